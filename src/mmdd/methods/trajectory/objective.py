"""Trajectory matching (MTT-VL, TESLA-VL, LoRS, RepBlend): the synthetic set is learned so that a student trained
on it from an expert's snapshot at epoch s lands, after `syn_steps` steps, where the expert was at s + expert_epochs.

One objective for the whole family; the papers differ in settings only (conf/method/*.yaml): the meta-gradient
(full unroll or TESLA), the inner loss, a learned similarity S (LoRS) and feature blending (RepBlend). The outer
loop around it (optimizer, checkpoints, DDP, NaN guards) is every learned method's (mmdd.methods.engine.outer_loop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mmdd.utils.profiling import scope
from mmdd.config_schema import build_settings
from mmdd.errors import MmddError
from mmdd.evaluate.diagnostics import CollapseProbe
from mmdd.methods.base import sample_real_pairs
from mmdd.methods.context import MethodContext
from mmdd.methods.trajectory.draws import RunDraws, draws_source
from mmdd.methods.engine.learned import LearnedMethod
from mmdd.methods.trajectory.meta_gradient import META_GRADIENT_NAMES, Segment, meta_gradient, with_cached_features
from mmdd.methods.engine.outer_loop import Backward, ObjectiveStep, OuterSettings
from mmdd.models.functional import ParamLayout
from mmdd.models.losses import INNER_LOSSES, pair_loss
from mmdd.synthetic.synthetic_set import SyntheticSet
from mmdd.methods.trajectory.shortcut import ConvexifiedSnapshots
from mmdd.teachers.trajectory_store import ExpertSnapshots
from mmdd.utils.seed import probe_seed
from mmdd.utils.trainer import process_device


@dataclass(kw_only=True)
class MatchingSettings(OuterSettings):
    """Settings of a trajectory-matching method (conf/method/<name>.yaml, minus `_target_`/`name`)."""

    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    min_start_epoch: int  # start epochs drawn from [min_start_epoch, max_start_epoch) (PTM-ST's phase windows)
    # PTM-ST's shortcut trajectories: {start, end} matches snapshots start..end-1 convexified per tensor
    # (mmdd.methods.trajectory.shortcut); None = the recorded trajectories
    convexify: dict | None
    batch_syn: int | None  # inner mini-batch; None = all pairs
    loss_merge: Literal["separate", "merged"]
    # TESLA's step-size gradient under loss_merge=merged: separate (reference) | as_loss
    tesla_lr_loss: Literal["separate", "as_loss"]
    # TESLA's pass 2 dropout: replay (exact: pass 1's masks) | redraw (LoRS's/RepBlend's code: new masks at pass 1's
    # parameters, distill_tesla_lors.py 402-405; keeps syn_steps parameter vectors). No effect without dropout.
    tesla_pass2_dropout: Literal["replay", "redraw"]
    # TESLA's pass 1 gradients taken with create_graph=True, as the LoRS/RepBlend code (distill_tesla_lors.py:377-378):
    # the same gradients, rounded as the reference's float32 kernels round them (parity checks; slower). See mtt_vl.yaml.
    tesla_pass1_graph: bool
    # TESLA's pass 2 product -lr <c, g_i>: double_backward (g_i with a graph, as the reference code) | forward
    # (the inner loss's directional derivative along lr*c: no graph of g_i). The same gradients; see mtt_vl.yaml.
    tesla_pass2: Literal["double_backward", "forward"]
    max_experts: int | None
    meta_gradient: Literal[META_GRADIENT_NAMES]  # full (MTT-VL) | tesla (constant memory)
    inner_loss: Literal[INNER_LOSSES]  # infonce | wbce | bce | soft_ce | kl | mse (soft ones read S; S = I without)
    label_temperature: float  # soft_ce/kl targets: softmax(S / label_temperature)
    # wbce only: None = exact (logsigmoid); 1e-6 = LoRS's/RepBlend's code, log(p + 1e-6) (models.losses.weighted_bce)
    wbce_log_eps: float | None
    temperature: float | None  # the inner loop's logit temperature; None = model.temperature (LoRS COCO-500: 0.1)
    blend: dict | None  # RepBlend: {alpha: 1.0} blends features/texts before the heads; None = off
    cache_features: bool  # frozen backbone: its features once per iteration (exact; see meta_gradient)
    feature_chunk: int | None  # None: keep the backbone graph; int: recompute in chunks (bounded memory)

    def __post_init__(self):
        super().__post_init__()
        if self.temperature is not None and self.temperature <= 0:
            raise MmddError(f"method.temperature must be a number > 0 or null, got {self.temperature!r}")
        if self.wbce_log_eps is not None and not 0 < self.wbce_log_eps < 1:
            raise MmddError(f"method.wbce_log_eps must be in (0, 1) or null, got {self.wbce_log_eps!r}")
        if self.label_temperature <= 0:
            raise MmddError(f"method.label_temperature must be > 0, got {self.label_temperature}")
        if self.syn_steps < 1 or self.expert_epochs < 1 or self.max_start_epoch < 1:
            raise MmddError("method.syn_steps, expert_epochs, max_start_epoch and iterations must all be >= 1")
        if not 0 <= self.min_start_epoch < self.max_start_epoch:
            raise MmddError(f"method.min_start_epoch ({self.min_start_epoch}) must be >= 0 and below max_start_epoch "
                            f"({self.max_start_epoch}): starts are drawn from [min, max)")
        if self.convexify is not None:
            from mmdd.methods.trajectory.shortcut import ConvexifySettings

            self.convexify_settings = build_settings(ConvexifySettings, self.convexify, "method.convexify",
                                                     "conf/method/ or the command line")


def build_segment(model, layout: ParamLayout, syn: SyntheticSet, config: MatchingSettings, start, target,
                  generator: torch.Generator, device=None, draws: RunDraws | None = None) -> Segment:
    """One iteration's segment: the synthetic set's data, step sizes and S, batches and blends drawn from
    `generator` (so two runs with equally seeded generators draw the same), or from `draws` (mmdd.methods.trajectory.draws:
    recorded or replayed)."""
    draws = draws or RunDraws()

    def inner_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with scope("loss"):
            return pair_loss(config.inner_loss, logits, syn.similarity_matrix(idx), config.label_temperature,
                             config.wbce_log_eps)

    return Segment(
        model=model,
        layout=layout,
        start=start,
        target=target,
        lrs={"image": syn.lrs["image"], "text": syn.lrs["text"]},
        images=syn.images,
        texts=syn.texts,
        schedule=draws.schedule(generator, len(syn), config.batch_syn, device),
        syn_steps=config.syn_steps,
        inner_loss=inner_loss,
        merged=config.loss_merge == "merged",
        lr_merged=config.loss_merge == "merged" and config.tesla_lr_loss == "as_loss",
        pass2_dropout=config.tesla_pass2_dropout,
        pass1_graph=config.tesla_pass1_graph,
        pass2=config.tesla_pass2,
        extra=tuple(syn.similarity.parameters()) if syn.similarity is not None else (),
        blend=draws.blend(generator, float(config.blend["alpha"])) if config.blend else None,
    )


def caches_features(config: MatchingSettings, model) -> bool:
    return config.cache_features and model.backbone_is_cacheable()


def meta_gradient_for(config: MatchingSettings, model):
    """The configured meta-gradient, on cached backbone features when the backbone allows it."""
    compute = meta_gradient(config.meta_gradient)
    if caches_features(config, model):
        compute = with_cached_features(compute, config.feature_chunk)
    return compute


class TrajectoryMatchingObjective:
    """One outer iteration's matching loss: draw an expert and a start epoch, read the two snapshots, unroll a
    student on the set and leave the meta-gradient in the set's .grad (the configured full unroll or TESLA)."""

    def __init__(self, model, trajectories: ExpertSnapshots, settings: MatchingSettings, draws: RunDraws | None = None):
        # starts are drawn from [min, max): the furthest target is snapshot max_start_epoch - 1 + expert_epochs
        if settings.max_start_epoch - 1 + settings.expert_epochs > trajectories.epochs:
            more = ("keep more snapshots (method.convexify.end) or record more epochs (teacher.epochs)"
                    if isinstance(trajectories, ConvexifiedSnapshots) else "or record more epochs (teacher.epochs)")
            raise MmddError(
                f"method.max_start_epoch ({settings.max_start_epoch}) - 1 + expert_epochs ({settings.expert_epochs}) "
                f"reaches past the {trajectories.epochs} epochs of the trajectories; lower them, {more}"
            )
        self.model = model
        # The experts stay on disk: each iteration reads the drawn expert's start and target snapshots only.
        self.trajectories = trajectories
        self.layout = ParamLayout.from_model(model)
        self.settings = settings
        self._meta_gradient = None  # the meta-gradient (on cached features when allowed), chosen at the first iteration
        self.teacher_experts = list(trajectories.experts)
        self.draws = draws or RunDraws()  # where the iteration's random draws come from (mmdd.methods.trajectory.draws)

    def __call__(self, syn: SyntheticSet, generator: torch.Generator, backward: Backward) -> ObjectiveStep:
        s, device = self.settings, syn.images.device
        draws = self.draws
        draws.begin(self.teacher_experts)
        expert, start = draws.segment_start(generator, self.trajectories.n_experts, s.max_start_epoch, s.min_start_epoch)
        with scope("data"):
            starts, targets = self.trajectories.segment(expert, start, s.expert_epochs, device, syn.images.dtype)
            seg = build_segment(self.model, self.layout, syn, s, starts, targets, generator, device, draws)
        if self._meta_gradient is None:  # decided once, in training mode (batch-norm statistics decide caching)
            self._meta_gradient = meta_gradient_for(s, self.model)
        with draws.dropout(self.model):
            loss, terms = self._meta_gradient(seg, backward)
        draws.end()
        return ObjectiveStep(loss, terms, {"distill/start_epoch": float(start)})


