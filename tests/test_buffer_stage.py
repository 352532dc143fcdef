"""`mmdd buffer` (mmdd.stages.buffer, mmdd.teachers.claims): processes sharing one store, claims of dead
processes, teachers stopped by a signal, a store extended with more experts."""

import json

import torch

import os
import signal
import subprocess

import pytest

from conftest import TINY, run_in_process, run_mmdd, the_store
from helpers import buffer_cmd, signal_once_written, trained_experts


@pytest.mark.slow  # keeps the default suite under 10 minutes; `pytest -m slow`
def test_two_buffer_processes_fill_one_store_without_clashing(root):
    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    store = root / "outputs/artifacts/shared"
    procs = [subprocess.Popen(buffer_cmd(root, f"buf_{i}", "teacher.num_experts=4", f"buffer_dir={store}"), cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    trained = [trained_experts(log) for log in logs]
    assert trained[0] | trained[1] == {0, 1, 2, 3} and not trained[0] & trained[1], trained  # each exactly once
    assert sorted(p.name for p in store.glob("expert_*.safetensors")) == [f"expert_{e:03d}.safetensors" for e in range(4)]
    assert not list(store.glob("*.claim")) and not list(store.glob("*.stale-*"))


def test_claims_of_dead_processes_are_taken_over_and_live_ones_respected(root):
    import json
    import socket

    store = root / "outputs/artifacts/claims"
    store.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    (store / "expert_001.claim").write_text(json.dumps({"host": host, "pid": gone.pid}))  # a killed run's claim
    (store / "expert_002.claim").write_text(json.dumps({"host": host, "pid": os.getpid()}))  # alive: this test
    proc = run_mmdd(["buffer", *TINY, "logger=none", "teacher.num_experts=3", f"buffer_dir={store}",
                     "hydra.run.dir=outputs/claims_1"], root)
    out = proc.stdout + proc.stderr
    assert trained_experts(out) == {0, 1}
    assert "taking over a stale claim" in out and f"expert 2 is being trained by {host} (pid {os.getpid()})" in out
    assert (store / "expert_001.safetensors").exists() and not (store / "expert_002.safetensors").exists()
    assert (store / "expert_002.claim").exists() and not (store / "expert_001.claim").exists()
    assert not list(store.glob("*.stale-*"))  # the moved-away claim is cleaned up with the finished expert


# SIGINT takes the same path as SIGTERM (mmdd.utils.signal_stop): slow, to keep the default suite under 8 minutes


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_teachers_stopped_by_a_signal_say_so_and_exit_with_its_code(root, sig):
    """Lightning turns SIGTERM during training into a SystemExit without a code (exit 0, as if the teachers were
    done) and Ctrl-C into exit 1; both are a sentence and 128 + the signal's number, the finished experts kept."""
    store = root / f"outputs/artifacts/stopped_{sig.name}"
    code, err = signal_once_written(root, ["buffer", *TINY, "logger=none", "teacher.num_experts=40",
                                           f"buffer_dir={store}", f"hydra.run.dir=outputs/stopped_{sig.name}"],
                                    store / "expert_001.safetensors", sig)
    assert code == 128 + sig, (code, err[-2000:])
    assert f"mmdd buffer: stopped by {sig.name}; every complete expert is kept" in err and "Traceback" not in err
    kept = len(list(store.glob("expert_*.safetensors")))
    assert 2 <= kept < 40


def test_a_store_is_extended_with_more_experts(root, tmp_path):
    """`teacher.num_experts=3` on a store of 2 trains expert 2 only (the store was refused as "another
    configuration": its hash counted the experts asked for)."""
    import shutil

    from mmdd.teachers.trajectory_store import TrajectoryStore

    made = the_store(root)
    store = tmp_path / "store"
    shutil.copytree(made, store)
    before = {p.name: p.stat().st_mtime_ns for p in store.glob("expert_*.safetensors")}
    proc = run_in_process(["buffer", *TINY, "logger=none", "teacher.num_experts=3", f"buffer_dir={store}",
                           "hydra.run.dir=outputs/extend"], root, check=True)
    assert proc.returncode == 0
    assert TrajectoryStore.open(store).completed_experts() == [0, 1, 2]
    assert {p: store.joinpath(p).stat().st_mtime_ns for p in before} == before  # experts 0 and 1 untouched


def test_teachers_can_start_from_one_initialisation(tmp_path):
    from safetensors.torch import load_file

    from mmdd.teachers.trajectory_store import TrajectoryStore

    run_in_process(["buffer", *TINY, "teacher.init=shared", "hydra.run.dir=outputs/shared"], tmp_path, check=True)
    run_in_process(["buffer", *TINY, "hydra.run.dir=outputs/per_expert"], tmp_path, check=True)
    stores = {json.loads(m.read_text())["teacher"].get("init", "per_expert"): m.parent
              for m in (tmp_path / "outputs" / "artifacts" / "buffers").rglob("manifest.json")}
    assert set(stores) == {"shared", "per_expert"}  # two stores: the setting is part of the store's identity

    def experts(kind):
        return [load_file(str(TrajectoryStore.open(stores[kind]).expert_path(e))) for e in (0, 1)]

    shared, own = experts("shared"), experts("per_expert")
    assert all(torch.equal(shared[0][n][0], shared[1][n][0]) for n in shared[0])  # one start ...
    assert any(not torch.equal(shared[0][n][-1], shared[1][n][-1]) for n in shared[0])  # ... two fine-tunings
    assert any(not torch.equal(own[0][n][0], own[1][n][0]) for n in own[0])  # the default: a start each
    bad = run_in_process(["buffer", *TINY, "teacher.init=one", "hydra.run.dir=outputs/bad"], tmp_path)
    assert bad.returncode == 2 and "teacher.init must be per_expert or shared" in bad.stderr
