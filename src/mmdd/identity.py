"""Identities: what names an artifact. A trajectory store's id and config hash, a distillation's identity (what its
checkpoint may resume into) and the data/model/teacher parts they share. They are built from the settings that
define the artifact, never from where it lives or how Hydra builds it, so a moved dataset keeps its stores and a
moved class keeps every store, checkpoint and interrupted evaluation (tests/test_identity_pins.py holds them)."""

from __future__ import annotations

from omegaconf import OmegaConf

from mmdd.config_schema import TeacherConfig
from mmdd.utils.config import settled_method, to_plain
from mmdd.utils.io import stable_hash


def data_identity(data_cfg, fingerprint: bool = True) -> dict:
    """What makes two datasets the same (not where they live on disk). `fingerprint=False`: from the config alone
    (the generated data's fingerprint needs the data on disk)."""
    d = to_plain(data_cfg)
    keep = ("name", "format", "generate", "image_size", "resize", "ann_files", "ann_file", "preprocess", "train_unit")
    identity = {k: d.get(k) for k in keep if k in d}
    if fingerprint and d.get("format") == "synscenes":
        # The generated content (generator version included), so a new generator means new teachers.
        from mmdd.data.synscenes import synscenes_fingerprint

        identity["fingerprint"] = synscenes_fingerprint(d["root"])
    return identity


# Model keys that say how captions are embedded (once), not what the model is.
_HOW_TEXT_IS_EMBEDDED = ("batch_size", "device")


def model_identity(model_cfg) -> dict:
    """What makes two models the same: the settings, not how Hydra builds them (_target_, _partial_)."""
    d = {k: v for k, v in to_plain(model_cfg).items() if not k.startswith("_")}
    if isinstance(d.get("text"), dict):
        d["text"] = {k: v for k, v in d["text"].items() if k not in _HOW_TEXT_IS_EMBEDDED}
    return d


def data_location(data_cfg) -> dict:
    """Where the data is read from (absolute): recorded beside the identity, not part of it, so a moved dataset
    keeps its stores and caches."""
    from pathlib import Path

    d = to_plain(data_cfg)
    keys = ("image_root", "ann_dir") if d.get("format") != "karpathy" else ("image_root", "ann_file")
    return {k: str(Path(str(d[k])).resolve()) for k in keys if d.get(k)}


# Teacher settings added after stores were first written, at their schema defaults: there a store is what it was before
# the setting existed, so they are left out of its identity (every existing store keeps its id and is still found).
LATER_TEACHER_SETTINGS = {"init": TeacherConfig.init}


def teacher_identity(teacher_cfg) -> dict:
    """The teacher settings as identities record them (LATER_TEACHER_SETTINGS at their defaults left out)."""
    return {k: v for k, v in to_plain(teacher_cfg).items() if LATER_TEACHER_SETTINGS.get(k, object()) != v}


def teachers_identity(cfg) -> dict:
    """Everything that defines a trajectory store's teachers and that a run reading the store must share: the data
    (what, not where), the model (incl. temperature, trainable part, checkpoint) and the teacher settings, except
    how many experts were asked for (a store is read expert by expert)."""
    teacher = {k: v for k, v in teacher_identity(cfg.teacher).items() if k != "num_experts"}
    augment = to_plain(cfg.data.augment) if cfg.teacher.augment and cfg.data.get("augment") is not None else None
    return {"data": data_identity(cfg.data), "model": model_identity(cfg.model), "teacher": teacher,
            "augment": augment}


def store_id(data_cfg, model_cfg, teacher_cfg) -> str:
    """A short hash of what defines a trajectory store's teachers, for its default directory name
    (`${mmdd.store_id:${data},${model},${teacher}}` in conf/base.yaml): other image sizes, split sizes, models or
    teacher settings or augmentations get other stores instead of finding one made otherwise."""
    augment = to_plain(data_cfg.augment) if teacher_cfg.augment and data_cfg.get("augment") is not None else None
    return stable_hash({"data": data_identity(data_cfg, fingerprint=False), "model": model_identity(model_cfg),
                        "teacher": teacher_identity(teacher_cfg), "augment": augment}, length=8)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mmdd.store_id"):
        OmegaConf.register_new_resolver("mmdd.store_id", store_id)


def teacher_hash(cfg) -> str:
    """A trajectory store's config hash: its teachers' identity (without the number of experts asked for)."""
    return stable_hash(teachers_identity(cfg))


# Method settings a resumed distillation may change: more iterations (extend a finished run), the outer
# optimiser's learning rates and momenta (e.g. lower lr_img after a run stopped on NaN losses), and how the
# meta-gradient is computed, which changes memory and speed but not the gradient (e.g. resume on a smaller GPU).
OUTER_SETTINGS = ("lr_img", "lr_txt", "lr_lr", "lr_sim", "momentum", "sim_momentum")  # the outer SGD's
RESUMABLE_METHOD_KEYS = ("iterations", *OUTER_SETTINGS, "meta_gradient", "tesla_pass1_graph", "tesla_pass2",
                         "cache_features", "feature_chunk")
# Method options added after stores and checkpoints existed, with the value that computes what every run before them
# computed: at that value an option is left out of the identity (so existing checkpoints still resume and the pinned
# identities hold); at any other value it is part of it.
NEUTRAL_METHOD_OPTIONS = {"wbce_log_eps": None, "tesla_pass2_dropout": "replay"}


def distill_identity(cfg) -> dict:
    """What a distillation checkpoint may be resumed into: the same data, model, teachers, method settings
    (but RESUMABLE_METHOD_KEYS), seed and budget; hardware, logging and evaluation settings may change too."""
    method = {k: v for k, v in settled_method(to_plain(cfg.method)).items() if k not in RESUMABLE_METHOD_KEYS
              and not (k in NEUTRAL_METHOD_OPTIONS and v == NEUTRAL_METHOD_OPTIONS[k])}
    identity = {"data": data_identity(cfg.data), "model": model_identity(cfg.model),
                "teacher": teacher_identity(cfg.teacher), "method": method, "seed": cfg.seed, "budget": cfg.budget}
    # The parity hooks change what is distilled; named only when used, so every other identity stays as it was.
    draws = to_plain(cfg.get("draws") or {})
    if draws.get("replay"):
        identity["draws_replay"] = str(draws["replay"])
    if cfg.get("init_from"):
        identity["init_from"] = str(cfg.init_from)
    return identity
