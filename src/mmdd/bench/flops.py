"""The floor a distillation iteration is judged against: its floating-point operations (PyTorch's FLOP counter,
which counts matrix products and convolutions, forward and every backward, double backward included), the rate it
achieves, and the machine's own matrix-multiply peak, measured here rather than taken from a datasheet."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def iteration_flops(run) -> int:
    """FLOPs of one call of `run` (matmuls, convolutions, attention; elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """FLOP/s of a square `size` matrix product on `device` in `dtype`, the best of `repeats` timed runs after one
    warm-up: what the machine's matmul kernels reach, the ceiling of an iteration made of matrix products."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
