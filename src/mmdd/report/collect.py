"""Collect results.json files (and W&B runs) into table cells: mean ± std over every student evaluation.

A *run* is one distillation (one seed) evaluated by K students; a *cell* is (dataset, method, budget,
protocol, variant), where the variant is what the run's overrides changed beyond seed/budget/method and
paths, so the rows of a sweep stay apart. Runs that died before writing results.json and runs with fewer
students than their protocol asked for are reported, not dropped silently.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mmdd.evaluate.retrieval import METRIC_KEYS
from mmdd.stage_list import STAGES

log = logging.getLogger(__name__)

# Overrides that say which run of a cell this is, or where it wrote, not what was run.
NOT_VARIANT_KEYS = {"seed", "budget", "method", "logger", "hardware", "synthetic", "students", "experiment_name", "buffer_dir",
                    "save_every", "evaluate", "diagnostics_every", "progress_bar", "log_every_n_steps", "log_pairs",
                    "tuned_from", "protocol"}  # protocol: the group choice is the rows' protocol column
NOT_VARIANT_PREFIXES = ("paths.", "hydra.", "logger.", "hardware.", "trainer.", "data.root", "hydra/")
# The full-data row: the teachers of a trajectory store, each evaluated on test after its last epoch.
TEACHERS_LABEL = "full train (teachers)"
TEACHERS_PROTOCOL = "teacher"


def set_key(results: dict, index: int) -> str:
    """Which set a run's students trained on (its path; the run's index within its cell when it has none)."""
    return str(results.get("synthetic") or f"run{index}")


def student_model(results: dict) -> str:
    """The model a run's students trained (its config's model name; '?' for results without one)."""
    return str(((results.get("config") or {}).get("model") or {}).get("name", "?"))


SPREADS = ("evaluations", "sets")  # what a table's ± is the std over (Cell.stats)

@dataclass
class Cell:
    dataset: str
    method: str
    budget: int
    protocol: str
    variant: str = ""
    runs: list[dict] = field(default_factory=list)  # results.json contents

    @property
    def is_teachers(self) -> bool:
        return self.protocol == TEACHERS_PROTOCOL

    @property
    def label(self) -> str:
        return f"{self.method} ({self.variant})" if self.variant else self.method

    def runs_of(self, where: str) -> list[dict]:
        """The runs (results) of one set, as students_by_set names it."""
        return [r for i, r in enumerate(self.runs) if set_key(r, i) == where]

    def students_by_set(self) -> dict[str, dict[int, dict]]:
        """{synthetic set: {student seed: test metrics}}: the students of one set may come from several jobs
        (`students=` spreads them), and a student evaluated twice counts once."""
        out: dict[str, dict[int, dict]] = {}
        for i, r in enumerate(self.runs):
            per_set = out.setdefault(set_key(r, i), {})
            for s in r.get("seeds", []):
                per_set.setdefault(int(s.get("seed", len(per_set))), s["test"])
        return out

    def sets_at_chance(self) -> list[str]:
        """Sets whose every student (over all the jobs that evaluated them) scored at chance: the evaluation records
        the chance threshold of its test split in results.json (`chance`)."""
        out = []
        for where, students in self.students_by_set().items():
            runs = self.runs_of(where)
            thresholds = [(r.get("chance") or {}).get("threshold") for r in runs]
            if not runs or None in thresholds:
                continue  # an older results.json, or the teachers' row
            threshold = max(thresholds)
            if all(t["r_mean"] <= threshold for t in students.values()):
                out.append(f"{where}: all {len(students)} students score at chance (test r_mean <= {threshold:.2f}, "
                           f"chance {runs[0]['chance']['r_mean']:.2f}); the set taught them nothing")
        return out

    def incomplete_sets(self) -> list[str]:
        """Sets whose students were spread over jobs (`students=`) and some job is missing."""
        out = []
        for where, students in self.students_by_set().items():
            runs = self.runs_of(where)
            protocol = runs[0].get("protocol") if runs else None
            wanted = protocol.get("num_seeds") if isinstance(protocol, dict) else None
            spread = any(r.get("expected_seeds") != wanted for r in runs)
            if wanted and spread and len(students) < int(wanted):
                out.append(f"{where}: {len(students)} of {wanted} students evaluated (a `students=` job is missing)")
        return out

    @property
    def evaluations(self) -> list[dict]:
        return [t for students in self.students_by_set().values() for t in students.values()]

    def stats(self, spread: str = "evaluations") -> tuple[dict, dict | None]:
        """Mean of each metric over all student evaluations of all runs, and its sample std: over those evaluations
        (spread=evaluations: distillation and student seeds pooled), or over the sets' own means (spread=sets: how far
        one distillation seed lands from another; None below two sets)."""
        if spread not in SPREADS:
            raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
        evals = self.evaluations
        mean = {k: statistics.fmean(e[k] for e in evals) for k in METRIC_KEYS}
        if spread == "sets":
            sets = [list(students.values()) for students in self.students_by_set().values() if students]
            spread_of = [{k: statistics.fmean(e[k] for e in students) for k in METRIC_KEYS} for students in sets]
        else:
            spread_of = evals
        std = {k: statistics.stdev(e[k] for e in spread_of) for k in METRIC_KEYS} if len(spread_of) > 1 else None
        return mean, std

    def cost(self) -> dict | None:
        """Mean cost of the cell's sets (each set once, from the distill_stats its results carry): distillation
        seconds, the store's teacher training seconds (None when not recorded), devices; None when no set has one."""
        per_set: dict[str, dict] = {}
        for i, r in enumerate(self.runs):
            cost = (r.get("distill_stats") or {}).get("cost")
            if cost:
                per_set.setdefault(set_key(r, i), cost)
        if not per_set:
            return None
        costs = list(per_set.values())
        teachers = [c["teachers"]["seconds"] for c in costs]
        devices = {c["device"] for c in costs} | {c["teachers"]["device"] for c in costs if c["teachers"]["device"]}
        floats = {c["storage"]["floats"] for c in costs if c.get("storage")}
        return {"distill_seconds": statistics.fmean(c["distill_seconds"] for c in costs),
                "storage_floats": max(floats) if floats else None,
                "teacher_seconds": None if None in teachers else statistics.fmean(teachers),
                "teacher_experts": max(c["teachers"]["experts"] for c in costs),
                "devices": sorted(devices), "sets": len(costs)}

    @property
    def seeds(self) -> str:
        """'sets×students', e.g. 3×3: distilled sets (distillation seeds) times students per set."""
        by_set = self.students_by_set()
        students = sorted({len(v) for v in by_set.values()})
        per_set = str(students[0]) if len(students) == 1 else "/".join(map(str, students))
        return f"{len(by_set)}×{per_set}"


