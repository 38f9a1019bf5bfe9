"""Helpers shared by the test modules (plain functions; the fixtures are in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def snapshot(folder: Path, *, mtimes: bool = True) -> dict[str, tuple[int, str]] | dict[str, str]:
    """Every file under ``folder``: relative path -> (mtime in ns, SHA-256), to prove that nothing was touched.

    ``mtimes=False``: relative path -> SHA-256 only, for folders whose files may be rewritten with the same
    bytes.
    """
    files = [path for path in sorted(folder.rglob("*")) if path.is_file()]
    if not mtimes:
        return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    return {
        str(path.relative_to(folder)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in files
    }


def muontrack_command() -> list[str]:
    """The installed ``muontrack`` script beside this interpreter, else ``python -m flows.cli``."""
    script = Path(sys.executable).with_name("muontrack")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "flows.cli"]


def run_muontrack(
    *arguments: str | Path | int, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``muontrack ARGUMENTS`` in a process of its own; the caller checks the exit status and output."""
    return subprocess.run(
        [*muontrack_command(), *map(str, arguments)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


#: the bytes of every figure file written under :func:`placeholder_figures`
PLACEHOLDER_FIGURE = b"placeholder figure (tests.helpers.placeholder_figures)\n"


def _placeholder_save(_fig: object, path: Path) -> Path:
    """analysis.figures._save without the rendering: the same file names, written through the same atomic
    replacement, each holding :data:`PLACEHOLDER_FIGURE`."""
    from analysis.figures import figure_paths
    from pipeline.atomic import replacing

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(figure_paths(path)) as temporaries:
        for temporary in temporaries:
            temporary.write_bytes(PLACEHOLDER_FIGURE)
    return path


@contextlib.contextmanager
def placeholder_figures() -> Iterator[None]:
    """Inside the block the report's figures are built but not rendered: each figure file is a small placeholder.

    For tests of what surrounds the figures (the catalog, staging and publishing, refusals): rendering the PNG and
    PDF files is about 80 % of a write_report call (about 10 s of 12 s on 2 cores). Tests of the figures
    themselves (tests/test_figures.py, test_write_report_files_and_contents) draw them for real.
    """
    import analysis.figures

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(analysis.figures, "_save", _placeholder_save)
        yield


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A failed command that printed one ``error: ...`` line on stderr, holding every fragment, and no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def central_differences(fun, args, argnum: int, h: float, skip=None):
    """The float64 central differences of the scalar ``fun(*args)`` along every entry of ``args[argnum]`` (step
    ``h``); entries where ``skip`` is True are left at 0."""
    import numpy as np

    base = [np.array(a, np.float64) for a in args]
    out = np.zeros(base[argnum].shape)
    for i in range(base[argnum].size):
        if skip is not None and skip[i]:
            continue
        plus = [a.copy() for a in base]
        minus = [a.copy() for a in base]
        plus[argnum][i] += h
        minus[argnum][i] -= h
        out[i] = (float(fun(*plus)) - float(fun(*minus))) / (2 * h)
    return out


def resident_mb() -> float:
    """This process's resident memory in MB (Linux's /proc/self/status; 0 where there is none)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
