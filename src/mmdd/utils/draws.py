"""A folder of recorded random draws, read and written step by step, with dropout masks recorded or replayed.

The format of `draws.record` / `draws.replay` (mmdd.methods.trajectory.draws: a distillation's iterations) and of
`student_draws` (mmdd.evaluate.student_draws: a student's training steps): `draws.json` holds one record per
iteration (what was drawn, and how many dropout calls it made) and `dropout.safetensors` the masks of every dropout
call, keyed "<iteration>.<call>" (uint8 0/1). `RecordedSteps` records the masks of a step's active dropout modules;
`ReplayedSteps` makes them apply recorded masks instead, bit for bit, and refuses records that do not fit with a
sentence naming the step. What else a step draws is the user's (their subclasses add it to the record).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmdd.errors import ArtifactError, MmddError
from mmdd.utils.io import atomic_write, atomic_write_json

FORMAT = "mmdd-draws"
VERSION = 1
DRAWS_FILE = "draws.json"
MASKS_FILE = "dropout.safetensors"


def active_dropouts(model: nn.Module) -> list[nn.Dropout]:
    return [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0 and m.training]


def replayed_dropout(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """What torch's dropout computes on a CPU tensor for a given keep-mask: x * (mask / (1 - p)), the same operations
    in the same order (ATen's _dropout_impl: noise.bernoulli_(1 - p); noise.div_(1 - p); input * noise), so the
    result and its gradient are bit for bit those of the run that drew the mask."""
    return x * mask.to(dtype=x.dtype, device=x.device).div_(1 - p)


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


class RecordedSteps:
    """Records each step's record (`_now`, filled by the caller between `begin` and `end`) and its dropout masks,
    and writes them to `folder` after every step (each file rewritten atomically: meant for short runs, e.g. the
    parity checks) or, with `write_each=False`, when `write()` is called (a student's hundreds of steps)."""

    def __init__(self, folder: str | Path, write_each: bool = True):
        self.folder = Path(folder)
        self.write_each = write_each
        self.iterations: list[dict] = []
        self.masks: dict[str, torch.Tensor] = {}
        self._now: dict = {}
        self._masks: list[torch.Tensor] = []

    def new_record(self) -> dict:
        return {"batches": []}

    def begin(self) -> None:
        self._now = self.new_record()
        self._masks = []

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

    def end(self) -> None:
        k = len(self.iterations)
        for j, mask in enumerate(self._masks):
            self.masks[f"{k}.{j}"] = mask.to(torch.uint8).contiguous()
        self._now["dropout_calls"] = len(self._masks)
        self.iterations.append(self._now)
        if self.write_each:
            self.write()

    def write(self) -> Path:
        return write_draws(self.folder, self.iterations, self.masks, source="mmdd")


class ReplayedSteps:
    """Reads a draws folder step by step and makes each step's dropout modules apply its recorded masks. `hook` and
    `unit` name the config key and what a step is in its error sentences."""

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

    def begin(self) -> None:
        self.k += 1
        if self.k >= len(self.iterations):
            raise MmddError(f"{self.hook}={self.folder} holds {len(self.iterations)} {self.unit}s, the run asks for "
                            f"{self.unit} {self.k + 1}: run at most as many as were recorded")
        self.now = self.iterations[self.k]
        self._call = 0

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

    def end(self) -> None:
        recorded = self.now.get("dropout_calls")
        if recorded is not None and recorded != self._call:
            self.refuse(f"it made {self._call} dropout calls, {recorded} were recorded")


def draws_hooked(cfg) -> bool:
    """Whether the run records or replays its draws (conf/distill.yaml `draws`)."""
    draws = cfg.get("draws") or {}
    return bool(draws.get("record") or draws.get("replay"))
