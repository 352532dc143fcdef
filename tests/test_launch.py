"""Launching a run's processes: SLURM (srun and submitit), torchrun, mmdd's own launch and a single process. Every
launcher's environment is made here for real (fake SLURM variables, torchrun itself); the processes run Lightning's
DDP on gloo."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, run_in_process
from mmdd.errors import MmddError
from mmdd.utils import launch
from mmdd.utils.trainer import process_device, setup_process

LAUNCH_VARIABLES = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                    "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "MMDD_PROCESSES_PER_NODE", "MMDD_WORLD_SIZE",
                    "MMDD_LAUNCHER_PID")


def slurm_env(ntasks: int, procid: int, nodes: int = 1, job_name: str = "mmdd-test") -> dict[str, str]:
    """What srun sets for task `procid` of `ntasks` on `nodes` nodes (the variables Lightning and submitit read)."""
    per_node = ntasks // nodes
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": job_name, "SLURM_NTASKS": str(ntasks),
            "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % per_node), "SLURM_NODEID": str(procid // per_node),
            "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost"}


@pytest.fixture
def clean_env(monkeypatch):
    for key in [*LAUNCH_VARIABLES, *[k for k in os.environ if k.startswith("SLURM_")]]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def hw(accelerator="cpu", devices=1, num_nodes=1):
    return OmegaConf.create({"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes})


def test_each_launcher_is_recognised_with_this_process_s_ranks(clean_env):
    assert launch.current() == launch.Launch("none", 0, 0, 0, 1, 1, 1)
    for key, value in slurm_env(16, 11, nodes=2).items():
        clean_env.setenv(key, value)
    assert launch.current() == launch.Launch("slurm", 11, 3, 1, 16, 8, 2)
    clean_env.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")  # SLURM's compressed form
    assert launch.current().tasks_per_node == 8
    clean_env.setenv("SLURM_JOB_NAME", "interactive")  # a shell in an allocation: not a launcher (Lightning's rule)
    assert launch.current().launcher == "none"
    clean_env.setenv("SLURM_JOB_NAME", "mmdd-test")
    # torchrun inside an srun: torchrun's workers are the ranks
    for key, value in {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                       "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}.items():
        clean_env.setenv(key, value)
    assert launch.current() == launch.Launch("torchrun", 5, 1, 1, 8, 4, 2)
    for key in [k for k in os.environ if k.startswith("SLURM_") or k in LAUNCH_VARIABLES]:
        clean_env.delenv(key)
    for key, value in {"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2", "MMDD_PROCESSES_PER_NODE": "2"}.items():
        clean_env.setenv(key, value)
    assert launch.current() == launch.Launch("mmdd", 1, 1, 0, 2, 2, 1)


def test_a_cluster_launch_that_does_not_match_the_devices_is_refused_with_the_setting_to_change(clean_env):
    for key, value in slurm_env(1, 0).items():  # sbatch without srun tasks per GPU
        clean_env.setenv(key, value)
    with pytest.raises(MmddError, match=r"slurm started 1 process\(es\) per node on 1 node\(s\) \(1 in all\), but "
                                        r"hardware.devices=4 x hardware.num_nodes=1 runs 4.*tasks_per_node=4"):
        launch.check(4, 1)
    for key, value in slurm_env(4, 2).items():  # 4 tasks, each of which would run the whole job alone
        clean_env.setenv(key, value)
    with pytest.raises(MmddError, match="hardware.devices=1 x hardware.num_nodes=1 runs 1.*hardware.devices=4"):
        setup_process(hw("cpu", 1))
    assert launch.check(4, 1).global_rank == 2


def test_work_outside_the_trainer_runs_on_the_rank_s_own_gpu_under_every_launcher(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    assert process_device(hw("gpu", 1)) == torch.device("cuda", 0)
    for key, value in slurm_env(4, 3).items():
        clean_env.setenv(key, value)
    assert process_device(hw("gpu", 4)) == torch.device("cuda", 3)  # SLURM_LOCALID, no LOCAL_RANK
    assert process_device(hw("gpu", [4, 5, 6, 7])) == torch.device("cuda", 7)
    assert process_device(hw("cpu", 4)) == torch.device("cpu")


def test_ddp_without_a_visible_gpu_is_refused_under_a_cluster_launcher_and_said_loudly_elsewhere(clean_env, caplog):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING"):
        setup_process(hw("auto", 2))
    assert "no CUDA GPU is visible here" in caplog.text and "running 2 CPU processes with gloo" in caplog.text
    caplog.clear()
    setup_process(hw("cpu", 2))  # said explicitly: meant
    assert "CPU processes" not in caplog.text
    for key, value in slurm_env(2, 0).items():
        clean_env.setenv(key, value)
    with pytest.raises(MmddError, match="slurm started this run on a node without usable GPUs.*gpus_per_node"):
        setup_process(hw("auto", 2))


def test_several_nodes_without_a_launcher_are_refused_instead_of_meeting_on_localhost(clean_env):
    from mmdd.utils.ddp import start_processes

    clean_env.setenv("MMDD_STAGE", "distill")
    with pytest.raises(MmddError, match="hardware.num_nodes=2, but no launcher started.*srun --nodes=2 "
                                        "--ntasks-per-node=4.*torchrun.*MASTER_ADDR"):
        start_processes(4, 2)
    assert "MASTER_ADDR" not in os.environ and "LOCAL_RANK" not in os.environ


def test_a_rank_started_by_mmdd_exits_when_rank_0_is_killed_even_while_blocked(tmp_path):
    """NCCL's collectives wait for a dead peer up to their timeout (30 minutes), holding the GPU: the ranks mmdd
    starts watch their parent, local rank 0, and stop with a sentence when it is gone. Here rank 1 blocks in a
    sleep standing for the collective; rank 0 is SIGKILLed."""
    rank0 = tmp_path / "rank0.py"
    rank0.write_text(textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = {{**os.environ, "MMDD_STAGE": "distill", "MMDD_LAUNCHER_PID": str(os.getpid()), "LOCAL_RANK": "1",
               "NODE_RANK": "0", "WORLD_SIZE": "2", "MMDD_PROCESSES_PER_NODE": "2"}}
        child = subprocess.Popen([sys.executable, {str(tmp_path / 'rank1.py')!r}], env=env)
        print(child.pid, flush=True)
        time.sleep(600)
    """))
    (tmp_path / "rank1.py").write_text(textwrap.dedent("""
        import time
        from mmdd.utils.ddp import ParentWatch
        ParentWatch(period=0.2).start()
        print("waiting", flush=True)
        time.sleep(600)  # a collective that never completes
    """))
    parent = subprocess.Popen([sys.executable, str(rank0)], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    time.sleep(0.5)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the child is no longer ours to wait for: it was re-parented
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("rank 1 kept running after rank 0 was killed")


def test_the_parent_watch_says_which_process_died(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from mmdd.utils.ddp import ParentWatch
        watch = ParentWatch()
        print("watching" if not watch.check() else "nothing to watch", flush=True)
        os.environ["MMDD_LAUNCHER_PID"] = "1"  # not the parent: the launcher is gone
        watch.check()
        print("not stopped")
    """))
    env = {**os.environ, "MMDD_STAGE": "distill", "MMDD_LAUNCHER_PID": str(os.getpid()), "LOCAL_RANK": "3",
           "NODE_RANK": "1", "WORLD_SIZE": "8", "MMDD_PROCESSES_PER_NODE": "4"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and proc.stdout.split() == ["watching"], (proc.stdout, proc.stderr)
    assert "mmdd distill: error: process 4 of 8 died (killed, out of memory, or it crashed" in proc.stderr
    assert "Rerun the same command to resume" in proc.stderr


def test_processes_started_together_embed_a_cold_caption_cache_once(tmp_path):
    """Every rank of an srun/torchrun job starts at once: one embeds the captions, the others wait and read them."""
    script = tmp_path / "embed.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        import torch
        from omegaconf import OmegaConf
        from mmdd.data.text_cache import embed_captions

        class SlowEncoder:
            def encode(self, captions):
                with open({str(tmp_path / 'calls')!r}, "a") as f:
                    f.write("call\\n")
                time.sleep(2.0)
                return torch.arange(len(captions) * 3, dtype=torch.float32).reshape(len(captions), 3)

        cfg = OmegaConf.create({{"name_or_path": "slow", "pooling": "mean", "max_length": 8, "normalize": False}})
        emb = embed_captions(cfg, ["a cat", "a dog"], {str(tmp_path / 'cache')!r}, SlowEncoder())
        print(emb.sum().item())
    """))
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == [["15.0"]] * 3
    assert (tmp_path / "calls").read_text() == "call\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


