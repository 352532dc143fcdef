"""TESLA's second pass: double backward against forward mode (method.tesla_pass2), on the papers' model.

    python experiments/bench_tesla_pass2.py --image-size 32 --budgets 100 --out outputs/bench_tesla_pass2

The setting of experiments/bench_paper_model.py (nfnet_l0 with random weights, the 768-d BERT stand-in, syn_steps
8, mini-batches of 20; RepBlend on the frozen backbone + heads, LoRS training the whole nfnet_l0), mmdd's own path
with each product in interleaved rounds (one iteration of each per round, the same draws), median s/iter after the
warm-up, peak memory, and the largest relative difference of the first iteration's gradients (heads' dropout off,
the same global RNG). Writes tesla_pass2.md / .json under --out.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from bench_paper_model import arguments, run_cells
from mmdd.bench.runner import GradientPath, MatchingSetup, Snapshots, gradient_agreement, interleaved_rounds
from mmdd.methods.trajectory.objective import meta_gradient_for
from mmdd.utils.seed import seed_everything

PRODUCTS = ("double_backward", "forward")


def bench(cfg, data, out, rounds: int, warmup: int) -> dict:
    seed_everything(cfg.seed)
    device = torch.device("cpu")
    setup = MatchingSetup(cfg, data["train"], device, out)
    paths = {}
    for product in PRODUCTS:
        settings = dataclasses.replace(setup.method.settings, tesla_pass2=product)
        paths[product] = GradientPath(setup.model, setup.layout, settings, meta_gradient_for(settings, setup.model),
                                      Snapshots(setup.trajectories))
    agreement = gradient_agreement(paths, setup.fresh, cfg.seed, device, "forward", "double_backward", (setup.model,))
    times, memory, _ = interleaved_rounds(paths, setup.fresh, cfg.seed, device, warmup, rounds,
                                          setup.method.settings.lr_min)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"method": str(cfg.method.name), "budget": int(cfg.budget), "pairs": len(setup.syn0),
            "image_size": int(cfg.data.image_size), "sec_per_iter": med, "seconds": times, "peak_mem_mb": memory,
            "ratio": med["double_backward"] / med["forward"], "grad_max_rel_diff": max(agreement.values()),
            "grad_rel_diff": agreement, "torch": torch.__version__, "threads": torch.get_num_threads()}


def table(results: list[dict]) -> str:
    lines = ["| method | budget | s/iter double backward | s/iter forward | double / forward | per-round ratios | "
             "peak MB double / forward | max rel. grad diff |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, m = r["sec_per_iter"], r["peak_mem_mb"]
        per_round = ", ".join(f"{a / b:.2f}" for a, b in zip(r["seconds"]["double_backward"], r["seconds"]["forward"]))
        lines.append(f"| {r['method']} | {r['budget']} ({r['pairs']} pairs) | {s['double_backward']:.3f} | "
                     f"{s['forward']:.3f} | {r['ratio']:.2f}x | {per_round} | {m['double_backward']:.0f} / "
                     f"{m['forward']:.0f} | {r['grad_max_rel_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = arguments()
    ap.set_defaults(budgets=[100], out="outputs/bench_tesla_pass2")
    args, extra = ap.parse_known_args()
    run_cells(args, extra, ("32-true",), lambda cfg, data, out: bench(cfg, data, out, args.iterations, args.warmup),
              table, "tesla_pass2")


if __name__ == "__main__":
    main()
