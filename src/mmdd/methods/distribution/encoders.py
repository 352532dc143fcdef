"""The encoder a distribution-matching method embeds real and synthetic data with, drawn anew each iteration.

kind=random  a freshly initialised network, as the model config builds it (DM, Zhao & Bilen 2023); a frozen
             backbone stays the loaded one, only what trains is redrawn
kind=expert  one expert of the trajectory store at a random recorded epoch
kind=mixed   MDM's "mixed teacher": `experts` (2) distinct experts at random epochs (MDM may draw one expert
             twice, at two epochs), merged per parameter tensor by the
             Model-Stock ratio of their angle around an anchor (Jang et al. 2024):
                 c = cos(w1 - w0, w2 - w0),  r = 2c / (1 + c),  w = w0 + alpha * r * ((w1 + w2) / 2 - w0)

The anchor w0 (`anchor`): MDM's code takes a freshly built model (ImageNet NFNet, a *random* text head, redrawn every
iteration: `fresh`); mmdd's default takes the first drawn expert's epoch-0 snapshot, the initialisation its fine-tuning
started from (`expert_init`), since around a random head the fine-tuning deltas' angle says nothing about the experts. The merge
assumes both experts start from one initialisation (a pre-trained backbone); experts trained from different random
initialisations lie in different basins, and their average is no teacher: a warning says so. `mmdd buffer
teacher.init=shared` trains every expert from one initialisation (kind=expert avoids merging altogether).
mmdd also clamps c at 0 (MDM: c in [-1, 1], so r -> -inf as c -> -1): a negative ratio would step away from both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from mmdd.config_schema import check_fields
from mmdd.errors import MmddError
from mmdd.models.functional import ParamLayout
from mmdd.teachers.trajectory_store import ExpertSnapshots

log = logging.getLogger(__name__)

KINDS = ("random", "expert", "mixed")


@dataclass(kw_only=True)
class EncoderSettings:
    """method.encoder: which network embeds the data each iteration."""

    kind: Literal[KINDS]
    experts: int  # mixed: how many experts are merged (MDM: 2)
    min_epoch: int  # expert/mixed: epochs drawn uniformly from min_epoch..max_epoch, both included (MDM: 1..10)
    max_epoch: int | None  # None = the store's last recorded epoch
    alpha: float  # mixed: MDM's merge_alpha (its script: 0.5)
    anchor: Literal["expert_init", "fresh"]  # mixed: the merge's w0 (see the module)

    def __post_init__(self):
        check_fields(self, "method.encoder", "fix it in conf/method/ or on the command line")
        if self.kind == "mixed" and self.experts < 2:
            raise MmddError(f"method.encoder.experts={self.experts}: a mixed teacher merges at least 2 experts "
                            "(or use method.encoder.kind=expert)")

    @property
    def needs_store(self) -> bool:
        return self.kind != "random"


def model_stock_ratio(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """r = 2c / (1 + c) of the cosine c between the two fine-tuning deltas (c clamped to [0, 1]; 0 when a delta is
    zero)."""
    d1, d2 = (w1 - w0).flatten().double(), (w2 - w0).flatten().double()
    denom = d1.norm() * d2.norm()
    c = (d1 @ d2 / denom).clamp(0.0, 1.0) if float(denom) > 0 else torch.zeros((), dtype=torch.float64)
    return (2.0 * c / (1.0 + c)).to(w0.dtype)


def merge_weights(anchor: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], alpha: float
                  ) -> dict[str, torch.Tensor]:
    """Per tensor: w0 + alpha * r * (mean of the experts - w0), r the Model-Stock ratio of the first two experts'
    angle around the anchor (MDM merges exactly two)."""
    out = {}
    for name, w0 in anchor.items():
        ws = [e[name] for e in experts]
        r = model_stock_ratio(w0, ws[0], ws[1])
        out[name] = w0 + alpha * r * (torch.stack(ws).mean(0) - w0)
    return out


class EncoderSampler:
    """Loads each iteration's encoder into `model` (its matched parameters, ParamLayout), drawing from a generator."""

    def __init__(self, settings: EncoderSettings, model, trajectories: ExpertSnapshots | None, build_model=None):
        self.settings = settings
        self.model = model
        self.layout = ParamLayout.from_model(model)
        self.trajectories = trajectories
        self.build_model = build_model  # kind=random: () -> a freshly initialised model of the same config
        if settings.needs_store:
            if trajectories is None:
                raise MmddError(f"method.encoder.kind={settings.kind} reads experts: set buffer_dir to a trajectory store")
            last = self.max_epoch
            if not 0 <= settings.min_epoch <= last or last > trajectories.epochs:
                raise MmddError(f"method.encoder epochs {settings.min_epoch}..{last} must lie within the store's "
                                f"0..{trajectories.epochs} recorded epochs")
            if settings.kind == "mixed" and trajectories.n_experts < settings.experts:
                raise MmddError(f"method.encoder.experts={settings.experts} but the store has {trajectories.n_experts} "
                                "experts; lower it or record more (teacher.num_experts)")
        self._warned = False

    @property
    def max_epoch(self) -> int:
        s = self.settings
        return self.trajectories.epochs if s.max_epoch is None else s.max_epoch

    def _epoch(self, generator: torch.Generator) -> int:
        lo, hi = self.settings.min_epoch, self.max_epoch
        return lo + int(torch.randint(hi - lo + 1, (1,), generator=generator))

    def _fresh(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The matched parameters of a model built anew from a seed drawn from `generator`, by name."""
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: the model is built on the CPU, and
            torch.default_generator.manual_seed(seed)  # the CUDA generators (dropout) keep their own streams
            fresh = self.build_model()
        named = dict(fresh.named_parameters())
        return {n: named[n].detach() for group in self.layout.names.values() for n in group}

    @torch.no_grad()
    def draw(self, generator: torch.Generator) -> dict[str, float]:
        """Put a new encoder into the model; returns what was drawn (logged per iteration)."""
        s = self.settings
        if s.kind == "random":
            fresh = self._fresh(generator)
            for name, value in fresh.items():
                self.model.get_parameter(name).copy_(value)
            return {}
        n = self.trajectories.n_experts
        if s.kind == "expert":
            expert, epoch = int(torch.randint(n, (1,), generator=generator)), self._epoch(generator)
            self.layout.load_into(self.model, self.trajectories.snapshots(expert, [epoch])[0])
            return {"distill/encoder_expert": float(expert), "distill/encoder_epoch": float(epoch)}
        experts = torch.randperm(n, generator=generator)[: s.experts].tolist()
        epochs = [self._epoch(generator) for _ in range(s.experts)]
        anchor_flat, first = self.trajectories.snapshots(experts[0], [0, epochs[0]])
        others = [self.trajectories.snapshots(e, [ep])[0] for e, ep in zip(experts[1:], epochs[1:])]
        if not self._warned:
            self._warned = True
            init = self.trajectories.snapshots(experts[1], [0])[0]
            differ = [m for m in init if not torch.equal(init[m], anchor_flat[m])]
            if differ:
                log.warning("method.encoder.kind=mixed merges experts that start from different initialisations "
                            "(this store's experts %d and %d differ at epoch 0 in their %s parameters): there the "
                            "merge averages networks from different basins. MDM merges fine-tunings of one pre-trained "
                            "model (its random text heads differ too): build the store with teacher.init=shared, or use "
                            "method.encoder.kind=expert",
                            experts[0], experts[1], " and ".join(differ))
        unflat = self.layout.unflatten
        anchor = unflat(anchor_flat) if s.anchor == "expert_init" else self._fresh(generator)
        merged = merge_weights(anchor, [unflat(first), *(unflat(o) for o in others)], s.alpha)
        for name, value in merged.items():  # per tensor, as merged: no flat vector in between
            self.model.get_parameter(name).copy_(value)
        return {"distill/encoder_epoch": float(sum(epochs)) / len(epochs)}
