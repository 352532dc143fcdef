"""Tuned rows: which rows of a table run the settings a search chose on val, and what that search cost.

A search record (experiments/tune_methods.py `summary`, tuned.json) holds per search its method, the trials run and
failed, the best trial's val r_mean, its settings and the wall time of all its trials. A row of `mmdd table` is that
search's tuned row when its method is the search's and every run of the row was launched with the chosen settings
(its overrides hold each of them, written as `override_of` writes them: the final runs take their overrides from
here, so the two cannot drift apart)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mmdd.errors import MmddError


def override_of(key: str, value) -> str:
    """A chosen setting as the command-line override the final runs are launched with (floats to 6 significant
    digits: the search's own resolution is far coarser)."""
    return f"{key}={format(value, '.6g') if isinstance(value, float) else value}"


@dataclass
class Search:
    name: str  # the search (conf/sweep/<name>.yaml)
    method: str  # the method it tuned
    trials: int
    failed: int
    val_r_mean: float | None
    settings: dict = field(default_factory=dict)
    search_seconds: float = 0.0

    @property
    def overrides(self) -> list[str]:
        return [override_of(k, v) for k, v in sorted(self.settings.items())]

    def describes(self, method: str, runs: list[dict]) -> bool:
        """Whether rows of `method` made by `runs` (results.json contents) are this search's tuned row."""
        wanted = set(self.overrides)
        return bool(wanted) and method == self.method and all(wanted <= set(r.get("overrides", [])) for r in runs)

    def cell(self) -> str:
        val = "–" if self.val_r_mean is None else f"{self.val_r_mean:.2f}"
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.trials} trials{failed}; val {val}"


def load_searches(path: str | Path) -> list[Search]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MmddError(f"--tuned {path}: not a readable search record ({exc}); write one with "
                        "`python experiments/tune_methods.py summary <search folder>`") from exc
    searches = []
    for name, entry in record.items():
        try:
            searches.append(Search(name=name, method=entry["method"], trials=int(entry["trials"]),
                                   failed=int(entry["failed"]), val_r_mean=entry.get("val_r_mean"),
                                   settings=dict(entry.get("settings", {})),
                                   search_seconds=float(entry.get("search_seconds", 0.0))))
        except (KeyError, TypeError, ValueError) as exc:
            raise MmddError(f"--tuned {path}: search {name!r} lacks {exc} (method, trials, failed); rewrite it with "
                            "`python experiments/tune_methods.py summary <search folder>`") from exc
    return searches


def search_of(method: str, runs: list[dict], searches: list[Search]) -> Search | None:
    """The search whose chosen settings made these runs, if any."""
    return next((s for s in searches if s.describes(method, runs)), None)
