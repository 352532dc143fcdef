"""`mmdd table` and `mmdd export`: commands over finished artifacts (argparse, no Hydra)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmdd.errors import MmddError
from mmdd.paths import repo_root
from mmdd.stage_list import STAGES

DEFAULT_ANCHORS = "experiments/paper_anchors.json"


def table(argv: list[str]) -> int:
    from mmdd.report.collect import SPREADS, collect, collect_wandb
    from mmdd.report.table import FORMATS, load_anchors, render, rows_from_cells

    ap = argparse.ArgumentParser(prog="mmdd table", description="Collect results.json files into a paper-style table: "
                                 "mean ± std over all student evaluations of all runs of a cell, best per column in bold.")
    ap.add_argument("dirs", nargs="*",
                    help="directories searched for results.json (default: outputs, unless --wandb is given)")
    ap.add_argument("--format", "-f", choices=FORMATS, default="md")
    ap.add_argument("--out", "-o", help="also write the table to this file")
    ap.add_argument("--anchors", nargs="?", const="", metavar="DATASET",
                    help="add the papers' numbers for each cell (optionally those of DATASET, e.g. flickr30k, "
                         "beside a run on another dataset)")
    ap.add_argument("--anchors-file", default=None, help=f"paper numbers (default: {DEFAULT_ANCHORS})")
    ap.add_argument("--plot", metavar="PNG", help="also plot test r_mean against budget per method (error bars: std)")
    ap.add_argument("--plot-x", choices=("budget", "time"), default="budget",
                    help="the plot's x axis: the budget, or the wall time to distil one set (one point per method and "
                         "budget)")
    ap.add_argument("--spread", choices=SPREADS, default="evaluations",
                    help="what ± (and the plot's error bars) is the std over: every student evaluation of a row "
                         "(default), or the sets' means, i.e. across distillation seeds")
    ap.add_argument("--wandb", action="append", default=[], metavar="DIR_OR_PROJECT",
                    help="also read W&B runs: an offline wandb/ directory, or entity/project through the API")
    ap.add_argument("--tuned", metavar="JSON", help="a search record (experiments/tune_methods.py summary: tuned.json): "
                    "mark the rows run at a search's chosen settings, with its trials, val score and cost")
    ap.add_argument("--versus", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="after the table, row A against row B (names as printed) at each budget and protocol both "
                         "have: the test r_mean difference per distillation seed, its mean ± std, whether every seed "
                         "agrees; repeatable")
    ap.add_argument("--by-student", action="store_true",
                    help="cross-architecture view: one row per set (named by its distill job), one column per student "
                         "model (test r_mean), and each model's fraction of the distilling model's score (md or csv)")
    args = ap.parse_args(argv)
    if args.by_student and (args.plot or args.anchors is not None or args.format == "latex" or args.versus):
        ap.error("--by-student writes md or csv, without --plot, --anchors or --versus")
    if args.versus and args.format != "md":
        ap.error("--versus writes Markdown (--format md)")

    from_wandb = [(res, f"wandb:{source}") for source in args.wandb for res in collect_wandb(source)]
    dirs = args.dirs or ([] if args.wandb else ["outputs"])
    collection = collect([Path(d) for d in dirs], from_wandb)
    if not collection.cells:
        print(f"mmdd table: error: no results.json (or W&B runs) under {' '.join(dirs + args.wandb)}", file=sys.stderr)
        for p in collection.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    anchors = []
    if args.anchors is not None:
        anchor_file = Path(args.anchors_file) if args.anchors_file else repo_root() / DEFAULT_ANCHORS
        anchors = load_anchors(anchor_file)
        if not anchors:
            print(f"mmdd table: note: no paper numbers in {anchor_file}", file=sys.stderr)
    if args.by_student:
        from mmdd.report.students import pivot_by_student, render_by_student

        text = render_by_student(*pivot_by_student(collection.cells), args.format)
    else:
        from mmdd.report.tuning import load_searches

        try:
            searches = load_searches(args.tuned) if args.tuned else None
        except MmddError as exc:
            print(f"mmdd table: error: {exc}", file=sys.stderr)
            return 2
        rows = rows_from_cells(collection.cells, args.spread, searches)
        text = render(rows, args.format, anchors, args.anchors or None, searched=searches is not None)
        if args.versus:
            from mmdd.report.orderings import render_versus, versus

            try:
                comparisons = [v for a, b in args.versus for v in versus(rows, a, b)]
            except MmddError as exc:
                print(f"mmdd table: error: {exc}", file=sys.stderr)
                return 2
            text += "\n\n" + render_versus(comparisons)
    print(text)
    if args.plot:
        from mmdd.report.plots import recall_vs_budget, recall_vs_time

        draw = recall_vs_time if args.plot_x == "time" else recall_vs_budget
        print(f"plot: {draw(rows, Path(args.plot))}", file=sys.stderr)
    if args.out:
        from mmdd.utils.io import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")
    for p in collection.problems:
        print(f"mmdd table: {p}", file=sys.stderr)
    return 0


def export(argv: list[str]) -> int:
    from mmdd.synthetic.export import export_synthetic

    ap = argparse.ArgumentParser(prog="mmdd export", description="Write a synthetic set as a plain dataset: PNG images, "
                                 "captions.jsonl (nearest real caption per text), text embeddings and the similarity matrix.")
    ap.add_argument("synthetic", help="a synthetic-set directory written by mmdd distill")
    ap.add_argument("out", help="the directory to write (must not exist, or be empty)")
    args = ap.parse_args(argv)
    try:
        out = export_synthetic(Path(args.synthetic), Path(args.out))
    except MmddError as exc:
        print(f"mmdd export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported to {out}; read it as a training split with data=pairs_table data.root={out} "
          "data.ann_files.train=captions.jsonl")
    phases = json.loads((out / "export.json").read_text()).get("earlier_phases")
    if phases:
        print(f"a phased set: its earlier phases are exports of their own in {', '.join(phases)} (train on them first, "
              "in order)")
    return 0


def plan(argv: list[str]) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from mmdd.paths import conf_dir
    from mmdd.config_schema import check_stage_settings
    from mmdd.plan import format_plan, make_plan

    ap = argparse.ArgumentParser(prog="mmdd plan", description="Parameter counts, trajectory store size and estimated "
                                 "peak device memory per stage for a composed config, without running anything.")
    ap.add_argument("stage", choices=[s.name for s in STAGES.values() if s.plannable], help="the stage whose config to compose")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for `mmdd <stage>`")
    args = ap.parse_args(argv)
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose(args.stage, overrides=args.overrides, return_hydra_config=False)
        check_stage_settings(cfg)  # as a stage does before it starts
        print(format_plan(cfg, make_plan(cfg)))
    except (MmddError, HydraException) as exc:
        print(f"mmdd plan: error: {exc}", file=sys.stderr)
        return 2
    return 0
