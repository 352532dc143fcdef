"""Config helpers: hashing the parts of a composed config that define an artifact."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmdd.utils.io import stable_hash


def to_plain(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def data_identity(data_cfg) -> dict:
    """What makes two datasets the same (not where they live on disk)."""
    d = to_plain(data_cfg)
    keep = ("name", "format", "generate", "image_size", "ann_files", "ann_file", "preprocess", "train_unit")
    identity = {k: d.get(k) for k in keep if k in d}
    if d.get("format") == "synscenes":
        # The generated content (generator version included), so a new generator means new teachers.
        from mmdd.data.synscenes import synscenes_fingerprint

        identity["fingerprint"] = synscenes_fingerprint(d["root"])
    return identity


def model_identity(model_cfg) -> dict:
    return to_plain(model_cfg)


def teacher_hash(cfg) -> str:
    return stable_hash(
        {"data": data_identity(cfg.data), "model": model_identity(cfg.model), "teacher": to_plain(cfg.teacher)}
    )


def config_hash(cfg) -> str:
    plain = to_plain(cfg)
    plain.pop("paths", None)
    plain.pop("hydra", None)
    return stable_hash(plain)


def task_overrides() -> list[str]:
    """The command-line overrides of this Hydra job ([] outside a Hydra app, e.g. the compose API)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def resolved_config(cfg) -> dict:
    """The full composed config, interpolations resolved where they can be (hydra: ones need a Hydra app)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # e.g. ${hydra:...} under the compose API: keep them unresolved
        return OmegaConf.to_container(cfg, resolve=False)
