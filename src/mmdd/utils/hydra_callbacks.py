"""Hydra callbacks: checks that must run before Hydra itself writes anything."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback


def check_writable(directory: str, key: str, stage: str) -> None:
    """Create `directory` and write (then remove) a file in it; on failure say so in a sentence and exit 2.

    Hydra creates the run directory and writes .hydra/ into it before mmdd's code runs, so an unwritable one (a
    read-only mount, a path through a file, a full disk) would otherwise end in a pathlib traceback. Permission bits
    alone cannot tell (root may write anywhere they allow), so the check is an actual write.
    """
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mmdd-write-check-"):
            pass
    except OSError as exc:
        print(f"mmdd {stage}: error: cannot write the run directory {directory} ({exc.strerror or exc}). Run from a "
              f"directory you can write to, or choose one: {key}=<writable path> (or paths.root_dir=...)",
              file=sys.stderr)
        sys.exit(2)


class RunDirectoryCheck(Callback):
    """Refuses an unwritable run (or sweep) directory with a sentence, before Hydra writes into it."""

    def on_run_start(self, config, **kwargs) -> None:
        check_writable(str(config.hydra.run.dir), "hydra.run.dir", str(config.get("stage", "")))

    def on_multirun_start(self, config, **kwargs) -> None:
        check_writable(str(config.hydra.sweep.dir), "hydra.sweep.dir", str(config.get("stage", "")))
