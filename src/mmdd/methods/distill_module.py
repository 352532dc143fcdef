"""Lightning module for distillation: one training step = one outer iteration (manual optimisation)."""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass

import lightning as L
import torch

from mmdd.errors import MmddError
from mmdd.methods.matching import BatchSchedule, Blend
from mmdd.models.functional import ParamLayout
from mmdd.methods.meta_gradient import STRATEGIES, Segment, meta_gradient, with_cached_features
from mmdd.models.losses import INNER_LOSSES, pair_loss
from mmdd.synthetic.similarity import KINDS as SIMILARITY_KINDS
from mmdd.synthetic.synthetic_set import SyntheticSet
from mmdd.teachers.trajectory_store import ExpertSnapshots
from mmdd.utils.config import OUTER_SETTINGS

log = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak RSS on CPU (labelled as such in logs)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class MatchingConfig:
    """Settings of a trajectory-matching method (conf/method/<name>.yaml, minus `_target_`/`name`)."""

    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    lr_img: float  # outer lr of the synthetic images
    lr_txt: float  # outer lr of the synthetic text embeddings
    lr_lr: float  # outer lr of the learned step sizes
    lr_init: float  # initial learned step size
    momentum: float = 0.5
    batch_syn: int | None = None  # inner mini-batch; None = all pairs
    loss_merge: str = "separate"
    tesla_lr_loss: str = "separate"  # TESLA's step-size gradient under loss_merge=merged: separate (reference) | as_loss
    init: str = "real"
    iterations: int = 1000
    max_experts: int | None = None
    lr_min: float | None = 0.0  # learned step sizes clamped here after each outer step; None = no clamp (the papers')
    meta_gradient: str = "full"  # full (MTT-VL) | tesla (constant memory)
    inner_loss: str = "infonce"  # infonce | wbce | bce | soft_ce | kl | mse (soft ones read S; S = I without)
    label_temperature: float = 0.1  # soft_ce/kl targets: softmax(S / label_temperature)
    temperature: float | None = None  # the inner loop's logit temperature; None = model.temperature (LoRS COCO-500: 0.1)
    similarity: dict | None = None  # LoRS: {kind: lowrank, rank, alpha} or {kind: full}; None = no S
    lr_sim: float = 0.0  # outer lr of S
    sim_momentum: float = 0.5
    blend: dict | None = None  # RepBlend: {alpha: 1.0} blends features/texts before the heads; None = off
    cache_features: bool = True  # frozen backbone: its features once per iteration (exact; see meta_gradient)
    feature_chunk: int | None = None  # None: keep the backbone graph; int: recompute in chunks (bounded memory)

    def __post_init__(self):
        self._check_types()
        if self.inner_loss not in INNER_LOSSES:
            raise MmddError(f"method.inner_loss must be one of {INNER_LOSSES}, got {self.inner_loss!r}")
        if self.similarity is not None and self.similarity.get("kind") not in SIMILARITY_KINDS:
            raise MmddError(f"method.similarity.kind must be one of {SIMILARITY_KINDS} (or similarity: null)")
        if self.meta_gradient not in STRATEGIES:
            raise MmddError(f"method.meta_gradient must be one of {STRATEGIES}, got {self.meta_gradient!r}")
        if self.loss_merge not in ("separate", "merged"):
            raise MmddError(f"method.loss_merge must be 'separate' or 'merged', got {self.loss_merge!r}")
        if self.tesla_lr_loss not in ("separate", "as_loss"):
            raise MmddError(f"method.tesla_lr_loss must be 'separate' or 'as_loss', got {self.tesla_lr_loss!r}")
        if self.init not in ("real", "noise"):
            raise MmddError(f"method.init must be 'real' or 'noise', got {self.init!r}")
        if self.temperature is not None and (isinstance(self.temperature, bool) or
                                             not isinstance(self.temperature, (int, float)) or self.temperature <= 0):
            raise MmddError(f"method.temperature must be a number > 0 or null, got {self.temperature!r}")
        if self.label_temperature <= 0:
            raise MmddError(f"method.label_temperature must be > 0, got {self.label_temperature}")
        if self.syn_steps < 1 or self.expert_epochs < 1 or self.max_start_epoch < 1 or self.iterations < 1:
            raise MmddError("method.syn_steps, expert_epochs, max_start_epoch and iterations must all be >= 1")

    _INTS = ("syn_steps", "expert_epochs", "max_start_epoch", "iterations")
    _OPTIONAL_INTS = ("batch_syn", "max_experts", "feature_chunk")
    _FLOATS = ("lr_img", "lr_txt", "lr_lr", "lr_init", "momentum", "label_temperature", "lr_sim", "sim_momentum")
    _OPTIONAL_FLOATS = ("lr_min",)
    _STRS = ("loss_merge", "tesla_lr_loss", "init", "meta_gradient", "inner_loss")
    _OPTIONAL_DICTS = ("similarity", "blend")

    def _check_types(self) -> None:
        """Values from YAML or a command-line override (`method.syn_steps=abc`) are not typed by Hydra: refuse
        the wrong kinds here, naming the field, instead of failing deep inside a comparison or a range()."""
        from collections.abc import Mapping

        def bad(f: str, what: str):
            v = getattr(self, f)
            return MmddError(f"method.{f} must be {what}, got {v!r} ({type(v).__name__}); "
                             f"fix it in conf/method/ or on the command line (method.{f}=...)")

        for f in self._INTS + self._OPTIONAL_INTS:
            v = getattr(self, f)
            if v is None and f in self._OPTIONAL_INTS:
                continue
            what = "an integer" + (" or null" if f in self._OPTIONAL_INTS else "")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(f, what)
            if isinstance(v, float):
                if not v.is_integer():
                    raise bad(f, what)
                setattr(self, f, int(v))
        for f in self._FLOATS + self._OPTIONAL_FLOATS:
            v = getattr(self, f)
            if v is None and f in self._OPTIONAL_FLOATS:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                raise bad(f, "a finite number")
            setattr(self, f, float(v))
        for f in self._STRS:
            if not isinstance(getattr(self, f), str):
                raise bad(f, "a string")
        for f in self._OPTIONAL_DICTS:
            v = getattr(self, f)
            if v is not None and not isinstance(v, Mapping):
                raise bad(f, "a mapping of settings or null")
        if not isinstance(self.cache_features, bool):
            raise bad("cache_features", "true or false")


