"""The processes of a multi-process run: mmdd starts them, watches them, and says in a sentence when one dies.

Lightning starts a run's other processes only when none are set up (its LightningEnvironment finds no LOCAL_RANK);
mmdd sets them up before its first multi-process Trainer exists, so Lightning joins them, with its public DDP
strategy and nothing of its private launcher:
- ranks 1..n-1 re-run the same command (the stage in MMDD_STAGE) in rank 0's Hydra run directory, with LOCAL_RANK,
  NODE_RANK, WORLD_SIZE and the rendezvous address in their environment. SLURM and torchrun jobs set these
  themselves, and nothing is started here;
- every process gets cpus // n torch threads unless OMP_NUM_THREADS says otherwise (as Lightning did: a DDP run's
  sums depend on it);
- a thread of rank 0 watches the processes it started. When one ends with an error it says which and how, ends the
  others and exits 2 (a hung collective leaves nothing gentler), unless rank 0 is already stopping with its own
  sentence (a lost process, or every rank stopping on a signal: utils.signal_stop);
- a collective failing because a process is gone is said as `process k of n died ...; rerun to resume`
  (`lost_process`, read by the CLI on every rank).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import torch

from mmdd.errors import MmddError
from mmdd.utils.launch import check, current
from mmdd.utils.stopping import LAUNCHER_PID_ENV, STAGE_ENV, STOP_EXPLAINED, kept

# What a collective says when another process of the group is gone (gloo on CPU; NCCL raises DistBackendError).
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")

# How many processes each node runs, and in all, for the ranks mmdd starts (mmdd.utils.launch reads them; Lightning's
# teardown removes WORLD_SIZE)
PER_NODE_ENV = "MMDD_PROCESSES_PER_NODE"
WORLD_ENV = "MMDD_WORLD_SIZE"

_started: list[subprocess.Popen] = []  # the processes this one started (ranks first_rank + 1, ...)
# This process's run, recorded when its first multi-process trainer is built (Lightning's teardown removes WORLD_SIZE
# from the environment before a failed collective reaches the CLI)
_run = {"world": 1, "first_rank": 0}


def _how(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _command(local_rank: int) -> tuple[list[str], str | None]:
    """Rank `local_rank`'s command line: the same stage and overrides, in rank 0's run directory, writing no second
    copy of the composed config."""
    command = [sys.executable, "-m", "mmdd.cli", *sys.argv[1:]]
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return command, None
    from hydra.utils import get_original_cwd

    run_dir = HydraConfig.get().run.dir
    command += [f'hydra.run.dir="{run_dir}"', f"hydra.job.name=mmdd_rank_{local_rank}", "hydra.output_subdir=null"]
    return command, get_original_cwd()


def start_processes(num_processes: int, num_nodes: int = 1) -> None:
    """Set up this node's `num_processes` processes of a run (this one is local rank 0), unless they are set up
    already: this is a rank > 0, a later trainer of the same run, or SLURM/torchrun started every rank (then they
    must be exactly the processes the config runs: mmdd.utils.launch.check)."""
    launch = check(num_processes, num_nodes)
    _run.update(world=num_processes * num_nodes, first_rank=launch.node_rank * num_processes)
    if launch.external or "LOCAL_RANK" in os.environ:
        return
    if os.environ.get(STAGE_ENV) is None:
        raise MmddError("several processes (hardware.devices x num_nodes > 1) re-run the `mmdd <stage>` command line; "
                        "start this run with the mmdd command (or under SLURM/torchrun, which start every rank)")
    if num_nodes > 1 and not ("MASTER_ADDR" in os.environ and "NODE_RANK" in os.environ):
        raise MmddError(f"hardware.num_nodes={num_nodes}, but no launcher started this run's processes on the other "
                        "nodes, and mmdd starts processes on this node only: launch it with SLURM (hydra/launcher="
                        f"slurm hydra.launcher.nodes={num_nodes} hydra.launcher.tasks_per_node={num_processes}, or "
                        f"srun --nodes={num_nodes} --ntasks-per-node={num_processes} mmdd ...) or torchrun "
                        f"(--nnodes={num_nodes} --nproc-per-node={num_processes}), or run the same mmdd command on "
                        "every node with MASTER_ADDR=<node 0's address>, MASTER_PORT and NODE_RANK=<node> set")
    node_rank = int(os.environ.get("NODE_RANK", 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update({"NODE_RANK": str(node_rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(num_processes * num_nodes),
                       PER_NODE_ENV: str(num_processes), WORLD_ENV: str(num_processes * num_nodes)})
    if "OMP_NUM_THREADS" not in os.environ:  # before the others start: they read it when torch loads
        os.environ["OMP_NUM_THREADS"] = str(max(1, _cpus() // num_processes))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for local_rank in range(1, num_processes):
        command, cwd = _command(local_rank)
        _started.append(subprocess.Popen(command, env={**os.environ, "LOCAL_RANK": str(local_rank)}, cwd=cwd))
    ProcessWatch(_started, world_size=_run["world"], first_rank=_run["first_rank"]).start()


def wait_for_started(timeout: float = 120.0) -> None:
    """After a stage ends well, rank 0 ends after the processes it started (they end after the last collective,
    while rank 0 may still evaluate): a rank > 0 whose launcher is gone takes that for rank 0's death (ParentWatch)."""
    deadline = time.monotonic() + timeout
    for p in _started:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def leave_process_group() -> None:
    """A stage that ended well leaves its process group, each process on its own (no barrier: rank 0 may evaluate
    for long after the others' last collective). Left to the interpreter's exit, gloo's threads are torn down in no
    set order and a process can abort after its work is done ("terminate called without an active exception"),
    which a cluster launcher records as a failed task."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ProcessWatch(threading.Thread):
    """Rank 0's watch over the processes it started (a daemon thread: it ends with the run)."""

    def __init__(self, processes: list[subprocess.Popen], world_size: int, first_rank: int, period: float = 5.0):
        super().__init__(daemon=True, name="mmdd-process-watch")
        self.processes, self.world_size, self.first_rank, self.period = processes, world_size, first_rank, period

    def run(self) -> None:
        while not self.check():
            time.sleep(self.period)

    def check(self) -> bool:
        """Looks once; True when there is nothing left to watch (all ended well, or the run was ended)."""
        codes = [p.poll() for p in self.processes]
        if all(code == 0 for code in codes):
            return True
        if not any(codes):
            return False
        dead = [(self.first_rank + i + 1, code) for i, code in enumerate(codes) if code]
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)  # a process waiting in a collective never returns from it
        if STOP_EXPLAINED.is_set():
            return True  # rank 0 is already stopping with its own message
        who = ", ".join(f"process {r} of {self.world_size} ({_how(code)})" for r, code in dead)
        stage = os.environ.get(STAGE_ENV, "")
        sys.stderr.write(f"\nmmdd {stage}: error: {who} died (killed, out of memory, or it crashed: its own output "
                         f"above says which), so the run stopped; {kept(stage, 'what was saved is kept')}. Rerun the "
                         "same command to resume\n")
        sys.stderr.flush()
        os._exit(2)  # the main thread may hang in a collective that will never complete


