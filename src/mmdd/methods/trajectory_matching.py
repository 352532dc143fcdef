"""Trajectory-matching distillation (MTT-VL; later TESLA-VL, LoRS, RepBlend plug in here)."""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from mmdd.errors import ArtifactError, MmddError, Stopped
from mmdd.methods.base import Method, check_budget, sample_real_pairs, save_synthetic
from mmdd.evaluate.diagnostics import CollapseProbe
from mmdd.methods.distill_module import DistillModule, MatchingConfig
from mmdd.methods.distributed import GuardedCheckpointIO, distill_strategy, raise_together
from mmdd.models.functional import ParamLayout
from mmdd.models.dual_encoder import build_dual_encoder, frozen_backbone_fingerprint
from mmdd.synthetic.similarity import build_similarity
from mmdd.synthetic.synthetic_set import SyntheticSet
from mmdd.teachers.trajectory_store import open_checked_trajectories
from mmdd.utils.config import distill_identity
from mmdd.utils.signal_stop import SignalStop
from mmdd.utils.trainer import accelerate_model, build_trainer

log = logging.getLogger(__name__)


CHECKPOINT = Path("checkpoint") / "last.ckpt"  # inside the synthetic set's directory


class DistillCheckpoint(SignalStop):
    """Every `every` outer steps: the synthetic set so far (rank 0) and a Lightning checkpoint to resume from
    (set, S, step sizes, optimizer momentum, step, every rank's RNG states, history); the checkpoint again at
    the end, so a finished run can be extended with more iterations. Both are written atomically.

    A stopping signal (SignalStop: every rank agrees after the same iteration) saves that iteration's set and
    checkpoint and ends the fit; `synthesize` then raises Stopped, so a stop is said and never taken for success."""

    def __init__(self, every: int, path: Path, save_set):
        super().__init__()
        self.every, self.path, self.save_set = every, Path(path), save_set
        self.last_saved = -1
        self.stopped_by: str | None = None  # SIGTERM / SIGINT, once the run stops on one

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):  # Lightning's own path: a SIGTERM before on_train_start
            self.stopped_by = self.stopped_by or "SIGTERM"
            if trainer.global_step != self.last_saved:
                self.last_saved = trainer.global_step
                self.save(trainer, pl_module, with_set=True)
        super().on_exception(trainer, pl_module, exception)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        stop = self.stop_requested(trainer, pl_module)
        if stop:
            self.stopped_by = signal.Signals(stop).name
            trainer.should_stop = True  # every rank, after this same iteration
        if (stop or (self.every and step % self.every == 0)) and step != self.last_saved:  # a skipped iteration keeps the step
            self.last_saved = step
            self.save(trainer, pl_module, with_set=True)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self.last_saved:
            self.save(trainer, pl_module, with_set=False)

    def save(self, trainer, pl_module, with_set: bool) -> None:
        """The set (rank 0), then the checkpoint (every rank takes part: RNG states are gathered; rank 0 writes);
        a failure on any rank stops every rank, with the last complete checkpoint left as it was."""
        error = None
        if with_set and trainer.is_global_zero:
            try:
                self.save_set(trainer.global_step)
            except Exception as exc:  # noqa: BLE001 - raised on every rank just below
                error = exc
        raise_together(trainer, pl_module.device, error, f"saving the synthetic set at iteration {trainer.global_step}")
        trainer.save_checkpoint(self.path)
        io = trainer.strategy.checkpoint_io
        raise_together(trainer, pl_module.device, io.take_error() if isinstance(io, GuardedCheckpointIO) else None,
                       f"writing the checkpoint {self.path}")


def resume_checkpoint(cfg, out_dir: Path) -> Path | None:
    """The checkpoint to resume from: `resume=auto` takes this run's own if one exists (a rerun in the same
    directory, a requeued SLURM job); `resume=<path>` a checkpoint file or a synthetic-set directory; `resume=false`
    starts over."""
    resume = str(cfg.get("resume", "auto"))
    if resume.lower() in ("none", "false"):
        return None
    if resume.lower() in ("auto", "true"):
        own = out_dir / CHECKPOINT
        return check_readable(own) if own.exists() else None
    path = Path(str(resume))
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        raise MmddError(f"resume={resume}: no checkpoint at {path}; pass a synthetic-set directory written by mmdd "
                        f"distill (it holds {CHECKPOINT}) or the .ckpt file, or resume=auto")
    return check_readable(path)


def check_readable(path: Path) -> Path:
    """Refuse a truncated, corrupted or foreign checkpoint with its path, before Lightning fails deep inside
    torch.load. weights_only: a checkpoint is a file a user hands us, and unpickling one can run any code it holds;
    mmdd's own checkpoints hold tensors and plain containers only."""
    try:
        # mmap: reads the archive's index and pickles, not the tensors (Lightning loads them right after)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or "mmdd" not in state or "state_dict" not in state:
            raise ValueError("not a distillation checkpoint of mmdd")
    except Exception as exc:  # torch.load raises many kinds on garbage (pickle, zip, EOF, ...)
        raise ArtifactError(f"checkpoint {path} cannot be used ({type(exc).__name__}: {exc}); delete it, or rerun with "
                            "resume=false to start over (the synthetic set saved beside it is kept until then)") from exc
    return path


