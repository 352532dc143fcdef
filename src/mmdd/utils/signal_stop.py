"""Stopping training on a signal at the same step on every process (see SignalStop)."""

from __future__ import annotations

import signal
import threading

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmdd.utils.stopping import agree, stop_signals


class SignalStop(L.Callback):
    """Signals in training only set a flag; after every training step the ranks agree on it and all stop at that
    same step (Lightning's own SIGTERM handler runs a broadcast inside the signal handler and stops rank 0 alone,
    which can leave the ranks waiting in different collectives for ever: a SIGTERM to a 2-process teacher run hung
    1 time in 5). The stop raises Lightning's SIGTERMException on every rank, so nothing after the fit (saving an
    expert as complete) runs; the CLI then says what was kept and exits 128 + the signal. A second Ctrl-C interrupts
    at once."""

    handles_signals = True
    # With several processes the ranks agree every this many steps (an all-reduce and a host sync each time): a
    # teacher step on a GPU takes ~0.1 s, so a stop waits a second or two, and a step is not stalled by the check.
    # One process looks after every step (no collective).
    MULTI_PROCESS_EVERY = 10

    def __init__(self):
        self.requested = 0
        self._previous: dict[int, object] = {}
        self._handler = None

    def on_train_start(self, trainer, pl_module):
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum, frame):
            self.requested = self.requested or int(signum)
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

        self._handler = on_signal
        for sig in stop_signals():
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, on_signal)

    def restore_signals(self) -> None:
        """Put back the handlers found at the start where ours is still installed (on a normal end Lightning has
        already put SIGTERM back to what it found before the run: that stays)."""
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                if signal.getsignal(sig) is self._handler:
                    signal.signal(sig, handler)
        self._previous = {}

    def stop_requested(self, trainer, pl_module) -> int:
        """The agreed stopping signal (0: go on); every rank calls this at the end of the same step."""
        return agree(self.requested, trainer, pl_module.device) if self._previous else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.world_size > 1 and trainer.global_step % self.MULTI_PROCESS_EVERY:
            return  # every rank skips the same steps
        if self.stop_requested(trainer, pl_module):
            raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception):
        self.restore_signals()

    def teardown(self, trainer, pl_module, stage):
        self.restore_signals()
