"""Trajectory-matching distillation (MTT-VL; later TESLA-VL, LoRS, RepBlend plug in here)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmdd.methods.base import Method, check_budget, sample_real_pairs, save_synthetic
from mmdd.methods.distill_module import DistillModule
from mmdd.models.dual_encoder import build_dual_encoder
from mmdd.synthetic.synthetic_set import SyntheticSet
from mmdd.teachers.trajectory_store import TrajectoryStore, flatten_trajectory
from mmdd.utils.trainer import build_trainer

log = logging.getLogger(__name__)


def load_trajectories(store: TrajectoryStore, names: dict[str, list[str]], max_experts: int | None = None):
    """All experts of the store in memory: {modality: [n_experts, epochs+1, P]}."""
    experts = store.completed_experts()
    if not experts:
        raise ValueError(f"trajectory store {store.root} has no complete expert; run `mmdd buffer`")
    if max_experts:
        experts = experts[:max_experts]
    per_mod: dict[str, list[torch.Tensor]] = {m: [] for m in names}
    for e in experts:
        traj = store.load_expert(e)
        for m in names:
            per_mod[m].append(flatten_trajectory(traj, names[m]))
    return {m: torch.stack(v) for m, v in per_mod.items()}


class SaveSyntheticEvery(L.Callback):
    """Saves the synthetic set every `every` iterations (and the caller saves at the end)."""

    def __init__(self, every: int, save_fn):
        self.every = every
        self.save_fn = save_fn

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step % self.every == 0:
            self.save_fn(step)


class TrajectoryMatching(Method):
    def __init__(
        self,
        name: str,
        syn_steps: int,
        expert_epochs: int,
        max_start_epoch: int,
        batch_syn: int | None,
        lr_img: float,
        lr_txt: float,
        lr_lr: float,
        lr_init: float,
        momentum: float,
        loss_merge: str = "separate",
        init: str = "real",
        iterations: int = 1000,
        max_experts: int | None = None,
        lr_min: float = 0.0,
    ):
        if loss_merge not in ("separate", "merged"):
            raise ValueError(f"method.loss_merge must be 'separate' or 'merged', got {loss_merge!r}")
        if init not in ("real", "noise"):
            raise ValueError(f"method.init must be 'real' or 'noise', got {init!r}")
        self.name = name
        self.syn_steps = int(syn_steps)
        self.expert_epochs = int(expert_epochs)
        self.max_start_epoch = int(max_start_epoch)
        self.batch_syn = batch_syn
        self.lr_img, self.lr_txt, self.lr_lr = float(lr_img), float(lr_txt), float(lr_lr)
        self.lr_init = float(lr_init)
        self.momentum = float(momentum)
        self.merged = loss_merge == "merged"
        self.init = init
        self.iterations = int(iterations)
        self.max_experts = max_experts
        self.lr_min = float(lr_min)

    def initial_set(self, cfg, train, budget: int) -> SyntheticSet:
        gen = torch.Generator().manual_seed(int(cfg.seed))
        images, texts, _, _ = sample_real_pairs(train, budget, gen, cfg.data.mean, cfg.data.std)
        if self.init == "noise":
            images = torch.randn(images.shape, generator=gen)
            texts = torch.randn(texts.shape, generator=gen) * train.text_emb.std(0, keepdim=True) + train.text_emb.mean(0, keepdim=True)
        return SyntheticSet(images, texts, {"image": self.lr_init, "text": self.lr_init})

    def synthesize(self, cfg, data, out_dir: Path, loggers: list) -> SyntheticSet:
        train = data["train"]
        budget = int(cfg.budget)
        check_budget(budget, train)
        torch.manual_seed(int(cfg.seed))
        model = build_dual_encoder(cfg.model, train.text_emb.shape[1], int(cfg.data.image_size))
        store = TrajectoryStore.open(Path(str(cfg.buffer_dir)))
        names = model.modality_parameter_names()
        shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        store.check_model(names, {n: shapes[n] for g in names.values() for n in g}, str(cfg.data.name))
        trajectories = load_trajectories(store, names, self.max_experts)
        log.info(
            "loaded %d experts x %d epochs from %s (%s params)",
            trajectories["image"].shape[0],
            trajectories["image"].shape[1] - 1,
            store.root,
            {m: t.shape[-1] for m, t in trajectories.items()},
        )
        syn = self.initial_set(cfg, train, budget)
        module = DistillModule(
            model,
            syn,
            trajectories,
            syn_steps=self.syn_steps,
            expert_epochs=self.expert_epochs,
            max_start_epoch=self.max_start_epoch,
            batch_syn=self.batch_syn,
            lr_img=self.lr_img,
            lr_txt=self.lr_txt,
            lr_lr=self.lr_lr,
            momentum=self.momentum,
            merged_loss=self.merged,
            seed=int(cfg.seed),
            lr_min=self.lr_min,
        )

        def save(step: int) -> None:
            save_synthetic(cfg, syn, train, out_dir, {"iteration": step, "complete": False})

        callbacks = [SaveSyntheticEvery(int(cfg.save_every), save)]
        trainer = build_trainer(cfg, loggers, callbacks, max_epochs=1)
        iterations = DataLoader(range(self.iterations), batch_size=1)
        trainer.fit(module, iterations)
        self.history = module.history
        return syn