def draw_segment_start(generator: torch.Generator, n_experts: int, max_start_epoch: int) -> tuple[int, int]:
    """The expert and start epoch of one iteration (MTT: uniform over experts and [0, max_start_epoch))."""
    expert = int(torch.randint(n_experts, (1,), generator=generator))
    start = int(torch.randint(max_start_epoch, (1,), generator=generator))
    return expert, start


def build_segment(model, layout: ParamLayout, syn: SyntheticSet, config: MatchingConfig, start, target,
                  generator: torch.Generator, device=None) -> Segment:
    """One iteration's segment: the synthetic set's data, step sizes and S, batches and blends drawn from
    `generator` (so two runs with equally seeded generators draw the same)."""

    def inner_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return pair_loss(config.inner_loss, logits, syn.similarity_matrix(idx), config.label_temperature)

    return Segment(
        model=model,
        layout=layout,
        start=start,
        target=target,
        lrs={"image": syn.lrs["image"], "text": syn.lrs["text"]},
        images=syn.images,
        texts=syn.texts,
        schedule=BatchSchedule(len(syn), config.batch_syn, generator, device=device),
        syn_steps=config.syn_steps,
        inner_loss=inner_loss,
        merged=config.loss_merge == "merged",
        lr_merged=config.loss_merge == "merged" and config.tesla_lr_loss == "as_loss",
        extra=tuple(syn.similarity.parameters()) if syn.similarity is not None else (),
        blend=Blend(float(config.blend["alpha"]), generator) if config.blend else None,
    )


