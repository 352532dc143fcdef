"""What a student draws at random, from one replaceable source: its initial weights, its mini-batches, its dropout masks.

By default a student draws them itself (its seed, the protocol's batch draw, torch's dropout). Two hooks make them
explicit (conf/evaluate.yaml `student_draws`), as `draws` does for a distillation (mmdd.methods.trajectory.draws), in the same
folder format (mmdd.utils.draws):

- `student_draws.record=<dir>`: each student k writes its draws to `<dir>/student_<k>/`;
- `student_draws.replay=<dir>`: each student k takes them from `<dir>/student_<k>/` instead: a folder written by
  `record`, or by the parity harness (experiments/parity/students.py) from the official evaluation, so that mmdd's
  students and the official ones train on the same draws and every recall can be compared.

A student's folder is a draws folder (`draws.json`, `dropout.safetensors`) whose iterations are its training steps, in
order over all epochs (and all phases of a phased set): `batches` holds the step's one mini-batch (indices into the
set), and the masks are those of the step's dropout calls. Beside them, `init.safetensors` holds the student's initial
trainable parameters per modality, keyed `image.<i>` / `text.<i>` in `modality_parameter_names()` order, which is the
reference code's `parameters()` order of its image encoder and text projection (untrained parameters, such as a frozen
backbone, come from the model config as always). A replayed student refuses draws that do not fit: another parameter
shape, an index outside the set, fewer steps than it trains, or a mask of another shape, naming the step.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmdd.errors import ArtifactError, MmddError
from mmdd.utils.draws import RecordedSteps, ReplayedSteps
from mmdd.utils.io import atomic_write

INIT_FILE = "init.safetensors"
HOOK = "student_draws"


def student_folder(root: str | Path, index: int) -> Path:
    return Path(root) / f"student_{index}"


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    """The student's trainable parameters as `<modality>.<i>`, in the order the init file keeps them."""
    named = dict(model.named_parameters())
    return {f"{modality}.{i}": named[name] for modality, names in model.modality_parameter_names().items()
            for i, name in enumerate(names)}


class StudentDraws:
    """The default: the student draws everything itself."""

    def initial_weights(self, model) -> None:
        """Called once on the freshly built student, before its first step."""

    def sampler(self, n: int, batch_size: int, default) -> torch.utils.data.Sampler:
        """The batch sampler of one phase (`default`: the protocol's own)."""
        return default

    @contextlib.contextmanager
    def step(self, model, idx: torch.Tensor):
        """Around one training step's forward pass on the set's rows `idx`."""
        yield

    def finish(self) -> None:
        """The student has trained."""


class RecordingStudentDraws(StudentDraws):
    """Draws as the default does and writes them to `folder` when the student has trained."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.draws = RecordedSteps(self.folder, write_each=False)

    def initial_weights(self, model):
        tensors = {k: v.detach().cpu().contiguous() for k, v in trainable_tensors(model).items()}
        atomic_write(self.folder / INIT_FILE, lambda p: save_file(tensors, str(p)))

    @contextlib.contextmanager
    def step(self, model, idx):
        self.draws.begin()
        self.draws._now["batches"].append(idx.tolist())
        with self.draws.dropout(model):
            yield
        self.draws.end()

    def finish(self):
        self.draws.write()


class _ReplayedBatches(torch.utils.data.Sampler):
    """One phase's batches, read in order from the recorded steps (the epoch's batch count is the protocol's)."""

    def __init__(self, owner: "ReplayedStudentDraws", n: int, num_batches: int):
        self.owner, self.n, self.num_batches = owner, n, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for _ in range(self.num_batches):
            yield self.owner.next_batch(self.n)


class ReplayedStudentDraws(StudentDraws):
    """Takes the initial weights, every mini-batch and every dropout mask from a student's draws folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.draws = ReplayedSteps(self.folder, hook=f"{HOOK}.replay", unit="training step")
        self._served = 0  # batches handed to the loader (it may fetch one ahead of the step that trains on it)

    def refuse(self, why: str):
        raise MmddError(f"{HOOK}.replay={self.folder}: {why}. Replay the draws of a student of the same model, set "
                        "and protocol")

    def initial_weights(self, model):
        path = self.folder / INIT_FILE
        if not path.is_file():
            raise ArtifactError(f"{HOOK}.replay={self.folder}: no {INIT_FILE} there (the student's initial weights); "
                                f"record it with {HOOK}.record=<dir> or with experiments/parity/students.py")
        saved = load_file(str(path))
        own = trainable_tensors(model)
        if set(saved) != set(own):
            self.refuse(f"{INIT_FILE} holds {len(saved)} parameters, the student trains {len(own)} "
                        f"(missing {sorted(set(own) - set(saved))[:4]}, extra {sorted(set(saved) - set(own))[:4]})")
        with torch.no_grad():
            for key, param in own.items():
                if tuple(saved[key].shape) != tuple(param.shape):
                    self.refuse(f"{INIT_FILE}'s {key} has shape {tuple(saved[key].shape)}, the student's "
                                f"{tuple(param.shape)}")
                param.copy_(saved[key].to(dtype=param.dtype))

    def sampler(self, n, batch_size, default):
        return _ReplayedBatches(self, n, len(default))

    def next_batch(self, n: int) -> list[int]:
        steps = self.draws.iterations
        if self._served >= len(steps):
            self.refuse(f"the student trains more than the {len(steps)} recorded training steps "
                        "(protocol.epochs or the set's size differs)")
        batch = steps[self._served]["batches"][0]
        self._served += 1
        if not batch or min(batch) < 0 or max(batch) >= n:
            self.refuse(f"training step {self._served}'s batch has indices outside the set's {n} pairs")
        return list(batch)

    @contextlib.contextmanager
    def step(self, model, idx):
        self.draws.begin()
        if idx.tolist() != self.draws.now["batches"][0]:
            self.refuse(f"training step {self.draws.k + 1} trains on other rows than were recorded")
        with self.draws.dropout(model):
            yield
        self.draws.end()

    def finish(self):
        if self.draws.k + 1 != len(self.draws.iterations):
            self.refuse(f"the student trained {self.draws.k + 1} steps, {len(self.draws.iterations)} were recorded "
                        "(protocol.epochs or the set's size differs)")


def student_draws(cfg, index: int) -> StudentDraws:
    """Student `index`'s source under `student_draws.record` / `.replay` (conf/evaluate.yaml); its own by default."""
    hook = cfg.get(HOOK) or {}
    record, replay = hook.get("record"), hook.get("replay")
    if record and replay:
        raise MmddError(f"{HOOK}.record and {HOOK}.replay are both set: replay draws recorded earlier, or record a "
                        "student's own, not both")
    if replay:
        return ReplayedStudentDraws(student_folder(replay, index))
    if record:
        return RecordingStudentDraws(student_folder(record, index))
    return StudentDraws()
