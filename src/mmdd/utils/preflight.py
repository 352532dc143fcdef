"""Fail before the work, not after it: every place a stage will write is checked when the stage starts."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mmdd.errors import MmddError
from mmdd.stage_list import STAGES

def check_writable(path: str | Path, key: str, min_free_mb: float) -> None:
    """`path` (a directory, created if missing) can be written, and its disk has `min_free_mb` free."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mmdd-write-check-") as f:
            f.write(b"mmdd")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise MmddError(f"cannot write to {path} ({key}): {exc.strerror or exc}; make it writable or set {key}=<another "
                        "directory>") from exc
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < min_free_mb:
        raise MmddError(f"only {free_mb:.0f} MB free on the disk that holds {path} ({key}); this run wants at least "
                        f"{min_free_mb:.0f} MB (paths.min_free_mb): free some space, or point {key} elsewhere")


def preflight(cfg, stage: str) -> None:
    """Check the top-level settings' types, the run directory and every output location of `stage` before any data
    is loaded (paths.data_dir too where the stage may generate the embedded dataset; a real one may be read-only)."""
    from mmdd.config_schema import check_stage_settings

    check_stage_settings(cfg)
    min_free = cfg.paths.min_free_mb
    keys = ["paths.output_dir", *STAGES[stage].outputs]
    if str(cfg.data.get("format")) == "synscenes":  # generated on first use
        keys.append("paths.data_dir")
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if node is not None else None
        if node is None:
            continue
        path = Path(str(node))
        if key == "pretrain.output":
            path = path.parent  # a file
        check_writable(path, key, min_free)
