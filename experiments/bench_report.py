"""Speed and memory of every matching method, mmdd's path vs the reference loop, at budgets 100 and 500.

    python experiments/bench_report.py [--budgets 100 500] [--iterations 5] [--out outputs/bench] [overrides ...]

One process; per (method, budget) the same `run_bench` as `mmdd bench`. RepBlend runs on its frozen
pre-trained backbone (experiment=synscenes_repblend), the others on the default model. At budget 500 the inner
mini-batch is 100 pairs (the papers also use mini-batches at large budgets), so a CPU iteration stays short.
Writes bench.md / bench.json under --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from mmdd.bench.runner import bench_table, run_bench
from mmdd.data.splits import load_data
from mmdd.paths import conf_dir
from mmdd.stages.buffer import run_buffer
from mmdd.stages.pretrain import run_pretrain

METHODS = ["mtt_vl", "tesla_vl", "lors", "repblend"]


def config(method: str, budget: int, iterations: int, warmup: int, out: Path, extra: list[str]):
    overrides = ["experiment=synscenes_repblend"] if method == "repblend" else [f"method={method}"]
    overrides += [f"budget={budget}", f"bench.iterations={iterations}", f"bench.warmup={warmup}",
                  f"paths.output_dir={out}", "logger=none"]
    if budget > 200:
        overrides.append("method.batch_syn=100")
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("bench", overrides=[*overrides, *extra])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="outputs/bench")
    args, extra = ap.parse_known_args()
    root = Path(args.out)
    results, data = [], None
    for budget in args.budgets:
        for method in args.methods:
            out = root / f"{method}_b{budget}"
            cfg = config(method, budget, args.iterations, args.warmup, out, extra)
            data = data or load_data(cfg)  # all splits once: teachers/pre-training evaluate on val/test
            if cfg.model.image.get("checkpoint"):
                run_pretrain(cfg, data)  # reuses a finished checkpoint
            run_buffer(cfg, data)  # reuses complete experts
            results.append(run_bench(cfg, data, out))
            print(bench_table(results[-1:]), flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench.json").write_text(json.dumps(results, indent=1))
    table = bench_table(results)
    (root / "bench.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
