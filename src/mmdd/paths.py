"""Locating the Hydra config tree, in a checkout or an installed wheel."""

from __future__ import annotations

from pathlib import Path


def conf_dir() -> Path:
    """The config tree (every Hydra entry point asks for it, so the typed schemas are registered here too)."""
    from mmdd.config_schema import register_schemas

    register_schemas()
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "base.yaml").exists():
            return candidate
    raise FileNotFoundError(f"mmdd's conf/ directory was not found next to {here}")


def repo_root() -> Path:
    """The checkout's root (where experiments/ lives); in an installed wheel, the package directory."""
    return conf_dir().parent
