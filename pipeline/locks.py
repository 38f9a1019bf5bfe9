"""One writer per output folder: ``simulate``, ``train``, ``evaluate`` and ``run`` hold an exclusive lock.

The lock is an ``flock`` on a file beside the folder, ``PARENT/.NAME.muontrack-lock`` (beside, not inside:
a dataset, run or report folder holds only what its contract lists). The kernel drops the lock when its
process dies, kill -9 included, so a crashed writer never blocks the next one; the file itself is removed
on a clean release. A second writer is refused at once, with the holder's pid, instead of waiting: two
writers of one folder are a mistake to report, not a queue.

The lock belongs to the real folder, whatever name reaches it: ``--out`` is resolved through symbolic links
first, so ``ds`` and a link ``ds_link -> ds`` share one lock. Before any work the writer also refuses what
would make it write or delete outside ``--out``: a lock file that is a symbolic link (opened without following
it), a symbolic link anywhere inside the folder (a planted ``.staging -> elsewhere`` would have its target's
files removed by the clean-up of leftovers), and an ``--out`` inside another dataset, run or report folder.
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


#: files that mark a folder as a dataset, a training run or a report (any one set of them, all present):
#: no muontrack output is written inside one of these
_OUTPUT_MARKERS: dict[str, tuple[str, ...]] = {
    "dataset": ("manifest.json", "hits"),
    "interrupted dataset": (".staging/dataset.json",),
    "run": ("config.json", "checkpoints"),
    "report": ("summary.json", "report.md"),
}


def real_folder(out: str | Path) -> Path:
    """``out`` as an absolute path with every symbolic link resolved (the part that exists)."""
    return Path(os.path.realpath(out))


def lock_path(out: str | Path) -> Path:
    """The lock file of the output folder ``out`` (of the real folder, whatever the name used)."""
    out = real_folder(out)
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def enclosing_output(out: Path) -> tuple[str, Path] | None:
    """``(kind, folder)`` of the dataset, run or report folder that contains ``out`` (``out`` itself excluded),
    or None."""
    for folder in out.parents:
        for kind, markers in _OUTPUT_MARKERS.items():
            if all(os.path.lexists(folder / marker) for marker in markers):
                return kind, folder
    return None


def first_symlink(folder: Path) -> Path | None:
    """The first symbolic link found inside ``folder`` (never following one), or None. About 0.1 s for the
    100 000 files of the largest dataset."""
    if not folder.is_dir():
        return None
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    return Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
    return None


def _refuse_unsafe_output(out: Path, real: Path) -> None:
    enclosing = enclosing_output(real)
    if enclosing is not None:
        kind, folder = enclosing
        raise MuontrackError(f"--out {out} is inside the {kind} folder {folder}; choose an --out outside it")
    link = first_symlink(real)
    if link is not None:
        raise MuontrackError(
            f"{link} is a symbolic link inside --out {out}; muontrack writes and deletes only inside --out and "
            "follows no link there: remove it or choose another --out"
        )


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def exclusive_writer(out: str | Path) -> Iterator[None]:
    """Hold the write lock of ``out`` for the ``with`` block; MuontrackError at once if another process holds it,
    or if ``out`` is unsafe to write (a symbolic link inside it, inside another output folder)."""
    real = real_folder(out)
    path = lock_path(real)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MuontrackError(f"cannot create {path.parent}: {err.strerror or err}") from None
    while True:
        try:
            # O_NOFOLLOW: a link planted at the lock's name would have the pid written into its target
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if os.path.islink(path):
                raise MuontrackError(f"the lock file {path} is a symbolic link; remove it") from None
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
        # checked under the lock: a second writer cannot race the checks
        _refuse_unsafe_output(Path(out), real)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
