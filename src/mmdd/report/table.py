"""Paper-style results tables: mean ± std over seeds."""

from __future__ import annotations

from mmdd.evaluate.retrieval import METRIC_KEYS

HEADERS = {"ir1": "IR@1", "ir5": "IR@5", "ir10": "IR@10", "tr1": "TR@1", "tr5": "TR@5", "tr10": "TR@10", "r_mean": "r_mean"}


def format_cell(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(rows: list[dict]) -> str:
    """rows: {"method", "budget", "n", "mean": {...}, "std": {...}} -> a Markdown table."""
    head = ["method", "budget", "seeds"] + [HEADERS[k] for k in METRIC_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        cells = [str(r["method"]), str(r.get("budget", "")), str(r.get("n", ""))]
        cells += [format_cell(r["mean"][k], r.get("std", {}).get(k)) for k in METRIC_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def result_row(results: dict) -> dict:
    """A table row from an evaluation's results.json contents."""
    return {"method": results["label"], "budget": results["budget"], "n": results["num_seeds"],
            "mean": results["mean"], "std": results["std"]}
