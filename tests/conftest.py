import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tiny sizes for end-to-end runs: every stage for real, in seconds.
TINY = [
    "data.generate.num_train=64",
    "data.generate.num_val=16",
    "data.generate.num_test=24",
    "model.image.width=8",
    "teacher.num_experts=2",
    "teacher.epochs=3",
    "teacher.batch_size=16",
    "method.iterations=3",
    "method.syn_steps=2",
    "budget=8",
    "protocol.epochs=4",
    "protocol.lr_decay_epoch=2",
    "protocol.eval_every=2",
    "protocol.num_seeds=2",
    "log_every_n_steps=1",
]


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def run_mmdd(args: list[str], root: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed CLI (`python -m mmdd.cli`) in a subprocess with outputs under `root`."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MMDD_ROOT": str(root)}
    cmd = [sys.executable, "-m", "mmdd.cli", *args]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
