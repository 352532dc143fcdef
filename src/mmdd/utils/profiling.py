"""Names for the parts of a distillation iteration, for a profiler to attribute its time to (mmdd.bench.breakdown).

`scope(part)` is a profiler range: 6 µs when no profiler runs (measured on the CPU box), some 70 per RepBlend
iteration of 1.5 s, so the matching code keeps it on."""

from __future__ import annotations

from torch.profiler import record_function

# the frozen or trained image backbone; the heads (and blending, the logits); the inner loss; the flat-vector
# arithmetic of the matched parameters (updates, sums, contractions, (un)flattening); the iteration's data (snapshots,
# the segment's batches)
PARTS = ("backbone", "heads", "loss", "flat", "data")
PREFIX = "mmdd::"


def scope(part: str) -> record_function:
    """Marks the operations run inside (`with scope(part):`) as `part` of an iteration (one of PARTS)."""
    return record_function(PREFIX + part)
