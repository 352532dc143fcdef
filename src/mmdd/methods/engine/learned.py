"""What every learned method shares: its settings, its initial set, and a run of the outer loop that saves,
resumes and stops as every other method's does. A new learned method subclasses `LearnedMethod` with its settings
dataclass and `make_objective` (see tests/test_outer_loop.py for one in thirty lines)."""

from __future__ import annotations

import logging
import signal

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmdd.config_schema import build_settings
from mmdd.errors import MmddError, Stopped
from mmdd.methods.base import DistillResult, Method, reference_pairs, sample_real_pairs
from mmdd.methods.context import MethodContext
from mmdd.methods.engine.checkpointing import CHECKPOINT, DistillCheckpoint, resume_checkpoint
from mmdd.methods.engine.distributed import GuardedCheckpointIO, distill_strategy
from mmdd.methods.engine.outer_loop import Objective, OuterIterations, OuterLoopModule, OuterSettings
from mmdd.models.dual_encoder import frozen_backbone_fingerprint
from mmdd.synthetic.similarity import build_similarity, similarity_spec
from mmdd.synthetic.synthetic_set import SyntheticSet, check_synthetic_compatible
from mmdd.utils.trainer import accelerate_model, precision_dtype

log = logging.getLogger(__name__)


class LearnedMethod(Method):
    """A method that learns the synthetic set by gradient descent on an `Objective`.

    Subclasses set `settings_cls` (an OuterSettings subclass: every key of conf/method/<name>.yaml but `_target_`
    and `name`) and implement `make_objective`; `prepare_model` and `make_probe` are optional hooks."""

    settings_cls: type[OuterSettings] = OuterSettings
    learned = True
    # True when the objective differentiates through the model's own gradient (trajectory matching): the backbone is
    # then left uncompiled (torch.compile has no double backward)
    second_order = False

    def __init__(self, name: str, **settings):
        self.name = name
        self.settings = build_settings(self.settings_cls, settings, "method", f"conf/method/{name}.yaml (method={name})")

    # -- hooks --------------------------------------------------------------------------------------------
    def prepare_model(self, model) -> None:
        """Adjust or refuse the model this method distils with (before its backbone is fingerprinted)."""

    def make_objective(self, context: MethodContext, model, fingerprint: str) -> Objective:
        """The method's loss on the set, for `model` (built by context.model, frozen by the loop) and the train split
        (context.train); `fingerprint` is the model's frozen backbone's, for checks against what the objective reads.
        An objective that reads experts of the trajectory store lists them in `teacher_experts` (their training is
        its cost)."""
        raise NotImplementedError

    def make_probe(self, context: MethodContext, model, objective: Objective, n: int):
        """A modality-collapse probe (mmdd.evaluate.diagnostics.CollapseProbe) for `n` pairs, or None."""
        return None

    # -- the run ------------------------------------------------------------------------------------------
    def initial_set(self, context: MethodContext, pairs: int, resuming: bool = False) -> SyntheticSet:
        """`pairs` distinct train images, each with one of its captions (init=real), or Gaussian data of the same
        shapes, the texts at the captions' per-dimension mean and std (init=noise); step sizes at lr_init.
        `resuming`: a checkpoint will replace the set, so an expensive initialisation may be skipped."""
        if context.init_from is not None:
            return self.set_from(context, pairs)
        train = context.train
        gen = torch.Generator().manual_seed(context.seed)
        if self.settings.init == "reference":
            images, texts = reference_pairs(train, pairs, gen, context.augment)
        else:
            images, texts = sample_real_pairs(train, pairs, gen)
        if self.settings.init == "noise":
            images = torch.randn(images.shape, generator=gen)
            texts = torch.randn(texts.shape, generator=gen) * train.text_emb.std(0, keepdim=True) + train.text_emb.mean(0, keepdim=True)
        lr = self.settings.lr_init
        similarity = None
        if self.settings.similarity:
            similarity = build_similarity(dict(self.settings.similarity), images.shape[0], gen)
        return SyntheticSet(images, texts, {"image": lr, "text": lr}, similarity)

    def set_from(self, context: MethodContext, n: int) -> SyntheticSet:
        """`init_from=<set dir>`: start from a saved set (its images, texts, step sizes and S) instead of the method's
        own initialisation, e.g. the official code's initial pairs in experiments/parity. It must be what this run
        would have made: `n` pairs of this data's image size and text width, with S of the method's kind."""
        folder = context.init_from
        syn, manifest = SyntheticSet.load(folder, dtype=precision_dtype(context.hardware))
        check_synthetic_compatible(manifest, context.model.text_encoder, context.model.image_size,
                                   context.model.text_dim, f"init_from={folder}")
        problems = []
        if len(syn) != n:
            problems.append(f"{len(syn)} pairs, this run distils {n} (budget={context.budget}"
                            + (", S takes one pair" if self.settings.similarity else "") + ")")
        spec = None if syn.similarity is None else syn.similarity.spec()
        want = similarity_spec(dict(self.settings.similarity)) if self.settings.similarity else None
        if spec != want:
            problems.append(f"similarity {spec}, method.similarity is {want}")
        if problems:
            raise MmddError(f"init_from={folder}: the set has {'; '.join(problems)}; pass a set made for these settings")
        return syn

    def synthesize(self, context: MethodContext) -> DistillResult:
        out_dir = context.out_dir
        check_distill_precision(str(context.hardware.precision))
        pairs = self.settings.pairs(context.budget)
        torch.manual_seed(context.seed)
        model = context.model.build()
        self.prepare_model(model)
        fingerprint = frozen_backbone_fingerprint(model)
        accelerate_model(model, context.hardware, second_order=self.second_order)
        objective = self.make_objective(context, model, fingerprint)
        ckpt = resume_checkpoint(context.resume, out_dir)
        if ckpt is not None and context.draws_hooked:
            raise MmddError(f"draws.record / draws.replay runs start fresh, but {out_dir} holds a checkpoint to resume "
                            "from: rerun with resume=false (or another output directory)")
        syn = self.initial_set(context, pairs, resuming=ckpt is not None)
        every = context.diagnostics_every
        probe = self.make_probe(context, model, objective, len(syn)) if every else None
        loop = OuterLoopModule(objective, syn, self.settings, seed=context.seed, probe=probe, diagnostics_every=every,
                               identity=context.records.identity, max_nonfinite=context.max_nonfinite)

        def save(step: int) -> None:  # an intermediate set, beside its checkpoint
            context.save_set(loop.saved_set(), self.manifest_fields(),
                             {"iteration": step, "complete": False, "backbone_fingerprint": fingerprint})

        if ckpt is not None:
            log.info("resuming from %s", ckpt)
        checkpoints = DistillCheckpoint(context.save_every, out_dir / CHECKPOINT, save)
        # One step per outer iteration; max_steps (not epochs) so that a resumed run stops at the same step.
        trainer = context.trainer(context.loggers, [checkpoints], max_steps=self.settings.iterations, max_epochs=-1,
                                  strategy=distill_strategy(context.hardware), use_distributed_sampler=False,
                                  plugins=[GuardedCheckpointIO()])

        def stopped() -> Stopped:
            stop = checkpoints.stopped_by or "SIGTERM"
            return Stopped(f"stopped by {stop} at iteration {trainer.global_step} of {self.settings.iterations}, with the "
                           f"set and a checkpoint saved in {out_dir}; rerun the same command to resume",
                           exit_code=128 + int(getattr(signal, stop)))

        try:
            trainer.fit(loop, OuterIterations(self.settings.iterations), ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
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

