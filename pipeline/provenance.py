"""Which code produced a result: ``<package version>+<12 hex digits of a SHA-256 over source files>``.

One helper for every place that records or compares code versions: the simulation (manifest and shards;
an interrupted dataset is only resumed by the same generator code), training (RUN/config.json) and the
Prefect cache keys (every package, so any code change invalidates cached results).
"""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: the project root (the folder holding the packages)
ROOT = Path(__file__).resolve().parent.parent


def code_version(*sources: str) -> str:
    """The package version plus a hash of ``sources``, paths relative to the project root.

    A source is a package folder (``"simulation"``: every ``*.py`` in it, sorted by name) or one file
    (``"pipeline/batches.py"``). The hash covers each file's path and bytes, so renaming or moving code
    changes it too.
    """
    try:
        package_version = version("muontrack")
    except PackageNotFoundError:
        package_version = "0+unknown"
    digest = hashlib.sha256()
    for source in sources:
        path = ROOT / source
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(ROOT).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return f"{package_version}+{digest.hexdigest()[:12]}"
