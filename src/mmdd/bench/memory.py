"""Peak memory of a block of code: CUDA's allocator peak, or on CPU the resident set sampled in a thread.

On CPU the process's lifetime peak (getrusage) only grows, so it cannot tell two paths run one after the
other apart; sampling /proc/self/statm every few milliseconds gives the peak *during* the block, minus the
resident set at its start (after handing freed heap back to the OS, which glibc otherwise keeps and reuses).
"""

from __future__ import annotations

import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the lifetime peak is the best available
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), so the resident set reflects live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement is only coarser
        pass


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_mb` (above the start) and `pm.kind`."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb = 0.0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss_above_start"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        release_free_heap()  # memory freed by earlier work would otherwise hide this block's growth
        self._start = rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes())
            self.peak_mb = (self._peak - self._start) / 2**20
        return False