PROBE = """
import json, os, sys
sys.path.insert(0, TESTS)
import torch
from launch_probe import Probe, ones, probe_cfg
from mmdd.utils.trainer import build_trainer, process_device, setup_process

cfg = probe_cfg(int(sys.argv[2]), "ddp", num_threads=1)
hw = cfg.hardware
setup_process(hw)
trainer = build_trainer(cfg)
trainer.fit(Probe(), ones())
from mmdd.utils.ddp import _started
out = {"pid": os.getpid(), "global_rank": trainer.global_rank, "local_rank": trainer.local_rank,
       "world_size": trainer.world_size, "device": str(process_device(hw)), "started": len(_started),
       "environment": type(trainer.strategy.cluster_environment).__name__}
with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
    json.dump(out, f)
if torch.distributed.is_initialized():  # leave together: gloo's threads torn down mid-exchange abort the process
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def run_probe(tmp_path: Path, processes: list[list[str]], envs: list[dict]) -> list[dict]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE.replace("TESTS", repr(str(Path(__file__).parent))))
    procs = [subprocess.Popen(cmd, env={**os.environ, **env}, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd, env in zip(processes, envs)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]


def test_srun_tasks_are_the_ranks_and_start_no_processes(tmp_path):
    """`hardware=ddp hardware.devices=2` under 2 SLURM tasks: 2 processes in all, ranks 0 and 1 from SLURM_PROCID
    (not the task's rank twice, as when mmdd also started processes of its own)."""
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    envs = [{**base, **slurm_env(2, i), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} for i in range(2)]
    cmd = [sys.executable, str(tmp_path / "probe.py"), str(tmp_path), "2"]
    ranks = run_probe(tmp_path, [cmd, cmd], envs)
    assert [(r["global_rank"], r["local_rank"], r["world_size"], r["started"]) for r in ranks] == [(0, 0, 2, 0),
                                                                                                  (1, 1, 2, 0)]
    assert {r["environment"] for r in ranks} == {"SLURMEnvironment"} and len({r["pid"] for r in ranks}) == 2


@pytest.mark.slow  # torchrun's agent adds ~10 s; the SLURM probe above covers the same mmdd path
def test_torchrun_workers_are_the_ranks_and_start_no_processes(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(tmp_path / "probe.py"), str(tmp_path), "2"]
    ranks = run_probe(tmp_path, [cmd], [base])
    assert [(r["global_rank"], r["local_rank"], r["world_size"], r["started"]) for r in ranks] == [(0, 0, 2, 0),
                                                                                                  (1, 1, 2, 0)]
    assert {r["environment"] for r in ranks} == {"TorchElasticEnvironment"}


# --- submitit jobs (hydra/launcher=slurm) on a SLURM stand-in: tests/fake_slurm.py -----------------------------------

TINY_DISTILL = [o for o in TINY if not o.startswith("method.iterations")] + ["logger=none", "evaluate=false"]
GRID = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=2", "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.max_num_timeout=3", "hydra.launcher.timeout_min=30", "hardware=ddp", "hardware.devices=2",
        "hardware.accelerator=cpu", "hardware.num_threads=1"]