def caches_features(config: MatchingConfig, model) -> bool:
    return config.cache_features and model.backbone_is_cacheable()


def strategy_for(config: MatchingConfig, model):
    """The configured meta-gradient, on cached backbone features when the backbone allows it."""
    strategy = meta_gradient(config.meta_gradient)
    if caches_features(config, model):
        strategy = with_cached_features(strategy, config.feature_chunk)
    return strategy


def outer_optimizer(syn: SyntheticSet, config: MatchingConfig) -> torch.optim.SGD:
    """The outer SGD over the synthetic set: images, texts, step sizes (and S), one param group each. One optimizer
    with param groups: several optimizers would each advance Lightning's global_step."""
    groups = [
        {"params": [syn.images], "lr": config.lr_img},
        {"params": [syn.texts], "lr": config.lr_txt},
        {"params": list(syn.lrs.parameters()), "lr": config.lr_lr},
    ]
    if syn.similarity is not None:
        groups.append({"params": list(syn.similarity.parameters()), "lr": config.lr_sim, "momentum": config.sim_momentum})
    return torch.optim.SGD(groups, lr=config.lr_img, momentum=config.momentum)


class NonFiniteLoss(MmddError):
    """Too many consecutive iterations with a NaN/inf matching loss or gradient, or an outer step that overflowed."""


