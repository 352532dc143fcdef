"""Atomic writes and content hashes shared by every artifact writer."""

from __future__ import annotations

import errno
import logging
import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write `path` via `write(tmp_path)` into a temp file beside it, then rename over.

    A crash mid-write leaves either the old file or no file, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid and host in the name: a temp file left by a killed process is recognised as litter
    # (remove_stale_temp_files) and never mistaken for one a live process is still writing.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}~{os.getpid()}~{socket.gethostname()}~", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp creates 0600 files; give the artifact the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        from mmdd.errors import MmddError

        raise MmddError(f"could not write {path}: {reason} (the previous version, if any, is intact); "
                        "free disk space or fix the directory's permissions, then rerun: runs resume") from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


_TEMP_OWNER = re.compile(r"~(\d+)~(.+)~[^~]*\.tmp$")
STALE_TEMP_SECONDS = 24 * 3600  # a temp file of another host (or of an older mmdd) this old belongs to no live writer


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Remove the `.<name>...tmp` files that atomic_write left in `directory` when its process was killed: those of
    a dead process on this host, and those older than a day from another host (or without an owner in the name).
    Returns what was removed."""
    import time

    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    host = socket.gethostname()
    for tmp in directory.glob(".*.tmp"):
        owner = _TEMP_OWNER.search(tmp.name)
        try:
            if owner and owner.group(2) == host:
                stale = not process_alive(int(owner.group(1)))
            else:
                stale = time.time() - tmp.stat().st_mtime > STALE_TEMP_SECONDS
            if stale:
                tmp.unlink()
                removed.append(tmp)
                log.info("removed %s, left by a process that was stopped while writing it", tmp)
        except OSError:
            pass
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@contextmanager
def building(lock: str | os.PathLike, what: str, period: float = 30.0) -> Iterator[None]:
    """Hold `lock` (a file, created beside a cache) while building `what`: the processes of a run started at once
    (SLURM, torchrun) build a cold cache once, one of them, while the others wait and then find it built. The caller
    looks for the cache again inside. An OS lock (flock): it ends with its process, so a killed builder blocks no
    one; on a file system without locks it says so and goes on (the cache's own write is atomic: both may build, as
    in the rare case of a process arriving just as the lock file is removed)."""
    import fcntl

    path = Path(lock)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        locked = True
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process building %s (%s)", what, path)
                start = time.monotonic()
                while True:
                    try:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        time.sleep(0.5)
                        waited = time.monotonic() - start
                        if waited // period != (waited - 0.5) // period:
                            log.info("still waiting for another process building %s: %.0f s", what, waited)
        except OSError as exc:  # e.g. ENOLCK on an NFS mount without lockd
            locked = False
            log.warning("cannot lock %s (%s): building %s without waiting for other processes", path, exc, what)
        try:
            yield
        finally:
            if locked:
                # Leave nothing beside the cache. A process already waiting on this file gets its lock next and finds
                # the cache built; one arriving later finds the cache before it looks for a lock.
                path.unlink(missing_ok=True)
                fcntl.flock(fh, fcntl.LOCK_UN)


_WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EFBIG: "file too large for this process's file-size limit (ulimit -f)"}


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, if for a reason the user can fix (a full disk, ...); None for anything else. Writers
    that are not plain file objects (safetensors, torch.save) report the OS error only in their message."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return _WRITE_ERRNOS[e.errno]
    text = str(exc)
    for code, reason in _WRITE_ERRNOS.items():
        if f"os error {code})" in text or os.strerror(code) in text:
            return reason
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-serialisable object, independent of dict key order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def read_manifest(directory: str | os.PathLike, fmt: str, what: str, fix: str) -> dict:
    """An artifact's manifest.json, checked to be JSON of the format `fmt`; else ArtifactError naming the file,
    what was expected there (`what`, e.g. "synthetic set") and what to do (`fix`)."""
    from mmdd.errors import ArtifactError

    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise ArtifactError(f"no {what} at {directory} (missing manifest.json); {fix}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); {fix}") from exc
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != fmt:
        raise ArtifactError(f"{path} is not a {what} manifest (format={found!r}); {fix}")
    return manifest


def human_bytes(n: int) -> str:
    """A size for a sentence: MB below a GiB, GB with two decimals above."""
    return f"{n / 2**20:,.0f} MB" if n < 2**30 else f"{n / 2**30:,.2f} GB"
