"""One expert over N processes, trained as on one: the papers' batch split over the ranks, the loss over all of it.

A teacher's batch of B pairs is one contrastive problem (every pair is the others' negative), so N ranks each
training on their own B pairs would be another training (a batch of N x B at the same learning rate), and each
rank's B / N pairs alone would have fewer negatives. Here every rank draws the expert's own order (the
single-process loader's, from the expert's seed), takes its slice of each global batch of B (`RankSlices`), and
the loss is InfoNCE over the B x B logits of all the ranks' embeddings (`global_logits`): the expert's gradient is
the single-process one, up to the order of float sums (tests/test_ddp.py), and per-image augmentations that run
in each rank's own loader workers.
"""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler


class RankSlices(Sampler[list[int]]):
    """Rank `rank`'s share of each of `batches`' global batches: the r-th of `world` equal slices."""

    def __init__(self, batches: Sampler[list[int]], rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        for batch in self.batches:
            share = len(batch) // self.world
            yield batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.batches)


def global_batch_loader(dataset, batch_size: int, seed: int, options: dict) -> DataLoader:
    """A teacher's (or pre-training's) batches in this process: the single-process loader's order (shuffled by
    `seed`, full batches of `batch_size`), and under DDP this rank's slice of each. Build it after the trainer: the
    processes mmdd starts exist from then on. `options`: DataLoader keywords (mmdd.data.splits.loader_options)."""
    from mmdd.utils import launch

    run = launch.current()
    world = run.world_size if run.launcher != "none" else 1
    generator = torch.Generator().manual_seed(seed)
    batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=True)
    if world > 1:
        per_rank_batch(batch_size, world)
        batches = RankSlices(batches, run.global_rank, world)
    # The loader draws its workers' seed from the same generator, before each epoch's order, as
    # DataLoader(shuffle=True, generator=...) does: one process's order is the one it always was.
    return DataLoader(dataset, batch_sampler=batches, generator=generator, **options)


def per_rank_batch(batch_size: int, world: int) -> int:
    """The rows of teacher.batch_size each of `world` processes trains on."""
    if batch_size % world:
        from mmdd.errors import MmddError

        raise MmddError(f"the batch size {batch_size} (teacher.batch_size / pretrain.batch_size) does not split evenly over {world} processes: each trains "
                        f"on an equal share of the papers' batch; use a batch size divisible by {world}, or train one "
                        "expert per GPU (README, Teachers)")
    return batch_size // world


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x`, in rank order; the gradient reaches this rank's own rows only. DDP averages the
    ranks' gradients, so a loss over the gathered rows is scaled by the world size before backward
    (`scaled_for_ddp`)."""
    world = torch.distributed.get_world_size()
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    parts[torch.distributed.get_rank()] = x
    return torch.cat(parts)


def global_logits(model, images: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """The [B, B] logits of the global batch (this rank's slice and the others'), or of the local batch alone."""
    img, txt = model.encode_image(images), model.encode_text(text_emb)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        img, txt = gather_rows(img), gather_rows(txt)
    return model.similarity(img, txt)


def scaled_for_ddp(loss: torch.Tensor) -> torch.Tensor:
    """Each rank's backward reaches only its own rows' share of the gradient; DDP's average of the ranks' gradients
    is then 1/N of the global batch's, so the loss backpropagated is N times the loss."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return loss * torch.distributed.get_world_size()
    return loss