def snapshots_drawn(trajectories: ExpertSnapshots, settings: MatchingSettings) -> int:
    """How many distinct snapshots the draws can ask for: every expert's start epochs and their targets."""
    epochs = settings.max_start_epoch - settings.min_start_epoch + settings.expert_epochs
    return trajectories.n_experts * epochs


def snapshot_cache_bytes(hw, trajectories: ExpertSnapshots, settings: MatchingSettings) -> int:
    """`hardware.snapshot_cache_mb`: a number of MB, or auto = on a GPU every snapshot the draws can ask for, up to
    a tenth of its memory (`mmdd plan` prints the figure); on the CPU none (the OS page cache keeps the files warm and
    there is no transfer to save)."""
    setting = hw.get("snapshot_cache_mb", "auto")
    if str(setting) != "auto":
        try:
            return int(float(setting) * 2**20)
        except ValueError:
            raise MmddError(f"hardware.snapshot_cache_mb must be a number of MB or auto, got {setting!r}") from None
    device = process_device(hw)
    if device.type != "cuda":
        return 0
    wanted = snapshots_drawn(trajectories, settings) * trajectories.snapshot_bytes()
    return int(min(wanted, 0.1 * torch.cuda.get_device_properties(device).total_memory))


class TrajectoryMatching(LearnedMethod):
    """Distils by matching expert trajectories; all settings live in a `MatchingSettings`."""

    settings_cls = MatchingSettings
    distillation_kind = "trajectory"  # mmdd plan's trajectory-matching estimate; mmdd bench's reference loop
    takes_draws = True  # expert, start epoch, mini-batches, blends, dropout masks: mmdd.methods.trajectory.draws
    second_order = True  # the student's inner steps are differentiated: its backbone stays uncompiled

    def make_objective(self, context: MethodContext, model, fingerprint: str) -> TrajectoryMatchingObjective:
        trajectories = context.store.open(model, self.settings.max_experts, fingerprint)
        if self.settings.convexify is not None:
            trajectories = ConvexifiedSnapshots(trajectories, self.settings.convexify_settings)
        trajectories.cache_bytes = snapshot_cache_bytes(context.hardware, trajectories, self.settings)
        return TrajectoryMatchingObjective(model, trajectories, self.settings, draws_source(context.draws))

    def manifest_fields(self) -> dict:
        return {"inner_loss": self.settings.inner_loss, "label_temperature": self.settings.label_temperature,
                "wbce_log_eps": self.settings.wbce_log_eps}

    def computed_with(self) -> dict:
        s = self.settings
        return {"meta_gradient": s.meta_gradient, **({"tesla_pass2": s.tesla_pass2} if s.meta_gradient == "tesla" else {})}

    def prepare_model(self, model) -> None:
        """The distillation loop's model: refuse what the method cannot use, and apply `method.temperature` (the inner
        loop's only: LoRS's COCO-500 script passes --temperature 0.1 to its distillation, while its teachers and
        students keep 0.07)."""
        if self.settings.temperature is not None:
            model.set_temperature(self.settings.temperature)
        # Blending (RepBlend) mixes frozen backbone features before trainable heads; refuse other models.
        if self.settings.blend and model.trainable != "heads":
            raise MmddError(
                f"method={self.name} blends the features of a frozen backbone and matches the heads only, but "
                f"model.trainable={model.trainable}: use model=convnet_heads (CPU), model=nfnet_bert_heads (the papers), "
                "or experiment=synscenes_repblend"
            )

    def make_probe(self, context: MethodContext, model, objective: TrajectoryMatchingObjective, n: int
                   ) -> CollapseProbe:
        """Embeds with expert 0's last recorded parameters; real reference: n real pairs (seeded)."""
        trajectories = objective.trajectories
        flats = trajectories.snapshots(0, [trajectories.epochs])[0]
        gen = torch.Generator().manual_seed(probe_seed(context.seed))
        images, texts = sample_real_pairs(context.train, n, gen)
        return CollapseProbe(model, objective.layout, flats, images, texts, context.hardware.inference_batch)
