"""Students: fresh models trained on a synthetic set, scored on retrieval (the protocols)."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from mmdd.data.datamodule import SplitData
from mmdd.errors import MmddError
from mmdd.evaluate.encode import evaluate_retrieval
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


class StudentModule(L.LightningModule):
    """Trains a dual encoder on (synthetic) pairs; picks its checkpoint by `selection`.

    selection=val: evaluate on val every `eval_every` epochs, keep the best state, read test once
    at the end (our default, the honest protocol). selection=test_best: choose on the test split
    (what the papers' code reports). selection=last: the final epoch.
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
        selection: str,
        select_data: SplitData | None,
        mean,
        std,
        loss: str = DEFAULT_INNER_LOSS,
        similarity: torch.Tensor | None = None,
        label_temperature: float = DEFAULT_LABEL_TEMPERATURE,
        features=None,
        eval_schedule: str = "every",
    ):
        super().__init__()
        if eval_schedule not in EVAL_SCHEDULES:
            raise ValueError(f"protocol.eval_schedule must be one of {EVAL_SCHEDULES}, got {eval_schedule!r}")
        self.eval_schedule = eval_schedule
        # A frozen backbone's cache (mmdd.evaluate.encode.BackboneFeatures): the loader then yields backbone
        # features of the synthetic images, and evaluations run only the heads.
        self.features = features
        if selection not in SELECTIONS:
            raise ValueError(f"protocol.selection must be one of {SELECTIONS}, got {selection!r}")
        self.model = model
        self.lrs = lrs
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.lr_decay_epoch = lr_decay_epoch
        self.lr_decay = lr_decay
        self.eval_every = eval_every
        self.selection = selection
        self.select_data = select_data
        self.mean, self.std = list(mean), list(std)
        self.best_score = float("-inf")
        self.best_epoch = -1
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []
        self.loss_name = loss
        self.label_temperature = label_temperature
        # The set's learned similarity (LoRS): students train against S[idx][:, idx].
        self.register_buffer("similarity", similarity.detach().clone() if similarity is not None else None)

    def training_step(self, batch, batch_idx):
        images, texts, idx = batch
        target = None if self.similarity is None else self.similarity[idx][:, idx]
        logits = self.model(images, texts, from_features=self.features is not None)
        loss = pair_loss(self.loss_name, logits, target, self.label_temperature)
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
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[self.lr_decay_epoch], gamma=self.lr_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def diverged(self, epoch: int, what: str) -> MmddError:
        return MmddError(f"the student diverged ({what}) at epoch {epoch} with step sizes {self.lrs}; lower them with "
                         "protocol.lr_source=fixed protocol.lr=<value>, or check the synthetic set")

    def on_train_epoch_end(self):
        epoch = self.current_epoch
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise self.diverged(epoch, "non-finite weights")
        loss = self.trainer.callback_metrics.get("student/loss")
        if loss is not None and not torch.isfinite(loss):
            raise self.diverged(epoch, f"training loss {float(loss)}")
        last = epoch == self.epochs - 1
        if self.selection == "last":
            if last:
                self._keep(epoch, {})
            return
        if self.evaluates_after(epoch) or last:
            try:
                metrics = evaluate_retrieval(self.model, self.select_data, self.mean, self.std, features=self.features)
            except ValueError as exc:  # finite weights, yet non-finite embeddings (overflowing activations)
                raise self.diverged(epoch, f"{exc} when evaluating") from exc
            self.model.train()
            self.history.append({"epoch": epoch, **metrics})
            self.log_dict({f"select/{k}": v for k, v in metrics.items()}, on_epoch=True)
            if metrics["r_mean"] > self.best_score:
                self._keep(epoch, metrics)

    def evaluates_after(self, epoch: int) -> bool:
        """Whether the selection split is evaluated after 0-based `epoch` (the last one always is)."""
        if self.eval_schedule == "reference":  # LoRS/RepBlend: range(0, Epoch + 1, k)
            return epoch % self.eval_every == 0
        return (epoch + 1) % self.eval_every == 0

    def _keep(self, epoch: int, metrics: dict) -> None:
        self.best_score = metrics.get("r_mean", 0.0)
        self.best_epoch = epoch
        self.best_metrics = metrics
        self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})


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
) -> StudentResult:
    """Train one student under `cfg.protocol`; return its test metrics (test read once under `val`)."""
    from mmdd.utils.trainer import build_trainer

    p = cfg.protocol
    L.seed_everything(seed, workers=True, verbose=False)
    model = build_model()
    if features is not None and not model.backbone_is_cacheable():
        features = None  # the backbone trains: nothing to reuse
    inputs = images.detach().cpu()
    if features is not None:
        with torch.no_grad():  # the synthetic images' backbone features, once for all epochs
            inputs = torch.cat([model.features(inputs[i : i + 256]) for i in range(0, len(inputs), 256)])
    select_split = {"val": "val", "test_best": "test", "last": None}[str(p.selection)]
    module = StudentModule(
        model,
        lrs=lrs,
        momentum=float(p.momentum),
        weight_decay=float(p.weight_decay),
        epochs=int(p.epochs),
        lr_decay_epoch=int(p.lr_decay_epoch),
        lr_decay=float(p.lr_decay),
        eval_every=int(p.eval_every),
        selection=str(p.selection),
        select_data=data[select_split] if select_split else None,
        mean=cfg.data.mean,
        std=cfg.data.std,
        loss=loss,
        similarity=similarity,
        label_temperature=label_temperature,
        features=features,
        eval_schedule=str(p.eval_schedule),
    )
    gen = torch.Generator().manual_seed(seed)
    pairs = TensorDataset(inputs, texts.detach().cpu(), torch.arange(images.shape[0]))
    draw = str(p.batch_draw)
    if draw not in BATCH_DRAWS:
        raise MmddError(f"protocol.batch_draw must be one of {BATCH_DRAWS}, got {draw!r}")
    if draw == "independent_if_similarity" and similarity is not None:
        loader = DataLoader(pairs, batch_sampler=IndependentBatches(len(pairs), int(p.batch_size), gen))
    else:
        loader = DataLoader(pairs, batch_size=int(p.batch_size), shuffle=True, generator=gen)
    # One process per student (students are small; several seeds spread over jobs, see README "Scaling out").
    trainer = build_trainer(cfg, loggers, max_epochs=int(p.epochs), log_every_n_steps=1, devices=1, num_nodes=1,
                            strategy="auto")
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - t0
    model.load_state_dict(module.best_state)
    model.to("cpu")
    test = evaluate_retrieval(model, data["test"], cfg.data.mean, cfg.data.std, features=features)
    return StudentResult(
        seed=seed,
        test=test,
        selected=module.best_metrics,
        best_epoch=module.best_epoch,
        train_seconds=seconds,
        history=module.history,
    )
