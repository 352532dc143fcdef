"""Writing artifacts (mmdd.utils.io): unwritable outputs and full disks before any work, a write failing mid-run,
temp files of killed writers."""

import os
import subprocess
import sys
import time

from helpers import TINY_DISTILL, distill_here, manifest


def test_unwritable_output_and_a_full_disk_fail_before_any_work(root):
    blocker = root / "a_file"
    blocker.write_text("not a directory")
    proc = distill_here(root, "nowhere", "method.iterations=2", f"synthetic_dir={blocker}/synthetic", check=False)
    assert proc.returncode == 2
    assert f"cannot write to {blocker}/synthetic (synthetic_dir)" in proc.stderr
    assert "loaded" not in proc.stdout  # failed before reading data or trajectories
    proc = distill_here(root, "full", "method.iterations=2", "paths.min_free_mb=1e12", check=False)
    assert proc.returncode == 2 and "MB free on the disk that holds" in proc.stderr and "paths.min_free_mb" in proc.stderr


def test_a_write_that_fails_mid_run_stops_with_a_message_and_leaves_no_partial_file(root):
    """A real failing write: the process's file-size limit (RLIMIT_FSIZE) is below the checkpoint's size, so
    Lightning's checkpoint write fails with EFBIG, like a disk that fills up during the run."""
    import resource

    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    cmd = [sys.executable, "-m", "mmdd.cli", "distill", *TINY_DISTILL, "method.iterations=4", "save_every=2",
           "hydra.run.dir=outputs/limited"]
    limit = 200 * 1024  # the set (~110 KB) fits, the checkpoint (set + model + optimizer) does not
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "writing the checkpoint" in proc.stderr and "file-size limit" in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpt_dir = root / "outputs/limited/synthetic/checkpoint"
    assert not list(ckpt_dir.glob("*"))  # no truncated checkpoint left to resume from
    assert manifest(root, "limited")["iteration"] == 2  # the set saved before the failure is intact


def test_temp_files_of_killed_writers_and_claims_on_complete_experts_are_cleaned(tmp_path):
    import socket

    from mmdd.teachers.claims import ExpertClaims
    from mmdd.utils.io import atomic_write, remove_stale_temp_files

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    left = tmp_path / f".synthetic.safetensors~{dead_pid}~{host}~abc123.tmp"
    live = tmp_path / f".manifest.json~{os.getpid()}~{host}~def456.tmp"
    other_host = tmp_path / f".history.json~{dead_pid}~another-host~ghi789.tmp"
    kept = tmp_path / "synthetic.safetensors"
    for p in (left, live, other_host, kept):
        p.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [left]
    assert live.exists() and other_host.exists() and kept.exists()  # alive, or not ours to judge yet
    old = time.time() - 2 * 24 * 3600
    os.utime(other_host, (old, old))
    assert remove_stale_temp_files(tmp_path) == [other_host]
    # what atomic_write leaves behind when killed is recognised as its own
    names = []
    atomic_write(tmp_path / "a.json", lambda p: names.append(p.name) or p.write_text("{}"))
    assert names[0].startswith(f".a.json~{os.getpid()}~{host}~") and names[0].endswith(".tmp")

    claims = ExpertClaims(tmp_path)
    assert claims.try_claim(0) and claims.try_claim(1)
    claims.release_complete([0])
    assert not claims.path(0).exists() and claims.path(1).exists()
