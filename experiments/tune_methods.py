"""The tuned comparison's searches (issue 29, section 2): every learned method searched alike, on val.

    python experiments/tune_methods.py search OUT [--trials 12] [--methods lors dm ...] [-- hydra overrides ...]
    python experiments/tune_methods.py summary OUT           # the chosen settings, a Markdown table and tuned.json

Per method, `--trials` Optuna TPE trials (conf/sweep/<method>.yaml, its sampler seeded) at budget 100 and
distillation seed 0; each trial's objective is its students' val r_mean (conf/sweep/_optuna.yaml: test is never read
while searching). Every method gets the same number of trials, failed ones (a set that diverged at the trial's outer
learning rates) counted as spent. Each method's study lives in OUT/<method>/study.db (sqlite): a search stopped
part-way resumes by running the same command, which counts each study's finished trials (complete or failed) and
launches only the rest, each launch in its own folder (OUT/<method>/launch_<k>/<trial>) so that no trial's folder is
reused by another. The stores the pending searches read are built first (`mmdd buffer`; MDM's from one shared
initialisation; `mmdd pretrain` and the frozen ConvNet's store for repblend and lors_heads; DM reads none). `summary` reads the
studies: per method the trials run, failed, their wall time, and the best trial's settings and val r_mean (the best of
the current search and the superseded ones: `chosen_in` names which), and writes
OUT/tuned.json, and names each chosen value still within a third of a decade of its log range's edge. The rule every
search follows (experiments/tuning_runs/README.md): such a range is extended by a decade on that side in
conf/sweep/<method>.yaml and the method searched again with the same number of trials (`search --supersede <method>`
moves its study and launches to OUT/<method>/superseded/<k>, whose trials count in the search's cost and the table's
trial column). `overrides OUT <search>` prints a search's chosen settings as the overrides the comparison's final
runs are launched with, and `mmdd table --tuned OUT/tuned.json` marks those rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Cheapest first, so a search stopped part-way has the most methods done (measured trial costs at budget 100).
METHODS = ("dm", "mdm", "repblend", "lors_heads", "ptm_st", "lors", "tesla_vl", "mtt_vl", "lors_infonce")
# What each method's store needs beyond the default model's (every stage of a method gets these overrides).
STORE = {"mdm": ["teacher.init=shared"]}
# The store each search reads, where it is not the default model's: DM reads none (random encoders every iteration),
# MDM-style the experts fine-tuned from one shared initialisation, the frozen pre-trained ConvNet's searches
# (`mmdd pretrain`, then its store) theirs.
READS = {"dm": None, "mdm": "shared", "repblend": "heads", "lors_heads": "heads"}
# the method a search tunes, where its name is not the method's (lors_infonce: LoRS's ablation with InfoNCE)
METHOD_OF = {"lors_heads": "lors", "lors_infonce": "lors"}


def mmdd() -> list[str]:
    return [os.environ.get("MMDD", sys.executable), *([] if "MMDD" in os.environ else ["-m", "mmdd.cli"])]


def study(folder: Path, method: str):
    """The method's study in folder/study.db (OUT/<method>, or one of its superseded searches), or None before its
    first trial."""
    import optuna

    db = folder / "study.db"
    if not db.exists():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=method, storage=f"sqlite:///{db}")
    except KeyError:  # the file exists, the study not yet
        return None


def superseded(out: Path, method: str) -> list[Path]:
    """The folders of the method's earlier searches, oldest first."""
    found = (out / method / "superseded").glob("[0-9]*")
    return sorted((p for p in found if p.name.isdigit()), key=lambda p: int(p.name))