def launcher_pid() -> int | None:
    """The pid of local rank 0 where mmdd started this process as a rank > 0, else None."""
    pid = os.environ.get(LAUNCHER_PID_ENV)
    if current().launcher != "mmdd" or not pid or int(pid) == os.getpid():
        return None
    return int(pid)


def launcher_gone() -> bool:
    pid = launcher_pid()
    return pid is not None and os.getppid() != pid


class ParentWatch(threading.Thread):
    """A rank > 0 started by mmdd watches local rank 0, its parent: when that is gone (killed, out of memory) this
    rank says so and exits 2. On gloo a collective fails soon after; on NCCL it would wait for the collective timeout
    (30 minutes) holding its GPU. A daemon thread: the main thread may be blocked in the collective."""

    def __init__(self, period: float = 2.0):
        super().__init__(daemon=True, name="mmdd-parent-watch")
        self.period = period
        launch = current()
        self.world_size, self.rank_zero = launch.world_size, launch.node_rank * launch.tasks_per_node

    def run(self) -> None:
        while not self.check():
            time.sleep(self.period)

    def check(self) -> bool:
        """Looks once; True when there is nothing left to watch."""
        if not launcher_gone():
            return False
        if STOP_EXPLAINED.is_set():
            return True  # this rank is stopping with its own sentence
        STOP_EXPLAINED.set()
        stage = os.environ.get(STAGE_ENV, "")
        sys.stderr.write(f"\nmmdd {stage}: error: process {self.rank_zero} of {self.world_size} died (killed, out of "
                         f"memory, or it crashed: its own output above says which), so this one stopped too; "
                         f"{kept(stage, 'what was saved is kept')}. Rerun the same command to resume\n")
        sys.stderr.flush()
        os._exit(2)  # the main thread may wait in a collective that never completes (NCCL)


def watch_launcher() -> None:
    """Start the ParentWatch where mmdd started this process as a rank > 0."""
    if launcher_pid() is not None:
        ParentWatch().start()


def lost_process(exc: BaseException) -> str | None:
    """The sentence for `exc` when it is a collective failing because a process of this run is gone, else None.
    Rank 0 knows which of the processes it started ended; a rank > 0 whose parent changed knows rank 0 died."""
    world, first_rank = _run["world"], _run["first_rank"]
    backend_error = getattr(torch.distributed, "DistBackendError", ())
    if world <= 1 or not (isinstance(exc, backend_error) or any(p in str(exc) for p in PEER_LOST)):
        return None
    dead = [first_rank + i + 1 for i, p in enumerate(_started) if p.poll() is not None]
    if launcher_gone():  # started by local rank 0 (not by SLURM or torchrun), now orphaned
        dead = [first_rank]
    who = f"process {', '.join(map(str, dead))} of {world}" if dead else \
        f"a process of {world} (on another node, or not started by this one)"
    stage = os.environ.get(STAGE_ENV, "")
    return (f"{who} died (killed, out of memory, or its node failed), so this one stopped too; "
            f"{kept(stage, 'what was saved is kept')}. Rerun the same command to resume")
