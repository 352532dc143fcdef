"""The papers' model on the bench: nfnet_l0 (random weights) + the 768-d BERT stand-in, RepBlend and LoRS.

    python experiments/bench_paper_model.py --image-size 32 --budgets 100 500 --out outputs/bench_paper [--profile 2]
    python experiments/bench_paper_model.py --image-size 224 --precision 32-true bf16-mixed hardware=gpu   # on a GPU

Per (method, budget, precision) one `run_bench` (mmdd's path vs the independent port of the reference loop, in
interleaved rounds) with the papers' inner loop (syn_steps 8, mini-batches of 20, as RepBlend's scripts; LoRS's
paper cells use 20-40) on the generated dataset at --image-size, teachers 2 experts x 3 epochs (enough to draw
segments from; speed does not depend on how well they trained). RepBlend stands on a frozen random nfnet_l0
(model.image.init_seed pins it), LoRS trains the whole nfnet_l0. The budget counts S's storage (LoRS: budget - 1
pairs). Writes bench.md / bench.json (and profile_*.txt with --profile) under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from mmdd.bench.runner import bench_table, run_bench
from mmdd.bench.standin import write_bert_standin
from mmdd.data.splits import load_data
from mmdd.paths import conf_dir
from mmdd.stages.buffer import run_buffer

MODELS = {"repblend": "nfnet_bert_heads", "lors": "nfnet_bert"}


def config(method, budget, precision, args, out: Path, text: Path, extra, stage: str = "bench"):
    """The bench's config of one cell; stage="buffer": the teachers' stage with the same data, model and teachers."""
    overrides = [
        f"method={method}", f"model={MODELS[method]}", "model.image.pretrained=false",
        f"model.text.name_or_path={text}", f"data.image_size={args.image_size}",
        f"data.generate.num_train={args.num_train}", "data.generate.num_val=50", "data.generate.num_test=50",
        "teacher.num_experts=2", "teacher.epochs=3", "method.syn_steps=8", "method.batch_syn=20",
        "method.expert_epochs=1", "method.max_start_epoch=2", f"budget={budget}",
        f"bench.iterations={args.iterations}", f"bench.warmup={args.warmup}", f"bench.profile={args.profile}",
        f"hardware.precision={precision}", f"paths.output_dir={out}", "logger=none",
    ]
    if stage != "bench":
        overrides = [o for o in overrides if not o.startswith("bench.")]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(stage, overrides=[*overrides, *extra])


def cells(args, extra, precisions=("32-true",)):
    """Every (method, budget, precision) cell of the command line: its bench config, the data (loaded once) and the
    cell's output folder, after its teachers are trained (complete experts are reused)."""
    root = Path(args.out)
    text = root / "bert768"
    if not (text / "config.json").exists():
        write_bert_standin(text)
    data = None
    for method in args.methods:
        for budget in args.budgets:
            for precision in precisions:
                out = root / f"{method}_b{budget}_{precision}"
                cfg = config(method, budget, precision, args, out, text, extra)
                data = data or load_data(cfg)
                run_buffer(config(method, budget, precision, args, out, text, extra, "buffer"), data)
                yield cfg, data, out


def arguments(description: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--budgets", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--methods", nargs="+", default=list(MODELS))
    ap.add_argument("--precision", nargs="+", default=["32-true"])
    ap.add_argument("--num-train", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench_paper")
    return ap


def run_cells(args, extra, precisions, measure, table, name: str) -> list[dict]:
    """`measure(cfg, data, out)` for every cell, each row printed as it comes; then every row in <out>/<name>.json
    and the table in <out>/<name>.md."""
    results = []
    for cfg, data, out in cells(args, extra, precisions):
        results.append(measure(cfg, data, out))
        print(table(results[-1:]), flush=True)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.json").write_text(json.dumps(results, indent=1))
    (root / f"{name}.md").write_text(table(results) + "\n")
    print(table(results))
    return results


def main() -> None:
    args, extra = arguments().parse_known_args()
    run_cells(args, extra, args.precision,
              lambda cfg, data, out: {**run_bench(cfg, data, out), "image_size": args.image_size}, bench_table, "bench")


if __name__ == "__main__":
    main()