@dataclass
class Collection:
    cells: list[Cell]
    problems: list[str]  # missing and partial runs, uneven seed counts


def teacher_results(dataset: str, store: str, test_by_expert: dict[int, dict], train_images: int) -> dict:
    """A results-like dict of a store's teachers (one "student" per expert, keyed by its index), so the full-data
    row goes through the same cells as the distilled sets; `mmdd run` writes it into summary.json."""
    return {"kind": "teachers", "dataset": dataset, "label": TEACHERS_LABEL, "method": TEACHERS_LABEL,
            "budget": int(train_images), "protocol": {"name": TEACHERS_PROTOCOL}, "synthetic": str(store),
            "seeds": [{"seed": int(e), "test": m} for e, m in sorted(test_by_expert.items())]}


def variant_overrides(overrides: list[str]) -> set[str]:
    """The overrides that change what was run (not which seed, budget, method, or where it wrote)."""

    def key(o: str) -> str:
        return o.lstrip("+~").split("=", 1)[0]

    return {o for o in overrides if key(o) not in NOT_VARIANT_KEYS and not key(o).startswith(NOT_VARIANT_PREFIXES)}


def variant_of(overrides: list[str], common: set[str] = frozenset()) -> str:
    """What tells this run's row apart: its variant overrides minus those every collected run shares."""
    return " ".join(sorted(variant_overrides(overrides) - set(common)))


