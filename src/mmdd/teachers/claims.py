"""Several processes (or SLURM jobs) filling one trajectory store: each expert is trained by exactly one.

A process claims expert e by creating `expert_NNN.claim` with O_EXCL (atomic on local file systems and NFS v3+),
writing who it is (host, pid). It refreshes the claim's mtime every epoch. A claim is stale, and is taken over,
when its process is gone (same host: decided by the process table alone) or when it has not been refreshed for
`stale_minutes` (another host, e.g. a killed SLURM job). Taking over renames the stale claim away first, so of two
processes that both see it stale only one succeeds; one that moved a fresh claim instead puts it back.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from mmdd.utils.io import process_alive

log = logging.getLogger(__name__)


class ExpertClaims:
    def __init__(self, root: str | Path, stale_minutes: float = 120.0):
        self.root = Path(root)
        self.stale_seconds = float(stale_minutes) * 60
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}

    def release_complete(self, complete: list[int]) -> None:
        """Remove the claims left on experts that are complete (their process was killed after writing them): a
        claim on a finished expert only misleads whoever lists the store."""
        for e in complete:
            self.path(e).unlink(missing_ok=True)

    def path(self, e: int) -> Path:
        return self.root / f"expert_{e:03d}.claim"

    def owner(self, e: int) -> dict | None:
        try:
            return json.loads(self.path(e).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_stale(self, e: int) -> bool:
        try:
            age = time.time() - self.path(e).stat().st_mtime
        except FileNotFoundError:
            return True
        owner = self.owner(e)
        if owner and owner.get("host") == self.me["host"]:
            return not process_alive(int(owner.get("pid", -1)))  # this host can tell: however slow, alive is alive
        return age > self.stale_seconds

    def try_claim(self, e: int) -> bool:
        """True if this process now owns expert e (it may train it)."""
        if self._create(e):
            return True
        try:
            judged = os.stat(self.path(e)).st_ino
        except FileNotFoundError:
            return self._create(e)
        if not self.is_stale(e):
            return False
        moved = self.path(e).with_name(f"{self.path(e).name}.stale-{self.me['host']}-{self.me['pid']}")
        try:  # only one of several processes that found it stale gets to move it away
            os.rename(self.path(e), moved)
        except FileNotFoundError:
            return False
        if os.stat(moved).st_ino != judged:
            # Another process took it over first and its fresh claim is what we moved: put it back (link fails
            # rather than overwrite, should a third process have claimed in between).
            try:
                os.link(moved, self.path(e))
            except FileExistsError:
                pass
            moved.unlink(missing_ok=True)
            return False
        log.warning("expert %d: taking over a stale claim", e)
        return self._create(e)

    def _create(self, e: int) -> bool:
        try:
            fd = os.open(self.path(e), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.me, "since": time.time()}, f)
        return True

    def refresh(self, e: int) -> None:
        try:
            os.utime(self.path(e))
        except FileNotFoundError:  # taken over while we were silent too long: train on, the write is atomic
            log.warning("expert %d: this process's claim was taken over by another; both now train it", e)

    def release(self, e: int) -> None:
        self.path(e).unlink(missing_ok=True)
        for stale in self.root.glob(f"expert_{e:03d}.claim.stale-*"):
            stale.unlink(missing_ok=True)
