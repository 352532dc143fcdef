"""Loggers for every stage: W&B (offline by default) plus a CSV logger beside it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mmdd.utils.config import resolved_config

log = logging.getLogger(__name__)


def build_loggers(cfg, job_type: str, name: str | None = None, save_dir: str | Path | None = None,
                  extra_config: dict | None = None) -> list:
    """Loggers from `cfg.logger` (conf/logger/): `csv` and `wandb`, each a partial `_target_` or null for none.

    `job_type` is the stage that made the run (buffer / distill / evaluate / ...), also inside `mmdd run`, whose
    config says stage `run` for all of them: `mmdd table --wandb` tells teachers from students by it. The CSV log goes
    under `save_dir`; every W&B run of one job goes to the job's own `wandb/` folder, so one folder holds all of them.
    `extra_config` is added to the W&B run's config (e.g. which synthetic set a student trains on).
    """
    from hydra.utils import instantiate

    save_dir = Path(save_dir or cfg.paths.output_dir)
    loggers = []
    if cfg.logger.csv is not None:
        loggers.append(instantiate(cfg.logger.csv)(save_dir=str(save_dir), version=name or job_type))
    if cfg.logger.wandb is not None:
        wandb = instantiate(cfg.logger.wandb, _convert_="all")
        mode = os.environ.get("WANDB_MODE", wandb.keywords["mode"])  # the environment wins, as in wandb itself
        loggers.append(wandb(job_type=job_type, name=name or job_type, save_dir=str(cfg.paths.output_dir),
                             offline=(mode == "offline"), mode=mode,
                             config={**resolved_config(cfg), **(extra_config or {})}))
    return loggers


def finish_loggers(loggers: list) -> None:
    """Close W&B runs so the next stage in this process starts its own run."""
    for lg in loggers:
        try:
            lg.finalize("success")
        except Exception:  # noqa: BLE001 - finalising is best effort
            pass
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()


def log_metrics(loggers: list, metrics: dict, step: int | None = None) -> None:
    for lg in loggers:
        lg.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        lg.save()


def log_pairs_table(loggers: list, key: str, images: list, captions: list[str]) -> None:
    """A W&B table: index, synthetic image, nearest real caption of its text."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            data = [[i, wandb.Image(img), cap] for i, (img, cap) in enumerate(zip(images, captions))]
            lg.log_table(key=key, columns=["index", "image", "nearest caption"], data=data)


def log_images(loggers: list, key: str, images: list, captions: list[str] | None = None) -> None:
    """Images (paths, PIL images or HWC arrays) with optional captions, to W&B."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            kwargs = {"caption": list(captions)} if captions else {}
            lg.log_image(key=key, images=list(images), **kwargs)