def add_run(cells: dict, results: dict, where: str, problems: list[str], common: set[str] = frozenset()) -> None:
    n, expected = len(results.get("seeds", [])), results.get("expected_seeds", results.get("num_seeds"))
    if n == 0:
        problems.append(f"{where}: results.json has no finished student; the run is not in the table")
        return
    if results.get("complete") is False or (expected and n < int(expected)):
        problems.append(f"{where}: partial, {n} of {expected} student seeds finished (rerun the same command to resume)")
    protocol = results.get("protocol", {})
    key = (
        str(results.get("dataset")),
        str(results.get("label") or results.get("method")),
        int(results.get("budget") or 0),
        str(protocol.get("name", "?") if isinstance(protocol, dict) else protocol),
        results["variant"] if "variant" in results else variant_of(results.get("overrides", []), common),
    )
    cells.setdefault(key, Cell(*key)).runs.append(results)


def writes_results(run_dir: Path) -> str | None:
    """The stage of a Hydra run directory whose stage should have written results.json, else None."""
    from omegaconf import OmegaConf

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.exists():
        return None
    config = OmegaConf.load(saved)
    stage = config.get("stage")
    if stage not in STAGES or not STAGES[stage].writes_results or (stage == "distill" and not config.get("evaluate", False)):
        return None
    return stage


def collect(roots: list[Path], extra: list[tuple[dict, str]] = ()) -> Collection:
    """Cells from every results.json under `roots` plus `extra` (results, where) pairs (e.g. from W&B)."""
    cells: dict[tuple, Cell] = {}
    problems: list[str] = []
    found: list[tuple[dict, str]] = list(extra)
    for root in roots:
        root = Path(root)
        if not root.exists():
            problems.append(f"{root}: does not exist")
            continue
        for path in sorted(root.rglob("results.json")):
            try:
                results = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                problems.append(f"{path}: unreadable ({exc}); skipped")
                continue
            found.append((results, str(path)))
        # `mmdd run` summaries carry the teachers of their store (the full-data row of their table.md).
        for path in sorted(root.rglob("summary.json")):
            try:
                teachers = json.loads(path.read_text()).get("teachers")
            except (OSError, json.JSONDecodeError, AttributeError) as exc:
                problems.append(f"{path}: unreadable ({exc}); skipped")
                continue
            if teachers and teachers.get("seeds"):
                found.append((teachers, str(path)))
        # Hydra run dirs of evaluating stages that never wrote results.json: crashed or killed runs.
        for hydra_dir in sorted(root.rglob(".hydra")):
            run_dir = hydra_dir.parent
            stage = writes_results(run_dir)
            if stage and not any(run_dir.rglob("results.json")):
                problems.append(f"{run_dir}: a `mmdd {stage}` run without results.json (failed or still running)")
    # Overrides shared by every run (e.g. a grid's common settings) do not tell rows apart.
    sets = [variant_overrides(r.get("overrides", [])) for r, _ in found if r.get("kind") != "teachers"]
    common = set.intersection(*sets) if sets else set()
    # Teachers of different stores (other models, teacher settings) are different rows, named by their store.
    stores = {r["synthetic"] for r, _ in found if r.get("kind") == "teachers"}
    for r, _ in found:
        if r.get("kind") == "teachers":
            r["variant"] = Path(r["synthetic"]).name if len(stores) > 1 else ""
    # W&B runs carry no overrides: where they hold students of several models (a set taught to other image encoders),
    # the model tells their rows apart, as a `model=` override does for results.json.
    from_wandb = [r for r, where in found if where.startswith("wandb:") and r.get("kind") != "teachers"]
    if len({student_model(r) for r in from_wandb}) > 1:
        for r in from_wandb:
            r["variant"] = f"model={student_model(r)}"
    for results, where in found:
        add_run(cells, results, where, problems, common)
    ordered = sorted(cells.values(), key=lambda c: (c.dataset, c.budget, c.protocol, c.method, c.variant))
    for c in ordered:
        problems.extend(c.incomplete_sets())
        problems.extend(c.sets_at_chance())
    distilled = [c for c in ordered if not c.is_teachers]  # a store's teachers are one row, not a set per seed
    counts = {len(c.students_by_set()) for c in distilled}
    if len(counts) > 1:
        most = max(counts)
        for c in distilled:
            if len(c.students_by_set()) < most:
                problems.append(f"{c.dataset} / {c.label} / budget {c.budget}: {len(c.students_by_set())} set(s), "
                                f"others have {most}")
    return Collection(ordered, problems)


