"""hardware.cpu_heap: with `keep`, a large CPU tensor freed and allocated again reuses the process's memory instead
of page-faulting on freshly zeroed pages (what cost RepBlend a third of its CPU time); `os` leaves the C library's
defaults. Each case in a fresh interpreter: the setting changes the whole process's allocator."""

import subprocess
import sys

import pytest

from mmdd.errors import MmddError
from mmdd.utils.cpu_heap import configure_cpu_heap

PROBE = """
import resource, sys
import torch
from mmdd.utils.cpu_heap import configure_cpu_heap
changed = configure_cpu_heap(sys.argv[1])
n = 64 * 2**20 // 4  # 64 MB of float32: above glibc's largest mmap threshold (32 MB)
for _ in range(4):  # warm-up: the heap grows until freed chunks fit the next request (3 chunks here)
    t = torch.empty(n).fill_(1.0)
    del t
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    t = torch.empty(n).fill_(1.0)
    del t
print(int(changed), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str, runs: int = 3, enough: int = -1) -> tuple[bool, int]:
    """The fewest page faults of up to `runs` fresh interpreters, stopping at one with no more than `enough`: the
    machine can only add faults (another process's memory pressure, the host reclaiming pages: one CI run saw 4 of 5
    cycles fault under keep, once), never remove the ones a fresh mapping must take, so the minimum is the allocator's
    own behaviour, and a run at or below `enough` already shows it."""
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True).stdout
        changed, faults = out.split()
        results.append((bool(int(changed)), int(faults)))
        if int(faults) <= enough:
            break
    return results[0][0], min(f for _, f in results)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_reuses_freed_memory_without_page_faults():
    pages = 5 * 64 * 2**20 // 4096  # five fresh 64 MB mappings: one fault per 4 KB page (fewer with huge pages)
    changed, faults_keep = _faults("keep", enough=pages // 5 - 1)
    # the C library's defaults: one interpreter shows the fresh mappings' faults (a busy machine only adds to them)
    unchanged, faults_os = _faults("os", runs=1)
    assert changed and not unchanged
    assert faults_os > pages // 2
    assert faults_keep < pages // 5  # fewer than one fresh 64 MB mapping in five (measured: none)


def test_unknown_setting_is_refused_with_the_choices():
    with pytest.raises(MmddError, match="hardware.cpu_heap must be one of keep, os"):
        configure_cpu_heap("never")
