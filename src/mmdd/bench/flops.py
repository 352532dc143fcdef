"""The floor a distillation iteration is judged against: its floating-point operations (PyTorch's FLOP counter
formulas: matrix products and convolutions, forward and every backward, double backward included), the bytes its
operations move, the rates it achieves, and the machine's own ceilings, measured here rather than taken from a
datasheet: the matrix-multiply peak and the copy bandwidth.

The roofline floor (`OpCosts.floor`) prices every operation the iteration runs at the faster of the two ceilings it
is bound by: its FLOPs at the matmul peak, or its operands read and its result written once at the copy bandwidth,
and sums them (no fusion across operations, no operand kept in cache between them). It is a model, not a proof: an
operand that stays in the last-level cache between two operations can beat it. It tells a compute-bound iteration
(LoRS's convolutions) from a memory-bound one (RepBlend's 20-row products with 2304 x 2304 weights), which the
FLOP count alone does not."""

from __future__ import annotations

import math
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

# Operations that move no data: allocation without initialisation, metadata (views are told by OpOverload.is_view).
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "resize_",
               "detach", "alias", "lift_fresh", "_local_scalar_dense", "is_same_size", "sym_size", "sym_stride"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements as laid out: dimensions broadcast with stride 0 count once."""
    if t.is_sparse or t.layout != torch.strided:
        return t.numel() * t.element_size()
    return math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0) * t.element_size()


class OpCosts(TorchDispatchMode):
    """Within the context, each operation's FLOPs (PyTorch's FLOP counter formulas; 0 where it has none: elementwise
    work) and bytes (its tensor operands and results; views and allocations move none), kept as counts of each
    (FLOPs, bytes) pair: an iteration repeats the same operations step after step. In-place and out= operations
    count the written tensor twice: read and written."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[tuple[int, int]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        flops = int(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0
        if func.is_view or packet.__name__ in _NO_TRAFFIC:
            moved = 0
        else:
            moved = sum(tensor_bytes(t) for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor))
        self.ops[(flops, moved)] += 1
        return out

    @property
    def flops(self) -> int:
        return sum(f * n for (f, _), n in self.ops.items())

    @property
    def bytes(self) -> int:
        return sum(b * n for (_, b), n in self.ops.items())

    def record(self) -> dict:
        """JSON-ready: the totals and the operations as [FLOPs, bytes, count] rows (for `floor` elsewhere)."""
        return {"flops": self.flops, "bytes": self.bytes, "ops": [[f, b, n] for (f, b), n in sorted(self.ops.items())]}

    def floor(self, peak_flops: float, bandwidth: float) -> dict[str, float]:
        return floor(self.record()["ops"], peak_flops, bandwidth)


def floor(ops: list[list[int]], peak_flops: float, bandwidth: float) -> dict[str, float]:
    """Seconds of an iteration's operations ([FLOPs, bytes, count] rows, OpCosts.record): `roofline` (each operation
    at the faster of the ceilings it is bound by, summed; see the module), `compute` (all FLOPs at the matmul peak)
    and `traffic` (all bytes at the copy bandwidth); roofline >= both."""
    return {"roofline": sum(n * max(f / peak_flops, b / bandwidth) for f, b, n in ops),
            "compute": sum(n * f for f, _, n in ops) / peak_flops,
            "traffic": sum(n * b for _, b, n in ops) / bandwidth}


def iteration_costs(run) -> OpCosts:
    """The operations of one call of `run`, with their FLOPs and bytes."""
    with OpCosts() as costs:
        run()
    return costs


def iteration_flops(run) -> int:
    """FLOPs of one call of `run` (matmuls, convolutions, attention; elementwise work is not counted)."""
    return iteration_costs(run).flops


def _best_seconds(device: torch.device, work, repeats: int) -> float:
    best = float("inf")
    for i in range(repeats + 1):  # the first is a warm-up (first-touch page faults, kernel selection)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """FLOP/s of a square `size` matrix product on `device` in `dtype`, the best of `repeats` timed runs after one
    warm-up: what the machine's matmul kernels reach, the ceiling of an iteration made of matrix products."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / _best_seconds(device, lambda: a @ b, repeats)


def memory_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s a copy of a `megabytes` buffer (far beyond any cache) moves, read and write counted, the best of
    `repeats` timed copies after one warm-up: the ceiling of operations that stream their operands."""
    n = megabytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _best_seconds(device, lambda: dst.copy_(src), repeats)
