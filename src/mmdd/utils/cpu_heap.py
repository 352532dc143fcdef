"""How the C library's allocator treats the large CPU tensors of a distillation (`hardware.cpu_heap`).

With glibc's defaults every allocation above its mmap threshold (at most 32 MB) is a fresh mapping, handed back to
the kernel when freed, so the next one page-faults on zeroed pages again: a RepBlend iteration allocates and frees
tens of its heads' 71 MB parameter vectors, and a third of its CPU time went to the kernel zeroing pages. `keep`
serves every allocation from the heap and never trims it: freed memory is reused as it is. The price is that the
process keeps its high-water mark of memory (measured: peak resident set +12 % for RepBlend, experiments/bench.md).
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

CPU_HEAP = ("keep", "os")
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_TOP_PAD = 256 * 2**20  # grow the heap in steps of this much more than asked (fewer brk calls)


def configure_cpu_heap(setting: str) -> bool:
    """Apply `hardware.cpu_heap` to this process: keep (see the module) or os (the C library's defaults, untouched).
    Returns whether the allocator was changed (False on a C library without mallopt, e.g. macOS: nothing to do)."""
    if setting not in CPU_HEAP:
        from mmdd.errors import MmddError

        raise MmddError(f"hardware.cpu_heap must be one of {', '.join(CPU_HEAP)}, got {setting!r}")
    if setting == "os":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS, musl), or no process library handle (Windows)
        log.debug("hardware.cpu_heap=keep: this C library has no mallopt; left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) and mallopt(_M_TOP_PAD, _TOP_PAD))
