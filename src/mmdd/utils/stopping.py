"""Stopping by a signal, said in a sentence with the shell's exit code, in every stage.

Without this, a SIGTERM (SLURM's time limit or preemption) during teacher or student training makes Lightning raise
`SIGTERMException`, a SystemExit without a code, so the process exits 0 as if it had finished; Ctrl-C in training
becomes Lightning's `sys.exit(1)`; and either signal outside training ends the process with no word. The handlers
here only remember the signal and stop the way Python would; the CLI then says what was stopped and exits with
128 + the signal's number (143 SIGTERM, 130 SIGINT). Distillation saves a checkpoint at the current iteration first
(methods.checkpointing.DistillCheckpoint).
"""

from __future__ import annotations

import signal

_received: list[int] = []
_explained: list[bool] = []


def kept(stage: str, otherwise: str) -> str:
    """What a stopped `stage` leaves behind, for its sentence (mmdd.stages)."""
    from mmdd.stages import STAGES

    return STAGES[stage].kept if stage in STAGES else otherwise

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
        from mmdd.utils.ddp import STOP_EXPLAINED

        STOP_EXPLAINED.set()  # every rank stops on its own; the launcher's watch must not take that for a death
    return signum
