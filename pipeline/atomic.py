"""Atomic file writes: write under a temporary name of this writer's own, then ``os.replace`` it over the target.

A reader (or a resumed run) sees either the old file or the complete new one, never a partial file under the
final name. The temporary name holds the process id and a random token, so two writers of the same file never
write into, or rename, each other's temporary; it is removed when the write fails. The temporary lives beside
the target (hidden, ``.NAME.<pid>-<hex>.tmp``) or in a staging folder of the same filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


def unique_name(name: str, *, hidden: bool = True) -> str:
    """A temporary file name for ``name`` no other writer uses: ``.NAME.<pid>-<hex>.tmp`` (without the dot
    when not ``hidden``)."""
    return f"{'.' if hidden else ''}{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


#: the names :func:`unique_name` gives hidden temporaries
_HIDDEN_TEMPORARY = re.compile(r"\..+\.\d+-[0-9a-f]{8}\.tmp")


def remove_temporaries(folder: Path) -> list[str]:
    """Delete the hidden temporaries (``.NAME.<pid>-<hex>.tmp``) that writers killed mid-write left directly in
    ``folder``; return their names. Call with the folder's lock held (pipeline.locks), so none is in use."""
    removed = []
    if folder.is_dir():
        for entry in os.scandir(folder):
            if _HIDDEN_TEMPORARY.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def fsync_file(path: Path) -> None:
    """Flush the file ``path`` to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def replacing(
    targets: Sequence[str | Path], *, fsync: bool = False, staging_dir: Path | None = None
) -> Iterator[list[Path]]:
    """Temporary paths for ``targets``, moved over them (in order) when the block ends without an exception.

    ``fsync``: flush each temporary to disk before the renames. ``staging_dir``: where the temporaries are
    written (not hidden there), instead of beside each target. Whatever is left of the temporaries (the block
    or a rename failed) is removed. With several targets each rename is atomic, the set is not: a kill between
    two renames leaves some targets new and others old.
    """
    temporaries = [
        (staging_dir / unique_name(Path(t).name, hidden=False))
        if staging_dir is not None
        else Path(t).with_name(unique_name(Path(t).name))
        for t in targets
    ]
    try:
        yield temporaries
        if fsync:
            for temporary in temporaries:
                fsync_file(temporary)
        for temporary, target in zip(temporaries, targets, strict=True):
            os.replace(temporary, target)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def write_atomic(
    path: str | Path, write: Callable[[Path], None], *, fsync: bool = False, staging_dir: Path | None = None
) -> None:
    """``write(temporary)``, then move the temporary over ``path`` (:func:`replacing`)."""
    with replacing([path], fsync=fsync, staging_dir=staging_dir) as (temporary,):
        write(temporary)


def write_text_atomic(path: str | Path, text: str, **options: Any) -> None:
    """``text`` (UTF-8) as ``path``, atomically (options: :func:`write_atomic`'s)."""
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"), **options)


def write_json_atomic(path: str | Path, data: Any, **options: Any) -> None:
    """``data`` as indented JSON (a newline at the end) as ``path``, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n", **options)
