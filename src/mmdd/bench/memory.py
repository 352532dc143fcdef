"""Peak memory of a block of code: CUDA's allocator peak, or on CPU the resident set sampled in a thread.

On CPU the process's lifetime peak (getrusage) only grows, so it cannot tell two paths run one after the
other apart. On Linux the kernel's high-water mark (VmHWM) is reset at the start of the block (writing 5 to
/proc/self/clear_refs) and read at its end: the exact peak during the block. Elsewhere /proc/self/statm is
sampled every few milliseconds. Either is reported minus the resident set at the block's start (after handing
freed heap back to the OS, which glibc otherwise keeps and reuses).
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


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak_rss_bytes() is not None
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The resident-set high-water mark since the last reset (VmHWM), or None where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
        self.reserved_mb = None  # CUDA: the caching allocator's peak (what the GPU must have free)
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
        self._hwm = reset_peak_rss()
        if self._hwm:  # exact: the kernel tracks the peak, no sampling thread needed
            return self

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
            self.reserved_mb = torch.cuda.max_memory_reserved(self.device) / 2**20
        elif self._hwm:
            self.peak_mb = (max(peak_rss_bytes(), self._start) - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes())
            self.peak_mb = (self._peak - self._start) / 2**20
        return False
