"""Seeding: one integer controls every random choice of a stage.

Every seed derived from a run's seed is derived here, each by its own named rule (the rules differ, and changing
one would change every committed number made with it):

    expert_seed(teacher.seed, e)  = teacher.seed * 1009 + e         teacher e of a store
    rank_seed(seed, r)            = seed + 1_000_003 * r            the draws of DDP rank r (rank 0 draws as 1 process)
    student_seed(seed, k)         = seed * 100 + k                  student k of a set
    probe_seed(seed)              = seed + 1                        the real pairs of the collapse diagnostics
    phase_seed(seed, i)           = seed + 10_007 * i               phase i of a phased distillation (phase 0 = seed)
"""

from __future__ import annotations

import random

import numpy as np
import torch


def expert_seed(teacher_seed: int, expert: int) -> int:
    return teacher_seed * 1009 + expert


def rank_seed(seed: int, rank: int) -> int:
    return seed + 1_000_003 * rank


def seed_rank_streams(seed: int, rank: int) -> None:
    """Seed torch's global generators (CPU and every CUDA device: the dropout masks of the matched model's inner
    steps) from the rank, so the N trajectory samples of an N-process step are independent; rank 0 keeps the stream
    a single process has (its runs are unchanged)."""
    if rank > 0:
        torch.manual_seed(rank_seed(seed, rank))


def student_seed(seed: int, student: int) -> int:
    return seed * 100 + student


def probe_seed(seed: int) -> int:
    return seed + 1


def phase_seed(seed: int, phase: int) -> int:
    return seed + 10_007 * phase


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
