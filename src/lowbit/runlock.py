"""One run per output directory: an advisory lock on ``<output_dir>/.lowbit.lock`` (``flock``).

The operating system releases it when the holding process ends, however it ends (``kill -9`` too), so no stale
lock is ever left behind. The file names the holder (pid, host, start time) for the message a second run gets.
On systems without ``fcntl`` (Windows) nothing is locked. A lock on a network filesystem is only as good as that
filesystem's ``flock``.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from .errors import LowbitError

__all__ = ["LOCK_NAME", "RunLock"]

LOCK_NAME = ".lowbit.lock"


class RunLock:
    """``with RunLock(folder):`` — the folder is this process's until the block ends (or the process does)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LowbitError(f"{self.path.parent}: cannot use as output_dir ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LowbitError(f"{self.path.parent}: another run is using this output_dir ({holder}); wait for it "
                              "to finish, or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None
