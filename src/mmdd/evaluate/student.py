"""Students: fresh models trained on a synthetic set, scored on retrieval (the protocols)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from torch.utils.data import DataLoader, TensorDataset

from mmdd.data.splits import SplitData
from mmdd.errors import MmddError
from mmdd.evaluate.encode import chunks, encode_images, encode_texts, evaluate_retrieval, model_dtype
from mmdd.evaluate.retrieval import retrieval_metrics
from mmdd.evaluate.student_draws import StudentDraws
from mmdd.models.losses import DEFAULT_INNER_LOSS, DEFAULT_LABEL_TEMPERATURE, pair_loss

log = logging.getLogger(__name__)

SELECTIONS = ("val", "test_best", "last")


@dataclass
class StudentResult:
    seed: int
    test: dict[str, float]
    selected: dict[str, float]  # the metrics the checkpoint was chosen on (val, or test under test_best)
    best_epoch: int
    train_seconds: float
    history: list[dict]


EVAL_SCHEDULES = ("every", "reference")
BATCH_DRAWS = ("permutation", "independent_if_similarity")
# A phased set's student (PTM-ST): separate (each phase its own step sizes, optimizer and schedule) | continued (PTM's
# evaluate_synset_PTM: every phase at the last phase's step sizes, one optimizer whose momentum carries over, one
# schedule counted over all phases)
PHASE_TRAININGS = ("separate", "continued")


class IndependentBatches(torch.utils.data.Sampler):
    """ceil(N / B) batches per epoch, each B indices of a fresh random permutation (so a pair may appear in several
    batches of an epoch, or in none): LoRS's and RepBlend's SimilarityDataloader, which their evaluation uses for
    sets with a learned similarity."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        for _ in range(len(self)):
            yield torch.randperm(self.n, generator=self.generator)[: self.batch_size].tolist()


