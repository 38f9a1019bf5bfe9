"""Training curves: a run's loss terms, validation σ68, learning rate and gradient norm against the epoch.

Drawn from a run's metrics table (RUN/metrics.parquet, pipeline.schema.TRAIN_METRICS_SCHEMA, docs/contracts.md) as a
Polars frame: analysis never imports the model package, so the callers that own run folders (flows: ``muontrack
train`` and the ``run`` flow after every epoch into RUN/training_curves.png, the evaluation into its report) read the
table and hand it over, with the epochs to mark (the best validation σ68's and the last). :func:`training_curves`
computes what the figure draws (plain arrays, checked against the table by tests/test_training_curves.py),
:func:`plot_training_curves` draws it in the report's style (analysis.figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from analysis import figures as fig

#: the loss terms drawn (those a run reports: the others are null in its metrics table)
LOSS_COLUMNS = ("loss", "bce", "pt_loss", "hamming")
_TERM_COLOURS = {"loss": "black", "bce": "tab:blue", "pt_loss": "tab:red", "hamming": "tab:purple"}
#: style of the epochs marked in every panel
_MARK_STYLE = {
    "best": {"color": "tab:green", "linestyle": ":"},
    "last": {"color": "0.5", "linestyle": "--"},
    "evaluated": {"color": "tab:orange", "linestyle": "-"},
}


@dataclass(frozen=True)
class Series:
    """One curve: ``column`` of metrics.parquet's ``split`` rows against their epoch (null rows left out)."""

    column: str
    split: str
    epoch: np.ndarray
    value: np.ndarray


@dataclass(frozen=True)
class TrainingCurves:
    """What the training-curves figure draws: each loss term on train and val rows, the val rows' σ68, the train
    rows' learning rate and gradient norm, and the marked epochs ({label: epoch}, e.g. best, last, evaluated)."""

    losses: list[Series]
    sigma68: Series
    learning_rate: Series
    grad_norm: Series
    marks: dict[str, int] = field(default_factory=dict)


def _series(metrics: pl.DataFrame, column: str, split: str) -> Series:
    rows = metrics.filter((pl.col("split") == split) & pl.col(column).is_not_null()).sort("epoch")
    return Series(column, split, rows["epoch"].to_numpy().astype(np.int64), rows[column].to_numpy().astype(np.float64))


def training_curves(metrics: pl.DataFrame, marks: dict[str, int | None] | None = None) -> TrainingCurves:
    """The curves of a run's metrics table (columns of pipeline.schema.TRAIN_METRICS_SCHEMA); ``marks``: epochs
    to mark ({label: epoch}; None values dropped)."""
    losses = [
        series
        for column in LOSS_COLUMNS
        if column in metrics.columns
        for split in ("train", "val")
        if (series := _series(metrics, column, split)).epoch.size
    ]
    return TrainingCurves(
        losses=losses,
        sigma68=_series(metrics, "sigma68", "val"),
        learning_rate=_series(metrics, "learning_rate", "train"),
        grad_norm=_series(metrics, "grad_norm", "train"),
        marks={label: int(epoch) for label, epoch in (marks or {}).items() if epoch is not None},
    )


#: a panel gets a log y axis when its values are all positive and span more than this factor
_LOG_SPAN = 10.0


def _log_if_wide(ax, values: list[np.ndarray]) -> None:
    joined = np.concatenate(values) if values else np.zeros(0)
    finite = joined[np.isfinite(joined)]
    if finite.size and np.all(finite > 0) and finite.max() > _LOG_SPAN * finite.min():
        ax.set_yscale("log")


def _draw(ax, series: Series, label: str, **style) -> None:
    ax.plot(series.epoch, series.value, marker="o", markersize=4, label=label, **style)


def _mark(ax, marks: dict[str, int]) -> None:
    for label, epoch in marks.items():
        ax.axvline(epoch, linewidth=1.2, label=f"{label} (epoch {epoch})", **_MARK_STYLE.get(label, {}))


@fig._hep_styled
def plot_training_curves(curves: TrainingCurves, title: str, path: Path) -> Path:
    """Four panels against the epoch: the loss terms (train solid, val dashed; the total wide and pale), the
    validation σ68 of q/pT, the learning rate of each epoch's last step and the epoch's mean gradient norm (before
    clipping); the marked epochs as vertical lines in every panel. A panel whose values are positive and span more
    than a factor :data:`_LOG_SPAN` has a log y axis. Writes ``path`` (PNG) and a PDF beside it."""
    figure = Figure(figsize=(12.0, 8.0))
    axes = figure.subplots(2, 2, sharex=True)
    loss_ax, sigma_ax, rate_ax, grad_ax = axes.flat
    for series in curves.losses:
        # the total underneath, wide and pale: it equals a term where the loss is that term alone (baseline: bce)
        total = {"linewidth": 4.0, "alpha": 0.35} if series.column == "loss" else {}
        _draw(
            loss_ax,
            series,
            f"{series.column} ({series.split})",
            color=_TERM_COLOURS.get(series.column, "tab:gray"),
            linestyle="--" if series.split == "val" else "-",
            **total,
        )
    _log_if_wide(loss_ax, [s.value for s in curves.losses])
    loss_ax.set_ylabel("loss term (epoch mean)")
    panels = (
        (sigma_ax, curves.sigma68, "val σ68(q/pT) (relative)", "tab:red"),
        (rate_ax, curves.learning_rate, "learning rate", "tab:blue"),
        (grad_ax, curves.grad_norm, "gradient norm (epoch mean)", "black"),
    )
    for ax, series, ylabel, colour in panels:
        if series.epoch.size:
            _draw(ax, series, ylabel, color=colour)
            _log_if_wide(ax, [series.value])
        else:
            fig._empty(ax, "no value")
        ax.set_ylabel(ylabel)
    epochs = np.concatenate([s.epoch for s in (*curves.losses, curves.sigma68)] or [np.zeros(0, np.int64)])
    for ax in axes.flat:
        _mark(ax, curves.marks)
        ax.grid(True, which="major", alpha=0.3)
        if epochs.size:
            ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)
            ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    if curves.losses:
        loss_ax.legend(fontsize="x-small", ncols=2)
    if curves.sigma68.epoch.size:
        best = float(np.nanmin(curves.sigma68.value))
        if math.isfinite(best):
            sigma_ax.set_title(f"lowest val σ68 {best:.4g}", fontsize="small")
        sigma_ax.legend(fontsize="x-small")
    figure.suptitle(title)
    return fig._save(figure, path)
