"""One writer per run directory: an exclusive lock on `<run dir>/.lock`, which names its holder.

The lock is the kernel's (flock), so it dies with its process: the file a killed run leaves behind is
taken over by the next run without asking anyone to delete it."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from ibq.errors import UserError
from ibq.runs.record import timestamp

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
# A killed run's forked children (data-loader workers) share its lock until they see that their parent
# is gone, within seconds: a dead holder on this host is waited for this long.
ORPHAN_WAIT_S = 30.0


def describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on {holder['host']} since {holder['since']} ({' '.join(holder['command'])[:120]})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def holder_is_gone(text: str) -> bool:
    """Whether the recorded holder is a process of this host that no longer runs."""
    try:
        holder = json.loads(text)
        if holder["host"] != socket.gethostname():
            return False
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, PermissionError):
        return False
    return False


class RunLock:
    """Context manager: holds the run directory's lock, or raises a UserError naming the holder."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = self._acquire()
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"run directory {self.run_dir} is not a directory: choose another hydra.run.dir") from None
        except OSError as error:  # no permission, a read-only file system, a full disk
            raise UserError(f"run directory {self.run_dir} cannot be written ({error.strerror}): choose another hydra.run.dir") from None
        stale = os.read(fd, 4096).decode(errors="replace")
        if stale:
            log.info("%s: taking over the lock left by %s, which is no longer running", self.run_dir, describe_holder(stale))
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": timestamp(), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return self

    def _acquire(self) -> int:
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                if holder_is_gone(text) and time.monotonic() < deadline:
                    time.sleep(0.2)  # its data-loader workers still hold the lock until they notice
                    continue
                raise UserError(f"run directory {self.run_dir} is in use by {describe_holder(text)}: "
                                f"wait for it to end or choose another hydra.run.dir") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed the file as we opened it: lock the next one

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
