"""Teacher training: a Lightning module for one expert and a callback recording its trajectory."""

from __future__ import annotations

import lightning as L
import torch

from mmdd.data.transforms import AugmentConfig, normalize, random_resized_crop
from mmdd.models.dual_encoder import DualEncoder
from mmdd.models.losses import symmetric_infonce
from mmdd.teachers.global_batch import global_logits, scaled_for_ddp


class ExpertModule(L.LightningModule):
    """Trains a dual encoder on real pairs with symmetric InfoNCE (the papers' teachers); over several processes, on
    the global batch (mmdd.teachers.global_batch)."""

    def __init__(
        self,
        model: DualEncoder,
        lr: float,
        momentum: float,
        weight_decay: float,
        mean,
        std,
        augment: AugmentConfig,
    ):
        super().__init__()
        self.model = model
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.mean = list(mean)
        self.std = list(std)
        self.augment = augment

    def training_step(self, batch, batch_idx):
        images, text_emb, _ = batch
        x = random_resized_crop(normalize(images, self.mean, self.std), self.augment)
        x, text_emb = x.to(self.dtype), text_emb.to(self.dtype)  # float64 under hardware.precision=64-true
        loss = symmetric_infonce(global_logits(self.model, x, text_emb))  # the global batch's under DDP
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return scaled_for_ddp(loss)

    def trainable_names(self) -> list[str]:
        groups = self.model.modality_parameter_names()
        return groups["image"] + groups["text"]

    def configure_optimizers(self):
        named = dict(self.model.named_parameters())
        params = [named[n] for n in self.trainable_names()]
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class TrajectoryRecorder(L.Callback):
    """Records the trainable parameters at epoch 0 (before training) and after every epoch."""

    def __init__(self, names: list[str], heartbeat=None):
        self.names = names
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.heartbeat = heartbeat  # called every epoch: keeps this process's claim on the expert fresh

    def _snapshot(self, pl_module: ExpertModule) -> None:
        named = dict(pl_module.model.named_parameters())
        self.snapshots.append({n: named[n].detach().cpu().clone() for n in self.names})

    def on_train_start(self, trainer, pl_module):
        self.snapshots = []
        self._snapshot(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._snapshot(pl_module)
        if self.heartbeat is not None:
            self.heartbeat()

    def trajectory(self) -> dict[str, torch.Tensor]:
        """{name: [epochs+1, *shape]}"""
        return {n: torch.stack([s[n] for s in self.snapshots]) for n in self.names}
