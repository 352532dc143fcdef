"""Paper-style results tables: mean ± std over seeds, as Markdown, LaTeX or CSV."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mmdd.evaluate.retrieval import METRIC_KEYS

HEADERS = {"ir1": "IR@1", "ir5": "IR@5", "ir10": "IR@10", "tr1": "TR@1", "tr5": "TR@5", "tr10": "TR@10", "r_mean": "r_mean"}
FORMATS = ("md", "latex", "csv")
PAPER_ORDER = ("mtt_vl", "lors", "repblend")  # publication order


def format_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def format_cost(cost: dict | None) -> str:
    """'12.3 min + 4.1 min teachers (5)': mean distillation wall time of the cell's sets, plus the training of the
    store experts they read (how many), '?' where not recorded; '–' for rows without a cost (the teachers' row)."""
    if not cost:
        return "–"
    text = format_duration(cost["distill_seconds"])
    if cost["teacher_experts"]:
        teachers = "?" if cost["teacher_seconds"] is None else format_duration(cost["teacher_seconds"])
        text += f" + {teachers} teachers ({cost['teacher_experts']})"
    return text


def format_storage(cost: dict | None) -> str:
    """The set's size in floats (images + texts + S + step sizes), e.g. '346k'."""
    n = (cost or {}).get("storage_floats")
    if n is None:
        return "–"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def format_cell(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_grid(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def markdown_table(rows: list[dict]) -> str:
    """rows: {"method", "budget", "n", "mean": {...}, "std": {...}} -> a Markdown table."""
    head = ["method", "budget", "seeds"] + [HEADERS[k] for k in METRIC_KEYS]
    return markdown_grid(head, [[str(r["method"]), str(r.get("budget", "")), str(r.get("n", ""))]
                      + [format_cell(r["mean"][k], r.get("std", {}).get(k)) for k in METRIC_KEYS] for r in rows])


def result_row(results: dict) -> dict:
    """A table row from an evaluation's results.json contents."""
    return {"method": results["label"], "budget": results["budget"], "n": results["num_seeds"],
            "mean": results["mean"], "std": results["std"]}


# --- `mmdd table`: rows from collected cells, best per column, paper anchors ----------------------
def rows_from_cells(cells, spread: str = "evaluations", searches=None) -> list[dict]:
    """`searches` (mmdd.report.tuning.load_searches): rows run at a search's chosen settings carry it as "tuning"."""
    from mmdd.report.tuning import search_of

    rows = []
    tunings = [search_of(c.method, c.runs, searches) if searches else None for c in cells]
    # a tuned row is named by its method and what runs on top of its search's settings; where that name is an untuned
    # row's of the same dataset, budget and protocol, it says "tuned"
    untuned = {(c.dataset, c.label, c.budget, c.protocol) for c, t in zip(cells, tunings) if t is None}
    for c, tuning in zip(cells, tunings):
        mean, std = c.stats(spread)
        label = c.label
        if tuning is not None:
            label = tuning.label(c.method, c.variant)
            if (c.dataset, label, c.budget, c.protocol) in untuned:
                label = tuning.label(c.method, c.variant, marked=True)
        rows.append({"dataset": c.dataset, "method": label,
                     "key": c.method, "budget": c.budget, "protocol": c.protocol, "seeds": c.seeds, "mean": mean,
                     "std": std, "spread": spread, "cost": c.cost(), "tuning": tuning, "cell": c})
    return rows


SPREAD_NOTES = {"evaluations": "±: sample std over every student evaluation of the row (seeds = sets × students)",
                "sets": "±: sample std of the sets' means, i.e. across distillation seeds (each set's students "
                        "averaged first; no ± with one set)"}


def mark_best(rows: list[dict]) -> None:
    """row["best"] = the metrics where the row has the highest mean among rows of its (dataset, budget, protocol)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["budget"], r["protocol"]), []).append(r)
    for group in groups.values():
        for r in group:
            r["best"] = set()
        if len(group) < 2:
            continue
        for k in METRIC_KEYS:
            top = max(r["mean"][k] for r in group)
            for r in group:
                if r["mean"][k] == top:
                    r["best"].add(k)


def load_anchors(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return json.loads(path.read_text()).get("cells", [])


def anchors_for(row: dict, anchors: list[dict], dataset: str | None) -> list[dict]:
    """The papers' numbers for the row's cell (method, budget, and `dataset` or the row's own dataset)."""
    want = dataset or row["dataset"]
    found = [a for a in anchors if a.get("method") == row["key"] and int(a.get("budget", -1)) == int(row["budget"])
             and a.get("dataset") == want]
    # One line per cell: the method's own paper, else the earliest paper that reports it (later ones copy it).
    found.sort(key=lambda a: (a.get("paper") != row["key"], PAPER_ORDER.index(a["paper"]) if a.get("paper") in PAPER_ORDER else 99))
    return found[:1]


def _anchor_label(a: dict) -> str:
    return f"↳ {a['method']} as reported ({a['paper']}, {a['dataset']})"


def render(rows: list[dict], fmt: str = "md", anchors: list[dict] | None = None, anchor_dataset: str | None = None,
           searched: bool = False) -> str:
    """`searched`: the rows were matched against search records (`--tuned`): md and csv add the tuning columns."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    mark_best(rows)
    anchors = anchors or []
    if fmt == "latex":
        return _latex(rows, anchors, anchor_dataset)
    return {"md": _markdown, "csv": _csv}[fmt](rows, anchors, anchor_dataset, searched)


def _value(r: dict, k: str, bold=lambda s: s) -> str:
    s = format_cell(r["mean"][k], (r.get("std") or {}).get(k))
    return bold(s) if k in r.get("best", ()) else s


def anchor_metric(a: dict, k: str) -> float | None:
    """A paper number; r_mean, which the papers do not print, is the mean of the six recalls."""
    v = a.get(k)
    recalls = [a.get(m) for m in METRIC_KEYS if m != "r_mean"]
    if v is None and k == "r_mean" and None not in recalls:
        v = sum(recalls) / len(recalls)
    return v


def _anchor_value(a: dict, k: str) -> str:
    v = anchor_metric(a, k)
    return "–" if v is None else f"{v:.2f}"


def _tuning_cells(r: dict) -> list[str]:
    """With --tuned: the search behind the row (trials, the chosen trial's val r_mean) and its cost, or why none."""
    t = r.get("tuning")
    if t is not None:
        return [t.cell(), format_duration(t.search_seconds)]
    return ["not tuned", "–"]


def searches_table(searches: list) -> str:
    """Searches (mmdd.report.tuning.Search) as Markdown, one line each: trials (failed; superseded), the chosen trial's
    val r_mean, the cost of all its trials, its chosen settings and any still at a log range's edge. `tune_methods.py
    summary` prints it; `mmdd table --tuned` puts the searches its rows ran under the table."""
    lines = ["| search | trials (failed) | best val r_mean | search cost | chosen settings | at a range edge |",
             "|---|---|---|---|---|---|"]
    for t in searches:
        val = "–" if t.val_r_mean is None else f"{t.val_r_mean:.2f}" + (f" ({t.chosen_in})" if t.chosen_in else "")
        earlier = f" +{t.superseded_trials} superseded" if t.superseded_trials else ""
        earlier += f" +{t.repeated_trials} repeated" if t.repeated_trials else ""
        lines.append(f"| {t.name} | {t.trials} ({t.failed}){earlier} | {val} | {format_duration(t.search_seconds)} | "
                     f"{' '.join(t.overrides) or '–'} | {', '.join(t.at_edges) or '–'} |")
    return "\n".join(lines)


def _markdown(rows, anchors, anchor_dataset, searched: bool) -> str:
    head = (["dataset", "method", "budget", "protocol", "seeds"] + [HEADERS[k] for k in METRIC_KEYS] + ["cost", "floats"]
            + (["tuned on val", "search cost"] if searched else []))
    body = []
    for r in rows:
        body.append([r["dataset"], r["method"], str(r["budget"]), r["protocol"], r["seeds"]]
                    + [_value(r, k, lambda s: f"**{s}**") for k in METRIC_KEYS]
                    + [format_cost(r.get("cost")), format_storage(r.get("cost"))]
                    + (_tuning_cells(r) if searched else []))
        for a in anchors_for(r, anchors, anchor_dataset):
            body.append(["", f"*{_anchor_label(a)}*", str(a["budget"]), "paper", ""] + [_anchor_value(a, k) for k in METRIC_KEYS]
                        + ["", ""] + (["", ""] if searched else []))
    text = markdown_grid(head, body)
    spreads = sorted({r["spread"] for r in rows if "spread" in r})
    if spreads:
        text += "\n\n" + "; ".join(SPREAD_NOTES[s] for s in spreads)
    devices = sorted({d for r in rows for d in ((r.get("cost") or {}).get("devices") or [])})
    if devices:
        text += (f"\n\ncost: mean wall time to distil one set, + training the store experts it read; measured on "
                 f"{'; '.join(devices)}. floats: what one set stores (images, texts, S, step sizes)")
    if searched:
        text += ("\n\ntuned on val: the row runs the settings its method's search chose, which its name leaves out; "
                 "overrides in a tuned row's name run on top of them (an ablation, a variant) and were never searched "
                 "themselves. The cell: the trials the search ran (failed ones counted; '+N over narrower ranges': an "
                 "earlier search superseded because its choice lay at a log range's edge, the range then extended a "
                 "decade; the chosen trial is the best of all of them, '(a trial over the narrower ranges)' where an "
                 "earlier one won), the chosen trial's students' val r_mean (test never read while searching), and any choice "
                 "still within a third of a decade of its range's edge. search cost: the wall time of all its trials, "
                 "superseded ones included. not tuned: no search chose the row's settings")
        used = list({id(r["tuning"]): r["tuning"] for r in rows if r.get("tuning") is not None}.values())
        if used:
            text += "\n\nThe settings each search chose (what its tuned rows ran):\n\n" + searches_table(used)
    return text


def _latex(rows, anchors, anchor_dataset) -> str:
    def esc(s: str) -> str:
        return str(s).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")

    cols = "llrll" + "r" * len(METRIC_KEYS) + "l"
    head = ["Dataset", "Method", "Budget", "Protocol", "Seeds"] + [HEADERS[k] for k in METRIC_KEYS] + ["Cost"]
    lines = [rf"\begin{{tabular}}{{{cols}}}", r"\toprule", " & ".join(esc(h) for h in head) + r" \\", r"\midrule"]
    for r in rows:
        vals = [_value(r, k, lambda s: rf"\textbf{{{s}}}").replace("±", r"$\pm$") for k in METRIC_KEYS]
        lines.append(" & ".join([esc(r["dataset"]), esc(r["method"]), str(r["budget"]), esc(r["protocol"]),
                                 esc(r["seeds"]).replace("×", r"$\times$"), *vals, esc(format_cost(r.get("cost")))])
                     + r" \\")
        for a in anchors_for(r, anchors, anchor_dataset):
            label = rf"\textit{{{esc(a['paper'])} ({esc(a['dataset'])}), reported}}"
            lines.append(" & ".join(["", label, str(a["budget"]), "paper", "", *(_anchor_value(a, k) for k in METRIC_KEYS),
                                     ""]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {SPREAD_NOTES[s]}" for s in sorted({r["spread"] for r in rows if "spread" in r})]
    return "\n".join(lines)


def _csv(rows, anchors, anchor_dataset, searched: bool) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    tuning_columns = ["tuned_search", "tuned_trials", "tuned_failed", "tuned_superseded_trials", "tuned_repeated_trials",
                      "tuned_val_r_mean", "tuned_chosen_in", "tuned_at_edges", "search_seconds"]
    w.writerow(["source", "dataset", "method", "budget", "protocol", "seeds",
                *(f"{k}_mean" for k in METRIC_KEYS), *(f"{k}_std" for k in METRIC_KEYS), "std_over", "best",
                *COST_COLUMNS, *(tuning_columns if searched else [])])
    for r in rows:
        std = r.get("std") or {}
        t = r.get("tuning")
        tuning = ([t.name, t.trials, t.failed, t.superseded_trials, t.repeated_trials,
                   "" if t.val_r_mean is None else f"{t.val_r_mean:.4f}", t.chosen_in, ";".join(t.at_edges),
                   f"{t.search_seconds:.1f}"] if t is not None else [""] * len(tuning_columns)) if searched else []
        w.writerow(["mmdd", r["dataset"], r["method"], r["budget"], r["protocol"], r["seeds"],
                    *(f"{r['mean'][k]:.4f}" for k in METRIC_KEYS), *(f"{std[k]:.4f}" if k in std else "" for k in METRIC_KEYS),
                    r.get("spread", ""), ";".join(k for k in METRIC_KEYS if k in r.get("best", ())), *_cost_fields(r.get("cost")),
                    *tuning])
        for a in anchors_for(r, anchors, anchor_dataset):
            w.writerow([f"paper:{a['paper']}", a["dataset"], a["method"], a["budget"], "paper", "",
                        *("" if a.get(k) is None else a[k] for k in METRIC_KEYS), *([""] * len(METRIC_KEYS)), "", "",
                        *([""] * len(COST_COLUMNS)), *([""] * len(tuning_columns) if searched else [])])
    return buf.getvalue()


COST_COLUMNS = ("distill_seconds", "teacher_seconds", "teacher_experts", "devices", "storage_floats")


def _cost_fields(cost: dict | None) -> list[str]:
    """A row's COST_COLUMNS, in order."""
    if not cost:
        return [""] * len(COST_COLUMNS)
    teachers = "" if cost["teacher_seconds"] is None else f"{cost['teacher_seconds']:.1f}"
    floats = "" if cost.get("storage_floats") is None else str(cost["storage_floats"])
    return [f"{cost['distill_seconds']:.1f}", teachers, str(cost["teacher_experts"]), ";".join(cost["devices"]), floats]
