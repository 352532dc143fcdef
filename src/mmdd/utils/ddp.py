"""Lightning's DDP, with a sentence when a process dies.

Lightning's launcher watches the processes it starts (ranks > 0 of a node) from a thread of rank 0; when one
ends with an error it SIGKILLs every process, rank 0 included: the user sees "Killed" (exit 137) and no word on
what happened. mmdd's observer does the same (a hung collective leaves nothing gentler) but first says which
process died and how, unless rank 0 is already stopping with its own sentence (utils.trainer.explain_lost_process,
or every rank stopping on a signal: utils.signal_stop), and ends rank 0 with exit code 2 instead of a kill.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

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
        stage = os.environ.get("MMDD_STAGE", "")
        sys.stderr.write(f"\nmmdd {stage}: error: {who} died (killed, out of memory, or it crashed: its own output "
                         "above says which), so the run stopped; what was saved is kept (complete experts, the last "
                         "checkpoint). Rerun the same command to resume\n")
        sys.stderr.flush()
        os._exit(2)  # the main thread may hang in a collective that will never complete


class _ExplainingLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher (its `launch`, line for line) with the explaining observer."""

    def launch(self, function, *args, trainer=None, **kwargs):
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            first = self.cluster_environment.node_rank() * self.num_processes
            _ExplainingObserver(self.procs, self.num_processes * self.num_nodes, first).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class MmddDDPStrategy(DDPStrategy):
    """DDP whose launcher says which process died (see the module's docstring)."""

    strategy_name = "mmdd_ddp"

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _ExplainingLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
