"""Compare every method on the embedded dataset: coresets vs trajectory matching, 3 student seeds each.

    python experiments/compare_methods.py --budgets 100 200 [--out outputs/compare] [hydra overrides ...]

A row is `method` (the default model: ConvNet + MiniLM, everything trains) or `method@convnet_heads`
(the frozen, pre-trained ConvNet backbone; heads train). RepBlend is a frozen-backbone method, so it runs
as `repblend@convnet_heads` through experiment=synscenes_repblend, and its baselines are the coresets
under that same backbone (`random@convnet_heads`, ...). Runs in one process (the dataset and caption
embeddings are loaded once) through the same stage functions as the CLI: (pretrain) -> buffer -> distill
-> evaluate, then prints a Markdown table and writes it with every results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from mmdd.data.datamodule import load_data
from mmdd.evaluate.stage import run_evaluate
from mmdd.methods.stage import run_distill
from mmdd.paths import conf_dir
from mmdd.report.table import markdown_table, result_row
from mmdd.teachers.buffer import run_buffer
from mmdd.teachers.pretrain import run_pretrain

CORESETS = ["random", "herding", "kcenter", "forgetting"]
COMPARED = [
    *CORESETS,
    "mtt_vl",
    "tesla_vl",
    "lors",
    *(f"{c}@convnet_heads" for c in CORESETS),
    "repblend@convnet_heads",
]
# Rows whose method has its own experiment config on the embedded dataset.
EXPERIMENTS = {"repblend@convnet_heads": "synscenes_repblend"}


def overrides_for(row: str) -> list[str]:
    """Hydra overrides of one row: `method` or `method@model`."""
    method, _, model = row.partition("@")
    if row in EXPERIMENTS:
        return [f"experiment={EXPERIMENTS[row]}"]
    return [f"method={method}", *([f"model={model}"] if model else [])]


def config(row: str, budget: int, out: Path, extra: list[str]):
    overrides = [*overrides_for(row), f"budget={budget}", f"paths.output_dir={out}", "logger=csv", *extra]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("run", overrides=overrides)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, nargs="+", default=[100])
    ap.add_argument("--methods", nargs="+", default=COMPARED, help="rows: method or method@model")
    ap.add_argument("--out", default="outputs/compare")
    ap.add_argument("--tag", default="", help="appended to row names (e.g. @kl for an override variant)")
    args, extra = ap.parse_known_args()
    out_root = Path(args.out)
    data = None
    rows = []
    for budget in args.budgets:
        for row in args.methods:
            label = row + args.tag
            out = out_root / f"b{budget}" / label
            cfg = config(row, budget, out, extra)
            data = data or load_data(cfg)
            t0 = time.perf_counter()
            if cfg.model.image.get("checkpoint"):
                run_pretrain(cfg, data)  # reuses a finished checkpoint
            run_buffer(cfg, data)  # reuses complete experts
            syn = run_distill(cfg, data, out / "synthetic")
            res = run_evaluate(cfg, syn, data, out, label=label)
            rows.append(result_row(res))
            print(f"{label} b{budget}: r_mean {res['mean']['r_mean']:.2f} ± {res['std']['r_mean']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            out_root.mkdir(parents=True, exist_ok=True)
            (out_root / "rows.json").write_text(json.dumps(rows, indent=1))  # partial progress survives a stop
    table = markdown_table(rows)
    (out_root / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
