"""Config helpers: plain containers, the hash of a whole run's config, the overrides of a Hydra job."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmdd.utils.io import stable_hash


def to_plain(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


# Classes moved since identities were first made (a config's `_target_`): current path -> the path identities name
# it by. A hash names a class by its first path, so moving code never orphans a store, a checkpoint or an interrupted
# evaluation. Add a line when a configured class moves.
FIRST_CLASS_PATHS: dict[str, str] = {
    # 2026-12-07: methods grouped by paradigm (mmdd.methods.trajectory / distribution / selection)
    "mmdd.methods.trajectory.objective.TrajectoryMatching": "mmdd.methods.trajectory_matching.TrajectoryMatching",
    "mmdd.methods.trajectory.phases.PhasedTrajectoryMatching": "mmdd.methods.phased.PhasedTrajectoryMatching",
    "mmdd.methods.distribution.objective.DistributionMatching":
        "mmdd.methods.distribution_matching.DistributionMatching",
    "mmdd.methods.distribution.objective.MultimodalDistributionMatching":
        "mmdd.methods.distribution_matching.MultimodalDistributionMatching",
    "mmdd.methods.selection.prototypes.PrototypeSelection": "mmdd.methods.prototypes.PrototypeSelection",
    **{f"mmdd.methods.selection.coresets.{c}": f"mmdd.methods.coreset.{c}"
       for c in ("RandomCoreset", "HerdingCoreset", "KCenterCoreset", "ForgettingCoreset")},
}


# Method settings written into the YAMLs after identities were first made, at the value every run before computed
# with (then a dataclass default): at that value a key is left out of identities and config hashes, so every store,
# checkpoint and interrupted evaluation stays valid; at any other value it is part of them. Per class (first path).
_TRAJECTORY_KEYS_2026_12 = {"grad_clip": None, "ema_decay": None, "min_start_epoch": 0, "convexify": None,
                            "tesla_pass2": "double_backward", "ema_bias_correction": False}
_DISTRIBUTION_KEYS_2026_12 = {"lr_min": 0.0, "similarity": None, "lr_sim": 0.0, "sim_momentum": 0.5, "ema_decay": None,
                              "ema_bias_correction": False, "dsa": None, "space": "embeddings",
                              "encoder.anchor": "expert_init", "kmeans.seeding": "plus_plus"}
LATER_METHOD_SETTINGS: dict[str, dict] = {
    "mmdd.methods.trajectory_matching.TrajectoryMatching": _TRAJECTORY_KEYS_2026_12,
    "mmdd.methods.phased.PhasedTrajectoryMatching": {"grad_clip": None, "tesla_pass2": "double_backward",
                                                     "ema_bias_correction": False},
    "mmdd.methods.distribution_matching.DistributionMatching": _DISTRIBUTION_KEYS_2026_12,
    "mmdd.methods.distribution_matching.MultimodalDistributionMatching": _DISTRIBUTION_KEYS_2026_12,
}


# Settings of other groups added after config hashes were first made, at the value every run before computed with:
# left out of config hashes at that value (a finished selection or an interrupted evaluation stays valid).
LATER_CONFIG_SETTINGS = {("hardware", "inference_batch"): 256, ("protocol", "phases"): "separate"}


def settled_method(method: dict) -> dict:
    """A method's settings (plain) as identities name them: its class by its first path, and the settings added to
    its YAML later left out where they hold the value that was computed with before (LATER_METHOD_SETTINGS; a dotted
    key names a setting inside a nested one, e.g. encoder.anchor)."""
    method = first_class_paths(method)
    later = LATER_METHOD_SETTINGS.get(method.get("_target_"), {})
    return _without_later(method, later)


def _without_later(tree: dict, later: dict) -> dict:
    nested: dict[str, dict] = {}
    for key, value in later.items():
        head, dot, rest = key.partition(".")
        if dot:
            nested.setdefault(head, {})[rest] = value
    out = {}
    for k, v in tree.items():
        if k in later and v == later[k]:
            continue
        out[k] = _without_later(v, nested[k]) if k in nested and isinstance(v, dict) else v
    return out


def first_class_paths(tree):
    """`tree` (plain containers) with every `_target_` named by its class's first path (FIRST_CLASS_PATHS)."""
    if isinstance(tree, dict):
        return {k: (FIRST_CLASS_PATHS.get(v, v) if k == "_target_" and isinstance(v, str) else first_class_paths(v))
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [first_class_paths(v) for v in tree]
    return tree


def config_hash(cfg) -> str:
    """A whole run's config (but where it writes): what a finished selection or student result was made by."""
    plain = first_class_paths(to_plain(cfg))
    if isinstance(plain.get("method"), dict):
        plain["method"] = settled_method(plain["method"])
    for (group, key), value in LATER_CONFIG_SETTINGS.items():
        if isinstance(plain.get(group), dict) and plain[group].get(key, value) == value:
            plain[group] = {k: v for k, v in plain[group].items() if k != key}
    plain.pop("paths", None)
    plain.pop("hydra", None)
    plain.pop("tuned_from", None)  # a record of where the settings came from, not one of them
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


def flat_items(tree, prefix: str = "") -> dict:
    """{"a.b.c": value} for a nested dict, for naming the fields in which two configs differ."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flat_items(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(old: dict, new: dict, limit: int = 8) -> list[str]:
    """'field: old -> new' for every field that differs (at most `limit`)."""
    a, b = flat_items(old), flat_items(new)
    diffs = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
             if a.get(k, "<absent>") != b.get(k, "<absent>")]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])
