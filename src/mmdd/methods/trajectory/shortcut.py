"""PTM-ST's "shortcut" trajectories (ICLR 2026; Previsior/PTM-ST convexify.py, read at f98700c): each parameter
tensor l of an expert moves on the straight line from its first to its last kept snapshot, at the pace of its
recorded path:

    theta_l(t) = (1 - beta_l(t)) theta_l(0) + beta_l(t) theta_l(K),   beta_l(t) = sum_{p<t} n_{p,l} / sum_{p<K} n_{p,l}

with n_{p,l} = ||theta_l(p+1) - theta_l(p)||_2 the recorded step norms and beta = 0 where the tensor never moved.
The endpoints t = 0 and t = K are the recorded snapshots exactly. {start, end} keep snapshots start..end-1 as PTM's
`traj[start:end]` does (its 0_6 and 0_8 stores: K = 5 and 7), re-indexed from 0.

mmdd computes them on the fly from the store instead of writing a second store: the step norms of a tensor are read
once per expert and kept (K numbers per tensor); a snapshot then reads two rows per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmdd.config_schema import check_fields
from mmdd.errors import MmddError
from mmdd.teachers.trajectory_store import ExpertSnapshots


@dataclass(kw_only=True)
class ConvexifySettings:
    """method.convexify: which recorded snapshots the shortcut spans (PTM-ST's --start/--end, end excluded)."""

    start: int
    end: int

    def __post_init__(self):
        check_fields(self, "method.convexify", "fix it in conf/method/ or on the command line")
        if not 0 <= self.start < self.end - 1:
            raise MmddError(f"method.convexify keeps snapshots start..end-1 = {self.start}..{self.end - 1}: it needs "
                            "0 <= start and at least two snapshots")


def shortcut_betas(step_norms: torch.Tensor) -> torch.Tensor:
    """[K] step norms -> [K+1] beta(t) = cumulative norm before t / total (0 everywhere when the total is 0)."""
    total = step_norms.sum()
    cum = torch.cat([torch.zeros(1, dtype=step_norms.dtype), step_norms.cumsum(0)])
    return cum / total if float(total) > 0 else torch.zeros_like(cum)


class ConvexifiedSnapshots(ExpertSnapshots):
    """An ExpertSnapshots reader over the convexified trajectories of the same experts (see the module doc)."""

    def __init__(self, recorded: ExpertSnapshots, settings: ConvexifySettings):
        if settings.end - 1 > recorded.epochs:
            raise MmddError(f"method.convexify.end={settings.end} keeps snapshots up to {settings.end - 1}, but the "
                            f"store records epochs 0..{recorded.epochs}")
        super().__init__(recorded.store, recorded.names, recorded.experts, recorded.dtype)
        self.settings = settings
        self._betas: dict[int, dict[str, torch.Tensor]] = {}  # expert -> tensor name -> [K+1]

    @property
    def epochs(self) -> int:
        return self.settings.end - 1 - self.settings.start

    def _rows(self, f, expert: int, name: str, epochs: Sequence[int]) -> list[torch.Tensor]:
        """Parameter `name` on its shortcut at each of `epochs`. Its beta(t) comes from its recorded step norms, read
        once per expert (K + 1 rows of this tensor) and kept; every later snapshot reads its two endpoint rows."""
        s, rows = self.settings, f.get_slice(name)
        betas = self._betas.setdefault(expert, {})
        if name not in betas:
            kept = rows[s.start:s.end].reshape(s.end - s.start, -1).double()  # 0-d tensors too
            betas[name] = shortcut_betas((kept[1:] - kept[:-1]).norm(dim=1))
        theta0, theta_k = rows[s.start], rows[s.end - 1]
        a, b = theta0.double(), theta_k.double()
        out = []
        for t in epochs:
            if t == 0 or t == self.epochs:  # the endpoints are the recorded snapshots themselves
                out.append(theta0 if t == 0 else theta_k)
            else:
                beta = float(betas[name][t])
                out.append(((1 - beta) * a + beta * b).to(theta0.dtype))
        return out
