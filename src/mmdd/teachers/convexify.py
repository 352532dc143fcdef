"""PTM-ST's "shortcut" trajectories (ICLR 2026; Previsior/PTM-ST convexify.py, read at f98700c): each parameter
tensor l of an expert moves on the straight line from its first to its last kept snapshot, at the pace of its
recorded path:

    theta_l(t) = (1 - beta_l(t)) theta_l(0) + beta_l(t) theta_l(K),   beta_l(t) = sum_{p<t} n_{p,l} / sum_{p<K} n_{p,l}

with n_{p,l} = ||theta_l(p+1) - theta_l(p)||_2 the recorded step norms and beta = 0 where the tensor never moved.
The endpoints t = 0 and t = K are the recorded snapshots exactly. {start, end} keep snapshots start..end-1 as PTM's
`traj[start:end]` does (its 0_6 and 0_8 stores: K = 5 and 7), re-indexed from 0.

mmdd computes them on the fly from the store instead of writing a second store: the step norms of an expert are read
once (one parameter's rows at a time) and kept (K numbers per tensor); a snapshot then reads two rows per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from mmdd.config_schema import check_fields
from mmdd.errors import ArtifactError, MmddError
from mmdd.teachers.trajectory_store import ExpertSnapshots


@dataclass(kw_only=True)
class ConvexifySettings:
    """method.convexify: which recorded snapshots the shortcut spans (PTM-ST's --start/--end, end excluded)."""

    start: int = 0
    end: int = 6

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

    def _path(self, expert: int):
        return self.store.expert_path(self.experts[expert])

    def betas(self, expert: int) -> dict[str, torch.Tensor]:
        """beta_l(t) of every tensor of one expert, from its recorded step norms (read once, then kept)."""
        if expert not in self._betas:
            s, path = self.settings, self._path(expert)
            out = {}
            try:
                with safe_open(str(path), framework="pt") as f:
                    for group in self.names.values():
                        for n in group:
                            rows = f.get_slice(n)[s.start:s.end].flatten(1).double()
                            out[n] = shortcut_betas((rows[1:] - rows[:-1]).norm(dim=1))
            except (SafetensorError, OSError) as exc:
                raise ArtifactError(f"{path} cannot be read ({exc}); rerun `mmdd buffer` with the settings that made "
                                    "the store") from exc
            self._betas[expert] = out
        return self._betas[expert]

    def snapshots(self, expert: int, epochs: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        betas, s = self.betas(expert), self.settings
        first, last = s.start, s.end - 1
        path = self._path(expert)
        out = [{m: torch.empty(self.numel[m], dtype=self.dtype) for m in self.names} for _ in epochs]
        try:
            with safe_open(str(path), framework="pt") as f:
                for m, group in self.names.items():
                    offset = 0
                    for n in group:
                        theta0 = f.get_slice(n)[first].reshape(-1)
                        theta_k = f.get_slice(n)[last].reshape(-1)
                        size = theta0.numel()
                        for flats, t in zip(out, epochs):
                            if t == 0:
                                value = theta0
                            elif t == self.epochs:
                                value = theta_k
                            else:
                                b = float(betas[n][t])
                                value = ((1 - b) * theta0.double() + b * theta_k.double()).to(theta0.dtype)
                            flats[m][offset:offset + size].copy_(value)
                        offset += size
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{path} cannot be read ({exc}); rerun `mmdd buffer` with the settings that made the "
                                "store") from exc
        return out
