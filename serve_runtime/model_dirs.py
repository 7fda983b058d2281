"""A replica's working directory for extracted models, and sweeping dead replicas' ones.

Each replica takes ``<model_dir>/replica-<id>/`` and holds an exclusive ``flock`` on
``<model_dir>/replica-<id>.lock`` for its whole life: the kernel drops the lock when the
process dies, however it dies (SIGKILL, OOM), so a directory whose lock can be taken
belongs to nobody and is removed. Process ids are not used: they are reused.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from pathlib import Path

import structlog

log = structlog.get_logger("serve_runtime.model_dirs")

PREFIX = "replica-"


class ReplicaDir:
    """This process's directory under ``model_dir``, locked while it lives."""

    def __init__(self, model_dir: Path) -> None:
        self.parent = Path(model_dir)
        self.parent.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock_path = self.parent / f"{name}.lock"
        # The lock exists before the directory: a sweeper never sees an unlocked new one.
        self._lock = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = self.parent / name
        self.path.mkdir()
        self.swept = sweep(self.parent, keep=name)

    def close(self) -> None:
        """Delete the directory and drop the lock (replica shutdown)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock_path.unlink(missing_ok=True)
        os.close(self._lock)


def sweep(parent: Path, keep: str | None = None) -> list[str]:
    """Remove the directories of replicas that are gone; returns their names."""
    removed: list[str] = []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        if not path.name.startswith(PREFIX) or path.name == keep:
            continue
        if path.suffix == ".lock":
            name = path.name[: -len(".lock")]
            if name != keep and _owner_gone(path):
                shutil.rmtree(parent / name, ignore_errors=True)
                path.unlink(missing_ok=True)
                removed.append(name)
        elif path.is_dir() and not (parent / f"{path.name}.lock").exists():
            if _pid_alive(path.name):  # the older layout, replica-<pid>: still running
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        log.info("swept model directories of replicas that are gone", count=len(removed))
    return removed


def _pid_alive(name: str) -> bool:
    pid = name[len(PREFIX) :].partition("-")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_gone(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops a lock we took: the sweep deletes right after
    return True
