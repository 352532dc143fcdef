"""Collect results.json files (and W&B runs) into table cells: mean ± std over every student evaluation.

A *run* is one distillation (one seed) evaluated by K students; a *cell* is (dataset, method, budget,
protocol, variant), where the variant is what the run's overrides changed beyond seed/budget/method and
paths, so the rows of a sweep stay apart. Runs that died before writing results.json and runs with fewer
students than their protocol asked for are reported, not dropped silently.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mmdd.evaluate.retrieval import METRIC_KEYS

# Overrides that say which run of a cell this is, or where it wrote, not what was run.
NOT_VARIANT_KEYS = {"seed", "budget", "method", "logger", "hardware", "synthetic", "experiment_name", "buffer_dir",
                    "save_every", "evaluate", "diagnostics_every", "progress_bar", "log_every_n_steps", "log_pairs"}
NOT_VARIANT_PREFIXES = ("paths.", "hydra.", "logger.", "hardware.", "data.root", "hydra/")
STAGES_WITH_RESULTS = ("distill", "evaluate", "run")


@dataclass
class Cell:
    dataset: str
    method: str
    budget: int
    protocol: str
    variant: str = ""
    runs: list[dict] = field(default_factory=list)  # results.json contents

    @property
    def label(self) -> str:
        return f"{self.method} ({self.variant})" if self.variant else self.method

    @property
    def evaluations(self) -> list[dict]:
        return [s["test"] for r in self.runs for s in r.get("seeds", [])]

    def stats(self) -> tuple[dict, dict | None]:
        """Mean and sample std of each metric over all student evaluations of all runs."""
        evals = self.evaluations
        mean = {k: statistics.fmean(e[k] for e in evals) for k in METRIC_KEYS}
        std = {k: statistics.stdev(e[k] for e in evals) for k in METRIC_KEYS} if len(evals) > 1 else None
        return mean, std

    @property
    def seeds(self) -> str:
        """'runs×students', e.g. 3×3: distillation seeds times student seeds per run."""
        students = sorted({len(r.get("seeds", [])) for r in self.runs})
        per_run = str(students[0]) if len(students) == 1 else "/".join(map(str, students))
        return f"{len(self.runs)}×{per_run}"


@dataclass
class Collection:
    cells: list[Cell]
    problems: list[str]  # missing and partial runs, uneven seed counts


def variant_of(overrides: list[str]) -> str:
    def key(o: str) -> str:
        return o.lstrip("+~").split("=", 1)[0]

    kept = [o for o in overrides if key(o) not in NOT_VARIANT_KEYS and not key(o).startswith(NOT_VARIANT_PREFIXES)]
    return " ".join(sorted(kept))


def add_run(cells: dict, results: dict, where: str, problems: list[str]) -> None:
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
        variant_of(results.get("overrides", [])),
    )
    cells.setdefault(key, Cell(*key)).runs.append(results)


def stage_of(run_dir: Path) -> str | None:
    """The `stage` of a Hydra run directory (from its saved config), None if it is not one."""
    cfg = run_dir / ".hydra" / "config.yaml"
    if not cfg.exists():
        return None
    for line in cfg.read_text().splitlines():
        if line.startswith("stage:"):
            return line.split(":", 1)[1].strip()
    return None


def collect(roots: list[Path]) -> Collection:
    cells: dict[tuple, Cell] = {}
    problems: list[str] = []
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
            add_run(cells, results, str(path), problems)
        # Hydra run dirs of evaluating stages that never wrote results.json: crashed or killed runs.
        for hydra_dir in sorted(root.rglob(".hydra")):
            run_dir = hydra_dir.parent
            stage = stage_of(run_dir)
            if stage in STAGES_WITH_RESULTS and not any(run_dir.rglob("results.json")):
                if stage == "distill" and "evaluate: false" in (hydra_dir / "config.yaml").read_text():
                    continue
                problems.append(f"{run_dir}: a `mmdd {stage}` run without results.json (failed or still running)")
    ordered = sorted(cells.values(), key=lambda c: (c.dataset, c.budget, c.protocol, c.method, c.variant))
    counts = {len(c.runs) for c in ordered}
    if len(counts) > 1:
        most = max(counts)
        for c in ordered:
            if len(c.runs) < most:
                problems.append(f"{c.dataset} / {c.label} / budget {c.budget}: {len(c.runs)} run(s), others have {most}")
    return Collection(ordered, problems)


def collect_wandb(path_or_project: str) -> list[dict]:
    """results-like dicts from W&B evaluate runs: an offline directory (wandb/ or offline-run-*) or entity/project.

    Offline runs are read from their run directory (files/wandb-summary.json, files/config.yaml); online ones
    through the public API. Each run's summary carries test/* of one student, grouped back by its config.
    """
    runs = _offline_runs(Path(path_or_project)) if Path(path_or_project).exists() else _online_runs(path_or_project)
    grouped: dict[tuple, dict] = {}
    for cfg, summary in runs:
        if cfg.get("stage") not in STAGES_WITH_RESULTS or not any(k.startswith("test/") for k in summary):
            continue
        test = {k: float(summary[f"test/{k}"]) for k in METRIC_KEYS if f"test/{k}" in summary}
        if len(test) != len(METRIC_KEYS):
            continue
        method = (cfg.get("method") or {}).get("name", "?")
        key = (cfg.get("data", {}).get("name"), method, cfg.get("budget"), cfg.get("seed"),
               (cfg.get("protocol") or {}).get("name"))
        res = grouped.setdefault(key, {"dataset": key[0], "label": method, "method": method, "budget": key[2],
                                       "seed": key[3], "protocol": cfg.get("protocol") or {}, "seeds": []})
        res["seeds"].append({"test": test})
    return list(grouped.values())


def _offline_runs(root: Path):
    import yaml

    dirs = [root] if (root / "files").exists() else sorted(root.rglob("offline-run-*")) + sorted(root.rglob("run-*"))
    for d in dirs:
        summary_file, config_file = d / "files" / "wandb-summary.json", d / "files" / "config.yaml"
        if not summary_file.exists() or not config_file.exists():
            continue
        raw = yaml.safe_load(config_file.read_text()) or {}
        cfg = {k: (v.get("value") if isinstance(v, dict) and "value" in v else v) for k, v in raw.items()}
        yield cfg, json.loads(summary_file.read_text())


def _online_runs(project: str):
    import wandb

    for run in wandb.Api().runs(project):
        yield dict(run.config), dict(run.summary)