def supersede(out: Path, method: str) -> None:
    """Keep the method's search so far as superseded (its range was extended): the next search starts afresh. A search
    already over the current ranges (its space.json) is resumed instead, so rerunning the same command is safe."""
    from mmdd.report.tuning import search_ranges

    folder = out / method
    saved = folder / "space.json"
    if saved.exists() and json.loads(saved.read_text()) == search_ranges(method):
        print(f"{method}: its search already runs over conf/sweep/{method}.yaml's current ranges; resuming it, not "
              "superseding", flush=True)
        return
    moving = [p for p in [folder / "study.db", saved, *folder.glob("launch_*")] if p.exists()]
    if not moving:
        return
    earlier = superseded(out, method)
    target = folder / "superseded" / str(int(earlier[-1].name) + 1 if earlier else 0)
    target.mkdir(parents=True)
    for path in moving:
        os.replace(path, target / path.name)  # same file system: a rename, nothing copied
    print(f"{method}: the search so far is kept in {target} (superseded)", flush=True)


def finished(s) -> list:
    """A study's trials that finished, complete or failed: a trial left RUNNING by a killed search is not counted (it
    is rerun)."""
    from optuna.trial import TrialState

    return [t for t in s.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]


def failures(trials) -> int:
    from optuna.trial import TrialState

    return sum(t.state == TrialState.FAIL for t in trials)


def distinct(trials) -> list:
    """The trials whose settings no earlier one of them ran. A search resumed before its seeded sampler's random start-up
    draws were done redrew them (fixed 2026-12-07: a resumed launch now seeds its sampler by the study's trial count):
    a repeat adds no setting to the search, so it is not counted as a trial, while its time still counts in the
    search's cost."""
    seen, kept = set(), []
    for t in trials:
        key = tuple(sorted(t.params.items()))
        if key not in seen:
            seen.add(key)
            kept.append(t)
    return kept


def spent(out: Path, method: str) -> tuple[int, int]:
    """(distinct trials finished, of which failed)."""
    s = study(out / method, method)
    done = distinct(finished(s)) if s is not None else []
    return len(done), failures(done)


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    code = subprocess.run(cmd).returncode
    if code:  # the stage said why; what is done stays done
        print(f"tune_methods: stopped: the command above exited {code}; fix what it says and run the same search "
              "again, which resumes", file=sys.stderr)
        sys.exit(code)


def search(out: Path, trials: int, methods: list[str], overrides: list[str], restart: list[str]) -> None:
    from mmdd.report.tuning import search_ranges
    from mmdd.utils.io import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    for method in restart:
        supersede(out, method)
    pending = []
    for method in methods:
        done, failed = spent(out, method)
        print(f"{method}: {done} of {trials} trials done ({failed} failed)", flush=True)
        if done < trials:
            pending.append((method, done))
    stores = {READS.get(m, "default") for m, _ in pending}  # built only where a pending search reads it
    if "default" in stores:
        run([*mmdd(), "buffer", *overrides, f"hydra.run.dir={out}/stages/buffer"])
    if "shared" in stores:
        run([*mmdd(), "buffer", *STORE["mdm"], *overrides, f"hydra.run.dir={out}/stages/buffer_shared"])
    if "heads" in stores:
        run([*mmdd(), "pretrain", *overrides, f"hydra.run.dir={out}/stages/pretrain"])
        run([*mmdd(), "buffer", "model=convnet_heads", *overrides, f"hydra.run.dir={out}/stages/buffer_heads"])
    for method, done in pending:
        folder = out / method
        launch = len(list(folder.glob("launch_*"))) if folder.exists() else 0
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "space.json").exists():  # the ranges this study is searched over (supersede compares them)
            atomic_write_json(folder / "space.json", search_ranges(method))
        # A resumed search's sampler is seeded by the trials its study holds: seeded as the first launch was, it would
        # redraw the random start-up settings already run. The first launch keeps the sweep's seed (conf/sweep/_optuna).
        s = study(folder, method)
        reseed = [f"hydra.sweeper.sampler.seed={len(s.trials)}"] if s is not None and s.trials else []
        run([*mmdd(), "distill", f"sweep={method}", "budget=100", "seed=0", *STORE.get(method, []), *overrides,
             f"hydra.sweeper.n_trials={trials - done}", f"hydra.sweeper.study_name={method}",
             f"hydra.sweeper.storage=sqlite:///{folder.resolve()}/study.db", *reseed,
             f"hydra.sweep.dir={folder}/launch_{launch}"])


