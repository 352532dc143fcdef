"""Helpers shared by the tests (conftest.py holds the fixtures and the CLI runners)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_in_process, run_mmdd


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


# ---------------------------------------------------------------- runs of the stages on the shared tiny store (conftest.root)
TINY_DISTILL = [o for o in TINY if not o.startswith("method.iterations")] + ["logger=none", "evaluate=false"]
DDP = ["hardware.devices=2", "hardware.strategy=ddp"]  # two CPU processes (gloo)
# learning-free and distribution-matching methods on the tiny store: their own few iterations, one student
SMALL = [o for o in TINY if not o.startswith("method.")] + ["method.iterations=4", "evaluate=false"]
TINY_DATA = [o for o in TINY if o.startswith("data.")]
ONE_STUDENT = [o for o in TINY if o.startswith("protocol.") and "num_seeds" not in o] + ["protocol.num_seeds=1"]


def distill(root: Path, run: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_mmdd(["distill", *TINY_DISTILL, *overrides, f"hydra.run.dir=outputs/{run}"], root, check=check)


def distill_here(root: Path, run: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """`distill` in this process (conftest.run_in_process), for runs whose assertions are on files and messages."""
    return run_in_process(["distill", *TINY_DISTILL, *overrides, f"hydra.run.dir=outputs/{run}"], root, check=check)


def the_set(root: Path, run: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / "outputs" / run / "synthetic" / "synthetic.safetensors"))


def manifest(root: Path, run: str) -> dict:
    import json

    return json.loads((root / "outputs" / run / "synthetic" / "manifest.json").read_text())


def assert_same_set(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def signal_once_written(root: Path, args: list[str], marker: Path, sig: int, what: str = "") -> tuple[int, str]:
    """Start `mmdd <args>` in its own process group, send `sig` to the group (every rank, as SLURM does) once
    `marker` exists, and return (exit code, stderr); a run that does not end within 90 s fails the test as hung."""
    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "mmdd.cli", *args], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{what}the processes hung after {signal.Signals(sig).name}")
    return proc.returncode, err


def buffer_cmd(root: Path, run: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mmdd.cli", "buffer", *TINY, "logger=none", *overrides, f"hydra.run.dir=outputs/{run}"]


def trained_experts(log: str) -> set[int]:
    import re

    return {int(m) for m in re.findall(r"expert (\d+): test r_mean", log)}
