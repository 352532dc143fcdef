"""What a trajectory-matching iteration draws at random, from one replaceable source.

Each outer iteration draws an expert and a start epoch, the inner mini-batches (a permutation of the set, cut in
consecutive chunks), RepBlend's blend (lambda and a permutation per step) and the heads' dropout masks. By default
they come from the run's generator and torch's global RNG (`RunDraws`). Two hooks make them explicit
(conf/distill.yaml `draws`):

- `draws.record=<dir>`: the run writes every iteration's draws there (`RecordingDraws`);
- `draws.replay=<dir>`: the run takes them from there instead (`ReplayedDraws`): a folder written by `record`, or by
  the parity harness (experiments/parity) from the official code's run, so mmdd and the official script compute on
  the same random draws and their results can be compared number by number.

A draws folder (mmdd.utils.draws, shared with the students' hooks) is plain data: `draws.json` (per iteration: the store's expert number, the start epoch, the mini-batch
indices per inner step, the blends) and `dropout.safetensors` (per iteration, the masks of every dropout call in
call order: for TESLA, the first pass's steps then the second pass's). A replayed run draws nothing itself, so its
seed no longer matters to the set; it starts fresh (no resume) and refuses draws that do not fit (other expert,
batch size, step count or mask shape) with a sentence naming the iteration.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mmdd.errors import MmddError
from mmdd.methods.trajectory.unrolling import BatchSchedule, Blend, inner_batch_size
from mmdd.utils.draws import RecordedSteps, ReplayedSteps


def draw_segment_start(generator: torch.Generator, n_experts: int, max_start_epoch: int, min_start_epoch: int = 0
                       ) -> tuple[int, int]:
    """The expert and start epoch of one iteration: uniform over experts and [min_start_epoch, max_start_epoch)
    (MTT: min 0; PTM-ST: a window per phase)."""
    expert = int(torch.randint(n_experts, (1,), generator=generator))
    start = min_start_epoch + int(torch.randint(max_start_epoch - min_start_epoch, (1,), generator=generator))
    return expert, start


class RunDraws:
    """The default: everything from the run's generator (and dropout from torch's RNG), as every run before the hooks."""

    def begin(self, experts: list[int]) -> None:
        """A new iteration over a reader of these store experts (index i is store expert experts[i])."""

    def segment_start(self, generator, n_experts: int, max_start: int, min_start: int) -> tuple[int, int]:
        return draw_segment_start(generator, n_experts, max_start, min_start)

    def schedule(self, generator, n: int, batch_size: int | None, device=None):
        return BatchSchedule(n, batch_size, generator, device=device)

    def blend(self, generator, alpha: float):
        return Blend(alpha, generator)

    def dropout(self, model: nn.Module):
        return contextlib.nullcontext()

    def end(self) -> None:
        """The iteration's draws are complete."""


class _RecordingSchedule:
    def __init__(self, inner, log: list):
        self.inner, self.log = inner, log

    def next(self):
        idx = self.inner.next()
        self.log.append(idx.tolist())
        return idx


class _RecordingBlend:
    def __init__(self, inner: Blend, log: list):
        self.inner, self.log = inner, log

    def draw(self, batch_size: int, device=None):
        lam, perm = self.inner.draw(batch_size, device)
        self.log.append([float(lam), perm.tolist()])
        return lam, perm


class RecordingDraws(RecordedSteps, RunDraws):
    """Draws as the default does and writes them to `folder` after every iteration (mmdd.utils.draws.RecordedSteps)."""

    def new_record(self) -> dict:
        return {"expert": None, "start": None, "batches": [], "blends": None}

    def begin(self, experts):
        self._experts = list(experts)
        RecordedSteps.begin(self)

    def segment_start(self, generator, n_experts, max_start, min_start):
        expert, start = super().segment_start(generator, n_experts, max_start, min_start)
        self._now["expert"], self._now["start"] = self._experts[expert], start
        return expert, start

    def schedule(self, generator, n, batch_size, device=None):
        return _RecordingSchedule(super().schedule(generator, n, batch_size, device), self._now["batches"])

    def blend(self, generator, alpha):
        self._now["blends"] = []
        return _RecordingBlend(super().blend(generator, alpha), self._now["blends"])


class _ReplayedSchedule:
    def __init__(self, owner: "ReplayedDraws", n: int, batch_size: int | None, device):
        self.owner, self.n, self.device = owner, n, device
        self.batch_size = inner_batch_size(n, batch_size)
        self.step = 0

    def next(self):
        batches = self.owner.now["batches"]
        if self.step >= len(batches):
            self.owner.refuse(f"it asks for inner step {self.step + 1} but {len(batches)} were recorded "
                              "(method.syn_steps differs)")
        idx = torch.tensor(batches[self.step], dtype=torch.long)
        self.step += 1
        if len(idx) != self.batch_size or (len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n)):
            self.owner.refuse(f"step {self.step}'s recorded batch has {len(idx)} indices in [0, {self.n}) expected "
                              f"{self.batch_size} (method.batch_syn or the number of pairs differs)")
        return idx.to(self.device) if self.device is not None else idx


class _ReplayedBlend:
    def __init__(self, owner: "ReplayedDraws"):
        self.owner, self.step = owner, 0

    def draw(self, batch_size: int, device=None):
        blends = self.owner.now.get("blends") or []
        if self.step >= len(blends):
            self.owner.refuse("it blends, but the recorded iteration has no blend for this step (method.blend differs)")
        lam, perm = blends[self.step]
        self.step += 1
        return torch.tensor(float(lam), device=device), torch.tensor(perm, dtype=torch.long, device=device)


class ReplayedDraws(ReplayedSteps, RunDraws):
    """Takes every draw from a draws folder, iteration by iteration; draws nothing itself."""

    def begin(self, experts):
        ReplayedSteps.begin(self)
        self._experts = list(experts)

    def segment_start(self, generator, n_experts, max_start, min_start):
        expert, start = int(self.now["expert"]), int(self.now["start"])
        if expert not in self._experts:
            self.refuse(f"its expert {expert} is not among the store's experts read here {self._experts}")
        if not min_start <= start < max_start:
            self.refuse(f"its start epoch {start} is outside [{min_start}, {max_start}) (method.max_start_epoch)")
        return self._experts.index(expert), start

    def schedule(self, generator, n, batch_size, device=None):
        return _ReplayedSchedule(self, n, batch_size, device)

    def blend(self, generator, alpha):
        return _ReplayedBlend(self)


def draws_source(draws_cfg) -> RunDraws:
    """The source `draws.record` / `draws.replay` (conf/distill.yaml) ask for; the run's own draws by default."""
    record = draws_cfg.get("record") if draws_cfg else None
    replay = draws_cfg.get("replay") if draws_cfg else None
    if record and replay:
        raise MmddError("draws.record and draws.replay are both set: replay draws recorded earlier, or record a "
                        "run's own, not both")
    if replay:
        return ReplayedDraws(replay)
    if record:
        return RecordingDraws(record)
    return RunDraws()
