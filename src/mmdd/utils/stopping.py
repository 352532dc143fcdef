"""Stopping by a signal, said in a sentence with the shell's exit code, in every stage.

Without this, a SIGTERM (SLURM's time limit or preemption) during teacher or student training makes Lightning raise
`SIGTERMException`, a SystemExit without a code, so the process exits 0 as if it had finished; Ctrl-C in training
becomes Lightning's `sys.exit(1)`; and either signal outside training ends the process with no word. The handlers
here only remember the signal and stop the way Python would; the CLI then says what was stopped and exits with
128 + the signal's number (143 SIGTERM, 130 SIGINT). Distillation saves a checkpoint at the current iteration first
(methods.engine.checkpointing.DistillCheckpoint).
"""

from __future__ import annotations

import signal
import threading

_received: list[int] = []
_explained: list[bool] = []


def kept(stage: str, otherwise: str) -> str:
    """What a stopped `stage` leaves behind, for its sentence (mmdd.stages)."""
    from mmdd.stage_list import STAGES

    return STAGES[stage].kept if stage in STAGES else otherwise

# Set once this process stops with its own sentence (another process lost, or every rank stopping on a signal): the
# launcher's watch (mmdd.utils.ddp) then ends the other processes quietly instead of reporting a death and exiting.
STOP_EXPLAINED = threading.Event()

# The environment a stage's processes share: the stage (Lightning re-starts ranks > 0 without it on the command line)
# and the pid of the process that started it (a rank > 0 whose parent is no longer that one knows rank 0 died).
STAGE_ENV = "MMDD_STAGE"
LAUNCHER_PID_ENV = "MMDD_LAUNCHER_PID"


def _on_sigterm(signum, frame) -> None:
    _received.append(signum)
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        raise SystemExit(128 + signum)  # nothing else handles it: stop here
    # Otherwise Lightning's handler, which calls this one too, stops its loop after the current step.


def _on_sigint(signum, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def install() -> None:
    """Remember SIGTERM and SIGINT (call once, early, in the main thread)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)


# A scheduler's requeue signal and its own handler: submitit, in whose jobs the CLI never runs (its job calls the
# stage's Hydra task), binds USR2 (SUBMITIT_PREEMPT_SIGNAL) to a handler that requeues the job and exits at once,
# 90-120 s before the time limit. mmdd takes the signal over: the stage first stops at its current step (a
# distillation saves that iteration), then submitit's handler requeues, and the requeued job resumes from there.
_requeue: list[tuple[int, object]] = []


def adopt_submitit_job(stage: str) -> None:
    """In a submitit job, whose task the CLI did not start: name the stage for the processes' sentences and install
    the handlers, taking over submitit's requeue signal. Nothing to do elsewhere (the CLI did it, or a stage runs
    in-process in a test or a script, whose process keeps its own handlers and environment)."""
    import os

    if "SUBMITIT_FOLDER" not in os.environ:
        return
    os.environ[STAGE_ENV] = stage
    if signal.getsignal(signal.SIGTERM) is _on_sigterm or threading.current_thread() is not threading.main_thread():
        return
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    sig = getattr(signal, f"SIG{name}", getattr(signal, name, None))
    handler = signal.getsignal(sig) if sig is not None else None
    if callable(handler):
        _requeue[:] = [(int(sig), handler)]
        signal.signal(sig, _on_sigterm)
    install()


def stop_signals() -> tuple[int, ...]:
    """The signals that stop a stage: SIGTERM, SIGINT and the job's requeue signal where there is one."""
    return (signal.SIGTERM, signal.SIGINT, *(sig for sig, _ in _requeue))


def requeue(stage: str) -> None:
    """After a stage stopped on the job's requeue signal and said so: hand over to the scheduler's handler
    (submitit's rank 0 requeues the job and exits; the other ranks return here and exit with the signal's code)."""
    import sys

    signum = received()
    for sig, handler in _requeue:
        if sig == signum:
            print(f"mmdd {stage}: {signal.Signals(signum).name} is the job's requeue signal (its time limit is near, "
                  "or it is preempted): the job is requeued and resumes from what was saved", file=sys.stderr)
            try:
                handler(signum, None)
            except Exception as exc:  # submitit says why it does not requeue (e.g. timed out too many times)
                print(f"mmdd {stage}: not requeued: {exc}", file=sys.stderr)


def received() -> int | None:
    """The first stopping signal this process received, or None."""
    return _received[0] if _received else None


def say(stage: str, message: str) -> None:
    """Print how the stage stopped, once per process (a stop passes several handlers on its way out)."""
    import sys

    if not _explained:
        _explained.append(True)
        print(f"mmdd {stage}: {message}", file=sys.stderr)


def explain(stage: str) -> int | None:
    """If a stopping signal arrived: say so (unless already said) and return the exit code for it; else None."""
    signum = received()
    if signum is None:
        return None
    say(stage, f"stopped by {signal.Signals(signum).name}; {kept(stage, 'nothing had started')}. Rerun the same "
               "command to resume")
    return 128 + signum


def note(signum: int) -> None:
    """Record a stopping signal that another process received (the ranks agreed on it), as if this one had."""
    if not _received:
        _received.append(int(signum))


def agree(signum: int, trainer, device) -> int:
    """The stopping signal any process of the run received (0: none), the same on every process: one all-reduce,
    called by every rank at the same point of the loop."""
    if trainer.world_size > 1:
        import torch

        t = torch.tensor(float(signum), device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        signum = int(t.item())
    if signum:
        note(signum)
        STOP_EXPLAINED.set()  # every rank stops on its own; the launcher's watch must not take that for a death
    return signum
