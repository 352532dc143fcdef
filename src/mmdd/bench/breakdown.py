"""Where an iteration's time goes: the backbone, the heads, the inner loss, the flat-vector arithmetic of the matched
parameters (updates, sums, contractions, (un)flattening), the data (snapshots, the segment's batches) and the rest.

mmdd's matching code marks those parts with `mmdd.utils.profiling.scope(part)`. A backward operation belongs to the
part whose forward operation made its autograd node: the profiler records each node's sequence number on the
forward operation and on the node's evaluation in the backward pass, which links the two, through double backward
too (a node made inside a backward belongs to that backward's part).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from mmdd.utils.profiling import PARTS, PREFIX

_BACKWARD = "autograd::engine::evaluate_function"

def time_breakdown(run: Callable[[], None], device: torch.device, iterations: int = 1) -> dict[str, float]:
    """Seconds per iteration of `run` by part (PARTS, and "other" for what no part marks: the trainer's and the
    optimizer's own work, Python between operations), from torch.profiler's self times (device time on a GPU). The
    profiler slows what it watches: the shares are what to read; the seconds add up to the profiled iteration."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iterations):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return {part: seconds / iterations for part, seconds in attribute(prof.events(), device).items()}


def attribute(events, device: torch.device) -> dict[str, float]:
    """Self time per part (seconds) of profiler events (see the module's docstring); "other" for the unmarked."""
    totals = {part: 0.0 for part in (*PARTS, "other")}
    for event, part in parts_of(events):
        self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        totals[part] = totals.get(part, 0.0) + self_us / 1e6
    return totals


def parts_of(events) -> list[tuple[object, str]]:
    """Each profiler event with the part it belongs to: its innermost marked range; a backward node's evaluation
    (and what runs inside it) the part of the forward operation that made the node."""
    by_sequence: dict[tuple[int, int], str] = {}  # (thread, autograd node's sequence number) -> the part that made it
    memo: dict[int, str] = {}

    def part_of(event) -> str:
        chain, e, found = [], event, "other"
        while e is not None:
            if e.id in memo:
                found = memo[e.id]
                break
            chain.append(e)
            if e.name.startswith(PREFIX):
                found = e.name[len(PREFIX):]
                break
            if e.name.startswith(_BACKWARD) and e.sequence_nr >= 0:
                found = by_sequence.get((e.fwd_thread, e.sequence_nr), "other")
                break
            e = e.cpu_parent
        for c in chain:
            memo[c.id] = found
        return found

    out = []
    for event in sorted(events, key=lambda e: e.time_range.start):  # a node's forward comes before its backward
        part = part_of(event)
        if event.sequence_nr >= 0 and not event.name.startswith(_BACKWARD):
            by_sequence.setdefault((event.thread, event.sequence_nr), part)
        out.append((event, part))
    return out


def breakdown_cells(parts: dict[str, float], seconds: float) -> str:
    """"backbone 41 %, heads 22 %, ...": each part's share of the profiled iteration, largest first, applied to
    `seconds` (the unprofiled median) for a time per part."""
    total = sum(parts.values()) or 1.0
    order = sorted(parts, key=parts.get, reverse=True)
    return ", ".join(f"{p} {parts[p] / total:.0%} ({parts[p] / total * seconds:.2f} s)" for p in order
                     if parts[p] / total >= 0.005)
