"""Figures saved as PNG beside the results (and logged to W&B by the stages that make them)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mmdd.data.transforms import denormalize  # noqa: E402
from mmdd.utils.io import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def error_bars(rows: list[dict]) -> str:
    """What the error bars are, for an axis label."""
    spreads = {r.get("spread") for r in rows} - {None}
    what = {"evaluations": "std over all students", "sets": "std over distillation seeds"}
    return f"; bars: {what[spreads.pop()]}" if len(spreads) == 1 else ""


def recall_vs_budget(rows: list[dict], path: Path, metric: str = "r_mean") -> Path:
    """One line per (dataset, method) over budgets, error bars = the rows' std (`mmdd table --spread`); the teachers'
    full-data rows are horizontal dashed lines (their budget is the whole train split, off the budgets' scale)."""
    from mmdd.report.collect import TEACHERS_PROTOCOL

    fig, ax = plt.subplots(figsize=(5.5, 4))
    series: dict[str, list[tuple[int, float, float]]] = {}
    full = [r for r in rows if r.get("protocol") == TEACHERS_PROTOCOL]
    rows = [r for r in rows if r.get("protocol") != TEACHERS_PROTOCOL] or rows
    for r in full:
        ax.axhline(r["mean"][metric], linestyle="--", color="grey", linewidth=1,
                   label=f"{r['method']} ({r['dataset']}, {r['budget']} images)")
    for r in rows:
        name = r["method"] if len({x["dataset"] for x in rows}) == 1 else f"{r['method']} ({r['dataset']})"
        series.setdefault(name, []).append((int(r["budget"]), r["mean"][metric], (r.get("std") or {}).get(metric, 0.0)))
    for name, pts in sorted(series.items()):
        pts.sort()
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.minorticks_off()  # only the budgets as ticks
    budgets = sorted({int(r["budget"]) for r in rows})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget (pairs)")
    ax.set_ylabel(f"test {metric} (%){error_bars(rows)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def recall_vs_time(rows: list[dict], path: Path, metric: str = "r_mean") -> Path:
    """One point per (method, budget) at the mean wall time to distil one of its sets (log scale; teacher training
    not included), error bars = the rows' std (`mmdd table --spread`); a method's budgets joined by a line. Rows without
    a recorded cost (the teachers, older results) are left out, and said so in the title."""
    fig, ax = plt.subplots(figsize=(9, 4.8))
    timed = [r for r in rows if (r.get("cost") or {}).get("distill_seconds") is not None]
    series: dict[str, list[tuple[float, float, float, int]]] = {}
    for r in timed:
        name = r["method"] if len({x["dataset"] for x in timed}) == 1 else f"{r['method']} ({r['dataset']})"
        series.setdefault(name, []).append((max(r["cost"]["distill_seconds"], 1e-3), r["mean"][metric],
                                            (r.get("std") or {}).get(metric, 0.0), int(r["budget"])))
    for k, (name, pts) in enumerate(sorted(series.items())):
        pts.sort(key=lambda p: p[3])
        xs, ys, es, budgets = zip(*pts)
        label = name if len(name) <= 60 else name[:57] + "..."  # a sweep's variant can be long
        # ten colours, then the next marker: every method stays told apart
        line = ax.errorbar(xs, ys, yerr=es, marker="os^Dv"[k // 10 % 5], color=f"C{k % 10}", capsize=3, label=label)
        for x, y, b in zip(xs, ys, budgets):
            ax.annotate(str(b), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("distillation wall time per set (s, log; labels: budget)")
    ax.set_ylabel(f"test {metric} (%){error_bars(rows)}")
    left_out = len(rows) - len(timed)
    if left_out:
        ax.set_title(f"{left_out} row(s) without a recorded cost left out", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside, not over, the points
    fig.tight_layout()
    return _save(fig, path)


def distillation_curves(history: list[dict], path: Path) -> Path:
    """Matching loss (total and per modality) and the learned step sizes over iterations."""
    it = [h["iteration"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (("distill/matching_loss", "total"), ("distill/loss_image", "image"), ("distill/loss_text", "text")):
        if all(key in h for h in history):
            ax1.plot(it, [h[key] for h in history], label=label)
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("matching loss")
    ax1.legend(fontsize=8)
    for key in sorted({k for h in history for k in h if k.startswith("distill/lr_")}):
        ax2.plot(it, [h.get(key, float("nan")) for h in history], label=key.removeprefix("distill/lr_"))
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("learned step size")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def pairs_grid(images: torch.Tensor, captions: list[str], mean, std, path: Path, n: int = 24, cols: int = 6) -> Path:
    """The first `n` synthetic images, each titled with the nearest real caption of its text."""
    n = min(n, len(images))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    pics = denormalize(images[:n].detach().float().cpu(), mean, std).permute(0, 2, 3, 1).numpy()
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(pics[i], interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(captions[i], 28)[:3]), fontsize=6)
    fig.tight_layout()
    return _save(fig, path)
