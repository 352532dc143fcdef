"""Distillation on several processes with Lightning's DDP machinery.

Each rank draws its own samples (trajectory matching: expert, start epoch and mini-batches); the synthetic set's gradients are averaged
across ranks before every outer step (OuterLoopModule.average_over_ranks: one all-reduce), so N processes give N trajectory
samples per step. mmdd starts the processes (utils.ddp), Lightning sets up the process group and provides the collectives;
the only thing left out is the DistributedDataParallel wrapper: an iteration calls backward many times
(every inner step of TESLA, the backbone pass of cached features) while DDP's reducer expects one backward per
forward, and the trainable tensors are just the synthetic set's, reduced once per step.
"""

from __future__ import annotations

import os

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning.pytorch.strategies import DDPStrategy


class SyntheticSetDDP(DDPStrategy):
    strategy_name = "mmdd_synthetic_ddp"

    def configure_ddp(self) -> None:
        # No DistributedDataParallel wrapper; start every rank from rank 0's module state (the synthetic set).
        with torch.no_grad():
            for tensor in (*self.model.parameters(), *self.model.buffers()):
                torch.distributed.broadcast(tensor.data, src=0)


def distill_strategy(hw):
    """The Lightning strategy for distillation under `hardware`: DDP without the wrapper whenever several
    processes run (`ddp`, or `auto` with devices/nodes > 1, which Lightning would turn into plain DDP)."""
    from mmdd.utils.trainer import hardware_processes

    strategy = hw.strategy
    if hardware_processes(hw) == 1 and strategy in ("auto", "ddp"):
        return "auto"
    if strategy in ("auto", "ddp"):
        return SyntheticSetDDP()
    from mmdd.errors import MmddError

    raise MmddError(f"hardware.strategy={strategy}: distillation runs on one process or with strategy=ddp (or auto)")


def gather_states(module, state: torch.Tensor) -> torch.Tensor:
    """[world, ...] of a per-rank state tensor (an RNG state), for a checkpoint written by rank 0."""
    world = module.trainer.world_size
    if world == 1:
        return state[None].clone()
    state = state.to(module.device)
    out = [torch.empty_like(state) for _ in range(world)]
    torch.distributed.all_gather(out, state)  # on the process group Lightning set up
    return torch.stack(out).cpu()


def _save_synced(checkpoint: dict, path) -> None:
    with open(path, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())


class GuardedCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint as every mmdd artifact is written: into a temp file in the checkpoint's own directory,
    fsynced, then renamed over the previous one, which stays whole until the new one is in place. (Lightning's own
    writer stages the file in TMPDIR; on another filesystem its move truncates `last.ckpt` and copies into it, so a
    kill during the copy left an empty checkpoint and lost the run.) A failed write (a full disk) is kept instead of
    raised, so rank 0 still reaches the barrier after it and every rank learns of the failure (`raise_together`)."""

    def __init__(self):
        super().__init__()
        self.error: BaseException | None = None

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        from mmdd.utils.io import atomic_write

        try:
            atomic_write(path, lambda tmp: _save_synced(checkpoint, tmp))
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank by raise_together
            # atomic_write words a full disk as its own error; keep the OS error for raise_together's message
            self.error = exc.__cause__ if exc.__cause__ is not None else exc

    def take_error(self) -> BaseException | None:
        error, self.error = self.error, None
        return error


def raise_together(trainer, device, error: BaseException | None, what: str) -> None:
    """If any rank failed at `what`, every rank raises (a rank that fails alone would leave the others waiting in
    the next collective). A full disk or a permission problem becomes a plain MmddError."""
    from mmdd.errors import MmddError
    from mmdd.utils.io import write_failure

    failed = torch.tensor(0.0 if error is None else 1.0, device=device)
    if trainer.world_size > 1:
        failed = trainer.strategy.reduce(failed, reduce_op="sum")
    if error is not None:
        reason = write_failure(error)
        if reason is not None and not isinstance(error, MmddError):
            raise MmddError(f"{what} failed: {reason}; fix that (free disk space, permissions, limits), then rerun the "
                            "same command: it resumes from the last checkpoint that was written") from error
        raise error
    if float(failed) > 0:
        raise MmddError(f"{what} failed on another process (see its error); stopping every process")
