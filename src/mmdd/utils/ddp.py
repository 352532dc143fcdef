"""Lightning's DDP, with a sentence when a process dies, for every multi-process trainer of mmdd.

Two things happen when a process of the run dies, and both ended without a word:
- the others' next collective fails (gloo: "Connection reset by peer"; NCCL: DistBackendError). The launcher runs
  the fit on every rank, so it turns that error into `process k of n died ...; rerun to resume` (an MmddError, exit
  2): rank 0 knows which of the processes it started ended, a rank > 0 whose parent changed knows rank 0 died;
- Lightning's launcher watches the processes it started from a thread of rank 0 and, when one ends with an error,
  SIGKILLs every process, rank 0 included ("Killed", exit 137). mmdd's watch does the same (a hung collective leaves
  nothing gentler) but first says which process died and how, and ends rank 0 with exit code 2, unless rank 0 is
  already stopping with its own sentence (a lost process, or every rank stopping on a signal: utils.signal_stop).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from mmdd.errors import MmddError
from mmdd.utils.stopping import LAUNCHER_PID_ENV, STAGE_ENV, kept

# Set once this process stops with its own sentence (another process lost, or every rank stopping on a signal): the
# launcher's watch then ends the other processes quietly instead of reporting a death and exiting.
STOP_EXPLAINED = threading.Event()


def _how(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class _ExplainingObserver(_ChildProcessObserver):
    def __init__(self, child_processes, world_size: int, first_rank: int):
        super().__init__(main_pid=os.getpid(), child_processes=child_processes)
        self._world_size, self._first_rank = world_size, first_rank

    def _terminate_all(self) -> None:
        dead = [(self._first_rank + i + 1, p.returncode) for i, p in enumerate(self._child_processes) if p.returncode]
        for p in self._child_processes:
            p.send_signal(self._termination_signal)
        if STOP_EXPLAINED.is_set():
            return  # rank 0 is already stopping with its own message
        who = ", ".join(f"process {r} of {self._world_size} ({_how(code)})" for r, code in dead)
        stage = os.environ.get(STAGE_ENV, "")
        sys.stderr.write(f"\nmmdd {stage}: error: {who} died (killed, out of memory, or it crashed: its own output "
                         "above says which), so the run stopped; what was saved is kept (complete experts, the last "
                         "checkpoint). Rerun the same command to resume\n")
        sys.stderr.flush()
        os._exit(2)  # the main thread may hang in a collective that will never complete


# What a collective says when another process of the group is gone (gloo on CPU; NCCL raises DistBackendError).
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


class _ExplainingLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher (its `launch`, line for line) with the explaining watch, and the fit's collectives
    failing on a dead process said in a sentence."""

    def launch(self, function, *args, trainer=None, **kwargs):
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            _ExplainingObserver(self.procs, self.world_size, self.first_rank).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        try:
            return function(*args, **kwargs)
        except RuntimeError as exc:
            who = self.lost_process(exc)
            if who is None:
                raise
            STOP_EXPLAINED.set()
            stage = os.environ.get(STAGE_ENV, "")
            raise MmddError(f"{who} died (killed, out of memory, or its node failed), so this one stopped too; "
                            f"{kept(stage, 'what was saved is kept')}. Rerun the same command to resume") from exc

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_nodes

    @property
    def first_rank(self) -> int:
        return self.cluster_environment.node_rank() * self.num_processes

    def lost_process(self, exc: BaseException) -> str | None:
        """Which process of the run is gone, in words ("process 1 of 2"), if `exc` is a collective failing for that
        reason; otherwise None."""
        backend_error = getattr(torch.distributed, "DistBackendError", ())
        if self.world_size <= 1 or not (isinstance(exc, backend_error) or any(p in str(exc) for p in PEER_LOST)):
            return None
        dead = [self.first_rank + i + 1 for i, p in enumerate(self.procs) if p.poll() is not None]
        launcher = int(os.environ.get(LAUNCHER_PID_ENV) or os.getpid())
        if launcher != os.getpid() and os.getppid() != launcher:  # started by rank 0 (not by SLURM), now orphaned
            dead = [self.first_rank]
        if dead:
            return f"process {', '.join(map(str, dead))} of {self.world_size}"
        return f"a process of {self.world_size} (on another node, or not started by this one)"


class MmddDDPStrategy(DDPStrategy):
    """DDP whose launcher says which process died (see the module's docstring)."""

    strategy_name = "mmdd_ddp"

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _ExplainingLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
