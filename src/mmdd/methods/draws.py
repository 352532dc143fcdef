"""What a trajectory-matching iteration draws at random, from one replaceable source.

Each outer iteration draws an expert and a start epoch, the inner mini-batches (a permutation of the set, cut in
consecutive chunks), RepBlend's blend (lambda and a permutation per step) and the heads' dropout masks. By default
they come from the run's generator and torch's global RNG (`RunDraws`). Two hooks make them explicit
(conf/distill.yaml `draws`):

- `draws.record=<dir>`: the run writes every iteration's draws there (`RecordingDraws`);
- `draws.replay=<dir>`: the run takes them from there instead (`ReplayedDraws`): a folder written by `record`, or by
  the parity harness (experiments/parity) from the official code's run, so mmdd and the official script compute on
  the same random draws and their results can be compared number by number.

A draws folder is plain data: `draws.json` (per iteration: the store's expert number, the start epoch, the mini-batch
indices per inner step, the blends) and `dropout.safetensors` (per iteration, the masks of every dropout call in
call order: for TESLA, the first pass's steps then the second pass's). A replayed run draws nothing itself, so its
seed no longer matters to the set; it starts fresh (no resume) and refuses draws that do not fit (other expert,
batch size, step count or mask shape) with a sentence naming the iteration.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmdd.errors import ArtifactError, MmddError
from mmdd.methods.matching import BatchSchedule, Blend, inner_batch_size
from mmdd.utils.io import atomic_write, atomic_write_json

FORMAT = "mmdd-draws"
VERSION = 1
DRAWS_FILE = "draws.json"
MASKS_FILE = "dropout.safetensors"


def draw_segment_start(generator: torch.Generator, n_experts: int, max_start_epoch: int, min_start_epoch: int = 0
                       ) -> tuple[int, int]:
    """The expert and start epoch of one iteration: uniform over experts and [min_start_epoch, max_start_epoch)
    (MTT: min 0; PTM-ST: a window per phase)."""
    expert = int(torch.randint(n_experts, (1,), generator=generator))
    start = min_start_epoch + int(torch.randint(max_start_epoch - min_start_epoch, (1,), generator=generator))
    return expert, start


def active_dropouts(model: nn.Module) -> list[nn.Dropout]:
    return [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0 and m.training]


def replayed_dropout(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """What torch's dropout computes on a CPU tensor for a given keep-mask: x * (mask / (1 - p)), the same operations
    in the same order (ATen's _dropout_impl: noise.bernoulli_(1 - p); noise.div_(1 - p); input * noise), so the
    result and its gradient are bit for bit those of the run that drew the mask."""
    return x * mask.to(dtype=x.dtype, device=x.device).div_(1 - p)


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


class RecordingDraws(RunDraws):
    """Draws as the default does and writes them to `folder` after every iteration (each file rewritten atomically:
    meant for short runs, e.g. the parity checks; the masks grow with the iterations). `write_each=False`: only when
    `write()` is called (a student's hundreds of training steps)."""

    def __init__(self, folder: str | Path, write_each: bool = True):
        self.folder = Path(folder)
        self.write_each = write_each
        self.iterations: list[dict] = []
        self.masks: dict[str, torch.Tensor] = {}
        self._now: dict = {}
        self._masks: list[torch.Tensor] = []

    def begin(self, experts):
        self._experts = list(experts)
        self._now = {"expert": None, "start": None, "batches": [], "blends": None}
        self._masks = []

    def segment_start(self, generator, n_experts, max_start, min_start):
        expert, start = super().segment_start(generator, n_experts, max_start, min_start)
        self._now["expert"], self._now["start"] = self._experts[expert], start
        return expert, start

    def schedule(self, generator, n, batch_size, device=None):
        return _RecordingSchedule(super().schedule(generator, n, batch_size, device), self._now["batches"])

    def blend(self, generator, alpha):
        self._now["blends"] = []
        return _RecordingBlend(super().blend(generator, alpha), self._now["blends"])

    @contextlib.contextmanager
    def dropout(self, model):
        # Where torch's dropout zeroed an output, its mask was 0 (an input exactly 0 has no gradient either way).
        hooks = [m.register_forward_hook(lambda mod, args, out: self._masks.append((out != 0).cpu()))
                 for m in active_dropouts(model)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def end(self):
        k = len(self.iterations)
        for j, mask in enumerate(self._masks):
            self.masks[f"{k}.{j}"] = mask.to(torch.uint8).contiguous()
        self._now["dropout_calls"] = len(self._masks)
        self.iterations.append(self._now)
        if self.write_each:
            self.write()

    def write(self) -> Path:
        return write_draws(self.folder, self.iterations, self.masks, source="mmdd")


def write_draws(folder: str | Path, iterations: list[dict], masks: dict[str, torch.Tensor], source: str) -> Path:
    """A draws folder: draws.json and dropout.safetensors (masks keyed "<iteration>.<call>", uint8 0/1)."""
    folder = Path(folder)
    atomic_write(folder / MASKS_FILE, lambda p: save_file(dict(masks), str(p)))
    atomic_write_json(folder / DRAWS_FILE, {"format": FORMAT, "version": VERSION, "source": source,
                                           "iterations": iterations})
    return folder


def read_draws(folder: str | Path, hook: str = "draws.replay") -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    path = folder / DRAWS_FILE
    if not path.is_file():
        raise ArtifactError(f"{hook}={folder}: no {DRAWS_FILE} there; record one with "
                            f"{hook.removesuffix('.replay')}.record=<dir> or with experiments/parity")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not readable JSON ({exc}); record the draws again") from exc
    if doc.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a draws file of mmdd (format {doc.get('format')!r}, want {FORMAT!r})")
    masks = load_file(str(folder / MASKS_FILE)) if (folder / MASKS_FILE).is_file() else {}
    return doc, masks


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


class ReplayedDraws(RunDraws):
    """Takes every draw from a draws folder, iteration by iteration; draws nothing itself. `hook` and `unit` name
    the config key and what an "iteration" is in its error sentences (a student's draws: its training steps)."""

    def __init__(self, folder: str | Path, hook: str = "draws.replay", unit: str = "iteration"):
        self.folder = Path(folder)
        self.hook, self.unit = hook, unit
        self.doc, self.masks = read_draws(folder, hook)
        self.iterations = self.doc["iterations"]
        self.k = -1
        self.now: dict = {}
        self._call = 0

    def refuse(self, why: str):
        raise MmddError(f"{self.hook}={self.folder}: {self.unit} {self.k + 1} cannot be replayed: {why}. Replay draws "
                        "recorded with the same settings, set size and model")

    def begin(self, experts):
        self.k += 1
        if self.k >= len(self.iterations):
            raise MmddError(f"{self.hook}={self.folder} holds {len(self.iterations)} {self.unit}s, the run asks for "
                            f"{self.unit} {self.k + 1}: run at most as many as were recorded")
        self.now = self.iterations[self.k]
        self._experts = list(experts)
        self._call = 0

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

    @contextlib.contextmanager
    def dropout(self, model):
        modules = active_dropouts(model)
        saved = [m.__dict__.get("forward") for m in modules]

        def replay(module):
            def forward(x):
                key = f"{self.k}.{self._call}"
                if key not in self.masks:
                    self.refuse(f"dropout call {self._call + 1} has no recorded mask (model.dropout differs, or "
                                "the draws were recorded without masks)")
                mask = self.masks[key]
                if tuple(mask.shape) != tuple(x.shape):
                    self.refuse(f"dropout call {self._call + 1}'s mask has shape {tuple(mask.shape)}, the input "
                                f"{tuple(x.shape)}")
                self._call += 1
                return replayed_dropout(x, mask, module.p)
            return forward

        for m in modules:
            m.forward = replay(m)
        try:
            yield
        finally:
            for m, f in zip(modules, saved):
                if f is None:
                    del m.forward
                else:
                    m.forward = f

    def end(self):
        recorded = self.now.get("dropout_calls")
        if recorded is not None and recorded != self._call:
            self.refuse(f"it made {self._call} dropout calls, {recorded} were recorded")


def draws_hooked(cfg) -> bool:
    """Whether the run records or replays its draws (conf/distill.yaml `draws`)."""
    draws = cfg.get("draws") or {}
    return bool(draws.get("record") or draws.get("replay"))


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
