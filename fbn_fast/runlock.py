"""One owner per run folder: an advisory lock held for the run's life, and the leftovers of killed writers.

The lock is ``flock`` on ``<run>/.lock``: the kernel releases it when its owner exits in any way (a SIGKILL
included), so a lock of a dead process is never stale; the file itself stays and names the last owner. Where
the file system has no ``flock`` (some network file systems) the run goes on unlocked, with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock", "holds_a_run", "remove_stale_files"]

LOCK_NAME = ".lock"
log = logging.getLogger("fbn_fast.train")


class RunFolderBusy(ValueError):
    """The run folder is locked by a live training process."""


class RunLock:
    """``flock`` of ``<run_dir>/.lock`` (exclusive, non-blocking); :meth:`release` or process exit frees it."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunFolderBusy` naming the process that holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.seek(0)
            owner = f.read().strip()
            f.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(f"run folder {str(self.path.parent)!r} is in use by another training run "
                                    f"({_describe(owner)}); wait for it to end, or choose another --name") from None
            log.warning("run folder %s cannot be locked (%s): two runs could write into it", self.path.parent, exc)
            return self
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the last descriptor releases the flock
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(owner: str) -> str:
    try:
        info = json.loads(owner)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "owner unknown"


def holds_a_run(run_dir: str | os.PathLike) -> bool:
    """Whether a run already trained in ``run_dir`` (it has checkpoints or log records)."""
    from .checkpoint import find_checkpoints

    metrics = Path(run_dir) / "metrics.jsonl"
    return bool(find_checkpoints(run_dir)) or (metrics.is_file() and metrics.stat().st_size > 0)


def remove_stale_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what writers killed mid-write left in a run folder (call with the folder's lock held): temporary
    files (``*.tmp``) and checksum files whose checkpoint is gone. Returns what was deleted."""
    run_dir = Path(run_dir)
    stale: list[Path] = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            orphan = p.name.endswith(".sha256") and not p.with_name(p.name[: -len(".sha256")]).exists()
            if p.is_file() and (p.name.endswith(".tmp") or orphan):
                stale.append(p)
    size = 0
    for p in stale:
        size += p.stat().st_size
        p.unlink(missing_ok=True)
    if stale:
        log.warning("removed %d temporary file(s) (%.1f MB) left by an interrupted write: %s", len(stale),
                    size / 1e6, ", ".join(p.name for p in stale[:5]) + (" ..." if len(stale) > 5 else ""))
    return stale
