"""Distillation on several processes with Lightning's DDP machinery.

Each rank draws its own expert, start epoch and mini-batches; the synthetic set's gradients are averaged
across ranks before every outer step (DistillModule.average_gradients), so N processes give N trajectory
samples per step. Lightning launches the processes, sets up the process group and provides the collectives;
the only thing left out is the DistributedDataParallel wrapper: an iteration calls backward many times
(every inner step of TESLA, the backbone pass of cached features) while DDP's reducer expects one backward per
forward, and the trainable tensors are just the synthetic set's, reduced once per step.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.ddp import _sync_module_states


class SyntheticSetDDP(DDPStrategy):
    strategy_name = "mmdd_synthetic_ddp"

    def configure_ddp(self) -> None:
        # No DistributedDataParallel wrapper; start every rank from rank 0's module state (the synthetic set).
        _sync_module_states(self.model)


def distill_strategy(hw):
    """The Lightning strategy for distillation under `hardware` (DDP without the wrapper; else unchanged)."""
    strategy = str(hw.strategy)
    if strategy == "ddp":
        return SyntheticSetDDP()
    if strategy.startswith("ddp"):
        from mmdd.errors import MmddError

        raise MmddError(f"hardware.strategy={strategy}: distillation supports strategy=ddp (or auto) only")
    return strategy


def rank_seed(seed: int, rank: int) -> int:
    """The draw seed of rank `rank`: rank 0 keeps `seed`, so one process draws what rank 0 of many draws."""
    return int(seed) + 1_000_003 * int(rank)


def gather_states(module, state: torch.Tensor) -> torch.Tensor:
    """[world, ...] of a per-rank state tensor (an RNG state), for a checkpoint written by rank 0."""
    world = module.trainer.world_size
    if world == 1:
        return state[None].clone()
    state = state.to(module.device)
    out = [torch.empty_like(state) for _ in range(world)]
    torch.distributed.all_gather(out, state)  # on the process group Lightning set up
    return torch.stack(out).cpu()
