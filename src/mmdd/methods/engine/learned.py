"""What every learned method shares: its settings, its initial set, and a run of the outer loop that saves,
resumes and stops as every other method's does. A new learned method subclasses `LearnedMethod` with its settings
dataclass and `make_objective` (see tests/test_outer_loop.py for one in thirty lines)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmdd.config_schema import build_settings
from mmdd.errors import MmddError, Stopped
from mmdd.data.transforms import augment_config
from mmdd.methods.base import DistillResult, Method, check_budget, reference_pairs, sample_real_pairs, save_synthetic
from mmdd.methods.engine.checkpointing import CHECKPOINT, DistillCheckpoint, resume_checkpoint
from mmdd.methods.engine.distributed import GuardedCheckpointIO, distill_strategy
from mmdd.utils.draws import draws_hooked
from mmdd.methods.engine.outer_loop import Objective, OuterIterations, OuterLoopModule, OuterSettings
from mmdd.models.dual_encoder import build_dual_encoder, frozen_backbone_fingerprint
from mmdd.synthetic.similarity import build_similarity, similarity_spec
from mmdd.synthetic.synthetic_set import SyntheticSet, check_synthetic_compatible
from mmdd.identity import distill_identity
from mmdd.utils.trainer import accelerate_model, build_trainer, precision_dtype

log = logging.getLogger(__name__)


class LearnedMethod(Method):
    """A method that learns the synthetic set by gradient descent on an `Objective`.

    Subclasses set `settings_cls` (an OuterSettings subclass: every key of conf/method/<name>.yaml but `_target_`
    and `name`) and implement `make_objective`; `prepare_model` and `make_probe` are optional hooks."""

    settings_cls: type[OuterSettings] = OuterSettings
    # True when the objective differentiates through the model's own gradient (trajectory matching): the backbone is
    # then left uncompiled (torch.compile has no double backward)
    second_order = False

    def __init__(self, name: str, **settings):
        self.name = name
        self.config = build_settings(self.settings_cls, settings, "method", f"conf/method/{name}.yaml (method={name})")

    # -- hooks --------------------------------------------------------------------------------------------
    def prepare_model(self, model) -> None:
        """Adjust or refuse the model this method distils with (before its backbone is fingerprinted)."""

    def make_objective(self, cfg, model, train, fingerprint: str) -> Objective:
        """The method's loss on the set, for `model` (built from cfg.model, frozen by the loop) and the train split;
        `fingerprint` is the model's frozen backbone's, for checks against what the objective reads. An objective
        that reads experts of the trajectory store lists them in `teacher_experts` (their training is its cost)."""
        raise NotImplementedError

    def make_probe(self, cfg, model, objective: Objective, train, n: int):
        """A modality-collapse probe (mmdd.evaluate.diagnostics.CollapseProbe) for `n` pairs, or None."""
        return None

    # -- the run ------------------------------------------------------------------------------------------
    def initial_set(self, cfg, train, budget: int, resuming: bool = False) -> SyntheticSet:
        """`budget` distinct train images, each with one of its captions (init=real), or Gaussian data of the same
        shapes, the texts at the captions' per-dimension mean and std (init=noise); step sizes at lr_init.
        `resuming`: a checkpoint will replace the set, so an expensive initialisation may be skipped."""
        if cfg.get("init_from"):
            return self.set_from(cfg.init_from, cfg, train, budget)
        gen = torch.Generator().manual_seed(cfg.seed)
        if self.config.init == "reference":
            images, texts = reference_pairs(train, budget, gen, cfg.data.mean, cfg.data.std,
                                            augment_config(cfg.data.get("augment")))
        else:
            images, texts = sample_real_pairs(train, budget, gen, cfg.data.mean, cfg.data.std)
        if self.config.init == "noise":
            images = torch.randn(images.shape, generator=gen)
            texts = torch.randn(texts.shape, generator=gen) * train.text_emb.std(0, keepdim=True) + train.text_emb.mean(0, keepdim=True)
        lr = self.config.lr_init
        similarity = None
        if self.config.similarity:
            similarity = build_similarity(dict(self.config.similarity), images.shape[0], gen)
        return SyntheticSet(images, texts, {"image": lr, "text": lr}, similarity)

    def set_from(self, folder, cfg, train, n: int) -> SyntheticSet:
        """`init_from=<set dir>`: start from a saved set (its images, texts, step sizes and S) instead of the method's
        own initialisation, e.g. the official code's initial pairs in experiments/parity. It must be what this run
        would have made: `n` pairs of this data's image size and text width, with S of the method's kind."""
        syn, manifest = SyntheticSet.load(folder, dtype=precision_dtype(cfg.hardware))
        check_synthetic_compatible(manifest, cfg, train.text_emb.shape[1], f"init_from={folder}")
        problems = []
        if len(syn) != n:
            problems.append(f"{len(syn)} pairs, this run distils {n} (budget={cfg.budget}"
                            + (", S takes one pair" if self.config.similarity else "") + ")")
        spec = None if syn.similarity is None else syn.similarity.spec()
        want = similarity_spec(dict(self.config.similarity)) if self.config.similarity else None
        if spec != want:
            problems.append(f"similarity {spec}, method.similarity is {want}")
        if problems:
            raise MmddError(f"init_from={folder}: the set has {'; '.join(problems)}; pass a set made for these settings")
        return syn

    def synthesize(self, cfg, data, out_dir: Path, loggers: list) -> DistillResult:
        train = data["train"]
        budget = check_budget(cfg.budget, train)
        check_distill_precision(str(cfg.hardware.precision))
        pairs = self.config.pairs(budget)
        torch.manual_seed(cfg.seed)
        model = build_dual_encoder(cfg.model, train.text_emb.shape[1], cfg.data.image_size)
        self.prepare_model(model)
        fingerprint = frozen_backbone_fingerprint(model)
        accelerate_model(model, cfg.hardware, second_order=self.second_order)
        objective = self.make_objective(cfg, model, train, fingerprint)
        ckpt = resume_checkpoint(cfg.resume, out_dir)
        if ckpt is not None and draws_hooked(cfg):
            raise MmddError(f"draws.record / draws.replay runs start fresh, but {out_dir} holds a checkpoint to resume "
                            "from: rerun with resume=false (or another output directory)")
        syn = self.initial_set(cfg, train, pairs, resuming=ckpt is not None)
        every = cfg.diagnostics_every
        probe = self.make_probe(cfg, model, objective, train, len(syn)) if every else None
        loop = OuterLoopModule(objective, syn, self.config, seed=cfg.seed, probe=probe, diagnostics_every=every,
                         identity=distill_identity(cfg), max_nonfinite=cfg.max_nonfinite)

        def save(step: int) -> None:
            save_synthetic(cfg, loop.saved_set(), train, out_dir, self.manifest_fields(),
                           {"iteration": step, "complete": False, "backbone_fingerprint": fingerprint})

        if ckpt is not None:
            log.info("resuming from %s", ckpt)
        checkpoints = DistillCheckpoint(cfg.save_every, out_dir / CHECKPOINT, save)
        # One step per outer iteration; max_steps (not epochs) so that a resumed run stops at the same step.
        trainer = build_trainer(cfg, loggers, [checkpoints], max_steps=self.config.iterations, max_epochs=-1,
                                strategy=distill_strategy(cfg.hardware), use_distributed_sampler=False,
                                plugins=[GuardedCheckpointIO()])
        # Before a stop on repeated NaN losses (every rank at once): the set in memory is the last good one; keep it
        # and a checkpoint of it, so a rerun with lower learning rates continues from there.
        loop.save_before_stop = lambda: checkpoints.save(trainer, loop, with_set=True)

        def stopped() -> Stopped:
            stop = checkpoints.stopped_by or "SIGTERM"
            return Stopped(f"stopped by {stop} at iteration {trainer.global_step} of {self.config.iterations}, with the "
                           f"set and a checkpoint saved in {out_dir}; rerun the same command to resume",
                           exit_code=128 + int(getattr(signal, stop)))

        try:
            trainer.fit(loop, OuterIterations(self.config.iterations), ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
        except SIGTERMException as exc:
            raise stopped() from exc
        if checkpoints.stopped_by:
            raise stopped()
        # The iterations made before the last resume ran in earlier processes (their setup time is not known).
        done = loop.resumes[-1]["iteration"] if loop.resumes else 0
        earlier = sum(h["distill/sec_per_iter"] for h in loop.history if h["iteration"] <= done)
        return DistillResult(loop.saved_set(), history=loop.history, diagnostics=loop.diagnostics, resumes=loop.resumes,
                             backbone_fingerprint=fingerprint,
                             teacher_experts=list(getattr(objective, "teacher_experts", [])), earlier_seconds=earlier)


def check_distill_precision(precision: str) -> None:
    """The precisions a learned distillation runs in: 32-true, 64-true and bf16-mixed (autocast around fp32 tensors).
    fp16 needs loss scaling, which the distillation cannot honour: its guard skips every step whose loss or gradient
    is not finite (so the scaler would never back off, and the run stops after method.max_nonfinite skips), the inner
    steps' gradients would stay scaled, and grad_clip would clip scaled gradients. A half-precision `-true` run would
    hold the set, its step sizes and S in 16 bits, rounding away most outer updates."""
    if precision in ("16-mixed", "16"):
        raise MmddError(f"hardware.precision={precision} (fp16 with loss scaling) cannot distil: a step whose gradient "
                        "overflows is skipped by the NaN guard, so the loss scale would never back off and the run "
                        "would stop after method.max_nonfinite skips. Use hardware.precision=bf16-mixed "
                        "(hardware=gpu_bf16: same range as fp32, no scaling) or 32-true")
    if precision in ("bf16-true", "16-true"):
        raise MmddError(f"hardware.precision={precision} would hold the synthetic set, its step sizes and S in 16 bits, "
                        "rounding away most outer updates: use hardware.precision=bf16-mixed (autocast around fp32 "
                        "tensors; hardware=gpu_bf16) or 32-true")

