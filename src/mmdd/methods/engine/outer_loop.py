"""The outer loop of every learned method: one Lightning training step = one outer iteration on the synthetic set.

What a method brings is an `Objective`: given the set and the run's generator, it leaves the gradient of its loss
in the set's `.grad` and says what to log. Everything around it lives here once: the outer optimizer's parameter
groups, per-rank draws, checkpoints that resume bit for bit (identity, every rank's RNG, history), NaN/inf guards,
DDP gradient averaging, timing, memory, collapse diagnostics and the history a run reports.
"""

from __future__ import annotations

import copy
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import lightning as L
import torch

from mmdd.config_schema import check_fields
from mmdd.errors import ArtifactError, MmddError
from mmdd.synthetic.synthetic_set import SyntheticSet
from mmdd.utils.config import config_differences
from mmdd.identity import OUTER_SETTINGS
from mmdd.utils.seed import rank_seed, seed_rank_streams

log = logging.getLogger(__name__)

# backward(loss, inputs): Lightning's manual_backward, so precision plugins (bf16, fp16 scaling) see every backward.
Backward = Callable[[torch.Tensor, list[torch.Tensor]], None]


@dataclass
class ObjectiveStep:
    """What one objective evaluation reports; its gradients are already in the set's `.grad`."""

    loss: torch.Tensor  # averaged over the ranks and logged as distill/matching_loss (every method's curve)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # averaged over ranks, logged as distill/loss_<k>
    stats: dict[str, float] = field(default_factory=dict)  # logged as given (e.g. distill/start_epoch)


class Objective(Protocol):
    """A learned method's loss on the synthetic set. `model` (or None) is registered in the outer loop, frozen,
    and moved to the device with it; the objective is not a module, so checkpoints hold model.* and syn.* only."""

    model: torch.nn.Module | None

    def __call__(self, syn: SyntheticSet, generator: torch.Generator, backward: Backward) -> ObjectiveStep: ...


