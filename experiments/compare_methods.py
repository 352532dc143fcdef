"""Compare every method on the embedded dataset: coresets vs trajectory matching, 3 student seeds each.

    python experiments/compare_methods.py --budgets 100 200 [--out outputs/compare] [hydra overrides ...]

Runs in one process (the dataset and caption embeddings are loaded once) through the same stage
functions as the CLI: buffer -> (pretrain) -> distill -> evaluate, then prints a Markdown table and
writes it with every results.json under --out. Frozen-backbone RepBlend uses
experiment=synscenes_repblend (its own pre-trained backbone and head-only teachers); its coreset
baselines under the same frozen backbone: --methods random --tag @convnet_heads experiment=synscenes_repblend.
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

COMPARED = ["random", "herding", "kcenter", "forgetting", "mtt_vl", "tesla_vl", "lors", "repblend"]


def config(method: str, budget: int, out: Path, extra: list[str]):
    overrides = [f"method={method}", f"budget={budget}", f"paths.output_dir={out}", "logger=csv", *extra]
    if method == "repblend":
        overrides = ["experiment=synscenes_repblend", *overrides]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("run", overrides=overrides)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, nargs="+", default=[100])
    ap.add_argument("--methods", nargs="+", default=COMPARED)
    ap.add_argument("--out", default="outputs/compare")
    ap.add_argument("--tag", default="", help="appended to method names in the table (e.g. @convnet_heads)")
    args, extra = ap.parse_known_args()
    out_root = Path(args.out)
    data = None
    rows = []
    for budget in args.budgets:
        for method in args.methods:
            out = out_root / f"b{budget}" / f"{method}{args.tag}"
            cfg = config(method, budget, out, extra)
            data = data or load_data(cfg)
            t0 = time.perf_counter()
            if cfg.model.image.get("checkpoint"):
                run_pretrain(cfg, data)
            run_buffer(cfg, data)  # reuses complete experts
            syn = run_distill(cfg, data, out / "synthetic")
            res = run_evaluate(cfg, syn, data, out)
            rows.append({**result_row(res), "method": method + args.tag})
            print(f"{method}{args.tag} b{budget}: r_mean {res['mean']['r_mean']:.2f} ± {res['std']['r_mean']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    table = markdown_table(rows)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "table.md").write_text(table + "\n")
    (out_root / "rows.json").write_text(json.dumps(rows, indent=1))
    print(table)


if __name__ == "__main__":
    main()
