"""What each expert's training recorded beside its trajectory: how it was trained, its retrieval metrics and cost."""

from __future__ import annotations

import json
from pathlib import Path


def training_record(batch_size: int, processes: int) -> dict:
    """How an expert was trained, in its metrics: the global batch (the papers'), each process's share, and the
    loss's negatives (the whole batch's, gathered over the processes)."""
    return {"processes": processes, "global_batch": batch_size, "batch_per_process": batch_size // processes,
            "loss": "infonce over the global batch", "sample_order": "the expert's seed (teacher.seed, expert)"}


def expert_metrics(store_dir: str | Path) -> dict[int, dict]:
    """{expert: its final-epoch retrieval per split, and its training `cost`} of a store's experts (the full-data
    upper bound)."""
    return {int(p.name.split(".")[0].split("_")[1]): json.loads(p.read_text())
            for p in sorted(Path(store_dir).glob("expert_*.metrics.json"))}


def teacher_cost(store_dir: str | Path, experts: list[int]) -> dict:
    """What training `experts` of a store cost: total seconds and device, or seconds None when an expert's time was
    not recorded (stores written before 2026-12)."""
    metrics = expert_metrics(store_dir)
    costs = [metrics.get(e, {}).get("cost") for e in experts]
    known = all(c is not None for c in costs)
    return {"experts": len(experts), "seconds": sum(c["seconds"] for c in costs) if known else None,
            "device": ", ".join(sorted({c["device"] for c in costs if c})) or None}
