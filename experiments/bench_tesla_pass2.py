"""TESLA's second pass: double backward against forward mode (method.tesla_pass2), on the papers' model.

    python experiments/bench_tesla_pass2.py --image-size 32 --budgets 100 --out outputs/bench_tesla_pass2

The setting of experiments/bench_paper_model.py (nfnet_l0 with random weights, the 768-d BERT stand-in, syn_steps
8, mini-batches of 20; RepBlend on the frozen backbone + heads, LoRS training the whole nfnet_l0), mmdd's own path
with each product in interleaved rounds (one iteration of each per round, the same draws), median s/iter after the
warm-up, peak memory, and the largest relative difference of the first iteration's gradients (heads' dropout off,
the same global RNG). Writes tesla_pass2.md / .json under --out.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
from pathlib import Path

import torch
from hydra.utils import instantiate

from bench_paper_model import arguments, cells
from mmdd.bench.runner import GradientPath, Snapshots, gradient_agreement, interleaved_rounds
from mmdd.methods.context import MethodContext
from mmdd.methods.engine.outer_loop import outer_optimizer
from mmdd.methods.trajectory.objective import meta_gradient_for
from mmdd.models.functional import ParamLayout
from mmdd.utils.seed import seed_everything

PRODUCTS = ("double_backward", "forward")


def bench(cfg, data, rounds: int, warmup: int) -> dict:
    seed_everything(cfg.seed)
    device = torch.device("cpu")
    method = instantiate(cfg.method)
    context = MethodContext.of(cfg, data["train"], cfg.paths.output_dir)
    model = context.model.build()
    method.prepare_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    layout = ParamLayout.from_model(model)
    trajectories = context.store.open(model, method.settings.max_experts)
    syn0 = method.initial_set(context, method.settings.pairs(context.budget))
    paths = {}
    for product in PRODUCTS:
        settings = dataclasses.replace(method.settings, tesla_pass2=product)
        paths[product] = GradientPath(model, layout, settings, meta_gradient_for(settings, model), Snapshots(trajectories))

    def fresh():
        syn = copy.deepcopy(syn0)
        return syn, outer_optimizer(syn, method.settings)

    agreement = gradient_agreement(paths, fresh, cfg.seed, device, "forward", "double_backward", (model,))
    times, memory, _ = interleaved_rounds(paths, fresh, cfg.seed, device, warmup, rounds, method.settings.lr_min)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"method": str(cfg.method.name), "budget": int(cfg.budget), "pairs": len(syn0),
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
    results = []
    for cfg, data, _ in cells(args, extra):
        results.append(bench(cfg, data, args.iterations, args.warmup))
        print(table(results[-1:]), flush=True)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "tesla_pass2.json").write_text(json.dumps(results, indent=1))
    (root / "tesla_pass2.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
