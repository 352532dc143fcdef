"""Tuned rows: which rows of a table run the settings a search chose on val, and what that search cost.

A search record (experiments/tune_methods.py `summary`, tuned.json) holds per search its method, the trials run and
failed, the best trial's val r_mean, its settings and the wall time of all its trials. A row of `mmdd table` is that
search's tuned row when its method is the search's and every run of the row was launched with the chosen settings
(its overrides hold each of them, written as `override_of` writes them: the final runs take their overrides from
here, so the two cannot drift apart).

The ranges follow one rule: a learning rate's range (two decades about a CPU default: its scale is a guess) whose
chosen value lies within a third of a decade of an edge (`at_edges`) is extended by a decade on that side, once, and
the method searched again with the same number of trials; the earlier search is kept as superseded, and its trials
count in the search's cost. Other log ranges (kernel widths, mixing concentrations, S's scale) are bounded by what
they mean; a choice at their edges is reported, not chased."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mmdd.errors import MmddError

EDGE_DECADES = 1 / 3  # how near (in decades) a log-scaled range's edge a chosen value is "at" it


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
    search_seconds: float = 0.0  # every trial spent choosing, the superseded searches' included
    superseded_trials: int = 0  # trials of earlier searches over narrower ranges (the edge rule)
    repeated_trials: int = 0  # runs that redrew a setting already run (a resumed search's sampler): not trials
    at_edges: list[str] = field(default_factory=list)  # chosen values still at a log range's edge
    chosen_in: str = ""  # where the best trial ran when not in the current search: "superseded/<k>"

    @property
    def overrides(self) -> list[str]:
        return [override_of(k, v) for k, v in sorted(self.settings.items())]

    @property
    def marker(self) -> str:
        """The override a run launched from this search carries (`tune_methods.py overrides` prints it first)."""
        return f"tuned_from={self.name}"

    def describes(self, method: str, runs: list[dict]) -> bool:
        """Whether rows of `method` made by `runs` (results.json contents) are this search's tuned row: each run was
        launched from it (its marker), or, without one, holds every chosen setting. A marked run may override a chosen
        setting (an ablation: a Hydra multirun keeps only the last value of a key); its name then shows that."""
        wanted = set(self.overrides)
        if not wanted or method != self.method:
            return False
        return all(self.marker in r.get("overrides", []) or wanted <= set(r.get("overrides", [])) for r in runs)

    def label(self, method: str, variant: str, marked: bool = False) -> str:
        """A tuned row's name: its method and what it runs beyond the chosen settings (an ablation's override), which
        the tuning column stands for; `marked`: says "tuned" (where an untuned row would otherwise share the name)."""
        rest = variant
        for o in self.overrides:  # whole tokens only (a chosen setting never holds a space)
            rest = re.sub(rf"(^| ){re.escape(o)}(?= |$)", "", rest)
        parts = (["tuned"] if marked else []) + ([rest.strip()] if rest.strip() else [])
        return f"{method} ({' '.join(parts)})" if parts else method

    def cell(self) -> str:
        val = "–" if self.val_r_mean is None else f"{self.val_r_mean:.2f}"
        failed = f", {self.failed} failed" if self.failed else ""
        earlier = f" (+{self.superseded_trials} over narrower ranges)" if self.superseded_trials else ""
        earlier += f" (+{self.repeated_trials} repeated draws)" if self.repeated_trials else ""
        edges = f"; at a range edge: {', '.join(self.at_edges)}" if self.at_edges else ""
        where = " (a trial over the narrower ranges)" if self.chosen_in else ""
        return f"{self.name}: {self.trials} trials{failed}{earlier}; val {val}{where}{edges}"

    @classmethod
    def from_record(cls, name: str, entry: dict) -> "Search":
        """One search of a tuned.json record (`tune_methods.py summary`)."""
        return cls(name=name, method=entry["method"], trials=int(entry["trials"]), failed=int(entry["failed"]),
                   val_r_mean=entry.get("val_r_mean"), settings=dict(entry.get("settings", {})),
                   search_seconds=float(entry.get("search_seconds", 0.0)),
                   superseded_trials=int(entry.get("superseded_trials", 0)),
                   repeated_trials=int(entry.get("repeated_trials", 0)), at_edges=list(entry.get("at_edges", [])),
                   chosen_in=str(entry.get("chosen_in", "")))


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
            searches.append(Search.from_record(name, entry))
        except (KeyError, TypeError, ValueError) as exc:
            raise MmddError(f"--tuned {path}: search {name!r} lacks {exc} (method, trials, failed); rewrite it with "
                            "`python experiments/tune_methods.py summary <search folder>`") from exc
    return searches


def search_of(method: str, runs: list[dict], searches: list[Search]) -> Search | None:
    """The search whose chosen settings made these runs, if any."""
    return next((s for s in searches if s.describes(method, runs)), None)


def search_ranges(sweep: str) -> dict[str, str]:
    """conf/sweep/<sweep>.yaml's searched parameters as written: name -> e.g. 'tag(log, interval(1, 100))'."""
    from omegaconf import OmegaConf

    from mmdd.paths import conf_dir

    path = conf_dir() / "sweep" / f"{sweep}.yaml"
    if not path.exists():
        raise MmddError(f"{path}: no search space named {sweep!r}; the searches are conf/sweep/<name>.yaml")
    params = OmegaConf.to_container(OmegaConf.load(path)).get("hydra", {}).get("sweeper", {}).get("params", {})
    return {key: str(value) for key, value in params.items()}


def search_space(sweep: str) -> dict:
    """conf/sweep/<sweep>.yaml's searched parameters: name -> Hydra's sweep (IntervalSweep with its tags, ChoiceSweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    return {key: parser.parse_override(f"{key}={value}").value() for key, value in search_ranges(sweep).items()}


def at_edges(space: dict, settings: dict, decades: float = EDGE_DECADES) -> list[str]:
    """The chosen values within `decades` of an edge of their log-scaled range, as 'name (lower|upper edge)'. Linear
    ranges (weights) and choices are bounded by what they mean and never reported."""
    found = []
    for key, sweep in space.items():
        start, end = getattr(sweep, "start", None), getattr(sweep, "end", None)
        if key not in settings or start is None or "log" not in getattr(sweep, "tags", ()):
            continue
        value = math.log10(float(settings[key]))
        if value - math.log10(start) < decades:
            found.append(f"{key} (lower edge)")
        elif math.log10(end) - value < decades:
            found.append(f"{key} (upper edge)")
    return found

