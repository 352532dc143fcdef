import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]



def debug_overrides(name: str = "tiny") -> list[str]:
    """conf/debug/<name>.yaml as command-line overrides (`key=value`, one per leaf), so a test can drop or replace
    single keys of it."""
    from omegaconf import OmegaConf

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={value}"

    return list(leaves(OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "debug" / f"{name}.yaml"))))


# Tiny sizes for end-to-end runs, every stage for real in seconds: conf/debug/tiny.yaml (the one source), and the
# matching methods' own settings small.
TINY = [*debug_overrides("tiny"), "method.iterations=3", "method.syn_steps=2"]


@pytest.fixture(scope="session", autouse=True)
def _shared_caption_embeddings(tmp_path_factory):
    """One caption-embedding cache for the session (MMDD_TEXT_CACHE_DIR, conf/paths/default.yaml): the embeddings are
    keyed by encoder and captions, so every fresh run root of the tiny dataset would embed the same captions again,
    seconds each. Subprocesses inherit it; tests of the cache itself pass their own folder."""
    before = os.environ.get("MMDD_TEXT_CACHE_DIR")
    os.environ["MMDD_TEXT_CACHE_DIR"] = str(tmp_path_factory.mktemp("caption_embeddings"))
    yield
    if before is None:
        os.environ.pop("MMDD_TEXT_CACHE_DIR", None)
    else:
        os.environ["MMDD_TEXT_CACHE_DIR"] = before


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


def the_store(root: Path) -> Path:
    """The one trajectory store a test root holds (the tiny teachers); more than one means a test wrote another
    where the shared one was expected, said here rather than one picked at random."""
    stores = sorted((root / "outputs" / "artifacts" / "buffers" / "synscenes").iterdir())
    assert len(stores) == 1, f"expected one trajectory store under {root}, found {[s.name for s in stores]}"
    return stores[0]


@functools.cache
def experiment_script(name: str):
    """experiments/<name>.py as a module, loaded once (its functions tested directly; the scripts keep no state). It is
    registered in sys.modules, where its dataclasses look their module up."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def call_in(root: Path, args: list, function, *call_args) -> subprocess.CompletedProcess:
    """`function(*call_args)` run from `root` with its stdout and stderr captured, as a command line would see it: its
    return value, or a SystemExit's code, is the exit code (`args` names the call in the result)."""
    import contextlib
    import io

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = function(*call_args)
    except SystemExit as exc:
        code = exc.code
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())


def run_in_process(args: list[str], root: Path, check: bool = False) -> subprocess.CompletedProcess:
    """`mmdd <stage> [overrides]` in this process: composed as the CLI composes it and run by the CLI's own task, so
    an MmddError ends it with code 2 and its message on stderr, as on the command line, without the seconds of a
    fresh interpreter (`check`: fail the test on a non-zero code). `hydra.run.dir=D` becomes the run directory root/D.
    Hydra's job config is set as a Hydra app sets it, so the run records its command-line overrides (results.json's
    `overrides`, which `mmdd table` names rows by). Runs whose assertions read Hydra's logs or a multirun use
    `run_mmdd`."""
    import copy

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from mmdd.cli import _task
    from mmdd.paths import conf_dir

    stage, *overrides = args
    run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), "outputs/in_process")
    overrides = [o for o in overrides if not o.startswith("hydra.")]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose(stage, overrides=overrides, return_hydra_config=True)
    # what a Hydra app does before it calls the task: the job's hydra node becomes HydraConfig, the task sees the rest
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(root / run_dir)
        cfg.hydra.run.dir = str(root / run_dir)
    HydraConfig.instance().set_config(cfg)
    cfg = copy.deepcopy(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.root_dir = str(root)
        cfg.paths.output_dir = str(root / run_dir)
    try:
        # the task returns the run's objective (for a sweeper), not an exit code: only a SystemExit sets one
        proc = call_in(root, [stage, *overrides], lambda: _task(stage)(cfg) and None)
    finally:
        HydraConfig.instance().cfg = None  # the next test starts outside any Hydra job, as a fresh process would
    if check and proc.returncode:
        raise AssertionError(f"mmdd {stage} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_command(args: list[str], root: Path) -> subprocess.CompletedProcess:
    """`mmdd <command> [args]` (table, export, plan) in this process, run from `root`: its exit code and output."""
    from mmdd import commands

    return call_in(root, args, getattr(commands, args[0]), args[1:])


def toy_segment(model, steps: int, inner_loss, extra=(), blend=None, n: int = 4, batch: int = 3):
    """A float64 matching segment on `model` (`n` pairs of 8x8 images and 5-d texts, batches of `batch`, a target
    0.05 away from the start), the same draws every call: for comparing meta-gradient paths exactly."""
    import torch

    from mmdd.methods.trajectory.unrolling import BatchSchedule
    from mmdd.models.functional import ParamLayout
    from mmdd.methods.trajectory.meta_gradient import Segment

    for p in model.parameters():
        p.requires_grad_(False)
    lay = ParamLayout.from_model(model)
    named = dict(model.named_parameters())
    start = {k: lay.flatten(named, k) for k in ("image", "text")}
    g = torch.Generator().manual_seed(1)
    target = {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in start.items()}
    images = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    lrs = {k: torch.tensor(0.5, dtype=torch.float64, requires_grad=True) for k in start}
    return Segment(model, lay, start, target, lrs, images, texts, BatchSchedule(n, batch, torch.Generator().manual_seed(3)),
                   steps, inner_loss, extra=tuple(extra), blend=blend)


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    """A run root with the tiny trajectory store (conf/debug/tiny.yaml's teachers), shared by the tests of stages
    that read it (checkpointing, DDP, buffer, io, evaluate); a test writes its runs under outputs/<its name>."""
    root = tmp_path_factory.mktemp("faults")
    run_in_process(["buffer", *TINY, "logger=none", "hydra.run.dir=outputs/buffer"], root, check=True)
    return root