class SelectionSplit:
    """The selection split as Lightning's validation data: chunks of its images and of its captions, as ranges of
    rows that `validation_step` encodes (the tensors are in memory). Not a DataLoader: a DataLoader's iterator draws
    from torch's global RNG, which would move the dropout masks of every later training step."""

    def __init__(self, data: SplitData | None, batch_size: int):
        self.batches = []  # none under selection=last: nothing is selected
        if data is not None:  # (which, first row, end): plain values, which Lightning's batch transfer passes as they are
            self.batches += [("image", r.start, r.stop) for r in chunks(data.num_images, batch_size)]
            self.batches += [("text", r.start, r.stop) for r in chunks(data.text_emb.shape[0], batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class StudentModule(L.LightningModule):
    """Trains a dual encoder on (synthetic) pairs and scores the selection split in Lightning's validation loop
    after the epochs `eval_schedule` names (and the last); `BestStudent` keeps the weights to test.

    selection=val: the best val r_mean's weights, test read once at the end (our default, the honest protocol).
    selection=test_best: chosen on the test split (what the papers' code reports). selection=last: the final epoch.
    """

    def __init__(
        self,
        model,
        lrs: dict[str, float],
        momentum: float,
        weight_decay: float,
        epochs: int,
        lr_decay_epoch: int,
        lr_decay: float,
        eval_every: int,
        select_data: SplitData | None,
        loss: str = DEFAULT_INNER_LOSS,
        similarity: torch.Tensor | None = None,
        label_temperature: float = DEFAULT_LABEL_TEMPERATURE,
        features=None,
        eval_schedule: str = "every",
        log_eps: float | None = None,
        draws: StudentDraws | None = None,
        epoch_offset: int = 0,
        optimizer_state: dict | None = None,
    ):
        super().__init__()
        if eval_schedule not in EVAL_SCHEDULES:
            raise ValueError(f"protocol.eval_schedule must be one of {EVAL_SCHEDULES}, got {eval_schedule!r}")
        self.eval_schedule = eval_schedule
        # A frozen backbone's cache (mmdd.evaluate.encode.BackboneFeatures): the loader then yields backbone
        # features of the synthetic images, and evaluations run only the heads.
        self.features = features
        self.model = model
        self.lrs = lrs
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.lr_decay_epoch = lr_decay_epoch
        self.lr_decay = lr_decay
        self.eval_every = eval_every
        self.select_data = select_data
        self.history: list[dict] = []  # the selection split's metrics after each evaluated epoch
        self._encoded: dict[str, list[torch.Tensor]] = {"image": [], "text": []}
        self.loss_name = loss
        self.label_temperature = label_temperature
        self.log_eps = log_eps  # wbce in the reference code's form (the set's method.wbce_log_eps)
        self.draws = draws or StudentDraws()  # parity hooks: replayed or recorded batches and dropout masks
        # protocol.phases=continued: the epochs of the phases before (the schedule counts on from them) and the
        # optimizer's state they left (momentum buffers)
        self.epoch_offset = epoch_offset
        self.optimizer_state = optimizer_state
        # The set's learned similarity (LoRS): students train against S[idx][:, idx].
        self.register_buffer("similarity", similarity.detach().clone() if similarity is not None else None)

    def training_step(self, batch, batch_idx):
        images, texts, idx = batch
        target = None if self.similarity is None else self.similarity[idx][:, idx]
        with self.draws.step(self.model, idx):
            logits = self.model(images, texts, from_features=self.features is not None)
        loss = pair_loss(self.loss_name, logits, target, self.label_temperature, self.log_eps)
        self.log("student/loss", loss, on_step=False, on_epoch=True, batch_size=images.shape[0])
        return loss

    def configure_optimizers(self):
        groups = self.model.modality_parameter_names()
        named = dict(self.model.named_parameters())
        opt = torch.optim.SGD(
            [
                {"params": [named[n] for n in groups["image"]], "lr": self.lrs["image"]},
                {"params": [named[n] for n in groups["text"]], "lr": self.lrs["text"]},
            ],
            lr=self.lrs["image"],
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        if self.optimizer_state is not None:  # the step sizes stay this module's; the momentum buffers carry over
            opt.load_state_dict({"state": self.optimizer_state, "param_groups": opt.state_dict()["param_groups"]})
        if self.epoch_offset:
            offset, milestone, gamma = self.epoch_offset, self.lr_decay_epoch, self.lr_decay
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: gamma if e + offset >= milestone else 1.0)
        else:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[self.lr_decay_epoch], gamma=self.lr_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def diverged(self, epoch: int, what: str) -> MmddError:
        return MmddError(f"the student diverged ({what}) at epoch {epoch} with step sizes {self.lrs}; lower them with "
                         "protocol.lr_source=fixed protocol.lr=<value>, or check the synthetic set")

    def check_finite_weights(self) -> None:
        # one device-side reduction and one host sync for all the weights
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            raise self.diverged(self.current_epoch, "non-finite weights")

    # -- selection: Lightning's validation loop on the selection split ------------------------------------
    def evaluates_after(self, epoch: int) -> bool:
        """Whether the selection split is evaluated after 0-based `epoch` (the last one always is)."""
        if epoch == self.epochs - 1:
            return True
        if self.eval_schedule == "reference":  # LoRS/RepBlend: range(0, Epoch + 1, k)
            return epoch % self.eval_every == 0
        return (epoch + 1) % self.eval_every == 0

    def validation_step(self, batch, batch_idx):
        kind, start, stop = batch
        rows = range(start, stop)
        if not self.evaluates_after(self.current_epoch):
            return  # validation runs after every epoch; the schedule says which ones count
        device = next(self.model.parameters()).device
        if kind == "image":
            self._encoded["image"].append(encode_images(self.model, self.select_data, rows, device,
                                                        self.features))
        else:
            self._encoded["text"].append(encode_texts(self.model, self.select_data, rows, device))

    def on_validation_epoch_end(self):
        encoded, self._encoded = self._encoded, {"image": [], "text": []}
        if not encoded["image"]:
            return
        self.check_finite_weights()
        sims = (torch.cat(encoded["image"]) @ torch.cat(encoded["text"]).t()).cpu()
        try:
            metrics = retrieval_metrics(sims, self.select_data.txt2img)
        except ValueError as exc:  # finite weights, yet non-finite embeddings (overflowing activations)
            raise self.diverged(self.current_epoch, f"{exc} when evaluating") from exc
        self.history.append({"epoch": self.current_epoch, **metrics})
        self.log_dict({f"select/{k}": v for k, v in metrics.items()}, on_epoch=True)

    def on_train_epoch_end(self):
        self.check_finite_weights()
        loss = self.trainer.callback_metrics.get("student/loss")
        if loss is not None and not torch.isfinite(loss):
            raise self.diverged(self.current_epoch, f"training loss {float(loss)}")


class BestStudent(Checkpoint):
    """Keeps the weights to test: those after the evaluated epoch with the best selection-split r_mean (the first
    of equals), or after the last epoch under selection=last. In memory, not in a file: an evaluation trains K
    students per set, and each would write a checkpoint at every improvement."""

    def __init__(self, last_only: bool = False):
        self.last_only = last_only
        self.offset = 0  # epochs of the phases trained before this one (train_student's `earlier`)
        self.score = float("-inf")
        self.epoch = -1
        self.metrics: dict[str, float] = {}
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer, module: StudentModule):
        if self.last_only or not module.history or module.history[-1]["epoch"] != trainer.current_epoch:
            return
        metrics = {k: v for k, v in module.history[-1].items() if k != "epoch"}
        if metrics["r_mean"] > self.score:
            self.keep(trainer.current_epoch, module, metrics)

    def on_train_epoch_end(self, trainer, module: StudentModule):
        if self.last_only and trainer.current_epoch == module.epochs - 1:
            self.keep(trainer.current_epoch, module, {})

    def keep(self, epoch: int, module: StudentModule, metrics: dict) -> None:
        self.score = metrics.get("r_mean", 0.0)
        self.epoch = epoch + self.offset
        self.metrics = metrics
        self.state = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}


