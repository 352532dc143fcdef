"""Phased trajectory matching (PTM-ST's "phased teachers"): the set is distilled as several subsets in turn, each
from fresh real pairs against its own window of the (shortcut) trajectories, e.g. Flickr-200 = 99 pairs on starts
[0, 2) of snapshots 0..5, then 100 pairs on starts [1, 3) of snapshots 0..7. Earlier subsets are not in later
phases' losses; students train on the phases in order (mmdd.evaluate.student.train_student's `earlier`).

On disk, the set's directory holds the last phase as an ordinary set; the earlier ones are sets in phase_<i>/
beside it, listed in its manifest (`earlier_phases`). Each phase resumes from its own checkpoint, and a rerun skips
complete phases. Budget: the phases' pairs must fit in `budget`; each phase's S (full in PTM-ST's scripts,
N_i x N_i floats) is counted in the set's storage (the floats column), not hidden in "one pair".
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import open_dict

from mmdd.config_schema import check_fields
from mmdd.errors import MmddError
from mmdd.methods.base import DistillResult, check_budget, save_synthetic
from mmdd.methods.trajectory_matching import MatchingSettings, TrajectoryMatching
from mmdd.synthetic.synthetic_set import SyntheticSet
from mmdd.utils.config import distill_identity
from mmdd.utils.io import stable_hash
from mmdd.utils.seed import phase_seed

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Phase:
    """One entry of method.phases: its pairs (PTM-ST's num_queries), start window and, optionally, its own
    iterations and shortcut span."""

    pairs: int
    min_start_epoch: int
    max_start_epoch: int
    iterations: int | None = None  # None = method.iterations
    convexify: dict | None = None  # None = method.convexify

    def __post_init__(self):
        check_fields(self, "method.phases[]", "fix it in conf/method/ or on the command line")
        if self.pairs < 1:
            raise MmddError(f"method.phases: a phase needs pairs >= 1, got {self.pairs}")


@dataclass(kw_only=True)
class PhasedSettings(MatchingSettings):
    phases: list | None = None  # [{pairs, min_start_epoch, max_start_epoch, iterations?, convexify?}]; None = one phase

    def __post_init__(self):
        super().__post_init__()
        self.phase_list = [Phase(**dict(p)) for p in (self.phases or [])]
        for i, p in enumerate(self.phase_list):  # each phase's settings are checked as a whole method's would be
            self.for_phase(i)

    def for_phase(self, i: int) -> MatchingSettings:
        p = self.phase_list[i]
        changes = {"min_start_epoch": p.min_start_epoch, "max_start_epoch": p.max_start_epoch}
        if p.iterations is not None:
            changes["iterations"] = p.iterations
        if p.convexify is not None:
            changes["convexify"] = p.convexify
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(MatchingSettings)}
        return MatchingSettings(**{**fields, **changes})


class PhasedTrajectoryMatching(TrajectoryMatching):
    settings_cls = PhasedSettings

    def __init__(self, name: str, **settings):
        super().__init__(name, **settings)
        # Where the earlier phases are saved, relative to the set (read by `mmdd evaluate`).
        self.earlier_dirs = [f"phase_{i}" for i in range(len(self.config.phase_list) - 1)]

    def manifest_fields(self) -> dict:
        fields = super().manifest_fields()
        if self.earlier_dirs:
            fields["earlier_phases"] = list(self.earlier_dirs)
        return fields

    def synthesize(self, cfg, data, out_dir: Path, loggers: list) -> DistillResult:
        phases = self.config.phase_list
        if not phases:
            return super().synthesize(cfg, data, out_dir, loggers)
        budget = check_budget(cfg.budget, data["train"])
        extra = 1 if self.config.similarity else 0  # a phase of B pairs with S is distilled as budget B + 1
        if sum(p.pairs for p in phases) > budget:
            raise MmddError(f"method.phases distil {sum(p.pairs for p in phases)} pairs, more than budget={budget}")
        earlier: list[SyntheticSet] = []
        history: list[dict] = []
        resumes: list[dict] = []
        seconds = 0.0  # spent by earlier processes (complete phases skipped, iterations before a resume)
        for i, phase in enumerate(phases):
            last = i == len(phases) - 1
            phase_cfg = copy.deepcopy(cfg)
            with open_dict(phase_cfg):
                phase_cfg.budget = phase.pairs + extra
                phase_cfg.seed = phase_seed(int(cfg.seed), i)
            where = Path(out_dir) if last else Path(out_dir) / f"phase_{i}"
            done = None if last else finished_phase(where, phase_cfg)
            if done is not None:
                syn, manifest = done
                log.info("phase %d of %d: complete in %s, skipped", i + 1, len(phases), where)
                earlier.append(syn)
                seconds += float(manifest.get("phase_seconds", 0.0))
                continue
            log.info("phase %d of %d: %d pairs, starts [%d, %d)", i + 1, len(phases), phase.pairs,
                     phase.min_start_epoch, phase.max_start_epoch)
            sub = copy.copy(self)
            sub.config = self.config.for_phase(i)
            sub.earlier_dirs = self.earlier_dirs if last else []  # a phase's own saves list no phases of their own
            started = time.perf_counter()
            result = TrajectoryMatching.synthesize(sub, phase_cfg, data, where, loggers)
            history += [{**h, "phase": float(i)} for h in result.history]
            resumes += [{**r, "phase": i} for r in result.resumes]
            seconds += result.earlier_seconds
            if not last:
                took = time.perf_counter() - started + result.earlier_seconds
                save_synthetic(phase_cfg, result.synthetic, data["train"], where, sub.manifest_fields(),
                               {"complete": True, "phase": i, "iteration": len(result.history), "phase_seconds": took,
                                "phase_identity": phase_identity(phase_cfg),
                                "backbone_fingerprint": result.backbone_fingerprint})
                earlier.append(result.synthetic)
        # The distill stage adds this process's wall time (every phase run here) to what earlier processes spent.
        return dataclasses.replace(result, history=history, resumes=resumes, earlier_phases=earlier,
                                   earlier_seconds=seconds)


def phase_identity(phase_cfg) -> str:
    """What a phase distils (data, model, teachers, method, seed, budget): a complete phase of another is redone."""
    return stable_hash(distill_identity(phase_cfg))


def finished_phase(where: Path, phase_cfg) -> tuple[SyntheticSet, dict] | None:
    """(set, manifest) of a phase saved complete by this same configuration (a rerun skips it), else None."""
    if not (where / "manifest.json").exists():
        return None
    syn, manifest = SyntheticSet.load(where)
    if manifest.get("complete") and manifest.get("phase_identity") == phase_identity(phase_cfg):
        return syn, manifest
    return None
