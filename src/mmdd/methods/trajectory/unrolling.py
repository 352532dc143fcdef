"""Trajectory matching, written once for every matching method.

Notation (DESIGN.md): an expert trajectory theta*_0..theta*_E; a start epoch s; the target
theta*_{s+M}. The student starts at theta*_s and takes `syn_steps` SGD steps on mini-batches
of the synthetic set with learned per-modality step sizes; the loss per modality m is

    L_m = ||theta_hat_m - theta*_{s+M,m}||^2 / ||theta*_{s,m} - theta*_{s+M,m}||^2

summed over modalities ("separate"), or sum of numerators over sum of denominators ("merged").
Parameters live as one flat vector per modality; `mmdd.models.functional.ParamLayout` maps them to the
model's named parameters for a functional forward.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from mmdd.models.functional import ParamLayout, functional_logits
from mmdd.utils.profiling import scope


def inner_batch_size(n: int, batch_size: int | None) -> int:
    """The inner mini-batch of a set of n pairs: method.batch_syn, or all pairs (None, or more than there are)."""
    return n if not batch_size or batch_size >= n else int(batch_size)


class BatchSchedule:
    """Inner mini-batches: consecutive chunks of a random permutation, redrawn when exhausted."""

    def __init__(self, n: int, batch_size: int | None, generator: torch.Generator | None = None, device=None):
        self.n = n
        self.batch_size = inner_batch_size(n, batch_size)
        self.generator = generator
        self.device = device
        self._perm: torch.Tensor | None = None
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self._perm is None or self._pos + self.batch_size > self.n:
            self._perm = torch.randperm(self.n, generator=self.generator)
            self._pos = 0
        idx = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx.to(self.device) if self.device is not None else idx


class Blend:
    """RepBlend's representation blending: per inner step lam ~ Beta(a, a) and one permutation
    of the batch shared by both modalities. All draws come from `generator`, so runs repeat."""

    def __init__(self, alpha: float, generator: torch.Generator | None = None):
        if alpha <= 0:
            raise ValueError(f"blend alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.generator = generator

    def draw(self, batch_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        # torch's Beta sampler takes no generator; numpy's does, seeded from ours.
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
        lam = torch.tensor(float(np.random.default_rng(seed).beta(self.alpha, self.alpha)))
        perm = torch.randperm(batch_size, generator=self.generator)
        return lam.to(device), perm.to(device)


def unroll_full(
    model,
    layout: ParamLayout,
    start: dict[str, torch.Tensor],
    lrs: dict[str, torch.Tensor],
    images: torch.Tensor,
    texts: torch.Tensor,
    schedule: BatchSchedule,
    syn_steps: int,
    inner_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    blend: "Blend | None" = None,
    from_features: bool = False,
) -> dict[str, torch.Tensor]:
    """Unrolled student: `syn_steps` differentiable SGD steps from `start` (MTT's full meta-gradient).

    `inner_loss(logits, idx)` sees the batch indices (soft-label losses index the learned S).
    Returns the final flat parameters with the whole graph kept, so a loss on them
    back-propagates into `images`, `texts`, `lrs` (and S). Memory grows linearly with syn_steps.
    """
    params = {m: start[m].detach().clone().requires_grad_(True) for m in start}
    mods = list(params)
    for _ in range(syn_steps):
        idx = schedule.next()
        mix = blend.draw(len(idx), idx.device) if blend is not None else None
        logits = functional_logits(model, layout, params, images[idx], texts[idx], mix, from_features)
        loss = inner_loss(logits, idx)
        grads = torch.autograd.grad(loss, [params[m] for m in mods], create_graph=True)
        with scope("flat"):
            params = {m: params[m] - lrs[m] * g for m, g in zip(mods, grads)}
    return params


def matching_loss(
    final: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    merged: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Normalised parameter distance; returns (loss, per-modality normalised terms)."""
    with scope("flat"):
        nums = {m: (final[m] - target[m]).pow(2).sum() for m in final}
        dens = {m: (start[m] - target[m]).pow(2).sum().clamp_min(1e-12) for m in final}
        terms = {m: nums[m] / dens[m] for m in final}
        if merged:
            loss = sum(nums.values()) / sum(dens.values())
        else:
            loss = sum(terms.values())
    return loss, terms
