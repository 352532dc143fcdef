"""Coreset baselines: real pairs selected from the training split (nothing is learned)."""

from __future__ import annotations

import torch

from mmdd.methods.base import Method, check_budget, sample_real_pairs
from mmdd.synthetic.synthetic_set import SyntheticSet


class RandomCoreset(Method):
    """`budget` random training images, each with one of its captions, trained at a fixed lr."""

    name = "random"

    def __init__(self, name: str = "random", lr: float = 0.1):
        self.name = name
        self.lr = lr

    def synthesize(self, cfg, data, out_dir, loggers) -> SyntheticSet:
        train = data["train"]
        budget = int(cfg.budget)
        check_budget(budget, train)
        gen = torch.Generator().manual_seed(int(cfg.seed))
        images, texts, _, _ = sample_real_pairs(train, budget, gen, cfg.data.mean, cfg.data.std)
        return SyntheticSet(images, texts, {"image": self.lr, "text": self.lr})
