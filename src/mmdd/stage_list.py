"""The stages of mmdd, listed once: `mmdd <stage>` runs one (a Hydra app with conf/<stage>.yaml as its primary
config), and the CLI's help, the checks made before a stage starts, what a stopped stage says it kept and which
runs hold results all read this list. It is plain data on the ground floor (it imports nothing of mmdd), so utils
and report may read it; a stage's work lives in `mmdd.stages.<name>.run(cfg)`, imported only when the stage runs
(the CLI reads this list before torch is imported)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    help: str  # one line for `mmdd --help`
    kept: str  # what a run of it stopped by a signal (or a lost process) leaves behind
    outputs: tuple[str, ...] = ()  # config keys of the directories it writes besides its run directory
    writes_results: bool = False  # its runs hold results.json files that `mmdd table` collects
    plannable: bool = True  # `mmdd plan <name>` estimates its memory

    def run(self, cfg) -> float | None:
        """Runs the stage; returns the val objective (val r_mean) where the stage evaluates, for sweepers."""
        return importlib.import_module(f"mmdd.stages.{self.name}").run(cfg)


# the caches of every stage that loads data (decoded images and features; caption embeddings, which may live apart)
CACHES = ("paths.cache_dir", "paths.text_cache_dir")

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("buffer", "train teachers and record their trajectories", "every complete expert is kept",
          ("buffer_dir", *CACHES)),
    Stage("distill", "distill a synthetic set with a method", "the set and checkpoint last saved are kept",
          ("synthetic_dir", *CACHES), writes_results=True),
    Stage("evaluate", "train students on a synthetic set and score retrieval",
          "every finished student is kept in results.json", CACHES, writes_results=True),
    Stage("pretrain", "pre-train the image backbone contrastively (for frozen-backbone methods)",
          "nothing of this pre-training is kept", ("pretrain.output", *CACHES)),
    Stage("run", "the quick start: all stages on the embedded dataset, then a table",
          "every finished stage's output is kept (complete experts, saved sets, finished students)",
          ("buffer_dir", *CACHES), writes_results=True, plannable=False),
    Stage("bench", "seconds per distillation iteration and memory: mmdd's path vs the reference loop",
          "nothing is kept"),
)}
