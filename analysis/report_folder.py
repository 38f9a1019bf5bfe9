"""The REPORT folder of an evaluation: the names of its files, and its atomic publication.

REPORT folder (docs/contracts.md, "Report folder")
    ``predictions/`` (:data:`PREDICTIONS_DIR`): ``hits.parquet``, ``clusters.parquet``, ``tracks.parquet``, one per
    table of :data:`PREDICTION_TABLES` (:func:`prediction_path`); ``report.md`` (:data:`REPORT_NAME`);
    ``summary.json`` (:data:`SUMMARY_NAME`); ``resolution.csv`` (:data:`RESOLUTION_NAME`); ``figures/``
    (:data:`FIGURES_DIR`, the PNG names of :data:`FIGURE_NAMES` and each evaluated run's training curves,
    :func:`training_figure_name`, each with a PDF beside it); the catalog files
    ``summary.parquet`` (:data:`CATALOG_SUMMARY_NAME`) and ``resolution.parquet`` (:data:`CATALOG_RESOLUTION_NAME`),
    :mod:`analysis.catalog`. analysis.report writes the files, flows reads and moves them.

Atomic publication
    :func:`staged_report` makes a whole evaluation (predictions and report) atomic: it is written into a staging
    folder beside REPORT and swapped into place at the end, so a writer killed at any point leaves the previous
    report (or none), never a mixture of old and new files; :func:`recover_report_dir` finishes or undoes what a
    killed writer left.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import MuontrackError

REPORT_NAME = "report.md"
SUMMARY_NAME = "summary.json"
RESOLUTION_NAME = "resolution.csv"
#: the catalog files (analysis.catalog)
CATALOG_SUMMARY_NAME = "summary.parquet"
CATALOG_RESOLUTION_NAME = "resolution.parquet"
PREDICTIONS_DIR = "predictions"
FIGURES_DIR = "figures"
#: the prediction tables, each ``predictions/NAME.parquet``
PREDICTION_TABLES = ("hits", "clusters", "tracks")
#: the report's figures in ``figures/``: {figure key: PNG name}
FIGURE_NAMES = {
    "rejection": "roc_rejection.png",
    "scores": "score_histograms.png",
    "clusters": "cluster_residuals.png",
    "q_over_pt": "q_over_pt_residuals.png",
    "sigma68_pt": "sigma68_vs_pt.png",
    "hit_performance_pt": "hit_efficiency_purity_vs_pt.png",
    "hit_performance_layer": "hit_efficiency_purity_vs_layer.png",
    "track_performance_pt": "failed_fit_charge_misid_vs_pt.png",
}

#: the report's event displays in ``figures/`` (analysis.display), one per displayed event
EVENT_DISPLAY_NAME = "event_display_{event_id}.png"


def training_figure_key(model: str) -> str:
    """The key of a run's training curves among the report's figure paths (analysis.report, analysis.render)."""
    return f"training:{model}"


def training_figure_name(model: str) -> str:
    """The PNG name in ``figures/`` of the training curves of the evaluated run of ``model`` (one run per model)."""
    return f"training_curves_{model}.png"


def prediction_path(report_dir: Path, table: str) -> Path:
    """``report_dir/predictions/TABLE.parquet``, ``table`` one of :data:`PREDICTION_TABLES`."""
    return Path(report_dir) / PREDICTIONS_DIR / f"{table}.parquet"


# ---------------------------------------------------------------------------------------------------------
# Atomic publication of a report folder
# ---------------------------------------------------------------------------------------------------------

#: the hidden folders beside REPORT: ``.NAME.staging-<pid>-<hex>/NAME`` (a report being written) and
#: ``.NAME.old-<pid>-<hex>/NAME`` (the report being replaced). The report sits one level down so that a glob
#: over published reports (``reports/*/summary.parquet``) never sees them.
_STAGING, _OLD = "staging", "old"


def _shell_pattern(out: Path, kind: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out.name)}\.{kind}-\d+-[0-9a-f]+")


def _new_shell(out: Path, kind: str) -> Path:
    """A new, empty hidden folder beside ``out`` (same file system: renames out of it are atomic)."""
    shell = out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    shell.mkdir(parents=True)
    return shell


def _shells(out: Path, kind: str) -> list[Path]:
    """The ``kind`` folders a writer of ``out`` left beside it, oldest first."""
    if not out.parent.is_dir():
        return []
    pattern = _shell_pattern(out, kind)
    found = [path for path in out.parent.iterdir() if pattern.fullmatch(path.name) and path.is_dir()]
    return sorted(found, key=lambda path: path.stat().st_mtime_ns)


def _discard(path: Path) -> None:
    """Delete a staging or replaced report folder (a writer killed here leaves it for the next one)."""
    shutil.rmtree(path, ignore_errors=True)


def recover_report_dir(out: Path) -> None:
    """Finish or undo what a killed writer of ``out`` left beside it. Call with ``out``'s lock held
    (pipeline.locks.exclusive_writer).

    A writer killed between moving the previous report away and moving the new one in leaves no ``out`` and
    the previous report in ``.NAME.old-*/NAME``: it is moved back. Every other leftover (staging folders, a
    replaced report not yet deleted) is deleted.
    """
    out = Path(os.path.abspath(out))
    old = _shells(out, _OLD)
    if not os.path.lexists(out):
        previous = [shell / out.name for shell in old if (shell / out.name).is_dir()]
        if previous:
            os.rename(previous[-1], out)
    for shell in [*old, *_shells(out, _STAGING)]:
        _discard(shell)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def _replace_dir(new: Path, out: Path) -> None:
    """Move the folder ``new`` to ``out``. Where the system can, the two are exchanged atomically (a reader sees
    the old report or the new one, never none) and the old one, now at ``new``, goes with the staging folder.
    Elsewhere: rename the current ``out`` away, rename ``new`` in, delete the old one; a kill in between leaves
    no report until the next writer, whose :func:`recover_report_dir` moves the previous one back."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    if _exchange(new, out):
        return
    old_shell = _new_shell(out, _OLD)
    os.rename(out, old_shell / out.name)
    os.rename(new, out)
    _discard(old_shell)


@contextmanager
def staged_report(out: Path) -> Iterator[Path]:
    """A fresh folder in which to write the whole report of ``out`` (predictions included), moved to ``out``
    when the ``with`` block ends without an exception; on an exception ``out`` is left as it was.

    The folder is ``.NAME.staging-<pid>-<hex>/NAME`` beside ``out``; leftovers of killed writers are cleaned up
    first (:func:`recover_report_dir`). Call with ``out``'s lock held (pipeline.locks.exclusive_writer).
    """
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise MuontrackError(f"report path {out} is a file, not a folder")
    recover_report_dir(out)
    try:
        shell = _new_shell(out, _STAGING)
    except OSError as err:
        raise MuontrackError(f"cannot write beside {out}: {err.strerror or err}") from None
    try:
        yield shell / out.name
        staged = shell / out.name
        if not staged.is_dir():
            raise MuontrackError(f"nothing was written for the report {out}")
        _replace_dir(staged, out)
    finally:
        _discard(shell)
