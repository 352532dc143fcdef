"""A distillation's checkpoints: kill-and-resume, stop signals, extending a finished run, changed settings,
NaN steps, corrupt or foreign checkpoints (mmdd.methods.engine.checkpointing, the outer loop's resume)."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY_DISTILL, assert_same_set, distill, distill_here, manifest, the_set


def test_sigkill_then_resume_equals_the_uninterrupted_run(root):
    n = 150  # long enough that the kill lands mid-run: ~25 iterations in (a tiny iteration is ~20 ms)
    distill_here(root, "straight", f"method.iterations={n}", "save_every=5")

    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    cmd = [sys.executable, "-m", "mmdd.cli", "distill", *TINY_DISTILL, f"method.iterations={n}", "save_every=5",
           "hydra.run.dir=outputs/killed"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = root / "outputs/killed/synthetic/checkpoint/last.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)  # a few more checkpoints
    # A save writes the set, then the checkpoint: kill once the checkpoint is the newer file, so the manifest read
    # below names the iteration the checkpoint holds (a kill between the two writes would resume one save earlier).
    saved = root / "outputs/killed/synthetic/manifest.json"
    while proc.poll() is None and time.time() < deadline and ckpt.stat().st_mtime_ns < saved.stat().st_mtime_ns:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = manifest(root, "killed")["iteration"]
    assert not manifest(root, "killed")["complete"] and 0 < killed_at < n

    distill_here(root, "killed", f"method.iterations={n}", "save_every=5")  # same command, same directory
    assert manifest(root, "killed")["resumed"][0]["iteration"] == killed_at
    assert manifest(root, "killed")["complete"]
    assert_same_set(the_set(root, "killed"), the_set(root, "straight"))
    history = __import__("json").loads((root / "outputs/killed/synthetic/history.json").read_text())
    assert [h["iteration"] for h in history] == list(range(1, n + 1))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143),
                                       pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])


def test_a_stop_signal_saves_the_iteration_says_so_and_exits_with_the_signals_code(root, sig, code):
    """SIGTERM is what SLURM sends at a time limit or preemption; SIGINT is Ctrl-C. Both finish the iteration in
    progress, save the set and a checkpoint at it, say where the run stopped, and exit 128 + signal (not 0 or 1)."""
    n, run = 60, f"stopped_{sig.name}"
    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    cmd = [sys.executable, "-m", "mmdd.cli", "distill", *TINY_DISTILL, f"method.iterations={n}", "save_every=5",
           f"hydra.run.dir=outputs/{run}"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = root / f"outputs/{run}/synthetic/manifest.json"  # written with the first periodic save
    deadline = time.time() + 120
    while not history.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    m = manifest(root, run)
    stopped_at = m["iteration"]
    assert not m["complete"] and 0 < stopped_at < n, m
    assert f"stopped by {sig.name} at iteration {stopped_at} of {n}" in err and "rerun the same command" in err
    assert err.count("stopped by") == 1, err[-2000:]  # said once (it was said again as "nothing had started")
    state = torch.load(root / f"outputs/{run}/synthetic/checkpoint/last.ckpt", weights_only=True)
    assert state["global_step"] == stopped_at  # the checkpoint is at the stop, not at the last periodic save
    distill_here(root, run, f"method.iterations={n}", "save_every=5")
    assert manifest(root, run)["complete"] and manifest(root, run)["resumed"][0]["iteration"] == stopped_at


@pytest.mark.slow  # keeps the default suite under 10 minutes; `pytest -m slow`
def test_a_finished_run_extends_with_more_iterations(root):
    distill(root, "short_then_long", "method.iterations=7", "save_every=0")
    distill(root, "short_then_long", "method.iterations=12", "save_every=0")
    distill(root, "long", "method.iterations=12", "save_every=0")
    assert manifest(root, "short_then_long")["iteration"] == 12
    assert_same_set(the_set(root, "short_then_long"), the_set(root, "long"))


@pytest.mark.slow  # keeps the default suite under 10 minutes; `pytest -m slow`
def test_resume_may_change_the_outer_learning_rates_and_records_it(root):
    """E.g. after a run stopped on NaN losses: continue from the last checkpoint with a lower lr_img."""
    for run in ("lowered", "kept"):
        distill(root, run, "method.iterations=4", "save_every=2")
    distill(root, "lowered", "method.iterations=8", "method.lr_img=20")
    distill(root, "kept", "method.iterations=8")
    lowered, kept = manifest(root, "lowered"), manifest(root, "kept")
    assert lowered["resumed"] == [{"iteration": 4, "changed": ["lr_img: 200.0 -> 20.0"]}]
    assert kept["resumed"] == [{"iteration": 4, "changed": []}]
    assert lowered["diagnostics"]["initial"] == kept["diagnostics"]["initial"]  # the first start's, kept
    step = (the_set(root, "lowered")["images"] - the_set(root, "kept")["images"]).abs().max()
    assert step > 0  # the new learning rate took effect after iteration 4


def test_resume_refuses_a_checkpoint_of_other_settings(root):
    distill_here(root, "other", "method.iterations=3")
    proc = distill_here(root, "other", "method.iterations=3", "method.syn_steps=3", check=False)
    assert proc.returncode == 2
    assert "another distillation" in proc.stderr and "(method.syn_steps: 2 -> 3)" in proc.stderr
    proc = distill_here(root, "other", "method.iterations=2", check=False)
    assert proc.returncode == 2 and "beyond method.iterations=2" in proc.stderr
    proc = distill_here(root, "fresh", "method.iterations=3", "resume=outputs/nowhere", check=False)
    assert proc.returncode == 2 and "no checkpoint at" in proc.stderr


def test_nan_steps_are_skipped_then_the_run_stops_with_the_last_good_set(root, caplog):
    with caplog.at_level(logging.WARNING, logger="mmdd"):
        proc = distill_here(root, "nan", "method.iterations=50", "method.lr_img=1e35", "max_nonfinite=3", check=False)
    assert proc.returncode == 2
    assert "3 iterations in a row had a NaN/inf" in proc.stderr
    assert caplog.text.count("step skipped") == 3
    m = manifest(root, "nan")
    assert not m["complete"] and m["iteration"] >= 1
    assert all(torch.isfinite(t).all() for t in the_set(root, "nan").values())
    # a checkpoint of that set, so a rerun with lower learning rates continues from it
    state = torch.load(root / "outputs/nan/synthetic/checkpoint/last.ckpt", weights_only=True)
    assert state["global_step"] == m["iteration"] and state["mmdd"]["skipped_iterations"] == 3


def test_a_corrupted_checkpoint_is_refused_not_loaded(root):
    distill_here(root, "corrupt", "method.iterations=4", "save_every=2")
    ckpt = root / "outputs/corrupt/synthetic/checkpoint/last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated
    before = the_set(root, "corrupt")
    proc = distill_here(root, "corrupt", "method.iterations=8", check=False)
    assert proc.returncode == 2 and f"checkpoint {ckpt} cannot be used" in proc.stderr and "resume=false" in proc.stderr
    assert_same_set(the_set(root, "corrupt"), before)  # nothing overwritten
    distill_here(root, "corrupt", "method.iterations=8", "resume=false")  # starts over
    assert manifest(root, "corrupt")["complete"] and manifest(root, "corrupt")["iteration"] == 8


class _RunsCode:
    """A pickle that, when unpickled, creates `marker` (any code could run the same way)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_unpickling_it(tmp_path):
    from mmdd.errors import ArtifactError
    from mmdd.methods.engine.checkpointing import resume_checkpoint

    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "handed_over.ckpt"
    torch.save({"mmdd": {}, "state_dict": {}, "payload": _RunsCode(marker)}, ckpt)
    with pytest.raises(ArtifactError, match=rf"checkpoint {ckpt} cannot be used \(UnpicklingError"):
        resume_checkpoint(str(ckpt), tmp_path / "synthetic")
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # what a full unpickle does with it
    assert marker.exists()