class TrajectoryMatching(Method):
    """Distils by matching expert trajectories; all settings live in a `MatchingConfig`."""

    def __init__(self, name: str, **settings):
        self.name = name
        self.config = MatchingConfig(**settings)
        self.history: list[dict] = []
        self.diagnostics: dict[str, dict[str, float]] = {}

    def initial_set(self, cfg, train, budget: int) -> SyntheticSet:
        gen = torch.Generator().manual_seed(int(cfg.seed))
        images, texts = sample_real_pairs(train, budget, gen, cfg.data.mean, cfg.data.std)
        if self.config.init == "noise":
            images = torch.randn(images.shape, generator=gen)
            texts = torch.randn(texts.shape, generator=gen) * train.text_emb.std(0, keepdim=True) + train.text_emb.mean(0, keepdim=True)
        lr = self.config.lr_init
        similarity = None
        if self.config.similarity:
            similarity = build_similarity(dict(self.config.similarity), images.shape[0], gen)
        return SyntheticSet(images, texts, {"image": lr, "text": lr}, similarity)

    def synthesize(self, cfg, data, out_dir: Path, loggers: list) -> SyntheticSet:
        train = data["train"]
        budget = check_budget(cfg.budget, train)
        if self.config.similarity and budget < 2:
            raise MmddError(f"budget={budget}: a learned similarity takes one pair's storage; use budget >= 2")
        torch.manual_seed(int(cfg.seed))
        model = build_dual_encoder(cfg.model, train.text_emb.shape[1], int(cfg.data.image_size))
        self.prepare_model(model)
        self.backbone_fingerprint = frozen_backbone_fingerprint(model)
        accelerate_model(model, cfg.hardware, second_order=True)
        trajectories = open_checked_trajectories(cfg, model, self.config.max_experts, self.backbone_fingerprint)
        # LoRS: the similarity parameters take the storage of one pair, so B - 1 pairs are distilled.
        syn = self.initial_set(cfg, train, budget - 1 if self.config.similarity else budget)
        every = int(cfg.get("diagnostics_every") or 0)
        probe = self.collapse_probe(cfg, model, trajectories, train, len(syn)) if every else None
        module = DistillModule(model, syn, trajectories, self.config, seed=int(cfg.seed), probe=probe,
                               diagnostics_every=every, identity=distill_identity(cfg),
                               max_nonfinite=int(cfg.get("max_nonfinite", 10)))

        def save(step: int) -> None:
            save_synthetic(cfg, syn, train, out_dir, {"iteration": step, "complete": False,
                                                      "backbone_fingerprint": self.backbone_fingerprint})

        ckpt = resume_checkpoint(cfg, out_dir)
        if ckpt is not None:
            log.info("resuming from %s", ckpt)
        callbacks = [DistillCheckpoint(int(cfg.save_every), out_dir / CHECKPOINT, save)]
        # One step per outer iteration; max_steps (not epochs) so that a resumed run stops at the same step.
        trainer = build_trainer(cfg, loggers, callbacks, max_steps=self.config.iterations, max_epochs=-1,
                                strategy=distill_strategy(cfg.hardware), use_distributed_sampler=False,
                                plugins=[GuardedCheckpointIO()])
        iterations = DataLoader(range(self.config.iterations), batch_size=1)
        # Before a stop on repeated NaN losses (every rank at once): the set in memory is the last good one; keep it
        # and a checkpoint of it, so a rerun with lower learning rates continues from there.
        module.save_before_stop = lambda: callbacks[0].save(trainer, module, with_set=True)
        def stopped() -> Stopped:
            stop = callbacks[0].stopped_by or "SIGTERM"
            return Stopped(f"stopped by {stop} at iteration {trainer.global_step} of {self.config.iterations}, with the "
                           f"set and a checkpoint saved in {out_dir}; rerun the same command to resume",
                           exit_code=128 + int(getattr(signal, stop)))

        try:
            trainer.fit(module, iterations, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
        except SIGTERMException as exc:
            raise stopped() from exc
        if callbacks[0].stopped_by:
            raise stopped()
        self.history = module.history
        self.diagnostics = module.diagnostics
        self.resumes = module.resumes
        return syn

    def prepare_model(self, model) -> None:
        """The distillation loop's model: refuse what the method cannot use, and apply `method.temperature` (the inner
        loop's only: LoRS's COCO-500 script passes --temperature 0.1 to its distillation, while its teachers and
        students keep 0.07)."""
        if self.config.temperature is not None:
            model.logit_scale.fill_(math.log(1.0 / self.config.temperature))
        # Blending (RepBlend) mixes frozen backbone features before trainable heads; refuse other models.
        if self.config.blend and model.trainable != "heads":
            raise MmddError(
                f"method={self.name} blends the features of a frozen backbone and matches the heads only, but "
                f"model.trainable={model.trainable}: use model=convnet_heads (CPU), model=nfnet_bert_heads (the papers), "
                "or experiment=synscenes_repblend"
            )

    @staticmethod
    def collapse_probe(cfg, model, trajectories, train, n: int) -> CollapseProbe:
        """Embeds with expert 0's last recorded parameters; real reference: n real pairs (seeded)."""
        flats = trajectories.snapshots(0, [trajectories.epochs])[0]
        gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
        images, texts = sample_real_pairs(train, n, gen, cfg.data.mean, cfg.data.std)
        return CollapseProbe(model, ParamLayout.from_model(model), flats, images, texts)
