"""Why the official scripts' logged matching losses differ from mmdd's by ~2e-4 in float32 while the sets agree.

The official loss is `(theta_N - theta*).dot(theta_N - theta*) / D` in float32 (distill_tesla_lors.py 464-467,
distill_repblend.py the same): a CPU float32 dot product accumulates sequentially, so over the 10-33 million matched
parameters it is off by about 1e-4 relative; mmdd's `pow(2).sum()` sums pairwise. Run:
`python experiments/parity/dot_rounding.py` (prints the relative error of each form against float64).
"""

import torch

# each modality's dot is taken separately; the text head is the same 768 -> 2304 ProjectionHead in both
SIZES = {"RepBlend image head": 10_626_048, "LoRS image side (nfnet_l0)": 32_769_488, "text head": 7_087_104}


def main() -> None:
    torch.manual_seed(0)
    print("| matched parameters | n | float32 dot | float32 pow(2).sum() |")
    print("|---|---|---|---|")
    for name, n in SIZES.items():
        x = torch.randn(n) * 1e-2 + 1e-3  # a parameter difference theta_N - theta*: small, not centred
        exact = x.double().dot(x.double())
        dot, pairwise = x.dot(x).double(), x.pow(2).sum().double()
        print(f"| {name} | {n:,} | {float((dot - exact) / exact):.1e} | {float((pairwise - exact) / exact):.1e} |")


if __name__ == "__main__":
    main()