class DistillModule(L.LightningModule):
    def __init__(self, model, syn: SyntheticSet, trajectories: ExpertSnapshots, config: MatchingConfig, seed: int,
                 probe=None, diagnostics_every: int = 0, identity: dict | None = None, max_nonfinite: int = 10):
        super().__init__()
        # What this run distils (mmdd.utils.config.distill_identity): a checkpoint resumes only into the same.
        self.identity = identity
        # Iterations with a NaN/inf loss or gradient are skipped; this many in a row stop the run.
        self.max_nonfinite = int(max_nonfinite)
        self.nonfinite_in_a_row = 0
        self.skipped_iterations = 0
        self._resume_rng: torch.Tensor | None = None
        self.resumes: list[dict] = []  # provenance: at which iterations this run was resumed, and what changed
        self.save_before_stop = None  # called on every rank before a stop on repeated NaN losses
        self._strategy = None  # the meta-gradient (on cached features when allowed), chosen at the first iteration
        self.seed = int(seed)
        # Modality-collapse diagnostics (mmdd.evaluate.diagnostics.CollapseProbe) every k iterations.
        self.probe = probe
        self.diagnostics_every = int(diagnostics_every)
        self.diagnostics: dict[str, dict[str, float]] = {}
        self.automatic_optimization = False
        self.model = model
        self.syn = syn
        # The experts stay on disk: each iteration reads the drawn expert's start and target snapshots only.
        self.trajectories = trajectories
        self.layout = ParamLayout.from_model(model)
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)
        if config.max_start_epoch + config.expert_epochs > trajectories.epochs:
            raise MmddError(
                f"method.max_start_epoch ({config.max_start_epoch}) + expert_epochs ({config.expert_epochs}) "
                f"exceeds the {trajectories.epochs} recorded teacher epochs; lower them or record more epochs "
                "(teacher.epochs)"
            )
        self.history: list[dict[str, float]] = []
        for p in self.model.parameters():
            p.requires_grad_(False)

    def configure_optimizers(self):
        return outer_optimizer(self.syn, self.config)

    def setup(self, stage: str) -> None:
        # Every rank draws its own experts, start epochs and batches; rank 0 draws what a single process does.
        from mmdd.methods.distributed import rank_seed

        self.generator.manual_seed(rank_seed(self.seed, self.global_rank))

    # -- checkpoints: everything an uninterrupted run would still have in memory --------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from mmdd.methods.distributed import gather_states

        checkpoint["mmdd"] = {
            "identity": self.identity,
            "world_size": self.trainer.world_size,
            "generator": gather_states(self, self.generator.get_state()),  # [world, ...]: each rank's draws
            "torch_rng": gather_states(self, torch.get_rng_state()),  # dropout masks
            "cuda_rng": gather_states(self, torch.cuda.get_rng_state(self.device)) if self.device.type == "cuda" else None,
            "history": self.history,
            "diagnostics": self.diagnostics,
            "skipped_iterations": self.skipped_iterations,
            "outer": self.outer_settings(),
            "resumes": self.resumes,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from mmdd.errors import ArtifactError
        from mmdd.utils.config import config_differences

        state = checkpoint.get("mmdd")
        if state is None:
            raise ArtifactError("the checkpoint is not a distillation checkpoint of mmdd (no 'mmdd' state)")
        if self.identity is not None and state["identity"] != self.identity:
            diffs = "; ".join(config_differences(state["identity"], self.identity))
            raise ArtifactError(f"the checkpoint was written by another distillation ({diffs}); resume with the "
                                "settings it was made with, or start a fresh run in a new directory")
        done = int(checkpoint.get("global_step", 0))
        if done > self.config.iterations:
            raise MmddError(f"the checkpoint is at iteration {done}, beyond method.iterations={self.config.iterations}; "
                            f"resume with method.iterations >= {done}, or start over with resume=false")
        world = self.trainer.world_size
        if state["world_size"] != world:
            raise MmddError(f"the checkpoint was written by {state['world_size']} processes, this run has {world}; "
                            "resume with the same hardware.devices x hardware.num_nodes")
        rank = self.global_rank
        # Each state is a row of a [world, ...] tensor: a view that does not start at its storage's beginning for
        # rank > 0, which Generator.set_state reads from the storage's start (a crash in libtorch): clone the rows.
        self.generator.set_state(state["generator"][rank].clone())
        # Applied when the first resumed iteration starts: starting the data loader draws from the global RNG.
        self._resume_rng = (state["torch_rng"][rank].clone(),
                            None if state["cuda_rng"] is None else state["cuda_rng"][rank].clone())
        self.history = state["history"]
        self.diagnostics = state["diagnostics"]
        self.skipped_iterations = state.get("skipped_iterations", 0)
        changed = config_differences(state.get("outer", {}), self.outer_settings())
        self.resumes = [*state.get("resumes", []), {"iteration": int(checkpoint.get("global_step", 0)),
                                                    "changed": changed}]
        if changed:
            log.info("resuming with other outer settings: %s", "; ".join(changed))

    def outer_settings(self) -> dict:
        return {k: getattr(self.config, k) for k in OUTER_SETTINGS}

    def on_train_start(self) -> None:
        # After Lightning restored the optimizer of a checkpoint: this run's learning rates and momenta apply.
        fresh = self.configure_optimizers()
        for group, want in zip(self.optimizers().optimizer.param_groups, fresh.param_groups):
            group["lr"], group["momentum"] = want["lr"], want["momentum"]

    def on_fit_start(self):
        if self.probe is not None:
            self.probe.to(self.device)
            if "initial" not in self.diagnostics:  # a resumed run keeps the first start's
                self.diagnostics = {"real": self.probe.reference, "initial": self.probe(self.syn.images, self.syn.texts)}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def iteration(self):
        """One outer iteration's gradients (left in .grad); returns (loss, terms, expert, start)."""
        expert, start = draw_segment_start(self.generator, self.trajectories.n_experts, self.config.max_start_epoch)
        starts, targets = self.trajectories.segment(expert, start, self.config.expert_epochs, self.device)
        seg = build_segment(self.model, self.layout, self.syn, self.config, starts, targets, self.generator, self.device)
        if self._strategy is None:  # decided once, in training mode (batch-norm statistics decide caching)
            self._strategy = strategy_for(self.config, self.model)
        loss, terms = self._strategy(seg, lambda t, inputs: self.manual_backward(t, inputs=inputs))
        return loss, terms, expert, start

    def average_gradients(self) -> None:
        """Mean of the synthetic set's gradients over the ranks (each rank matched its own trajectory)."""
        if self.trainer.world_size == 1:
            return
        for p in self.syn.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = self.trainer.strategy.reduce(p.grad, reduce_op="mean")

    def all_finite(self, tensors) -> bool:
        """One device-side reduction and one host sync; agreed by every rank (all skip, or none does)."""
        ok = torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all().float()
        if self.trainer.world_size > 1:
            ok = self.trainer.strategy.reduce(ok, reduce_op="mean")
        return float(ok) == 1.0

    def gradients_are_finite(self, loss: torch.Tensor) -> bool:
        return self.all_finite([loss, *(p.grad for p in self.syn.parameters() if p.grad is not None)])

    def skip_nonfinite(self, step: int) -> None:
        """The set, step sizes, S and momentum stay as they were; stop after `max_nonfinite` in a row."""
        self.nonfinite_in_a_row += 1
        self.skipped_iterations += 1
        self.log("distill/skipped_iterations", float(self.skipped_iterations), on_step=True, batch_size=1)
        log.warning("iteration %d: NaN/inf matching loss or gradient; step skipped (%d in a row)", step,
                    self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            if self.save_before_stop is not None:
                self.save_before_stop()
            raise NonFiniteLoss(
                f"{self.nonfinite_in_a_row} iterations in a row had a NaN/inf matching loss or gradient (up to "
                f"iteration {step}); stopped. The synthetic set is left as it was before them. Lower the outer "
                "learning rates (method.lr_img, lr_txt, lr_lr) or method.lr_init, or raise max_nonfinite"
            )

    def training_step(self, batch, batch_idx):
        if self._resume_rng is not None:
            cpu, cuda = self._resume_rng
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)
            self._resume_rng = None
        t0 = time.perf_counter()
        opt = self.optimizers()
        opt.zero_grad()
        loss, terms, expert, start = self.iteration()
        self.average_gradients()
        if not self.gradients_are_finite(loss):
            # No optimizer step: the set and the momentum stay; the step count does not advance, so the run
            # still makes method.iterations outer steps (the next iteration draws anew).
            opt.zero_grad()
            self.skip_nonfinite(self.global_step + 1)
            return
        self.nonfinite_in_a_row = 0
        opt.step()
        self.syn.clamp_lrs_(self.config.lr_min)
        if not self.all_finite(list(self.syn.parameters())):
            # Finite gradients, but the step overflowed: the set in memory is lost; the last saved one is not.
            raise NonFiniteLoss(
                f"the outer step of iteration {self.global_step} made the synthetic set non-finite (overflow); "
                "stopped without saving it: the set and checkpoint last written (save_every) are intact. "
                "Lower the outer learning rates (method.lr_img, lr_txt, lr_lr)")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        if self.trainer.world_size > 1:  # the loss of the averaged step: the mean over the ranks' samples
            loss = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
            terms = {m: self.trainer.strategy.reduce(v.detach(), reduce_op="mean") for m, v in terms.items()}
        stats = {
            "distill/matching_loss": float(loss.detach()),
            **{f"distill/loss_{m}": float(v.detach()) for m, v in terms.items()},
            **{f"distill/lr_{m}": v for m, v in self.syn.lr_values().items()},
            "distill/sec_per_iter": seconds,
            "distill/peak_mem_mb": peak_memory_mb(self.device),
            "distill/start_epoch": float(start),
        }
        step = self.global_step
        if self.probe is not None and self.diagnostics_every and (
            step % self.diagnostics_every == 0 or step == self.config.iterations
        ):
            self.diagnostics["final"] = self.probe(self.syn.images, self.syn.texts)
            stats.update({f"distill/diag_{k}": v for k, v in self.diagnostics["final"].items()})
        self.history.append({"iteration": float(step), **stats})
        self.log_dict(stats, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        self.log("loss", stats["distill/matching_loss"], prog_bar=True, logger=False, batch_size=1)