@dataclass(kw_only=True)
class OuterSettings:
    """How the synthetic set is learned, whatever the objective (conf/method/<name>.yaml, which sets every field:
    the YAML is where the defaults live). Subclasses add their objective's settings; every field's type is checked
    when the method is built (`method.<field>=abc` is a sentence naming the field, not a failure deep inside a
    comparison)."""

    lr_img: float  # outer lr of the synthetic images
    lr_txt: float  # outer lr of the synthetic text embeddings
    lr_lr: float  # outer lr of the learned step sizes
    lr_init: float  # initial learned step size
    momentum: float
    # real: distinct train images with one of their captions; noise: Gaussian; reference: random caption entries with
    # their images through the teachers' augmentation, as the reference scripts (methods.base.reference_pairs)
    init: str
    iterations: int
    lr_min: float | None  # learned step sizes clamped here after each outer step; None = no clamp (the papers')
    similarity: dict | None  # LoRS: {kind: lowrank, rank, alpha} or {kind: full}; None = no S
    lr_sim: float  # outer lr of S
    sim_momentum: float
    grad_clip: float | None  # clip the joint norm of the images' and texts' gradients (MDM: 1.0); None = off
    # PTM-ST: an exponential moving average of the set (e = d e + (1 - d) x after every step) is what is saved and
    # evaluated; the step sizes stay the learned ones (PTM's evaluated sets carry the raw step sizes). None = off.
    ema_decay: float | None
    # False: the average starts at the initial set (PTM-ST's timm ModelEma), which keeps the weight d^T after T steps
    # (0.99^2001 = 2e-9 in PTM's runs, but 0.99^100 = 37 % in a 100-step one). True: bias-corrected, no weight on the
    # initial set whatever T: e_t = sum_s (1-d) d^(t-s) x_s / (1 - d^t), the iterates weighted as the plain average
    # weights them once d^T is negligible.
    ema_bias_correction: bool

    INITS = ("real", "noise", "reference")  # what `init` may name; a method with its own initialisation extends this

    def __post_init__(self):
        from mmdd.synthetic.similarity import KINDS as SIMILARITY_KINDS

        check_fields(self, "method", "fix it in conf/method/ or on the command line")
        if self.similarity is not None and self.similarity.get("kind") not in SIMILARITY_KINDS:
            raise MmddError(f"method.similarity.kind must be one of {SIMILARITY_KINDS} (or similarity: null)")
        if self.init not in self.INITS:
            raise MmddError(f"method.init must be one of {self.INITS}, got {self.init!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise MmddError(f"method.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise MmddError(f"method.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.iterations < 1:
            raise MmddError(f"method.iterations must be >= 1, got {self.iterations}")

    # A learned similarity S is stored in the place of one pair (LoRS's accounting): a budget of B pairs distils B - 1.
    def pairs(self, budget: int) -> int:
        """How many pairs a set of `budget` holds (one fewer with S); an MmddError when none would be left."""
        if self.similarity and budget < 2:
            raise MmddError(f"budget={budget}: a learned similarity takes one pair's storage; use budget >= 2")
        return budget - 1 if self.similarity else budget

    def budget(self, pairs: int) -> int:
        """The budget of a set of `pairs` pairs (S counted as one more)."""
        return pairs + 1 if self.similarity else pairs


def outer_optimizer(syn: SyntheticSet, settings: OuterSettings) -> torch.optim.SGD:
    """The outer SGD over the synthetic set: images, texts, step sizes (and S), one param group each. One optimizer
    with param groups: several optimizers would each advance Lightning's global_step."""
    groups = [
        {"params": [syn.images], "lr": settings.lr_img},
        {"params": [syn.texts], "lr": settings.lr_txt},
        {"params": list(syn.lrs.parameters()), "lr": settings.lr_lr},
    ]
    if syn.similarity is not None:
        groups.append({"params": list(syn.similarity.parameters()), "lr": settings.lr_sim,
                       "momentum": settings.sim_momentum})
    return torch.optim.SGD(groups, lr=settings.lr_img, momentum=settings.momentum)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak RSS on CPU (labelled as such in logs)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class OuterIterations:
    """What the fit iterates over: one item per outer iteration, carrying nothing (an objective draws its own
    samples from the loop's generator), so it is not a DataLoader. Lightning takes it as resumable: with nothing in
    it, a resumed run loses nothing by iterating from the start, and `max_steps` ends the run at the right step.
    Each pass draws one number from torch's global RNG, as a DataLoader's iterator does, so the dropout masks of
    every run (resumed and DDP ones too) are those of runs made before it replaced one."""

    def __init__(self, iterations: int):
        self.iterations = iterations

    def __len__(self) -> int:
        return self.iterations

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_()
        return iter(range(self.iterations))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NonFiniteLoss(MmddError):
    """Too many consecutive iterations with a NaN/inf loss or gradient, or an outer step that overflowed."""


class OuterLoopModule(L.LightningModule):
    def __init__(self, objective: Objective, syn: SyntheticSet, settings: OuterSettings, seed: int, probe=None,
                 diagnostics_every: int = 0, identity: dict | None = None, max_nonfinite: int = 10):
        super().__init__()
        # What this run distils (mmdd.identity.distill_identity): a checkpoint resumes only into the same.
        self.identity = identity
        # Iterations with a NaN/inf loss or gradient are skipped; this many in a row stop the run.
        self.max_nonfinite = max_nonfinite
        self.nonfinite_in_a_row = 0
        self.skipped_iterations = 0
        self._resume_rng: torch.Tensor | None = None
        self.resumes: list[dict] = []  # provenance: at which iterations this run was resumed, and what changed
        self.seed = seed
        # Modality-collapse diagnostics (mmdd.evaluate.diagnostics.CollapseProbe) every k iterations.
        self.probe = probe
        self.diagnostics_every = diagnostics_every
        self.diagnostics: dict[str, dict[str, float]] = {}
        self.automatic_optimization = False
        self.objective = objective
        if objective.model is not None:
            self.model = objective.model  # before syn: the checkpoints' state_dict order
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.syn = syn
        self.settings = settings
        # The EMA of the set (ema_decay): a frozen copy, in the checkpoints with the set, starting at the initial set.
        self.ema = copy.deepcopy(syn).requires_grad_(False) if settings.ema_decay is not None else None
        if self.ema is not None and settings.ema_bias_correction:
            # how many steps the average holds (a buffer: checkpointed, so a resumed run continues its weights)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict[str, float]] = []

    def saved_set(self) -> SyntheticSet:
        """What the run saves and hands to its students: the set, or its EMA (ema_decay)."""
        return self.syn if self.ema is None else self.ema

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.settings.ema_decay
        keep, weight = d, 1.0 - d  # of the average so far, of the newest set
        if self.settings.ema_bias_correction:
            # e_t = (1 - w_t) e_(t-1) + w_t x_t with w_t = (1-d)/(1-d^t) is the bias-corrected average (w_1 = 1: the
            # initial set drops out)
            self.ema_updates += 1
            weight = (1.0 - d) / (1.0 - d ** int(self.ema_updates))
            keep = 1.0 - weight
        for name, p in self.syn.named_parameters():
            e = self.ema.get_parameter(name)
            if name.startswith("lrs."):
                e.copy_(p)  # the learned step sizes themselves (see OuterSettings.ema_decay)
            else:
                e.mul_(keep).add_(p, alpha=weight)

    def configure_optimizers(self):
        return outer_optimizer(self.syn, self.settings)

    def setup(self, stage: str) -> None:
        # Every rank draws its own samples; rank 0 draws what a single process does.
        self.generator.manual_seed(rank_seed(self.seed, self.global_rank))
        seed_rank_streams(self.seed, self.global_rank)

    # -- checkpoints: everything an uninterrupted run would still have in memory --------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from mmdd.methods.engine.distributed import gather_states

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
        state = checkpoint.get("mmdd")
        if state is None:
            raise ArtifactError("the checkpoint is not a distillation checkpoint of mmdd (no 'mmdd' state)")
        if self.identity is not None and state["identity"] != self.identity:
            diffs = "; ".join(config_differences(state["identity"], self.identity))
            raise ArtifactError(f"the checkpoint was written by another distillation ({diffs}); resume with the "
                                "settings it was made with, or start a fresh run in a new directory")
        done = int(checkpoint.get("global_step", 0))
        if done > self.settings.iterations:
            raise MmddError(f"the checkpoint is at iteration {done}, beyond method.iterations={self.settings.iterations}; "
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
        self.resumes = [*state.get("resumes", []), {"iteration": done, "changed": changed}]
        if changed:
            log.info("resuming with other outer settings: %s", "; ".join(changed))

    def outer_settings(self) -> dict:
        return {k: getattr(self.settings, k) for k in OUTER_SETTINGS}

    def on_train_start(self) -> None:
        self._last_step_end = time.perf_counter()
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

    def average_over_ranks(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]):
        """Mean of the synthetic set's gradients over the ranks (each rank drew its own samples), and of the matching
        loss and its terms, in one all-reduce of one flat buffer (not one per tensor: 13 collectives and host syncs
        an iteration before). Returns the mean loss and terms; a rank's non-finite loss makes the mean non-finite,
        so every rank sees it."""
        world = self.trainer.world_size
        if world == 1:
            return loss, terms
        params = list(self.syn.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        scalars = torch.stack([loss.detach(), *(v.detach() for v in terms.values())]).to(params[0].grad.dtype)
        flat = torch.cat([*(p.grad.reshape(-1) for p in params), scalars])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= world
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p.grad).clone()
            offset += p.numel()
        mean = flat[offset:]
        return mean[0], {m: mean[1 + i] for i, m in enumerate(terms)}

    @staticmethod
    def all_finite(tensors) -> bool:
        """One device-side reduction and one host sync. Every rank checks the same values (the averaged gradients,
        the set after the same step), so all skip or none does without a collective."""
        return bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())

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
            raise NonFiniteLoss(  # on every rank at once: DistillCheckpoint saves the last good set
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
        result = self.objective(self.syn, self.generator, lambda t, inputs: self.manual_backward(t, inputs=inputs))
        loss, terms = self.average_over_ranks(result.loss, result.terms)  # the mean over the ranks' samples
        if not self.gradients_are_finite(loss):
            # No optimizer step: the set and the momentum stay; the step count does not advance, so the run
            # still makes method.iterations outer steps (the next iteration draws anew).
            opt.zero_grad()
            self.skip_nonfinite(self.global_step + 1)
            self._last_step_end = time.perf_counter()
            return
        self.nonfinite_in_a_row = 0
        if self.settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([self.syn.images, self.syn.texts], self.settings.grad_clip)
        opt.step()
        self.syn.clamp_lrs_(self.settings.lr_min)
        self.update_ema()
        if not self.all_finite(list(self.syn.parameters())):
            # Finite gradients, but the step overflowed: the set in memory is lost; the last saved one is not.
            raise NonFiniteLoss(
                f"the outer step of iteration {self.global_step} made the synthetic set non-finite (overflow); "
                "stopped without saving it: the set and checkpoint last written (save_every) are intact. "
                "Lower the outer learning rates (method.lr_img, lr_txt, lr_lr)")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        values = torch.stack([loss.detach(), *(v.detach() for v in terms.values())]).tolist()  # one host sync
        stats = {
            "distill/matching_loss": values[0],
            **{f"distill/loss_{m}": v for m, v in zip(terms, values[1:])},
            **{f"distill/lr_{m}": v for m, v in self.syn.lr_values().items()},
            "distill/sec_per_iter": seconds,
            # from the previous step's end: also the trainer's loop and the logging (what a timer around a script's
            # loop sees; the parity harness compares it with the official loops')
            "distill/wall_sec_per_iter": time.perf_counter() - self._last_step_end,
            "distill/peak_mem_mb": peak_memory_mb(self.device),
            # what the caching allocator holds (allocated + its cache): what the GPU must have free
            **({"distill/peak_reserved_mb": torch.cuda.max_memory_reserved(self.device) / 2**20}
               if self.device.type == "cuda" else {}),
            **result.stats,
        }
        step = self.global_step
        if self.probe is not None and self.diagnostics_every and (
            step % self.diagnostics_every == 0 or step == self.settings.iterations
        ):
            saved = self.saved_set()  # the set the run saves (its EMA under ema_decay), not the raw iterate
            self.diagnostics["final"] = self.probe(saved.images, saved.texts)
            stats.update({f"distill/diag_{k}": v for k, v in self.diagnostics["final"].items()})
        self.history.append({"iteration": float(step), **stats})
        self.log_dict(stats, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        self.log("loss", stats["distill/matching_loss"], prog_bar=True, logger=False, batch_size=1)
        self._last_step_end = time.perf_counter()

