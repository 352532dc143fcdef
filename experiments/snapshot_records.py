"""Copy the records of a compare_methods.sh run into experiments/methods_comparison_runs/ (what git keeps):

    python experiments/snapshot_records.py OUT/<group> experiments/methods_comparison_runs/<dest>

Keeps every job's results.json, .hydra/{config,overrides}.yaml, synthetic/manifest.json, the sweep's multirun.yaml,
summary.json and *.log (and a search's study.db, space.json and tuned.json: experiments/tune_methods.py); leaves out the synthetic sets' tensors, checkpoints, stores, W&B and CSV logs (too large for
git; the same command rebuilds them). `mmdd table` reads the copy as it reads the run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from mmdd.utils.io import atomic_write

# study.db and tuned.json: experiments/tune_methods.py's searches (each method's Optuna study, resumable from the copy;
# the chosen settings; space.json: the ranges a study was searched over)
KEEP_NAMES = {"results.json", "multirun.yaml", "summary.json", "study.db", "tuned.json", "space.json"}
KEEP_IN_PARENT = {".hydra": {"config.yaml", "overrides.yaml"}, "synthetic": {"manifest.json"}}
SKIP_DIRS = {"checkpoints", "wandb", "csv", "lightning_logs"}


def kept(rel: Path) -> bool:
    if SKIP_DIRS & set(rel.parts[:-1]):
        return False
    name, parent = rel.name, rel.parent.name
    return name in KEEP_NAMES or name.endswith(".log") or name in KEEP_IN_PARENT.get(parent, ())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="a group folder of a compare_methods.sh OUT (e.g. outputs/compare/dm)")
    ap.add_argument("dst", type=Path, help="where its records go")
    args = ap.parse_args(argv)
    if not args.src.is_dir():
        print(f"snapshot_records: {args.src} is not a directory", file=sys.stderr)
        return 2
    files = [p for p in sorted(args.src.rglob("*")) if p.is_file() and kept(p.relative_to(args.src))]
    for p in files:
        atomic_write(args.dst / p.relative_to(args.src), lambda tmp, src=p: shutil.copy2(src, tmp))
    print(f"{len(files)} files from {args.src} -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
