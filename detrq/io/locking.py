"""One writer per results folder: an advisory lock that a second writer reports (or waits for).

``folder_lock(folder)`` holds ``fcntl.flock`` on ``folder/.lock`` for the duration of a command. The kernel
releases it when the process ends, however it ends, so a crashed run never leaves a stale lock; the file
records the holder's pid and command so that the second writer can say who holds it.

The torchrun ranks that a pipeline step launches (``detrq.parallel.launch``) write into the folder that the launching
command holds: ``INHERITED_LOCK_ENV`` in their environment says so, and they take no lock of their own.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from detrq.io.errors import DetrqError

LOCK_NAME = ".lock"
INHERITED_LOCK_ENV = "DETRQ_LOCK_HELD_BY_LAUNCHER"


@contextmanager
def folder_lock(folder: str | os.PathLike, wait: bool = False) -> Iterator[Path]:
    """Hold the write lock of ``folder`` (created if missing). Without ``wait``, a folder that another process
    holds raises ``DetrqError`` naming that process; with ``wait`` it blocks until the lock is free. Under
    ``INHERITED_LOCK_ENV`` the launching command holds it, and this is a no-op."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if os.environ.get(INHERITED_LOCK_ENV):
        yield folder
        return
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                raise DetrqError(f"{folder} is being written by {holder}; wait for it to finish (or pass --wait)") \
                    from None
            print(f"waiting for {holder} to finish writing {folder} ...", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({' '.join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))})"
                      .encode(), 0)
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the lock
