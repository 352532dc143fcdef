"""Names for the parts of a distillation iteration, for a profiler to attribute its time to (mmdd.bench.breakdown).

`scope(part)` is a profiler range: about a microsecond when no profiler runs, so the matching code keeps it on."""

from __future__ import annotations

from contextlib import contextmanager

from torch.profiler import record_function

# the frozen or trained image backbone; the heads (and blending, the logits); the inner loss; the flat-vector
# arithmetic of the matched parameters (updates, sums, contractions, (un)flattening); the iteration's data (snapshots,
# the segment's batches)
PARTS = ("backbone", "heads", "loss", "flat", "data")
PREFIX = "mmdd::"


@contextmanager
def scope(part: str):
    """Marks the operations run inside as `part` of an iteration (one of PARTS)."""
    with record_function(PREFIX + part):
        yield