@dataclass
class StudentPhase:
    """A set a student trains on before the one under evaluation (PTM-ST's earlier phases): its own pairs, step
    sizes and S."""

    images: torch.Tensor
    texts: torch.Tensor
    lrs: dict[str, float]
    similarity: torch.Tensor | None = None


def train_student(
    cfg,
    build_model,
    images: torch.Tensor,
    texts: torch.Tensor,
    lrs: dict[str, float],
    data: dict[str, SplitData],
    seed: int,
    loggers=None,
    loss: str = DEFAULT_INNER_LOSS,
    similarity: torch.Tensor | None = None,
    label_temperature: float = DEFAULT_LABEL_TEMPERATURE,
    features=None,
    inputs_are_features: bool = False,
    earlier: list[StudentPhase] = (),
    log_eps: float | None = None,
    draws: StudentDraws | None = None,
) -> StudentResult:
    """Train one student under `cfg.protocol`; return its test metrics (test read once under `val`).
    `inputs_are_features`: `images` are already the frozen backbone's features (the full_train set).
    `earlier`: sets trained on first, in order (a curriculum): each phase runs the protocol's epochs, with a fresh
    optimizer and schedule at its own step sizes (protocol.phases=separate), or continuing one optimizer and one
    schedule at the last phase's step sizes (continued: PTM-ST's code); the checkpoint is selected over the
    evaluations of all phases.
    `log_eps`: wbce in the reference code's form (mmdd.models.losses.weighted_bce). `draws`: where the initial weights,
    mini-batches and dropout masks come from (mmdd.evaluate.student_draws; default: the student's own)."""
    from mmdd.utils.trainer import build_trainer, one_device, precision_dtype, process_device

    p = cfg.protocol
    L.seed_everything(seed, workers=True, verbose=False)
    model = build_model()
    # 64-true: double before any weights are loaded into it (Lightning would cast it at fit, rounding nothing)
    model.to(precision_dtype(cfg.hardware))
    draws = draws or StudentDraws()
    draws.initial_weights(model)
    if features is not None and not model.backbone_is_cacheable():
        features = None  # the backbone trains: nothing to reuse
    if inputs_are_features and features is None:
        raise MmddError("backbone features as the training inputs need a frozen backbone and protocol.cache_features")
    draw = p.batch_draw
    if draw not in BATCH_DRAWS:
        raise MmddError(f"protocol.batch_draw must be one of {BATCH_DRAWS}, got {draw!r}")
    if p.selection not in SELECTIONS:
        raise MmddError(f"protocol.selection must be one of {SELECTIONS}, got {p.selection!r}")
    select_split = {"val": "val", "test_best": "test", "last": None}[p.selection]
    phase_training = p.get("phases", "separate")
    if phase_training not in PHASE_TRAININGS:
        raise MmddError(f"protocol.phases must be one of {PHASE_TRAININGS}, got {phase_training!r}")
    continued = phase_training == "continued"
    phases = [*earlier, StudentPhase(images, texts, lrs, similarity)]
    carried = None  # continued: the optimizer state the previous phase left
    gen = torch.Generator().manual_seed(seed)
    best = BestStudent(last_only=select_split is None)
    history: list[dict] = []
    seconds = 0.0
    for k, phase in enumerate(phases):
        inputs = phase.images.detach().cpu()
        if features is not None and not inputs_are_features:
            with torch.no_grad():  # the synthetic images' backbone features, once for all epochs
                batch = cfg.hardware.inference_batch
                inputs = torch.cat([model.features(inputs[i : i + batch].to(model_dtype(model)))
                                    for i in range(0, len(inputs), batch)])
        module = StudentModule(
            model,
            lrs=phases[-1].lrs if continued else phase.lrs,
            momentum=p.momentum,
            weight_decay=p.weight_decay,
            epochs=p.epochs,
            lr_decay_epoch=p.lr_decay_epoch,
            lr_decay=p.lr_decay,
            eval_every=p.eval_every,
            select_data=data[select_split] if select_split else None,
            loss=loss,
            similarity=phase.similarity,
            label_temperature=label_temperature,
            features=features,
            eval_schedule=p.eval_schedule,
            log_eps=log_eps,
            draws=draws,
            epoch_offset=k * p.epochs if continued else 0,
            optimizer_state=carried,
        )
        pairs = TensorDataset(inputs, phase.texts.detach().cpu(), torch.arange(inputs.shape[0]))
        if draw == "independent_if_similarity" and phase.similarity is not None:
            loader = DataLoader(pairs, batch_sampler=IndependentBatches(len(pairs), p.batch_size, gen))
        else:
            loader = DataLoader(pairs, batch_size=p.batch_size, shuffle=True, generator=gen)
        batches = draws.sampler(len(pairs), p.batch_size, loader.batch_sampler)
        if batches is not loader.batch_sampler:  # replayed batches (the loader above stays as is: its RNG use is pinned)
            loader = DataLoader(pairs, batch_sampler=batches)
        best.offset = k * p.epochs  # epochs are counted over all phases
        # One process per student (students are small; several seeds spread over jobs, see README "Scaling out").
        trainer = build_trainer(cfg, loggers, [best], max_epochs=p.epochs, log_every_n_steps=1,
                                devices=one_device(cfg.hardware), num_nodes=1,  # this rank's own GPU
                                strategy="auto", enable_checkpointing=True,  # BestStudent is the checkpointing
                                **({} if select_split else {"limit_val_batches": 0}))  # selection=last: nothing to select on
        t0 = time.perf_counter()
        trainer.fit(module, loader, val_dataloaders=SelectionSplit(module.select_data, cfg.hardware.inference_batch))
        seconds += time.perf_counter() - t0
        if continued:
            carried = trainer.optimizers[0].state_dict()["state"]
        history += [{**h, "phase": k, "epoch": h["epoch"] + best.offset} for h in module.history] if earlier else module.history
    draws.finish()
    model.load_state_dict(best.state)
    model.to(process_device(cfg.hardware))  # the final test on the stage's device, as training ran
    test = evaluate_retrieval(model, data["test"], cfg.hardware.inference_batch, features=features)
    return StudentResult(
        seed=seed,
        test=test,
        selected=best.metrics,
        best_epoch=best.epoch,
        train_seconds=seconds,
        history=history,
    )
