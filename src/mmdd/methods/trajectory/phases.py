"""Phased trajectory matching (PTM-ST's "phased teachers"): the set is distilled as several subsets in turn, each
from fresh real pairs against its own window of the (shortcut) trajectories, e.g. Flickr-200 = 99 pairs on starts
[0, 2) of snapshots 0..5, then 100 pairs on starts [1, 3) of snapshots 0..7. Earlier subsets are not in later
phases' losses; students train on the phases in order (mmdd.evaluate.student.train_student's `earlier`).

On disk, the set's directory holds the last phase as an ordinary set; the earlier ones are sets in phase_<i>/
beside it, listed in its manifest (`earlier_phases`). Each phase resumes from its own checkpoint, and a rerun skips
complete phases. `init_from=<a phased set>` starts each phase from
that set's own phase (phase_<i>/, the last from the set itself; the parity harness records the official run's
initial pairs that way); `draws.record/replay=<dir>` keeps each phase's draws in <dir>/phase_<i>. Budget: the phases'
pairs must fit in `budget`; each phase's S (full in PTM-ST's scripts,
N_i x N_i floats) is counted in the set's storage (the floats column), not hidden in "one pair".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mmdd.config_schema import build_settings, check_fields
from mmdd.errors import MmddError
from mmdd.methods.base import DistillResult
from mmdd.methods.context import MethodContext, Resume
from mmdd.methods.trajectory.objective import MatchingSettings, TrajectoryMatching
from mmdd.synthetic.synthetic_set import SyntheticSet
from mmdd.utils.io import atomic_write_json, remove_stale_temp_files
from mmdd.utils.trainer import is_rank_zero

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
    phases: list[dict] | None  # [{pairs, min_start_epoch, max_start_epoch, iterations?, convexify?}]; None = one phase

    def __post_init__(self):
        super().__post_init__()
        self.phase_list = [build_settings(Phase, p, "method.phases[]", "conf/method/ or the command line")
                           for p in (self.phases or [])]
        for i, p in enumerate(self.phase_list):  # each phase's settings are checked as a whole method's would be
            self.for_phase(i)

    def for_phase(self, i: int) -> MatchingSettings:
        p = self.phase_list[i]
        changes = {"min_start_epoch": p.min_start_epoch, "max_start_epoch": p.max_start_epoch}
        if p.iterations is not None:
            changes["iterations"] = p.iterations
        if p.convexify is not None:  # the phase's keys over the method's span
            changes["convexify"] = {**(self.convexify or {}), **p.convexify}
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(MatchingSettings)}
        return MatchingSettings(**{**fields, **changes})


class PhasedTrajectoryMatching(TrajectoryMatching):
    settings_cls = PhasedSettings

    def __init__(self, name: str, **settings):
        super().__init__(name, **settings)
        # Where the earlier phases are saved, relative to the set (read by `mmdd evaluate`).
        self.earlier_dirs = [f"phase_{i}" for i in range(len(self.settings.phase_list) - 1)]
        self.earlier_identities: list[str] = []  # set by synthesize: what each earlier phase was distilled by

    def manifest_fields(self) -> dict:
        fields = super().manifest_fields()
        if self.earlier_dirs:
            fields["earlier_phases"] = list(self.earlier_dirs)
            if self.earlier_identities:
                fields["earlier_phase_identities"] = list(self.earlier_identities)
        return fields

    def synthesize(self, context: MethodContext) -> DistillResult:
        phases = self.settings.phase_list
        if not phases:
            return super().synthesize(context)
        if sum(p.pairs for p in phases) > context.budget:
            raise MmddError(f"method.phases distil {sum(p.pairs for p in phases)} pairs, more than budget={context.budget}")
        resume = PhaseResume(context.resume, len(phases))
        # What each phase distils: its pairs (+1 when S takes a pair's storage) and its seed.
        budgets = [self.settings.budget(p.pairs) for p in phases]
        # Recorded in the set's manifest: evaluation refuses an earlier phase that another configuration wrote.
        self.earlier_identities = [context.phase_records(i, budgets[i]).phase_identity()
                                   for i in range(len(phases) - 1)]
        earlier: list[SyntheticSet] = []
        history: list[dict] = []
        resumes: list[dict] = []
        seconds = 0.0  # spent by earlier processes (complete phases skipped, iterations before a resume)
        for i, phase in enumerate(phases):
            last = i == len(phases) - 1
            settings = self.settings.for_phase(i)
            where = context.out_dir if last else context.out_dir / f"phase_{i}"
            done = None if last or resume.fresh else finished_phase(where, self.earlier_identities[i],
                                                                    settings.iterations)
            if done is not None:
                syn, manifest, phase_history = done
                log.info("phase %d of %d: complete in %s, skipped", i + 1, len(phases), where)
                earlier.append(syn)
                history += [{**h, "phase": float(i)} for h in phase_history]
                resumes += [{**r, "phase": i} for r in manifest.get("resumed", [])]
                seconds += float(manifest.get("phase_seconds", 0.0))
                continue
            if not last:
                for folder in (where, where / "checkpoint"):  # temp files of a process killed while writing
                    remove_stale_temp_files(folder)
            log.info("phase %d of %d: %d pairs, starts [%d, %d)", i + 1, len(phases), phase.pairs,
                     phase.min_start_epoch, phase.max_start_epoch)
            sub = copy.copy(self)
            sub.settings = settings
            sub.earlier_dirs = self.earlier_dirs if last else []  # a phase's own saves list no phases of their own
            sub.earlier_identities = self.earlier_identities if last else []
            phase_context = context.for_phase(i, budgets[i], where, resume.of_phase(i), last)
            started = time.perf_counter()
            result = TrajectoryMatching.synthesize(sub, phase_context)
            history += [{**h, "phase": float(i)} for h in result.history]
            resumes += [{**r, "phase": i} for r in result.resumes]
            seconds += result.earlier_seconds
            if not last:
                earlier.append(result.synthetic)
                if is_rank_zero():  # rank 0 writes, as for the set itself
                    took = time.perf_counter() - started + result.earlier_seconds
                    phase_context.save_set(result.synthetic, sub.manifest_fields(),
                                           {"complete": True, "phase": i, "iteration": len(result.history),
                                            "phase_seconds": took, "phase_identity": self.earlier_identities[i],
                                            "backbone_fingerprint": result.backbone_fingerprint,
                                            **({"resumed": result.resumes} if result.resumes else {})})
                    atomic_write_json(where / "history.json", result.history)  # a rerun that skips it keeps it
        # The distill stage adds this process's wall time (every phase run here) to what earlier processes spent.
        return dataclasses.replace(result, history=history, resumes=resumes, earlier_phases=earlier,
                                   earlier_seconds=seconds)


class PhaseResume:
    """`resume` for each phase: auto resumes every phase from its own checkpoint (phase_<i>/checkpoint/, and the set's
    for the last); false starts every phase over, complete ones too; a set directory resumes each phase from the
    same place in that directory. One .ckpt file cannot hold several phases and is refused."""

    def __init__(self, resume, n_phases: int):
        self.resume = Resume.of(resume)
        self.n_phases = n_phases
        if self.resume.path is not None and not self.resume.path.is_dir():
            raise MmddError(f"resume={self.resume.setting}: a phased set ({n_phases} phases) resumes from a set directory written "
                            "by mmdd distill (each phase from its own checkpoint in it), not from one checkpoint file; "
                            "or use resume=auto / resume=false")

    @property
    def fresh(self) -> bool:
        return self.resume.fresh

    def of_phase(self, i: int) -> str:
        source = self.resume.path
        if source is None:  # auto or fresh: the same for every phase
            return self.resume.setting
        return str(source if i == self.n_phases - 1 else source / f"phase_{i}")


def finished_phase(where: Path, identity: str, iterations: int) -> tuple[SyntheticSet, dict, list[dict]] | None:
    """(set, manifest, history) of a phase saved complete by this same configuration (its `identity`, what the
    phase distils) with at least `iterations` (a rerun skips it; one asked for more iterations resumes it), else
    None."""
    if not (where / "manifest.json").exists():
        return None
    syn, manifest = SyntheticSet.load(where)
    if not manifest.get("complete") or manifest.get("phase_identity") != identity:
        return None
    if int(manifest.get("iteration", 0)) < iterations:
        log.info("phase in %s is complete at %s iterations; method.iterations asks for %d: resuming it", where,
                 manifest.get("iteration"), iterations)
        return None
    history_file = where / "history.json"
    return syn, manifest, json.loads(history_file.read_text()) if history_file.exists() else []
