"""One writer per output folder: ``simulate``, ``train``, ``evaluate`` and ``run`` hold an exclusive lock.

The lock is an ``flock`` on a file beside the folder, ``PARENT/.NAME.muontrack-lock`` (beside, not inside:
a dataset, run or report folder holds only what its contract lists). The kernel drops the lock when its
process dies, kill -9 included, so a crashed writer never blocks the next one; the file itself is removed
on a clean release. A second writer is refused at once, with the holder's pid, instead of waiting: two
writers of one folder are a mistake to report, not a queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import MuontrackError

LOCK_SUFFIX = ".muontrack-lock"


def lock_path(out: str | Path) -> Path:
    """The lock file of the output folder ``out``."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def exclusive_writer(out: str | Path) -> Iterator[None]:
    """Hold the write lock of ``out`` for the ``with`` block; MuontrackError at once if another process holds it."""
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MuontrackError(f"cannot create {path.parent}: {err.strerror or err}") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise MuontrackError(f"cannot write beside {out}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MuontrackError(
                f"{out} is being written by another muontrack process (pid {_holder(path)}); wait for it or choose "
                "another --out"
            ) from None
        # a releasing writer unlinks the file: the one locked here must still be the one at `path`
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