def collect_wandb(path_or_project: str) -> list[dict]:
    """results-like dicts from W&B runs: an offline directory (wandb/ or offline-run-*) or entity/project.

    Offline runs are read from their .wandb files (mmdd.report.wandb_offline); online ones through the public API.
    A run's job type says what it is: an `evaluate` run is one student (its summary carries its test/*), grouped back
    by the set it trained on; a `buffer` run is one teacher, grouped by its store into the full-data row. The config's
    `stage` cannot tell them apart: inside `mmdd run` it is `run` for every one of them.
    """
    runs = _offline_runs(Path(path_or_project)) if Path(path_or_project).exists() else _online_runs(path_or_project)
    grouped: dict[tuple, dict] = {}
    teachers: dict[tuple, dict] = {}
    for job_type, recorded, summary in runs:  # recorded: the run's config as W&B kept it (a dict)
        test = {k: float(summary[f"test/{k}"]) for k in METRIC_KEYS if f"test/{k}" in summary}
        if len(test) != len(METRIC_KEYS):
            continue
        dataset = (recorded.get("data") or {}).get("name")
        if job_type == "buffer":
            run = recorded.get("teacher_run") or {}
            if "store" not in run:  # a teacher run of an older mmdd: which store it belongs to is unknown
                continue
            key = (dataset, run["store"])
            res = teachers.setdefault(key, teacher_results(dataset, run["store"], {}, run.get("train_images", 0)))
            res["seeds"].append({"seed": int(run["expert"]), "test": test})
            continue
        if job_type != "evaluate":
            continue
        # Students log which set they train on; the stage's own method/budget/seed are the fallback.
        syn = recorded.get("synthetic_set") or {}
        method = syn.get("method") or (recorded.get("method") or {}).get("name", "?")
        label = syn.get("label") or method
        budget, seed = syn.get("budget", recorded.get("budget")), syn.get("seed", recorded.get("seed"))
        # The student's model too: a set taught to other image encoders (cross-architecture) is a row per encoder.
        model = (recorded.get("model") or {}).get("name")
        key = (recorded.get("data", {}).get("name"), label, budget, seed, (recorded.get("protocol") or {}).get("name"),
               syn.get("path"), model)
        res = grouped.setdefault(key, {"dataset": key[0], "label": label, "method": method, "budget": budget,
                                       "seed": seed, "protocol": recorded.get("protocol") or {}, "seeds": [],
                                       "synthetic": syn.get("path"), "config": {"model": {"name": model}}})
        # With its seed, a student evaluated again (another job on the same set) counts once (Cell.students_by_set).
        student = recorded.get("student_seed")
        res["seeds"].append({"test": test} if student is None else {"seed": int(student), "test": test})
    return list(grouped.values()) + list(teachers.values())


def _offline_runs(root: Path):
    from mmdd.report.wandb_offline import read_run

    for f in sorted(root.rglob("run-*.wandb")):
        try:
            yield read_run(f)
        except (ValueError, OSError) as exc:
            log.warning("skipping %s: %s", f, exc)


def _online_runs(project: str):
    import wandb

    for run in wandb.Api().runs(project):
        yield run.job_type, dict(run.config), dict(run.summary)
