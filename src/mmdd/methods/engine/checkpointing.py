"""A distillation's checkpoints: where they live, when they are written, which one a run resumes from.

Not specific to any method: every learned method's outer loop (mmdd.methods.engine.outer_loop) is saved and resumed
through these."""

from __future__ import annotations

import signal
from pathlib import Path

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmdd.errors import ArtifactError, MmddError
from mmdd.methods.context import Resume
from mmdd.methods.engine.distributed import GuardedCheckpointIO, raise_together
from mmdd.methods.engine.outer_loop import NonFiniteLoss
from mmdd.utils.signal_stop import SignalStop

CHECKPOINT = Path("checkpoint") / "last.ckpt"  # inside the synthetic set's directory


class DistillCheckpoint(SignalStop):
    """Every `every` outer steps: the synthetic set so far (rank 0) and a Lightning checkpoint to resume from
    (set, S, step sizes, optimizer momentum, step, every rank's RNG states, history); the checkpoint again at
    the end, so a finished run can be extended with more iterations. Both are written atomically.

    A stopping signal (SignalStop: every rank agrees after the same iteration) saves that iteration's set and
    checkpoint and ends the fit; `synthesize` then raises Stopped, so a stop is said and never taken for success.
    A stop on repeated NaN losses (NonFiniteLoss, raised on every rank at once) saves the set in memory, the last
    good one, with a checkpoint of it, so a rerun with lower learning rates continues from there.
    `save_set(step)` writes the set so far (rank 0)."""

    def __init__(self, every: int, path: Path, save_set):
        super().__init__()
        self.every, self.path, self.save_set = every, Path(path), save_set
        self.last_saved = -1
        self.stopped_by: str | None = None  # SIGTERM / SIGINT, once the run stops on one

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):  # Lightning's own path: a SIGTERM before on_train_start
            self.stopped_by = self.stopped_by or "SIGTERM"
            if trainer.global_step != self.last_saved:
                self.last_saved = trainer.global_step
                self.save(trainer, pl_module, with_set=True)
        elif isinstance(exception, NonFiniteLoss):
            self.save(trainer, pl_module, with_set=True)
        super().on_exception(trainer, pl_module, exception)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        stop = self.stop_requested(trainer, pl_module)
        if stop:
            self.stopped_by = signal.Signals(stop).name
            trainer.should_stop = True  # every rank, after this same iteration
        if (stop or (self.every and step % self.every == 0)) and step != self.last_saved:  # a skipped iteration keeps the step
            self.last_saved = step
            self.save(trainer, pl_module, with_set=True)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self.last_saved:
            self.save(trainer, pl_module, with_set=False)

    def save(self, trainer, pl_module, with_set: bool) -> None:
        """The set (rank 0), then the checkpoint (every rank takes part: RNG states are gathered; rank 0 writes);
        a failure on any rank stops every rank, with the last complete checkpoint left as it was."""
        error = None
        if with_set and trainer.is_global_zero:
            try:
                self.save_set(trainer.global_step)
            except Exception as exc:  # noqa: BLE001 - raised on every rank just below
                error = exc
        raise_together(trainer, pl_module.device, error, f"saving the synthetic set at iteration {trainer.global_step}")
        trainer.save_checkpoint(self.path)
        io = trainer.strategy.checkpoint_io
        raise_together(trainer, pl_module.device, io.take_error() if isinstance(io, GuardedCheckpointIO) else None,
                       f"writing the checkpoint {self.path}")


def resume_checkpoint(resume, out_dir: Path) -> Path | None:
    """The checkpoint to resume from (Resume's rules), checked readable; None to start over."""
    resume = Resume.of(resume)
    if resume.fresh:
        return None
    if resume.auto:
        own = out_dir / CHECKPOINT
        return check_readable(own) if own.exists() else None
    path = resume.path / CHECKPOINT if resume.path.is_dir() else resume.path
    if not path.is_file():
        raise MmddError(f"resume={resume.setting}: no checkpoint at {path}; pass a synthetic-set directory written by mmdd "
                        f"distill (it holds {CHECKPOINT}) or the .ckpt file, or resume=auto")
    return check_readable(path)


def check_readable(path: Path) -> Path:
    """Refuse a truncated, corrupted or foreign checkpoint with its path, before Lightning fails deep inside
    torch.load. weights_only: a checkpoint is a file a user hands us, and unpickling one can run any code it holds;
    mmdd's own checkpoints hold tensors and plain containers only."""
    try:
        # mmap: reads the archive's index and pickles, not the tensors (Lightning loads them right after)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or "mmdd" not in state or "state_dict" not in state:
            raise ValueError("not a distillation checkpoint of mmdd")
    except Exception as exc:  # torch.load raises many kinds on garbage (pickle, zip, EOF, ...)
        raise ArtifactError(f"checkpoint {path} cannot be used ({type(exc).__name__}: {exc}); delete it, or rerun with "
                            "resume=false to start over (the synthetic set saved beside it is kept until then)") from exc
    return path
