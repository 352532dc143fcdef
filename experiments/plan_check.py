"""`mmdd plan`'s memory estimate against the memory measured on this machine's CPU, for the same step.

For each configuration the plan's estimate (meta device, no compute) is compared with the peak resident set of
the real computation on CPU: building the model with random weights and running the same step (a teacher's
training step, one outer distillation iteration with the full unroll and with TESLA, a student's step), measured
by mmdd.bench.memory.PeakMemory (the kernel's high-water mark above the start, after freed heap is returned).

    python experiments/plan_check.py --out outputs/plan_check.md
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mmdd.bench.memory import PeakMemory
from mmdd.paths import conf_dir
from mmdd.plan import distill_step, meta_model, text_dim, tracked_peak, training_step

SIZES = {
    "32 px, budget 100": ["budget=100"],
    "64 px, budget 50": ["data.image_size=64", "budget=50"],
}


def measure(cfg, dim, make_step) -> tuple[float, float]:
    """(estimate MB, measured MB): the step on meta under the tracker (+ weights), and on CPU under PeakMemory."""
    meta = meta_model(cfg, dim)
    weights = sum(p.numel() for p in meta.parameters()) * 4
    estimate = (weights + tracked_peak(make_step(meta, "meta"))) / 2**20
    with PeakMemory(torch.device("cpu")) as pm:
        model = meta_model(cfg, dim, device="cpu")
        torch.manual_seed(0)
        make_step(model, "cpu")()
        del model
    return estimate, pm.peak_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/plan_check.md")
    args = ap.parse_args()
    rows = ["| size | stage | estimate MB | measured MB | estimate / measured |", "|---|---|---|---|---|"]
    for label, overrides in SIZES.items():
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("distill", overrides=overrides)
        dim = text_dim(cfg)
        method = instantiate(cfg.method)
        stages = {"teacher step (batch %d)" % cfg.teacher.batch_size:
                  lambda m, d: training_step(cfg, m, dim, int(cfg.teacher.batch_size), float(cfg.teacher.momentum),
                                             float(cfg.teacher.weight_decay), d)}
        for strategy in ("full", "tesla"):
            variant = copy.deepcopy(method)
            variant.settings.meta_gradient = strategy
            stages[f"distill iteration, {strategy}"] = lambda m, d, v=variant: distill_step(cfg, m, dim, v, d)
        for stage, make_step in stages.items():
            est, got = measure(cfg, dim, make_step)
            rows.append(f"| {label} | {stage} | {est:.0f} | {got:.0f} | {est / got:.2f} |")
            print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