@pytest.fixture(scope="module")
def slurm_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    run_in_process(["buffer", *TINY, "logger=none", "hydra.run.dir=outputs/buffer"], root, check=True)
    return root


def submit(root: Path, name: str, overrides: list[str], hold: bool) -> tuple[subprocess.Popen, dict]:
    """`mmdd distill -m` with hydra/launcher=slurm (the README's grid command) on the SLURM stand-in."""
    import fake_slurm

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    env.update(fake_slurm.install(root / f"{name}_bin", root / f"{name}_slurm"), MMDD_ROOT=str(root),
               WANDB_MODE="offline", WANDB_SILENT="true", **({"FAKE_SLURM_HOLD": "1"} if hold else {}))
    cmd = [sys.executable, "-m", "mmdd.cli", "distill", "-m", *GRID, *TINY_DISTILL, *overrides,
           f"hydra.sweep.dir=outputs/{name}"]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), env


def task_logs(root: Path, name: str, job: str) -> list[str]:
    logs = sorted((root / f"outputs/{name}/.submitit/{job}").glob(f"{job}_*_log.out"))
    errs = sorted((root / f"outputs/{name}/.submitit/{job}").glob(f"{job}_*_log.err"))
    return [o.read_text() + e.read_text() for o, e in zip(logs, errs)]


@pytest.mark.slow  # two 2-process submitit jobs of a distillation: ~1 min
def test_the_readme_slurm_grid_runs_one_rank_per_task_in_each_job(slurm_root):
    """README's grid command, 2 GPUs per job (here 2 CPU tasks per job): each job runs exactly its 2 SLURM tasks as
    ranks 0 and 1 (none starts processes of its own), writes its set once, and the submitter collects both."""
    proc, env = submit(slurm_root, "grid", ["method.iterations=3", "seed=0,1"], hold=False)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-5000:]
    submitted = json.loads((Path(env["FAKE_SLURM_DIR"]) / "sbatch.jsonl").read_text())
    job = submitted["job"]
    assert "export SLURM_KILL_BAD_EXIT=1" in Path(submitted["script"]).read_text()  # a dead task ends the others
    for index in ("0", "1"):
        logs = task_logs(slurm_root, "grid", f"{job}_{index}")
        assert len(logs) == 2, logs
        for rank, log in enumerate(logs):
            assert f"slurm: process {rank} of 2 (local rank {rank} on node 0 of 1), device cpu" in log, log[-3000:]
            assert "mmdd_rank_" not in log  # the name of ranks mmdd starts itself
        manifest = json.loads((slurm_root / f"outputs/grid/{index}/synthetic/manifest.json").read_text())
        assert manifest["complete"] and manifest["seed"] == int(index)
        assert not (slurm_root / f"outputs/grid/{index}/synthetic_rank1").exists()


