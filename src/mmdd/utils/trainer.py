"""Lightning Trainer from the `hardware` config: the only place that knows about devices."""

from __future__ import annotations

import torch


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
    return L.Trainer(**kwargs)
