"""An exclusive lock on a directory, held by one process for a whole command: the campaign directory, the rehearsal
buffer and the Fisher store each take theirs before they change anything.

The lock is a file, `LOCK_FILE`, in the directory: created with `O_CREAT | O_EXCL` and, where the platform has it,
locked with `fcntl.flock`. It records its holder (pid, host, start time, command), which a refused process names.
The kernel releases a `flock` when its process dies, however it dies, so a lock file left by a crashed process on
this host is recognised as stale and taken over (with a warning). What cannot be told apart from a live holder is
refused, naming the holder and the way out: a lock recorded by another host (a shared filesystem whose `flock` does
not reach across hosts would make it look free), or any existing lock file where there is no `flock` (Windows). Break
such a lock with `continual-dpo unlock --campaign_dir DIR` (see [`DirectoryLock.break_lock`]) or by deleting the file,
once you are sure its holder is gone.

The lock is reentrant within its process (nested `with` blocks on the same directory share it), and released, file
deleted, when the outermost block ends.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Union


try:
    import fcntl
except ImportError:  # Windows: the lock file alone (O_EXCL)
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
#: Attempts to lock a file that a releasing holder deletes under us (each one is a fresh race: a few are plenty).
_ATTEMPTS = 5


class DirectoryLockedError(RuntimeError):
    """Another process holds the lock of the directory (or held it and cannot be proven gone)."""


def describe_holder(holder: Optional[dict[str, Any]]) -> str:
    if not holder:
        return "a process that left no record (it died while taking the lock, or the file was emptied)"
    command = f" running `{holder['command']}`" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{command}, since {holder.get('started_at')}"


def _read_holder(path: Path) -> Optional[dict[str, Any]]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _try_flock(fd: int) -> Optional[bool]:
    """True when this process now holds the `flock` of `fd`, False when another one does, None when the filesystem
    cannot tell (no `fcntl`, or a filesystem without `flock`)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` is still the file open as `fd` (a releasing holder deletes its file: locking the deleted file
    would be holding nothing)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


class DirectoryLock:
    """The exclusive lock of `directory` (see the module docstring), a context manager.

    Args:
        directory: the directory to lock; created if missing.
        command: what the holder does, recorded for a refused process to read (default: this process's argv).
        what: the directory's role in the error message ("campaign directory", "rehearsal buffer", ...).

    Raises:
        DirectoryLockedError: on entering, when another process holds the lock, naming it and how to break it.
    """

    # path -> (lock, depth): the locks this process holds, for reentrancy
    _held: dict[str, tuple[DirectoryLock, int]] = {}
    _registry_lock = threading.Lock()

    def __init__(self, directory: Union[str, os.PathLike], command: Optional[str] = None, what: str = "directory"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.command = command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.what = what
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None

    # ---------------------------------------------------------------------------------------------------- use
    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            self._acquire()
        except PermissionError as error:
            raise DirectoryLockedError(
                f"Cannot lock the {self.what} {self.directory}: {error.strerror} ({error.filename}). Every command "
                f"takes the directory's lock file {LOCK_FILE!r}, so it needs write access to the directory: run it "
                "as a user who may write there, or on a writable copy."
            ) from error

    def _acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        with self._registry_lock:
            held = self._held.get(key)
            if held is not None and held[0]._pid == os.getpid():  # a fork's child holds nothing
                self._held[key] = (held[0], held[1] + 1)
                return
            for _ in range(_ATTEMPTS):
                if self._try_acquire():
                    self._pid = os.getpid()
                    self._held[key] = (self, 1)
                    return
            raise DirectoryLockedError(
                f"Could not lock the {self.what} {self.directory}: {self.path} kept being replaced by other processes."
            )

    def release(self) -> None:
        key = os.path.realpath(self.path)
        with self._registry_lock:
            held = self._held.get(key)
            if held is None:
                return
            lock, depth = held
            if depth > 1:
                self._held[key] = (lock, depth - 1)
                return
            del self._held[key]
            lock._release_file()

    @classmethod
    def break_lock(cls, directory: Union[str, os.PathLike], force: bool = False) -> Optional[dict[str, Any]]:
        """Delete the lock file of `directory` and return its holder's record (None when there was no lock).

        Refuses (`DirectoryLockedError`) while a live process on this host holds it, unless `force`: break only the
        lock of a holder you know is gone (its machine crashed, its job was killed on another host)."""
        path = Path(directory) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            holder = _read_holder(path)
            if _try_flock(fd) is False and not force:
                raise DirectoryLockedError(
                    f"{path} is held by a live process: {describe_holder(holder)}. Stop that process (or let it finish) "
                    "instead of breaking its lock."
                )
            if _same_file(fd, path):
                os.unlink(path)
        finally:
            os.close(fd)
        logger.warning("Broke the lock %s of %s.", path, describe_holder(holder))
        return holder or {}

    # ---------------------------------------------------------------------------------------------------- internals
    def _try_acquire(self) -> bool:
        """One attempt: True when this process now holds the lock, False when the file was replaced under us (try
        again); raises when another process holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:  # its holder just released it
                return False
            created = False
        try:
            locked = _try_flock(fd)
            if locked is False:
                raise self._held_error(_read_holder(self.path))
            if not _same_file(fd, self.path):
                os.close(fd)
                return False
            if not created:
                self._take_over(_read_holder(self.path), locked)
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": self.command,
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def _take_over(self, holder: Optional[dict[str, Any]], locked: Optional[bool]) -> None:
        """An existing lock file whose `flock` we got: its holder died on this host (the kernel released it). Refuse
        what we cannot prove stale: no `flock` here, or a holder on another host."""
        if locked is None:
            raise self._held_error(holder, "this filesystem has no working `flock` to prove its holder gone")
        if holder and holder.get("host") != socket.gethostname():
            raise self._held_error(holder, "it was taken on another host, whose process this host cannot see")
        logger.warning(
            "Took over the stale lock %s of %s: that process is gone (it crashed or was killed).",
            self.path,
            describe_holder(holder),
        )

    def _held_error(self, holder: Optional[dict[str, Any]], reason: Optional[str] = None) -> DirectoryLockedError:
        why = f" ({reason})" if reason else ""
        return DirectoryLockedError(
            f"The {self.what} {self.directory} is in use by {describe_holder(holder)}{why}. Wait for that command to end. "
            f"If its process is gone (a crashed machine, a job killed on another host), break the stale lock with "
            f"`continual-dpo unlock --campaign_dir DIR` for a campaign, or delete {self.path}."
        )

    def _release_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):  # deleted while still locked: no one can lock the old file and think it held
                if fcntl is None:  # Windows cannot delete an open file (and has no flock to keep)
                    os.close(fd)
                    fd = None
                os.unlink(self.path)
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock
