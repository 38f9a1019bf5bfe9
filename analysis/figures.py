"""Figures of the evaluation report (PNG and PDF, matplotlib's Agg canvas via ``matplotlib.figure.Figure``, so
no pyplot state and no display are needed).

Each function takes already computed tables (see :mod:`analysis.metrics`), writes one PNG and a PDF of the same
stem beside it, and returns the PNG's path. Every figure is drawn in mplhep's neutral HEP style (``ROOT``: ticks
inside on all four sides, minor ticks, axis labels at the axis ends) inside a style context, so matplotlib's
global rcParams are left as they were. Figure numbers refer to Coccaro et al. (arXiv 2512.01647).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec

import matplotlib.style
import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from analysis.metrics import SIGNAL_EFFICIENCY_POINTS
from analysis.statistics import CORE_WINDOW_N_SIGMA, GaussianFit, auc_from_roc, roc_curve, sigma68
from pipeline.atomic import replacing
from pipeline.registry import LIMIT_ROW, SUMMARY_ROWS

#: a fixed colour, line style, marker and label per known model (pipeline.schema.MODEL_NAMES), so a model looks
#: the same in every figure; the paper-chain networks share their robust counterparts' family of hues and are
#: dashed, so the two reconstruction chains read apart at a glance
MODEL_STYLE = {
    "truth": {"color": "black", "linestyle": "-", "marker": "o", "label": "truth weights"},
    "truth_charge": {"color": "0.5", "linestyle": "-", "marker": "D", "label": "truth × charge"},
    "truth_share": {"color": "0.7", "linestyle": ":", "marker": "d", "label": "truth shares × charge"},
    "classical": {"color": "tab:green", "linestyle": "-", "marker": "s", "label": "classical (road search + DAF)"},
    "baseline_paper": {"color": "tab:cyan", "linestyle": "--", "marker": "v", "label": "baseline (BCE), paper reco"},
    "e2e_paper": {"color": "tab:orange", "linestyle": "--", "marker": "^", "label": "end-to-end, paper reco"},
    "baseline": {"color": "tab:blue", "linestyle": "-", "marker": "v", "label": "baseline (BCE), robust reco"},
    "e2e": {"color": "tab:red", "linestyle": "-", "marker": "^", "label": "end-to-end, robust reco"},
    "assignment": {"color": "tab:purple", "linestyle": ":", "marker": "P", "label": "assignment (LAP)"},
    "share_baseline": {"color": "tab:olive", "linestyle": "-.", "marker": "<", "label": "charge shares, robust reco"},
    "share_e2e": {
        "color": "tab:brown",
        "linestyle": "-",
        "marker": ">",
        "label": "charge shares end-to-end, robust reco",
    },
}
#: the limit row (pipeline.registry.LIMIT_ROW): no model, drawn as a line across each pT bin
LIMIT_STYLE = {"color": "0.3", "linestyle": "-", "marker": "_", "label": "Cramér–Rao limit"}
#: the σ68 / limit panel's y axis ends here at most; points beyond it are drawn as arrows at its top edge
RATIO_AXIS_MAX = 3.0
#: colours of models outside MODEL_NAMES (none of MODEL_STYLE's)
_EXTRA_COLOURS = ("tab:pink", "gold", "teal", "navy", "maroon", "lime")
#: panels per row of the score histograms
_MAX_PANELS_PER_ROW = 4
_DPI = 120
#: size of a one-panel figure with its legend to the right of the axes (up to 8 models and their numbers)
_LEGEND_FIGSIZE = (10.0, 4.8)
#: formats written per figure: the PNG under the given name, then a PDF of the same stem beside it
FIGURE_FORMATS = ("png", "pdf")
#: changes to mplhep's ROOT style, whose sizes are made for one 10 in × 10 in panel at 26 pt; ours are 4 to 5 in
#: high with up to 8 legend entries. DejaVu Sans (matplotlib's own) backs up any glyph TeX Gyre Heros lacks.
_STYLE_OVERRIDES: dict[str, Any] = {
    "font.size": 13,
    "font.sans-serif": ["TeX Gyre Heros", "Helvetica", "Arial", "DejaVu Sans"],
    "axes.linewidth": 1.2,
    "xtick.major.size": 7,
    "xtick.minor.size": 3.5,
    "ytick.major.size": 7,
    "ytick.minor.size": 3.5,
}

_P = ParamSpec("_P")


def hep_style() -> list[dict[str, Any]]:
    """The style of every figure, for ``matplotlib.style.context``: mplhep's experiment-neutral HEP style
    (``mplhep.style.ROOT``), then :data:`_STYLE_OVERRIDES`.

    mplhep is imported here, not at module import (it imports pyplot; about half a second), and its import
    registers the TeX Gyre fonts the style names.
    """
    import mplhep

    return [mplhep.style.ROOT, _STYLE_OVERRIDES]


def _hep_styled(plot: Callable[_P, Path]) -> Callable[_P, Path]:
    """Run a figure function, drawing and saving included, inside the :func:`hep_style` context: fonts are
    looked up at drawing time, so the save must be inside it too."""

    @functools.wraps(plot)
    def styled(*args: _P.args, **kwargs: _P.kwargs) -> Path:
        with matplotlib.style.context(hep_style()):
            return plot(*args, **kwargs)

    return styled


def model_order(models: list[str] | set[str]) -> list[str]:
    """Known rows in the documented order (pipeline.registry.SUMMARY_ROWS: the limit, then the models), then any
    others alphabetically."""
    known = [m for m in SUMMARY_ROWS if m in models]
    return known + sorted(set(models) - set(SUMMARY_ROWS))


def model_style(model: str) -> dict[str, str]:
    """color, linestyle, marker and label of a model: MODEL_STYLE's, or a colour picked from the name for an
    unknown model (the same name always gets the same colour); :data:`LIMIT_STYLE` for the limit row."""
    if model == LIMIT_ROW:
        return LIMIT_STYLE
    if model in MODEL_STYLE:
        return MODEL_STYLE[model]
    index = sum(map(ord, model)) % len(_EXTRA_COLOURS)
    return {"color": _EXTRA_COLOURS[index], "linestyle": "-.", "marker": "x", "label": model}


def _line_style(model: str) -> dict[str, str]:
    """Keyword arguments of a line or step histogram of ``model``."""
    style = model_style(model)
    return {"color": style["color"], "linestyle": style["linestyle"], "label": style["label"]}


def figure_paths(path: Path) -> list[Path]:
    """Every file a figure function writes for ``path``: ``path`` itself (PNG), then the same stem in each further
    format of :data:`FIGURE_FORMATS`."""
    path = Path(path)
    return [path, *(path.with_suffix(f".{extension}") for extension in FIGURE_FORMATS[1:])]


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as ``path`` (PNG) and as a PDF beside it; returns ``path``.

    Each file is first written under a hidden temporary name in the same folder, then renamed over the final
    name once all formats are written, so a killed process leaves either the previous figures or the new ones,
    never a truncated file under a final name (a kill between two renames can leave a new PNG beside an old PDF).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with replacing(figure_paths(path)) as temporaries:
        for temporary, extension in zip(temporaries, FIGURE_FORMATS, strict=True):
            fig.savefig(temporary, format=extension, dpi=_DPI)
    return path


def _legend_outside(ax) -> None:
    """The legend to the right of the axes: with up to 8 models an inside legend hides the curves."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)


# ---------------------------------------------------------------------------------------------------------
# What each figure draws: plain arrays, computed apart from the drawing so that tests/test_figures.py can check
# them against NumPy on the prediction tables
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """A ROC curve (:func:`analysis.statistics.roc_curve`) and its area, shared by ``models`` (report order)
    when their values are identical."""

    models: tuple[str, ...]
    signal_eff: np.ndarray
    background_eff: np.ndarray
    auc: float


@dataclass(frozen=True)
class Histogram:
    """One row's histogram as drawn: contents per bin divided by (all entries of the row × bin width), so entries
    outside the edges (``n_outside``) show as missing area."""

    models: tuple[str, ...]
    edges: np.ndarray
    density: np.ndarray
    n_entries: int
    n_outside: int
    #: σ68 of all the row's entries (:func:`analysis.statistics.sigma68`); None without entries
    sigma68: float | None = None


@dataclass(frozen=True)
class ScorePanel:
    """One panel of the score histograms: the score density of signal and of background hits, shared by
    ``models`` when their scores are identical hit for hit."""

    models: tuple[str, ...]
    edges: np.ndarray
    signal: np.ndarray
    background: np.ndarray


@dataclass(frozen=True)
class ClusterResidualData:
    """What :func:`plot_cluster_residuals` draws: every row on the core window's scale (``wide``), the rows with
    the narrowest residuals on bins matched to their σ68 (``zoom``), and the truth row's median ± σ68."""

    wide: list[Histogram]
    zoom: list[Histogram]
    truth_median: float | None
    truth_sigma68: float | None


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f"))


def identical_groups(values: dict[str, tuple[np.ndarray, ...]]) -> list[tuple[str, ...]]:
    """The models of ``values`` grouped by identical arrays (every array of the tuple equal, NaN equal to NaN), in
    report order within and between the groups: rows that share their data are drawn once (``baseline`` and
    ``baseline_paper`` have the same classifier and so the same scores)."""
    groups: list[list[str]] = []
    for model in model_order(set(values)):
        for group in groups:
            if all(_equal(a, b) for a, b in zip(values[group[0]], values[model], strict=True)):
                group.append(model)
                break
        else:
            groups.append([model])
    return [tuple(group) for group in groups]


def group_label(models: tuple[str, ...]) -> str:
    """The legend label of rows drawn as one: "baseline (BCE), paper reco = robust reco" (the labels' common part
    before the last comma said once), else the labels joined by " = "."""
    labels = [model_style(model)["label"] for model in models]
    head = labels[0].rpartition(", ")[0]
    if len(labels) > 1 and head and all(label.startswith(f"{head}, ") for label in labels):
        return f"{head}, " + " = ".join(label[len(head) + 2 :] for label in labels)
    return " = ".join(labels)


def group_style(models: tuple[str, ...]) -> dict[str, str]:
    """The style of rows drawn as one: that of the first of them drawn with a solid line (a network's robust-chain
    row, the canonical look of its classifier), else the first's; the label is :func:`group_label`'s."""
    solid = [model for model in models if model_style(model)["linestyle"] == "-"]
    return model_style((solid or list(models))[0]) | {"label": group_label(models)}


def roc_curves(hit_scores: pl.DataFrame, column: str) -> list[Curve]:
    """The ROC of ``column`` ("score": the raw classifier output, or "weight": the hit's weight in the final
    clusters) per classifying model, on the hits with a finite value (as analysis.metrics.classification_metrics);
    models with identical curves share one. A model lacking signal or background hits has none.

    Args:
        hit_scores: (model, score, weight, is_signal) from :func:`analysis.metrics.hit_score_table`.
    """
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for model in model_order(set(hit_scores["model"].unique().to_list())):
        group = hit_scores.filter(pl.col("model") == model)
        values, labels = group[column].to_numpy(), group["is_signal"].to_numpy().astype(bool)
        finite = np.isfinite(values)
        if labels[finite].all() or not labels[finite].any():
            continue
        signal_eff, background_eff, _ = roc_curve(values[finite], labels[finite])
        curves[model] = (signal_eff, background_eff)
    return [Curve(group, *curves[group[0]], auc=auc_from_roc(*curves[group[0]])) for group in identical_groups(curves)]


def score_panels(hit_scores: pl.DataFrame, bins: int = 50) -> list[ScorePanel]:
    """Per classifying model (models with the same score on every hit share a panel), the density of the
    finite scores of signal and of background hits, each class normalised to 1, on ``bins`` bins over [0, 1] (wider
    where a score lies outside)."""
    values: dict[str, tuple[np.ndarray, ...]] = {}
    for model in set(hit_scores["model"].unique().to_list()):
        group = hit_scores.filter(pl.col("model") == model).sort("event_id", "hit_id")
        values[model] = (
            group["event_id"].to_numpy(),
            group["hit_id"].to_numpy(),
            group["score"].to_numpy(),
            group["is_signal"].to_numpy().astype(bool),
        )
    panels = []
    for models in identical_groups(values):
        _, _, scores, signal = values[models[0]]
        finite = np.isfinite(scores)
        # scores outside [0, 1] (a model without a sigmoid) widen the axis instead of being dropped
        lo = min(0.0, float(scores[finite].min(initial=0.0)))
        hi = max(1.0, float(scores[finite].max(initial=1.0)))
        edges = np.linspace(lo, hi, bins + 1)
        densities = []
        for mask in (signal & finite, ~signal & finite):
            counts, _ = np.histogram(scores[mask], bins=edges)
            densities.append(counts / (max(int(mask.sum()), 1) * np.diff(edges)))
        panels.append(ScorePanel(models, edges, *densities))
    return panels


def _histogram(models: tuple[str, ...], values: np.ndarray, edges: np.ndarray) -> Histogram:
    """:class:`Histogram` of the finite ``values`` on ``edges``."""
    values = values[np.isfinite(values)]
    counts, _ = np.histogram(values, bins=edges)
    density = counts / (max(values.size, 1) * np.diff(edges))
    width = sigma68(values) if values.size else None
    return Histogram(models, edges, density, int(values.size), int(values.size - counts.sum()), width)


def _residuals_by_model(table: pl.DataFrame) -> dict[str, np.ndarray]:
    """{model: its finite, non-null ``residual`` values} of a table with (model, residual), rows without any
    left out."""
    found = {}
    for model in model_order(set(table["model"].unique().to_list())):
        values = table.filter(pl.col("model") == model)["residual"].drop_nulls().to_numpy().astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            found[model] = values
    return found


#: the cluster residual figure's upper panel spans the core window's centre ± this many σ of the core fit
CLUSTER_WIDE_N_SIGMA = 8.0
#: its lower panel spans ± this many σ68 of the narrowest row, in bins of 1/ZOOM_BINS_PER_SIGMA68 of that σ68,
#: and draws the rows whose σ68 is at most ZOOM_MAX_SIGMA68_RATIO times it
ZOOM_N_SIGMA68 = 8.0
ZOOM_BINS_PER_SIGMA68 = 5
ZOOM_MAX_SIGMA68_RATIO = 3.0


def cluster_residual_data(cluster_residuals: pl.DataFrame, core: GaussianFit, bins: int = 80) -> ClusterResidualData:
    """What :func:`plot_cluster_residuals` draws.

    ``wide``: every row on ``bins`` bins over core.mu ± :data:`CLUSTER_WIDE_N_SIGMA` core.sigma (the scale of the
    core window and of the truth row). ``zoom``: the rows whose σ68 is at most :data:`ZOOM_MAX_SIGMA68_RATIO`
    times the smallest σ68 s, over 0 ± :data:`ZOOM_N_SIGMA68` s in bins of s / :data:`ZOOM_BINS_PER_SIGMA68`
    (the clean-cluster rows resolve a few µm, far below the wide panel's bins).
    """
    residuals = _residuals_by_model(cluster_residuals)
    wide_edges = np.linspace(
        core.mu - CLUSTER_WIDE_N_SIGMA * core.sigma, core.mu + CLUSTER_WIDE_N_SIGMA * core.sigma, bins + 1
    )
    wide = [_histogram((model,), values, wide_edges) for model, values in residuals.items()]
    widths = {histogram.models[0]: histogram.sigma68 for histogram in wide if histogram.sigma68}
    zoom: list[Histogram] = []
    if widths:
        narrowest = min(widths.values())
        half_range = ZOOM_N_SIGMA68 * narrowest
        zoom_edges = np.linspace(-half_range, half_range, round(2 * ZOOM_N_SIGMA68 * ZOOM_BINS_PER_SIGMA68) + 1)
        zoom = [
            _histogram((model,), residuals[model], zoom_edges)
            for model, width in widths.items()
            if width <= ZOOM_MAX_SIGMA68_RATIO * narrowest
        ]
    truth = residuals.get("truth")
    if truth is None:
        return ClusterResidualData(wide, zoom, None, None)
    return ClusterResidualData(wide, zoom, float(np.median(truth)), sigma68(truth))


#: the q/pT residual figure spans ± this many times the rows' median σ68, in bins of 1/Q_OVER_PT_BINS_PER_SIGMA68
#: of it: the median, not the largest, so that a row with tails a hundred times wider (the paper chain) does not
#: squeeze the rows near the limit into one bin
Q_OVER_PT_RANGE_SIGMA68 = 6.0
Q_OVER_PT_BINS_PER_SIGMA68 = 8


def q_over_pt_histograms(track_residuals: pl.DataFrame) -> list[Histogram]:
    """Per model, the relative q/pT residuals of its successful fits (non-null residuals) over 0 ±
    :data:`Q_OVER_PT_RANGE_SIGMA68` times the median of the models' σ68, in bins of 1/
    :data:`Q_OVER_PT_BINS_PER_SIGMA68` of it; [] when no model has a residual spread.

    Args:
        track_residuals: (model, residual) from :func:`analysis.metrics.track_residual_table`.
    """
    residuals = _residuals_by_model(track_residuals)
    widths = [sigma68(values) for values in residuals.values()]
    widths = [width for width in widths if width > 0]
    if not widths:
        return []
    half_range = Q_OVER_PT_RANGE_SIGMA68 * float(np.median(widths))
    edges = np.linspace(-half_range, half_range, round(2 * Q_OVER_PT_RANGE_SIGMA68 * Q_OVER_PT_BINS_PER_SIGMA68) + 1)
    return [_histogram((model,), values, edges) for model, values in residuals.items()]


# ---------------------------------------------------------------------------------------------------------
# The report's figures
# ---------------------------------------------------------------------------------------------------------


def _draw_rocs(ax, curves: list[Curve], min_signal_eff: float) -> None:
    """Rejection vs efficiency of each curve, its AUC in the legend. A ROC with a single working point (a hard
    0/1 selection such as classical's: (0, 0), the selection, (1, 1)) is drawn as one marker at that point, not
    as a line to (1, 1)."""
    for curve in curves:
        style = group_style(curve.models)
        # points with no background left have infinite rejection: not drawable on a log axis
        keep = (curve.background_eff > 0) & (curve.signal_eff >= min_signal_eff)
        hard_selection = curve.signal_eff.size <= 3
        if hard_selection:
            # (1, 1) is the working point only when the selection takes every hit
            keep[-1] = keep[-1] and curve.signal_eff.size == 2
        x, y = curve.signal_eff[keep], 1.0 / curve.background_eff[keep]
        if hard_selection:
            label = f"{style['label']}: 0/1 selection, AUC = {curve.auc:.4f}"
            ax.plot(x, y, linestyle="none", marker=style["marker"], color=style["color"], label=label)
        else:
            label = f"{style['label']}: AUC = {curve.auc:.4f}"
            ax.plot(x, y, color=style["color"], linestyle=style["linestyle"], label=label)
    for target in SIGNAL_EFFICIENCY_POINTS:
        ax.axvline(target, color="0.7", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlim(min_signal_eff, 1.0)
    ax.set_ylabel("background rejection $1/\\varepsilon_b$")
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        _legend_outside(ax)
    else:
        _empty(ax, "no classifying model")


@_hep_styled
def plot_rejection_vs_efficiency(hit_scores: pl.DataFrame, path: Path, min_signal_eff: float = 0.5) -> Path:
    """Background rejection 1/ε_b (log) vs signal efficiency ε_s per model (paper Fig. 4): above, of the raw
    classifier score; below, of the final hit weights (the weight each hit has in the final clusters, which is what
    separates the reconstruction chains). Models with identical curves (``baseline`` and ``baseline_paper`` share
    their scores) are drawn once; each curve's AUC is in the legend.

    Args:
        hit_scores: (model, score, weight, is_signal) from :func:`analysis.metrics.hit_score_table`.
        path: PNG to write.
        min_signal_eff: left edge of the x axis.
    """
    fig = Figure(figsize=(_LEGEND_FIGSIZE[0] + 1.0, 8.6))
    score_ax, weight_ax = fig.subplots(2, 1, sharex=True)
    for ax, column, title in (
        (score_ax, "score", "Hit classification: raw classifier score"),
        (weight_ax, "weight", "Hit selection: final hit weight in the clusters"),
    ):
        _draw_rocs(ax, roc_curves(hit_scores, column), min_signal_eff)
        ax.set_title(title)
    weight_ax.set_xlabel("signal hit efficiency $\\varepsilon_s$")
    return _save(fig, path)


@_hep_styled
def plot_score_histograms(hit_scores: pl.DataFrame, path: Path, bins: int = 50) -> Path:
    """Per-hit classifier score distributions, signal vs background, one panel per distinct score (models with
    identical scores share one), normalised, on one log y scale for all panels, at most
    :data:`_MAX_PANELS_PER_ROW` panels a row (:func:`score_panels`).

    Args:
        hit_scores: (model, event_id, hit_id, score, is_signal) from :func:`analysis.metrics.hit_score_table`.
    """
    panels = score_panels(hit_scores, bins)
    n_panels = max(1, len(panels))
    n_columns = min(n_panels, _MAX_PANELS_PER_ROW)
    n_rows = math.ceil(n_panels / n_columns)
    fig = Figure(figsize=(4.4 * n_columns, 3.9 * n_rows))
    axes = fig.subplots(n_rows, n_columns, squeeze=False, sharey=True).ravel()
    for ax in axes[n_panels:]:
        ax.set_axis_off()
    contents = [panel.signal for panel in panels] + [panel.background for panel in panels]
    positive = np.concatenate(contents)[np.concatenate(contents) > 0] if contents else np.array([])
    for ax, panel in zip(axes, panels, strict=False):
        ax.stairs(panel.signal, panel.edges, color="tab:blue", label="signal hits")
        ax.stairs(panel.background, panel.edges, color="tab:red", label="background hits")
        ax.set_yscale("log")
        ax.set_xlabel("classifier score $s$")
        ax.set_title(group_label(panel.models), fontsize="small")
        ax.legend(loc="upper center")
    axes[0].set_ylabel("$1/N \\; dN/ds$")
    if positive.size:
        # one scale for every panel, with headroom for the legends
        axes[0].set_ylim(positive.min() / 2, positive.max() * 30)
    if not panels:
        _empty(axes[0], "no classifying model")
    return _save(fig, path)


def _beyond(histogram: Histogram) -> str:
    return f"{100 * histogram.n_outside / max(histogram.n_entries, 1):.1f}% beyond axis"


def _log_limits(ax, histograms: list[Histogram]) -> None:
    """A log y axis following the drawn contents (not a curve's far tails)."""
    ax.set_yscale("log")
    contents = np.concatenate([h.density for h in histograms]) if histograms else np.array([])
    positive = contents[contents > 0]
    if positive.size:
        ax.set_ylim(positive.min() / 3, positive.max() * 3)


@_hep_styled
def plot_cluster_residuals(
    cluster_residuals: pl.DataFrame, core: GaussianFit, path: Path, window_n_sigma: float = CORE_WINDOW_N_SIGMA
) -> Path:
    """Cluster residual x̂ − x_true per model (paper Fig. 5 style), :func:`cluster_residual_data`, in two panels.

    Above, every row on the scale of the core window (shaded: μ ± ``window_n_sigma``·σ of the Gaussian fitted to
    the truth residuals, the window of the core fraction), with the truth row's median ± σ68 as dashed lines. The
    fitted Gaussian itself is not drawn: the truth row's residuals (clusters of unweighted strips) are flat-topped
    and a Gaussian does not describe them; the window is a definition, σ68 what the histogram holds. Below, the
    rows with the narrowest residuals on bins matched to their σ68 (a few µm for the clean clusters), linear y.

    Args:
        cluster_residuals: (model, residual [mm]) from :func:`analysis.metrics.cluster_residual_table`.
        core: the Gaussian fitted to the truth residuals (analysis.metrics.core_fraction_table).
    """
    data = cluster_residual_data(cluster_residuals, core)
    fig = Figure(figsize=(_LEGEND_FIGSIZE[0] + 1.0, 8.6))
    wide_ax, zoom_ax = fig.subplots(2, 1)
    half_width = window_n_sigma * core.sigma
    wide_ax.axvspan(
        core.mu - half_width,
        core.mu + half_width,
        color="gold",
        alpha=0.25,
        label=f"core window ±{window_n_sigma:g}σ (σ = {core.sigma:.3g} mm)",
    )
    for histogram in data.wide:
        style = _line_style(histogram.models[0]) | {"label": f"{group_label(histogram.models)} ({_beyond(histogram)})"}
        wide_ax.stairs(histogram.density, histogram.edges, **style)
    if data.truth_median is not None and data.truth_sigma68:
        for side in (-1.0, 1.0):
            wide_ax.axvline(
                data.truth_median + side * data.truth_sigma68,
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"truth median ± σ68 ({data.truth_sigma68:.3g} mm)" if side > 0 else None,
            )
    _log_limits(wide_ax, data.wide)
    if data.wide:
        wide_ax.set_xlim(data.wide[0].edges[0], data.wide[0].edges[-1])
    wide_ax.set_title("Cluster position residuals")
    for histogram in data.zoom:
        label = f"{group_label(histogram.models)}: σ68 = {1000 * histogram.sigma68:.3g} µm ({_beyond(histogram)})"
        zoom_ax.stairs(histogram.density, histogram.edges, **(_line_style(histogram.models[0]) | {"label": label}))
    if data.zoom:
        zoom_ax.set_xlim(data.zoom[0].edges[0], data.zoom[0].edges[-1])
        zoom_ax.set_ylim(bottom=0)
        zoom_ax.set_title("Narrowest rows, bins of σ68 / 5", fontsize="small")
    else:
        _empty(zoom_ax, "no cluster residual")
    for ax in (wide_ax, zoom_ax):
        ax.set_xlabel("cluster residual $r = \\hat{x}_l - x_{\\mathrm{true},l}$ [mm]")
        ax.set_ylabel("$1/N \\; dN/dr$ [1/mm]")
        if ax.get_legend_handles_labels()[0]:
            _legend_outside(ax)
    return _save(fig, path)


@_hep_styled
def plot_q_over_pt_residuals(track_residuals: pl.DataFrame, resolution: pl.DataFrame, path: Path) -> Path:
    """Relative q/pT residual per model (paper Fig. 5) on a log y axis, zoomed on the bulk of the rows
    (:func:`q_over_pt_histograms`), σ68 ± error and the share beyond the axis in the legend.

    Args:
        track_residuals: (model, residual) from :func:`analysis.metrics.track_residual_table`.
        resolution: (model, sigma68, sigma68_err) from :func:`analysis.metrics.resolution_by_model`.
    """
    fig = Figure(figsize=(_LEGEND_FIGSIZE[0] + 1.0, _LEGEND_FIGSIZE[1]))
    ax = fig.add_subplot()
    widths = {row["model"]: row for row in resolution.iter_rows(named=True)}
    histograms = q_over_pt_histograms(track_residuals)
    if not histograms:
        _empty(ax, "no successful track fit")
    else:
        for histogram in histograms:
            row = widths.get(histogram.models[0], {})
            width = format_value_error(row.get("sigma68"), row.get("sigma68_err"))
            label = f"{group_label(histogram.models)}: σ68 = {width} ({_beyond(histogram)})"
            ax.stairs(histogram.density, histogram.edges, **(_line_style(histogram.models[0]) | {"label": label}))
        _log_limits(ax, histograms)
        ax.set_xlim(histograms[0].edges[0], histograms[0].edges[-1])
        _legend_outside(ax)
    ax.set_xlabel("relative residual $r = [(q/p_T)_{reco} - (q/p_T)_{true}]\\,/\\,(q/p_T)_{true}$")
    ax.set_ylabel("$1/N \\; dN/dr$")
    ax.set_title("Transverse momentum resolution")
    return _save(fig, path)


def _plain_log_labels(ax) -> None:
    """Plain numbers (0.005, 0.01, 0.02) on a log y axis whose range is set; besides the decades, the minor
    ticks at 2 and 5 (and 3 where the axis spans under a decade and a half) are labelled too."""
    low, high = ax.get_ylim()
    span = math.log10(high / low)
    shown = {2, 3, 5} if span < 1.5 else ({2, 5} if span < 3 else set())

    def minor(value: float, _position: int) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
        return f"{value:g}" if mantissa in shown else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


@_hep_styled
def plot_sigma68_vs_pt(resolution_pt: pl.DataFrame, path: Path) -> Path:
    """σ68 of the relative q/pT residual vs true pT, error bars from the bootstrap (paper Fig. 6), on a log axis
    (rows near the limit and rows a hundred times worse both readable). The models stand side by side within
    each pT bin, whose edges are drawn as grey lines.

    With rows of the limit (``model`` = pipeline.registry.LIMIT_ROW) the limit is drawn as a line across each bin,
    the region below it shaded, and a second panel shows each model's σ68 / limit per bin on a linear axis
    zoomed on the models (at most :data:`RATIO_AXIS_MAX`; a point beyond is an arrow at the top edge).

    Args:
        resolution_pt: (model, pt_lo, pt_hi, n, sigma68, sigma68_err) from
            :func:`analysis.metrics.resolution_by_pt`, the limit's rows among them or not.
    """
    limit = resolution_pt.filter((pl.col("model") == LIMIT_ROW) & (pl.col("sigma68") > 0))
    rows = resolution_pt.filter((pl.col("model") != LIMIT_ROW) & (pl.col("sigma68") > 0))
    if limit.height:
        fig = Figure(figsize=(_LEGEND_FIGSIZE[0], 6.6))
        ax, ratio_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (2.0, 1.0)})
        axes = [ax, ratio_ax]
    else:
        fig = Figure(figsize=_LEGEND_FIGSIZE)
        ax, ratio_ax = fig.add_subplot(), None
        axes = [ax]
    ax.set_yscale("log")
    models = model_order(set(resolution_pt.filter(pl.col("model") != LIMIT_ROW)["model"].to_list()))
    n_models = max(1, len(models))
    edges = np.unique(resolution_pt.select("pt_lo", "pt_hi").to_numpy())
    for axis in axes:
        for edge in edges:
            # the bin edges as lines: with several models side by side, per-point horizontal bars would overlap
            axis.axvline(edge, color="0.85", linewidth=0.8, zorder=0)
    limit_of = dict(zip(limit["pt_lo"].to_list(), limit["sigma68"].to_list(), strict=True))
    # what sets the axis ranges: the points and the limit, not the error bars (a bar of a few events can span
    # decades), except the upper bars of the ratio panel up to its cap
    values = [*limit["sigma68"].to_list(), *rows["sigma68"].to_list()]
    ratio_low: list[float] = []
    ratio_high: list[float] = []
    for index, model in enumerate(models):
        group = rows.filter(pl.col("model") == model)
        if group.height == 0:
            continue
        style = model_style(model)
        lo, hi = group["pt_lo"].to_numpy(), group["pt_hi"].to_numpy()
        # the models side by side within the middle 80 % of each bin, in report order, so error bars never overlap
        offset = (index + 0.5) / n_models - 0.5
        centre = 0.5 * (lo + hi) + 0.8 * offset * (hi - lo)
        value, err = group["sigma68"].to_numpy(), group["sigma68_err"].fill_null(0.0).to_numpy()
        points = {"fmt": style["marker"], "markersize": 4, "capsize": 2, "color": style["color"]}
        # the lower bar stops short of zero, which a log axis cannot show
        ax.errorbar(centre, value, yerr=[np.minimum(err, 0.9 * value), err], label=style["label"], **points)
        if ratio_ax is None:
            continue
        reference = np.array([limit_of.get(pt_lo, np.nan) for pt_lo in group["pt_lo"].to_list()])
        keep = np.isfinite(reference)
        ratio, ratio_err = value[keep] / reference[keep], err[keep] / reference[keep]
        inside = ratio <= RATIO_AXIS_MAX
        ratio_ax.errorbar(centre[keep][inside], ratio[inside], yerr=ratio_err[inside], **points)
        # beyond the axis: an arrow at the top edge (placed once the axis range is known)
        ratio_ax.plot(
            centre[keep][~inside],
            np.full(int((~inside).sum()), np.nan),
            linestyle="none",
            marker="^",
            color=style["color"],
            gid="beyond",
        )
        ratio_low += list(ratio)
        ratio_high += [*(ratio + ratio_err)[inside], *[RATIO_AXIS_MAX] * int((~inside).sum())]
    if limit.height:
        lo, hi, value = limit["pt_lo"].to_numpy(), limit["pt_hi"].to_numpy(), limit["sigma68"].to_numpy()
        ax.hlines(value, lo, hi, color=LIMIT_STYLE["color"], linewidth=2.0, label=LIMIT_STYLE["label"], zorder=3)
    if values:
        bottom, top = 0.7 * min(values), max(ax.get_ylim()[1], 1.4 * max(values))
        for left, right, height in limit.select("pt_lo", "pt_hi", "sigma68").rows():
            ax.fill_between([left, right], bottom, height, color=LIMIT_STYLE["color"], alpha=0.12, linewidth=0)
        ax.set_ylim(bottom, top)
    if ratio_ax is not None:
        ratio_ax.axhline(1.0, color=LIMIT_STYLE["color"], linewidth=2.0)
        low = max(0.0, min([0.9, *(0.95 * r for r in ratio_low)]))
        high = min(RATIO_AXIS_MAX, max([1.3, *(1.05 * r for r in ratio_high)]))
        ratio_ax.set_ylim(low, high)
        for line in ratio_ax.get_lines():
            if line.get_gid() == "beyond":
                line.set_ydata(np.full(len(line.get_xdata()), high - 0.04 * (high - low)))
        ratio_ax.set_ylabel("$\\sigma_{68}$ / limit")
        ratio_ax.grid(True, axis="y", alpha=0.3)
    axes[-1].set_xlabel("$p_T^{true}$ [GeV]")
    ax.set_ylabel("$\\sigma_{68}$ of relative $q/p_T$ residual")
    ax.set_title("Resolution vs transverse momentum")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    _plain_log_labels(ax)
    if len(edges):
        ax.set_xlim(edges[0], edges[-1])
    if models or limit.height:
        _legend_outside(ax)
    return _save(fig, path)


@dataclass(frozen=True)
class RatePoints:
    """One model's points of a rate figure: the bins (``lo``, ``hi``), where the marker stands within each (the
    models side by side), the rate and its Clopper–Pearson interval (``lower``, ``upper``)."""

    model: str
    lo: np.ndarray
    hi: np.ndarray
    x: np.ndarray
    rate: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def rate_points(table: pl.DataFrame, x: str, rate: str) -> list[RatePoints]:
    """The points of ``rate`` per model (report order; bins where the rate is null left out) of an
    analysis.performance table binned in ``x``: its ``x_lo``, ``x_hi`` columns where it has them, else the integer
    column ``x`` (a layer) as bins of width 1. The models stand side by side within the middle 80 % of each bin."""
    models = model_order(set(table["model"].to_list()))
    points = []
    for index, model in enumerate(models):
        rows = table.filter((pl.col("model") == model) & pl.col(rate).is_not_null())
        if f"{x}_lo" in rows.columns:
            rows = rows.sort(f"{x}_lo")
            lo, hi = rows[f"{x}_lo"].to_numpy().astype(np.float64), rows[f"{x}_hi"].to_numpy().astype(np.float64)
        else:
            rows = rows.sort(x)
            lo, hi = rows[x].to_numpy() - 0.5, rows[x].to_numpy() + 0.5
        offset = (index + 0.5) / len(models) - 0.5
        centre = 0.5 * (lo + hi) + 0.8 * offset * (hi - lo)
        values = [rows[column].to_numpy().astype(np.float64) for column in (rate, f"{rate}_lo", f"{rate}_hi")]
        points.append(RatePoints(model, lo, hi, centre, *values))
    return points


@_hep_styled
def plot_rates(
    table: pl.DataFrame, x: str, panels: tuple[tuple[str, str], ...], xlabel: str, title: str, path: Path
) -> Path:
    """Binomial rates per model against a binned variable, as ACTS's performance writers draw efficiencies: per
    model and bin a marker at the rate with the Clopper–Pearson 68.27 % interval as its error bar
    (:func:`rate_points`), the bin edges as grey lines. One panel per (rate column, y label) of ``panels``, stacked
    on a shared x axis.

    Args:
        table: an analysis.performance table (model, the bins of ``x``, each rate with ``_lo``, ``_hi``).
    """
    fig = Figure(figsize=(_LEGEND_FIGSIZE[0], 3.4 * len(panels) + 1.2))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (rate, ylabel) in zip(axes, panels, strict=True):
        points = rate_points(table, x, rate)
        edges = np.unique(np.concatenate([np.r_[p.lo, p.hi] for p in points])) if points else np.array([])
        for edge in edges:
            ax.axvline(edge, color="0.85", linewidth=0.8, zorder=0)
        for point in points:
            style = model_style(point.model)
            # the interval may not hold the rate exactly at 0 or 1 in floating point: clip the bar lengths at 0
            bars = [np.maximum(point.rate - point.lower, 0.0), np.maximum(point.upper - point.rate, 0.0)]
            ax.errorbar(
                point.x,
                point.rate,
                yerr=bars,
                fmt=style["marker"],
                markersize=4,
                capsize=2,
                color=style["color"],
                label=style["label"],
            )
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        if points:
            ax.set_xlim(edges[0], edges[-1])
            _legend_outside(ax)
        else:
            _empty(ax, "no entries")
    axes[0].set_title(title)
    axes[-1].set_xlabel(xlabel)
    return _save(fig, path)


