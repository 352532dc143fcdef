"""`mmdd table --by-student`: one row per distilled set, one column per student architecture (cross-architecture).

A set is taught to its own model by its distill job and to other image encoders by `mmdd evaluate -m
synthetic=<sets> model=<other>`; `mmdd table` keeps those as separate rows (their overrides differ). This view puts
them side by side: test r_mean of each set under each student model, with how many sets × students each cell pools,
and each other model's score as a fraction of the set's own (distilling) model's, the usual cross-architecture
question (does the set carry its gain to an encoder it was not distilled for?).
"""

from __future__ import annotations

import csv
import io
import statistics

from mmdd.report.collect import Cell, set_key, student_model
from mmdd.report.table import markdown_grid


def is_distill_job(results: dict) -> bool:
    """The distill job evaluates its own set with its own config: the two hashes agree only there."""
    own = results.get("synthetic_config_hash")
    return own is not None and own == results.get("config_hash")


# Overrides of a student's evaluation that its column already says (the model) or that only count its students.
NOT_COLUMN_KEYS = ("model", "protocol.num_seeds")


def column_of(cell: Cell, results: dict) -> str:
    """A run's column: its student model, and for an `mmdd evaluate` of a set, what else its overrides changed about
    the students (e.g. 'vit_tiny_minilm (protocol.lr=0.01 protocol.lr_source=fixed)'), so that students trained
    differently are not pooled. A distill job's variant is how the set was made: it names the row, not the column."""
    model = student_model(results)
    if is_distill_job(results):
        return model
    extra = [t for t in cell.variant.split() if t.lstrip("+~").split("=", 1)[0] not in NOT_COLUMN_KEYS]
    return f"{model} ({' '.join(extra)})" if extra else model


def pivot_by_student(cells: list[Cell]) -> tuple[list[dict], list[str]]:
    """(rows, columns). rows: {"dataset", "budget", "set", "home", "values": {column: {"r_mean", "sets", "students",
    "at_chance"}}}; a row is the sets that share a label (its distill job's row label: method and variant), so the
    seeds of one method pool as in `mmdd table`; a column is a student model as column_of names it. columns: the
    distilling models first, then the others, by name."""
    home_label: dict[str, str] = {}  # set path -> the label of its distill job's cell
    home_model: dict[str, str] = {}
    for cell in cells:
        for i, r in enumerate(cell.runs):
            if is_distill_job(r):
                where = set_key(r, i)
                home_label[where], home_model[where] = cell.label, student_model(r)
    # (dataset, budget, row label) -> model -> set -> {student seed: test metrics}, and the chance threshold seen
    grid: dict[tuple, dict[str, dict[str, dict[int, dict]]]] = {}
    thresholds: dict[tuple, list[float | None]] = {}
    homes: dict[tuple, set[str]] = {}
    for cell in cells:
        if cell.is_teachers:
            continue
        for i, r in enumerate(cell.runs):
            where = set_key(r, i)
            key = (cell.dataset, cell.budget, home_label.get(where, str(r.get("label") or cell.method)))
            model = column_of(cell, r)
            students = grid.setdefault(key, {}).setdefault(model, {}).setdefault(where, {})
            for s in r.get("seeds", []):
                students.setdefault(int(s.get("seed", len(students))), s["test"])
            thresholds.setdefault(key + (model,), []).append((r.get("chance") or {}).get("threshold"))
            if where in home_model:
                homes.setdefault(key, set()).add(home_model[where])
    distilling = sorted({m for models in homes.values() for m in models})
    others = sorted({m for by_model in grid.values() for m in by_model} - set(distilling))
    rows = []
    for key, by_model in sorted(grid.items()):
        values = {}
        for model, by_set in by_model.items():
            evals = [t["r_mean"] for students in by_set.values() for t in students.values()]
            if not evals:
                continue
            seen = thresholds[key + (model,)]
            threshold = None if None in seen else max(seen)
            values[model] = {"r_mean": statistics.fmean(evals), "sets": len(by_set),
                             "students": sorted({len(s) for s in by_set.values()}),
                             "at_chance": threshold is not None and all(v <= threshold for v in evals)}
        home = sorted(homes.get(key, ()))
        rows.append({"dataset": key[0], "budget": key[1], "set": key[2], "values": values,
                     "home": home[0] if len(home) == 1 else None})
    return rows, distilling + others


def _count(v: dict) -> str:
    return f"{v['sets']}×{'/'.join(map(str, v['students']))}"


def _ratio(row: dict, model: str) -> float | None:
    home = row["values"].get(row["home"]) if row["home"] else None
    other = row["values"].get(model)
    if home is None or other is None or model == row["home"] or home["r_mean"] <= 0:
        return None
    return other["r_mean"] / home["r_mean"]


def render_by_student(rows: list[dict], models: list[str], fmt: str = "md") -> str:
    """The pivot as Markdown (r_mean (sets×students), † at chance, and each model / the distilling model's ratio)
    or CSV (one line per row and model)."""
    ratio_models = [m for m in models if any(r["home"] and r["home"] != m for r in rows)]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["dataset", "budget", "set", "distilled_with", "student_model", "r_mean", "sets", "students",
                    "at_chance", "ratio_to_distilling_model"])
        for r in rows:
            for m in models:
                v = r["values"].get(m)
                if v is None:
                    continue
                ratio = _ratio(r, m)
                w.writerow([r["dataset"], r["budget"], r["set"], r["home"] or "", m, f"{v['r_mean']:.4f}", v["sets"],
                            "/".join(map(str, v["students"])), int(v["at_chance"]),
                            "" if ratio is None else f"{ratio:.4f}"])
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"--by-student writes md or csv, not {fmt!r}")
    head = ["dataset", "budget", "set"] + [f"{m} students" for m in models] + [f"{m} / distilling model"
                                                                           for m in ratio_models]
    body = []
    for r in rows:
        cells = [r["dataset"], str(r["budget"]), r["set"]]
        for m in models:
            v = r["values"].get(m)
            cells.append("–" if v is None else f"{v['r_mean']:.2f}{' †' if v['at_chance'] else ''} ({_count(v)})")
        for m in ratio_models:
            ratio = _ratio(r, m)
            cells.append("–" if ratio is None else f"{ratio:.2f}")
        body.append(cells)
    text = markdown_grid(head, body)
    text += ("\n\nTest r_mean of the val-selected checkpoint, mean over every student of the row's sets (sets × students "
             "per set); a set's row is named by its distill job. † every student at or below the chance threshold "
             "its evaluation recorded. `<model> / distilling model`: that column's r_mean over the r_mean of the "
             "model the sets were distilled with.")
    return text