@pytest.mark.slow  # a 2-process submitit job stopped by its requeue signal, then requeued: ~1 min
def test_submitit_s_requeue_signal_saves_the_current_iteration_requeues_and_the_job_resumes(slurm_root):
    """submitit's USR2 (before the time limit) requeues the job from inside its handler; under mmdd the stage first
    stops at the current iteration on every rank with a checkpoint of it, then submitit requeues, and the requeued
    job continues from that iteration (save_every is larger than the run: no periodic checkpoint exists)."""
    import fake_slurm

    n = 400
    proc, env = submit(slurm_root, "requeue", [f"method.iterations={n}", "save_every=100000", "seed=0"], hold=True)
    state = Path(env["FAKE_SLURM_DIR"])
    deadline = time.monotonic() + 120
    while not (state / "sbatch.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    submitted = json.loads((state / "sbatch.jsonl").read_text())
    script, index = submitted["script"], submitted["indices"][0]
    job = submitted["job"] if index is None else f"{submitted['job']}_{index}"  # one job: not an array
    while not (slurm_root / f"outputs/requeue/.submitit/{job}/{job}_submitted.pkl").exists() \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.kill()  # the submitter would wait for the result; the job runs without it, as on a cluster
    proc.wait()

    def run_task() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, fake_slurm.__file__, "run-task", script, submitted["job"],
                                 str(index)], cwd=slurm_root,
                                env={**env, "FAKE_SLURM_HOLD": ""})

    task = run_task()
    while time.monotonic() < deadline + 120:
        logs = task_logs(slurm_root, "requeue", job)
        if len(logs) == 2 and "process 1 of 2" in logs[1] and (state / "srun.jsonl").exists():
            break
        time.sleep(0.5)
    time.sleep(8)  # into the iterations
    os.kill(json.loads((state / "srun.jsonl").read_text().splitlines()[-1])["srun"], signal.SIGUSR2)
    assert task.wait(timeout=300) != 0
    logs = task_logs(slurm_root, "requeue", job)
    assert (state / "scontrol.log").read_text().split() == ["requeue", job], logs[0][-3000:]
    manifest = json.loads((slurm_root / "outputs/requeue/0/synthetic/manifest.json").read_text())
    stopped_at = manifest["iteration"]
    assert not manifest["complete"] and 0 < stopped_at < n
    for log in logs:
        assert f"mmdd distill: stopped by SIGUSR2 at iteration {stopped_at} of {n}" in log, log[-3000:]
    assert "the job is requeued and resumes from what was saved" in logs[0]

    task = run_task()  # the requeued job: same script, same pickle (submitit's checkpoint rewrote it)
    assert task.wait(timeout=600) == 0, task_logs(slurm_root, "requeue", job)[0][-3000:]
    manifest = json.loads((slurm_root / "outputs/requeue/0/synthetic/manifest.json").read_text())
    assert manifest["complete"] and manifest["iteration"] == n
    assert manifest["resumed"][0]["iteration"] == stopped_at


def test_a_one_process_trainer_inside_a_launch_leaves_the_launch_as_it_was(clean_env):
    """Rank 0's students in a torchrun job train in one-process trainers (LightningEnvironment). Were WORLD_SIZE gone
    after one (LightningEnvironment.teardown deletes it when a DDP strategy ends), this process would take itself for
    a 1-process torchrun job and the next stage would refuse the launch."""
    from launch_probe import Probe, ones, probe_cfg
    from mmdd.utils.trainer import build_trainer

    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}
    for key, value in torchrun.items():
        clean_env.setenv(key, value)
    before = launch.current()

    cfg = probe_cfg(1, "auto", num_threads=0)
    trainer = build_trainer(cfg)
    trainer.fit(Probe(), ones(4))
    assert (trainer.world_size, trainer.global_rank) == (1, 0)
    assert {k: os.environ.get(k) for k in torchrun} == torchrun
    assert launch.current() == before == launch.Launch("torchrun", 0, 0, 0, 2, 2, 1)
