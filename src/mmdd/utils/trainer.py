"""Lightning Trainer from the `hardware` config: the only place that knows about devices."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def accelerate_model(model, hw, second_order: bool = False):
    """Apply `hardware.channels_last` and `hardware.compile` to a dual encoder (both default off).

    torch.compile has no double backward, so the backbone is compiled only where autograd goes through it
    once: teachers, students, pre-training, and distillation when the backbone is frozen. Distilling through
    a trainable backbone (`second_order=True`) differentiates its gradient, and keeps it uncompiled.
    """
    compile = bool(hw.get("compile", False))
    if compile and second_order and model.trainable != "heads":
        log.warning("hardware.compile is not applied to the backbone here: distilling through a trainable "
                    "backbone needs double backward, which torch.compile does not support")
        compile = False
    return model.accelerate(channels_last=bool(hw.get("channels_last", False)), compile=compile)


def build_trainer(cfg, loggers=None, callbacks=None, **overrides):
    import lightning as L

    hw = cfg.hardware
    if hw.get("num_threads"):
        torch.set_num_threads(int(hw.num_threads))
    kwargs = dict(
        accelerator=str(hw.accelerator),
        devices=hw.devices,
        num_nodes=int(hw.num_nodes),
        strategy=str(hw.strategy),
        precision=hw.precision,
        logger=loggers if loggers else False,
        callbacks=callbacks or [],
        enable_checkpointing=False,
        enable_progress_bar=bool(cfg.progress_bar),
        enable_model_summary=False,
        log_every_n_steps=int(cfg.get("log_every_n_steps", 10)),
        deterministic=bool(hw.get("deterministic", False)),
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    refuse_ddp_in_local_multirun(kwargs["strategy"])
    return L.Trainer(**kwargs)


def refuse_ddp_in_local_multirun(strategy) -> None:
    """Lightning starts DDP ranks > 0 by re-running the command line; inside a Hydra multirun that command is the
    whole sweep. SLURM jobs (submitit, one task per device) start their ranks themselves and are fine."""
    import os

    from lightning.pytorch.strategies import DDPStrategy

    if not (isinstance(strategy, DDPStrategy) or str(strategy).startswith("ddp")):
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if "SLURM_NTASKS" in os.environ or "LOCAL_RANK" in os.environ:
        return
    from mmdd.errors import MmddError

    raise MmddError("hardware.strategy=ddp inside a local multirun (-m): Lightning would start the whole sweep again "
                    "in every extra process. Run each multi-GPU job as a single run, or launch the sweep with "
                    "hydra/launcher=slurm hydra.launcher.tasks_per_node=<devices per node>")
