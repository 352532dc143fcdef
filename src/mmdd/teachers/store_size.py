"""How much disk a trajectory store takes, and the check that it fits before any teacher trains."""

from __future__ import annotations

import shutil
from pathlib import Path

from mmdd.errors import MmddError
from mmdd.utils.io import human_bytes

SNAPSHOT_BYTES = 4  # snapshots are float32 (bf16 autocast changes activations, not the weights recorded)


def store_bytes(cfg, model) -> int:
    """The trajectory store on disk: every expert's matched parameters at epochs 0..E (safetensors headers aside)."""
    named = dict(model.named_parameters())
    matched = sum(named[n].numel() for names in model.modality_parameter_names().values() for n in names)
    return cfg.teacher.num_experts * (cfg.teacher.epochs + 1) * int(matched) * SNAPSHOT_BYTES


def check_store_fits(cfg, model) -> None:
    """Refuse `mmdd buffer` when the experts still to train will not fit on the store's disk."""
    from mmdd.teachers.trajectory_store import TrajectoryStore

    root = Path(str(cfg.buffer_dir))
    per_expert = store_bytes(cfg, model) // max(cfg.teacher.num_experts, 1)
    done = 0
    if (root / "manifest.json").exists():
        done = len([e for e in TrajectoryStore.open(root).completed_experts() if e < cfg.teacher.num_experts])
    need = per_expert * (cfg.teacher.num_experts - done)
    existing = root
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if need > free:
        raise MmddError(f"the trajectory store needs {human_bytes(need)} more ({cfg.teacher.num_experts - done} experts "
                        f"x {human_bytes(per_expert)}) but only {human_bytes(free)} is free on the disk of {root} "
                        "(buffer_dir): free space, point buffer_dir at a larger disk, or record fewer experts/epochs "
                        "(teacher.num_experts, teacher.epochs)")
