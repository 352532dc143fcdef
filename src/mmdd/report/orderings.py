"""Does one row beat another, seed by seed? `mmdd table ... --versus A B`.

Two rows of a table are compared where both have sets at the same dataset, budget and protocol: per distillation seed, each
set's test r_mean (the mean over its students), the difference A - B at the seeds both rows hold (paired: the same
seed draws the same real pairs, the same experts' order), and its mean and sample std over those seeds. With three
seeds nothing here is a significance test; the verdict says only whether every paired seed agrees on the sign.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from mmdd.errors import MmddError


def set_scores(cell, name: str) -> dict[int, float]:
    """{distillation seed: the set's test r_mean, averaged over its students}. A row with two sets of one seed (two
    folders holding the same runs) cannot be paired and is refused."""
    scores: dict[int, float] = {}
    where_of: dict[int, str] = {}
    for where, students in cell.students_by_set().items():
        runs = cell.runs_of(where)
        if not students or not runs or "seed" not in runs[0]:
            continue
        seed = int(runs[0]["seed"])
        if seed in scores:
            raise MmddError(f"--versus: row {name!r} (budget {cell.budget}) holds two sets of distillation seed {seed} "
                            f"({where_of[seed]} and {where}); table one folder of each run")
        scores[seed], where_of[seed] = statistics.fmean(t["r_mean"] for t in students.values()), where
    return scores


@dataclass
class Versus:
    a: str
    b: str
    dataset: str
    budget: int
    protocol: str
    seeds: list[int]  # the distillation seeds both rows hold
    differences: list[float]  # A - B per seed, in `seeds` order

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.differences) if len(self.differences) > 1 else None

    @property
    def verdict(self) -> str:
        wins = sum(d > 0 for d in self.differences)
        losses = sum(d < 0 for d in self.differences)
        n = len(self.differences)
        if wins == n:
            return f"A above B at every seed ({n} of {n})"
        if losses == n:
            return f"A below B at every seed ({n} of {n})"
        ties = n - wins - losses
        return f"seeds disagree (A above at {wins}, below at {losses}" + (f", equal at {ties}" if ties else "") + f" of {n})"


def versus(rows: list[dict], a: str, b: str) -> list[Versus]:
    """A against B (row names as the table prints them) at every budget and protocol both have."""
    names = {r["method"] for r in rows}
    missing = [n for n in (a, b) if n not in names]
    if missing:
        raise MmddError(f"--versus: no row named {', '.join(map(repr, missing))}; the rows are: "
                        f"{', '.join(sorted(names))}")
    by_key: dict[tuple, dict] = {}
    for r in rows:
        key = (r["method"], r["dataset"], r["budget"], r["protocol"])
        if key in by_key and r["method"] in (a, b):
            raise MmddError(f"--versus: two rows are named {r['method']!r} ({r['dataset']}, budget {r['budget']}, "
                            f"protocol {r['protocol']}); table fewer folders, or compare rows whose names differ")
        by_key[key] = r
    found = []
    for (name, dataset, budget, protocol), row in sorted(by_key.items(), key=lambda kv: kv[0][1:]):
        other = by_key.get((b, dataset, budget, protocol))
        if name != a or other is None:
            continue
        sa, sb = set_scores(row["cell"], a), set_scores(other["cell"], b)
        seeds = sorted(set(sa) & set(sb))
        if seeds:
            found.append(Versus(a, b, dataset, budget, protocol, seeds, [sa[s] - sb[s] for s in seeds]))
    if not found:
        raise MmddError(f"--versus {a!r} {b!r}: the two rows share no budget, protocol and distillation seed")
    return found


def render_versus(comparisons: list[Versus]) -> str:
    lines = ["| A | B | dataset | budget | protocol | seeds | A - B per seed (test r_mean) | A - B mean ± std | ordering |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in comparisons:
        per_seed = ", ".join(f"{d:+.2f}" for d in v.differences)
        spread = f"{v.mean:+.2f} ± {v.std:.2f}" if v.std is not None else f"{v.mean:+.2f}"
        lines.append(f"| {v.a} | {v.b} | {v.dataset} | {v.budget} | {v.protocol} | {','.join(map(str, v.seeds))} | {per_seed} | "
                     f"{spread} | {v.verdict} |")
    lines.append("\nA - B: per distillation seed, each set's test r_mean (mean over its students), paired by seed; "
                 "± is the sample std over the seeds. Three seeds are no significance test: 'every seed' only says "
                 "the ordering did not flip between seeds.")
    return "\n".join(lines)
