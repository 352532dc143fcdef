"""`mmdd pretrain`: contrastive pre-training of the image backbone on the train split.

Frozen-backbone methods (RepBlend) need a meaningful backbone. In the papers it is
ImageNet-pretrained nfnet_l0; where no pretrained weights exist (the embedded dataset, no
network) this stage is the analogue: train backbone + heads with InfoNCE, keep the backbone's
state dict, and let `model.image.checkpoint` load it for teachers, distillation and students.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import save_file

from mmdd.data.splits import PairDataset, check_full_batches, load_data, loader_options
from mmdd.data.transforms import augment_config, per_image_augment
from mmdd.evaluate.encode import evaluate_retrieval
from mmdd.models.dual_encoder import build_dual_encoder
from mmdd.teachers.expert_module import ExpertModule
from mmdd.teachers.global_batch import global_batch_loader, per_rank_batch
from mmdd.utils.config import to_plain
from mmdd.identity import data_identity
from mmdd.utils.io import atomic_write, stable_hash
from mmdd.utils.logging import build_loggers, finish_loggers, log_metrics
from mmdd.utils.seed import seed_everything
from mmdd.utils.trainer import accelerate_model, build_trainer, hardware_processes, process_device

log = logging.getLogger(__name__)


def pretrain_hash(cfg) -> str:
    image = {k: v for k, v in to_plain(cfg.model.image).items() if k != "checkpoint"}
    return stable_hash({"data": data_identity(cfg.data), "image": image, "pretrain": to_plain(cfg.pretrain)})


def run_pretrain(cfg, data=None) -> Path:
    out = Path(str(cfg.pretrain.output))
    key = pretrain_hash(cfg)
    if out.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(out), "pt") as f:
                if (f.metadata() or {}).get("config_hash") == key:
                    log.info("pretrained backbone %s is up to date; skipping", out)
                    return out
        except (SafetensorError, OSError):
            pass
    data = data or load_data(cfg, splits=("train", "val"))
    train = data["train"]
    # Train the whole network; the checkpoint being produced must not be loaded into it.
    model_cfg = OmegaConf.merge(cfg.model, {"trainable": "backbone_and_heads", "image": {"checkpoint": None}})
    seed_everything(cfg.pretrain.seed)
    model = accelerate_model(build_dual_encoder(model_cfg, train.text_emb.shape[1], cfg.data.image_size), cfg.hardware)
    p = cfg.pretrain
    augment = augment_config(cfg.data.augment)
    module = ExpertModule(model, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay,
                          mean=cfg.data.mean, std=cfg.data.std, augment=augment)
    dataset = PairDataset(train, unit=str(cfg.data.train_unit), augment=per_image_augment(augment, train))
    check_full_batches(dataset, p.batch_size, "pretrain.batch_size")
    per_rank_batch(p.batch_size, hardware_processes(cfg.hardware))
    loggers = build_loggers(cfg, job_type="pretrain", name="pretrain")
    try:
        # As the teachers: the batch split over the processes, the loss over all of it, one sample order
        trainer = build_trainer(cfg, loggers, max_epochs=p.epochs, use_distributed_sampler=False)
        loader = global_batch_loader(dataset, p.batch_size, cfg.pretrain.seed,
                                     loader_options(cfg.data, process_device(cfg.hardware).type == "cuda"))
        trainer.fit(module, loader)
        if not trainer.is_global_zero:  # every process holds the same weights: process 0 evaluates and saves them
            return out
        model.to(process_device(cfg.hardware))
        val = evaluate_retrieval(model, data["val"], cfg.hardware.inference_batch) if "val" in data else {}
        log_metrics(loggers, {f"val/{k}": v for k, v in val.items()})
    finally:
        finish_loggers(loggers)
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    atomic_write(out, lambda path: save_file(state, str(path), metadata={"config_hash": key}))
    log.info("pretrained backbone saved to %s (val r_mean %.2f)", out, val.get("r_mean", float("nan")))
    return out


def run(cfg) -> None:
    print(f"pretrained backbone: {run_pretrain(cfg)}")
