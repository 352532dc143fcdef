"""Helpers shared by the tests (conftest.py holds the fixtures and the CLI runners)."""

from __future__ import annotations

import functools


@functools.cache
def method_config(method: str) -> dict:
    """conf/method/<method>.yaml as the CLI composes it (its bases merged, interpolations resolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from mmdd.paths import conf_dir

    overrides = [f"method={method}", "paths.output_dir=/tmp/mmdd-test-compose"]
    if GlobalHydra.instance().is_initialized():  # inside a test's own Hydra context (always on mmdd's conf/)
        cfg = compose("distill", overrides=overrides)
    else:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("distill", overrides=overrides)
    return OmegaConf.to_container(cfg.method, resolve=True)


def method_values(method: str) -> dict:
    """Every setting the method's class reads, at its config's values (the config without `_target_`, `name` and
    Hydra's keys)."""
    return {k: v for k, v in method_config(method).items() if not k.startswith("_") and k != "name"}


def method_settings(cls, method: str, **changes):
    """A settings dataclass `cls` built as mmdd builds it (mmdd.config_schema.build_settings) from
    conf/method/<method>.yaml with `changes` over it."""
    from mmdd.config_schema import build_settings

    return build_settings(cls, {**method_values(method), **changes}, "method", f"conf/method/{method}.yaml")


def outer_values(**changes) -> dict:
    """The outer loop's settings of conf/method/_outer.yaml (every learned method's base), with `changes`."""
    from omegaconf import OmegaConf

    from mmdd.paths import conf_dir

    return {**OmegaConf.to_container(OmegaConf.load(conf_dir() / "method" / "_outer.yaml")), **changes}