def seconds(trials) -> float:
    """The wall time of these trials (each one's distillation and its students)."""
    return sum(t.duration.total_seconds() for t in trials if t.duration is not None)


def summary(out: Path) -> dict:
    """Per method: trials, failed, the best trial's settings and its val r_mean, what superseded searches spent and
    the chosen values still at a log range's edge."""
    from optuna.trial import TrialState

    from mmdd.report.tuning import at_edges, search_space

    tuned = {}
    for method in METHODS:
        s = study(out / method, method)
        if s is None:
            continue
        # every search of the method, oldest first, as (where, its finished trials); the current one last, as ""
        searches = [(f"superseded/{f.name}", finished(e)) for f in superseded(out, method)
                    if (e := study(f, method)) is not None] + [("", finished(s))]
        runs = [t for _, trials in searches for t in trials]  # every run trial, repeats included: the cost
        searches = [(where, distinct(trials)) for where, trials in searches]
        done, earlier = searches[-1][1], [t for _, trials in searches[:-1] for t in trials]
        entry = {"method": METHOD_OF.get(method, method), "trials": len(done), "failed": failures(done),
                 "superseded_trials": len(earlier), "repeated_trials": len(runs) - len(done) - len(earlier),
                 "search_seconds": seconds(runs)}
        # The choice is the best val trial of every search this method ran: a search over extended ranges is more
        # trials of one tuning budget, and may find less than the narrower one did (TPE is a sampler, not a bound).
        complete = [(t, where) for where, trials in searches for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            best, where = max(complete, key=lambda pair: pair[0].value)  # ties: the earliest search's
            entry.update(val_r_mean=best.value, settings=best.params, trial=best.number, chosen_in=where,
                         at_edges=at_edges(search_space(method), best.params))  # edges of the widest ranges
        tuned[method] = entry
    return tuned


def markdown(tuned: dict) -> str:
    from mmdd.report.table import searches_table
    from mmdd.report.tuning import Search

    return searches_table([Search.from_record(name, entry) for name, entry in tuned.items()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="run (or resume) every method's search")
    s.add_argument("out", type=Path)
    s.add_argument("--trials", type=int, default=12)
    s.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    s.add_argument("--supersede", nargs="+", choices=METHODS, default=[], metavar="METHOD",
                   help="first keep these methods' searches so far as superseded (their ranges were extended) and "
                        "search them afresh")
    m = sub.add_parser("summary", help="the chosen settings per method (writes OUT/tuned.json)")
    m.add_argument("out", type=Path)
    o = sub.add_parser("overrides", help="a search's chosen settings as hydra overrides (from OUT/tuned.json), one line")
    o.add_argument("out", type=Path)
    o.add_argument("search", choices=METHODS)
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []  # hydra overrides for every stage
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.command == "search":
        if args.trials < 1:
            parser.error("--trials must be >= 1")
        if set(args.supersede) - set(args.methods):
            parser.error("--supersede: only methods this search runs (add them to --methods)")
        search(args.out, args.trials, args.methods, overrides, args.supersede)
        return 0
    if args.command == "overrides":  # what the comparison's final runs are launched with (mmdd.report.tuning)
        from mmdd.report.tuning import load_searches

        found = [x for x in load_searches(args.out / "tuned.json") if x.name == args.search]
        if not found or not found[0].settings:
            print(f"{args.out}/tuned.json: no chosen settings for {args.search}", file=sys.stderr)
            return 1
        print(" ".join([found[0].marker, *found[0].overrides]))
        return 0
    tuned = summary(args.out)
    if not tuned:
        print(f"{args.out}: no study yet (run `search` first)", file=sys.stderr)
        return 1
    from mmdd.utils.io import atomic_write_json

    atomic_write_json(args.out / "tuned.json", tuned)
    print(markdown(tuned))
    return 0


if __name__ == "__main__":
    sys.exit(main())