def format_value_error(value: float | None, err: float | None) -> str:
    """'v ± e' with both rounded to the error's second significant digit; 'n/a' for a missing value."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if err is None or not math.isfinite(err) or err <= 0:
        return f"{value:.4g}"
    digits = max(0, 1 - math.floor(math.log10(err)))
    return f"{value:.{digits}f} ± {err:.{digits}f}"


@_hep_styled
def plot_scan_metric(table: pl.DataFrame, metric: str, label: str, path: Path, log_y: bool = False) -> Path:
    """One metric of a regime scan against the background scale: one panel per detector (side by side, in the
    table's order, a shared y axis), one line per row with its error bars (analysis.scan_report.points_table). The rows
    stand slightly apart around each scale (a few percent on the log x axis), so their error bars do not overlap.

    Args:
        table: (detector, background_scale, model, ``metric``, ``metric``_err, ...); rows whose value is null
            (a hit metric of a truth reference or of the limit) are not drawn.
        metric: the column drawn; ``label`` its axis label.
        log_y: a log y axis (σ68, whose rows span decades at high background).
    """
    detectors = table["detector"].unique(maintain_order=True).to_list() or ["(no point)"]
    fig = Figure(figsize=(4.2 * len(detectors) + 3.2, 4.8))
    axes = fig.subplots(1, len(detectors), sharey=True, squeeze=False)[0]
    drawn = table.filter(pl.col(metric).is_not_null() & pl.col(metric).is_finite())
    if log_y:
        drawn = drawn.filter(pl.col(metric) > 0)
    scales = sorted(set(table["background_scale"].to_list()))
    for ax, detector in zip(axes, detectors, strict=True):
        rows = drawn.filter(pl.col("detector") == detector)
        models = model_order(set(rows["model"].to_list()))
        for index, model in enumerate(models):
            group = rows.filter(pl.col("model") == model).sort("background_scale")
            dodge = 2.0 ** (0.05 * (index - (len(models) - 1) / 2))
            style = model_style(model)
            value = group[metric].to_numpy()
            err = group[f"{metric}_err"].fill_null(0.0).fill_nan(0.0).to_numpy()
            lower = np.minimum(err, 0.9 * value) if log_y else err
            ax.errorbar(
                group["background_scale"].to_numpy() * dodge,
                value,
                yerr=[lower, err],
                fmt=style["marker"],
                linestyle=style["linestyle"],
                color=style["color"],
                markersize=5,
                capsize=3,
                label=style["label"],
            )
        if rows.height == 0:
            _empty(ax, "no value")
        ax.set_xscale("log", base=2)
        if scales:
            ax.set_xticks(scales)
            ax.set_xlim(min(scales) / 1.3, max(scales) * 1.3)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda _value, _position: ""))
        ax.set_xlabel("background scale")
        ax.set_title(f"detector: {detector}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    if log_y and drawn.height:
        axes[0].set_yscale("log")
        _plain_log_labels(axes[0])
    axes[0].set_ylabel(label)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            if text not in labels:
                handles.append(handle)
                labels.append(text)
    if handles:
        axes[-1].legend(
            handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0
        )
    return _save(fig, path)