def test_a_checkpoint_is_written_beside_itself_and_renamed_so_a_failed_write_keeps_the_last_one(tmp_path, monkeypatch):
    from mmdd.methods.engine import distributed

    io = distributed.GuardedCheckpointIO()
    path = tmp_path / "checkpoint" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    assert io.take_error() is None and torch.load(path, weights_only=True)["step"] == 1
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst)))
    io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert [(s.parent, d) for s, d in renames] == [(path.parent, path)]  # staged in the same directory, not TMPDIR

    def dies_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(distributed.torch, "save", dies_mid_write)
    io.save_checkpoint({"step": torch.tensor(3)}, path)
    assert isinstance(io.take_error(), OSError)
    assert torch.load(path, weights_only=True)["step"] == 2  # the previous checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left


def test_snapshots_kept_on_the_device_between_draws_give_the_same_set(root):
    """hardware.snapshot_cache_mb (auto on a GPU): the matching only reads the cached snapshots."""
    distill_here(root, "snapshot_cache", "method.iterations=6", "hardware.snapshot_cache_mb=64", check=True)
    distill_here(root, "no_snapshot_cache", "method.iterations=6", "hardware.snapshot_cache_mb=0", check=True)
    assert_same_set(the_set(root, "snapshot_cache"), the_set(root, "no_snapshot_cache"))
