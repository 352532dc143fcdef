"""Learned similarity S between synthetic images and texts (LoRS, Xu et al. ICML 2024).

low-rank: S = diag(a) + (alpha / r) * L @ R^T with a = 1, L ~ N(0, 1), R = 0, so S = I at start;
full:     S is an N x N matrix initialised to I.
`matrix(idx)` builds only the batch's block S[idx][:, idx] from the indexed parameters.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("lowrank", "full")


class LowRankSimilarity(nn.Module):
    kind = "lowrank"

    def __init__(self, n: int, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.diag = nn.Parameter(torch.ones(n))
        self.left = nn.Parameter(torch.randn(n, self.rank, generator=generator))
        self.right = nn.Parameter(torch.zeros(n, self.rank))

    def matrix(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        a, l, r = (self.diag, self.left, self.right) if idx is None else (self.diag[idx], self.left[idx], self.right[idx])
        # In the parameters' own precision (fp32) under bf16 autocast too: the product is S itself, the target the
        # inner loss matches, and its gradient is the outer update of L and R
        device = l.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            with torch.autocast(device_type=device, enabled=False):
                return torch.diag(a) + (self.alpha / self.rank) * (l @ r.t())
        return torch.diag(a) + (self.alpha / self.rank) * (l @ r.t())

    def spec(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha}


class FullSimilarity(nn.Module):
    kind = "full"

    def __init__(self, n: int):
        super().__init__()
        self.full = nn.Parameter(torch.eye(n))

    def matrix(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.full if idx is None else self.full[idx][:, idx]

    def spec(self) -> dict:
        return {"kind": self.kind}


def similarity_spec(spec: dict) -> dict:
    """What `build_similarity(spec, n).spec()` records, without building (or drawing) anything."""
    kind = spec.get("kind")
    if kind == "lowrank":
        return {"kind": kind, "rank": int(spec["rank"]), "alpha": float(spec["alpha"])}
    if kind == "full":
        return {"kind": kind}
    raise ValueError(f"similarity kind must be one of {KINDS}, got {kind!r}")


def build_similarity(spec: dict, n: int, generator: torch.Generator | None = None) -> nn.Module:
    spec = similarity_spec(spec)
    if spec["kind"] == "lowrank":
        return LowRankSimilarity(n, spec["rank"], spec["alpha"], generator)
    return FullSimilarity(n)
