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
from pathlib import Path
from typing import Any, ParamSpec

import matplotlib.style
import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from analysis.metrics import SIGNAL_EFFICIENCY_POINTS
from analysis.statistics import CORE_WINDOW_N_SIGMA, GaussianFit
from pipeline.atomic import replacing
from pipeline.models import LIMIT_ROW, SUMMARY_ROWS

#: a fixed colour, line style, marker and label per known model (pipeline.schema.MODEL_NAMES), so a model looks
#: the same in every figure; the paper-chain networks share their robust counterparts' family of hues and are
#: dashed, so the two reconstruction chains read apart at a glance
MODEL_STYLE = {
    "truth": {"color": "black", "linestyle": "-", "marker": "o", "label": "truth weights"},
    "truth_charge": {"color": "0.5", "linestyle": "-", "marker": "D", "label": "truth × charge"},
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
#: the limit row (pipeline.models.LIMIT_ROW): no model, drawn as a line across each pT bin
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
    """Known rows in the documented order (pipeline.models.SUMMARY_ROWS: the limit, then the models), then any
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


@_hep_styled
def plot_rejection_vs_efficiency(
    rocs: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, min_signal_eff: float = 0.5
) -> Path:
    """Background rejection 1/ε_b (log) vs signal efficiency ε_s per model (paper Fig. 4).

    A ROC with a single working point (a hard 0/1 selection such as classical's: points (0, 0),
    the selection, (1, 1)) is drawn as one marker at that point, not as a line to (1, 1).

    Args:
        rocs: {model: (signal_eff, background_eff)} from :func:`analysis.statistics.roc_curve`.
        path: PNG to write.
        min_signal_eff: left edge of the x axis.
    """
    fig = Figure(figsize=_LEGEND_FIGSIZE)
    ax = fig.add_subplot()
    for model in model_order(rocs):
        signal_eff, background_eff = rocs[model]
        # points with no background left have infinite rejection: not drawable on a log axis
        keep = (background_eff > 0) & (signal_eff >= min_signal_eff)
        if signal_eff.size <= 3:
            # a hard 0/1 selection: (0, 0), its working point, (1, 1); the chords between them are no curve, so
            # only the working point is drawn ((1, 1) is it only when the selection takes every hit)
            keep[-1] = keep[-1] and signal_eff.size == 2
            style = model_style(model)
            ax.plot(
                signal_eff[keep],
                1.0 / background_eff[keep],
                linestyle="none",
                marker=style["marker"],
                color=style["color"],
                label=f"{style['label']}: 0/1 selection",
            )
        else:
            ax.plot(signal_eff[keep], 1.0 / background_eff[keep], **_line_style(model))
    for target in SIGNAL_EFFICIENCY_POINTS:
        ax.axvline(target, color="0.7", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlim(min_signal_eff, 1.0)
    ax.set_xlabel("signal hit efficiency $\\varepsilon_s$")
    ax.set_ylabel("background rejection $1/\\varepsilon_b$")
    ax.set_title("Hit classification (raw classifier score)")
    ax.grid(True, which="both", alpha=0.3)
    if rocs:
        _legend_outside(ax)
    else:
        _empty(ax, "no classifying model")
    return _save(fig, path)


@_hep_styled
def plot_score_histograms(hit_scores: pl.DataFrame, path: Path, bins: int = 50) -> Path:
    """Per-hit classifier score distributions, signal vs background, one panel per model (normalised, log y),
    at most :data:`_MAX_PANELS_PER_ROW` panels a row.

    Args:
        hit_scores: (model, score, is_signal) from :func:`analysis.metrics.hit_score_table`.
    """
    models = model_order(set(hit_scores["model"].unique().to_list()))
    n_panels = max(1, len(models))
    n_columns = min(n_panels, _MAX_PANELS_PER_ROW)
    n_rows = math.ceil(n_panels / n_columns)
    fig = Figure(figsize=(4.2 * n_columns, 3.8 * n_rows))
    axes = fig.subplots(n_rows, n_columns, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_axis_off()
    edges = np.linspace(0.0, 1.0, bins + 1)
    for ax, model in zip(axes, models, strict=False):
        group = hit_scores.filter(pl.col("model") == model)
        scores = group["score"].to_numpy()
        signal = group["is_signal"].to_numpy().astype(bool)
        finite = np.isfinite(scores)
        # scores outside [0, 1] (a model without a sigmoid) widen the axis instead of being dropped
        lo, hi = min(0.0, float(scores[finite].min(initial=0.0))), max(1.0, float(scores[finite].max(initial=1.0)))
        model_edges = edges if (lo, hi) == (0.0, 1.0) else np.linspace(lo, hi, bins + 1)
        for mask, label, colour in ((signal, "signal hits", "tab:blue"), (~signal, "background hits", "tab:red")):
            values = scores[mask & finite]
            if values.size:
                ax.hist(values, bins=model_edges, density=True, histtype="step", color=colour, label=label)
        ax.set_yscale("log")
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * 30)  # headroom for the legend
        ax.set_xlabel("classifier score $s$")
        ax.set_ylabel("$1/N \\; dN/ds$")
        ax.set_title(model_style(model)["label"])
        ax.legend(loc="upper center")
    if not models:
        _empty(axes[0], "no classifying model")
    return _save(fig, path)


@_hep_styled
def plot_cluster_residuals(
    cluster_residuals: pl.DataFrame,
    core: GaussianFit,
    path: Path,
    window_n_sigma: float = CORE_WINDOW_N_SIGMA,
    range_n_sigma: float = 8.0,
    bins: int = 80,
) -> Path:
    """Cluster residual x̂ − x_true per model with the core window shaded (paper Fig. 5 style).

    Args:
        cluster_residuals: (model, residual [mm]) from :func:`analysis.metrics.cluster_residual_table`.
        core: the Gaussian fitted to the truth residuals; the window is μ ± ``window_n_sigma``·σ.
        range_n_sigma: the x axis spans μ ± this many σ; entries beyond are not drawn (counted in the legend).
    """
    fig = Figure(figsize=_LEGEND_FIGSIZE)
    ax = fig.add_subplot()
    lo, hi = core.mu - range_n_sigma * core.sigma, core.mu + range_n_sigma * core.sigma
    edges = np.linspace(lo, hi, bins + 1)
    half_width = window_n_sigma * core.sigma
    ax.axvspan(core.mu - half_width, core.mu + half_width, color="gold", alpha=0.25, label=f"core ±{window_n_sigma:g}σ")
    bin_width = edges[1] - edges[0]
    drawn: list[np.ndarray] = []
    for model in model_order(set(cluster_residuals["model"].unique().to_list())):
        residuals = cluster_residuals.filter(pl.col("model") == model)["residual"].drop_nulls().to_numpy()
        if residuals.size == 0:
            continue
        outside = int(((residuals < lo) | (residuals > hi)).sum())
        label = f"{model_style(model)['label']} ({100 * outside / residuals.size:.1f}% beyond axis)"
        style = _line_style(model) | {"label": label}
        # normalised to all clusters of the model (not only those on the axis), so tails show as lost area
        weights = np.full(residuals.size, 1.0 / (residuals.size * bin_width))
        contents, _, _ = ax.hist(residuals, bins=edges, weights=weights, histtype="step", **style)
        drawn.append(contents)
    n_truth = cluster_residuals.filter(pl.col("model") == "truth")["residual"].drop_nulls().len()
    if n_truth:
        # the fitted Gaussian holds n_fit / coverage(window) of the truth clusters
        coverage = math.erf(window_n_sigma / math.sqrt(2.0))
        x = np.linspace(lo, hi, 400)
        density = np.exp(-0.5 * ((x - core.mu) / core.sigma) ** 2) / (core.sigma * math.sqrt(2 * math.pi))
        scale = core.n_fit / coverage / n_truth
        ax.plot(
            x, scale * density, color="black", linestyle="--", linewidth=1, label=f"truth fit: σ = {core.sigma:.3g} mm"
        )
    ax.set_yscale("log")
    positive = np.concatenate(drawn)[np.concatenate(drawn) > 0] if drawn else np.array([])
    if positive.size:
        # the axis follows the histograms (not the Gaussian's far tails)
        ax.set_ylim(positive.min() / 3, positive.max() * 3)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("cluster residual $r = \\hat{x}_l - x_{\\mathrm{true},l}$ [mm]")
    ax.set_ylabel("$1/N \\; dN/dr$ [1/mm]")
    ax.set_title("Cluster position residuals")
    _legend_outside(ax)
    return _save(fig, path)


@_hep_styled
def plot_q_over_pt_residuals(
    track_residuals: pl.DataFrame, resolution: pl.DataFrame, path: Path, range_sigma68: float = 5.0, bins: int = 80
) -> Path:
    """Relative q/pT residual per model with σ68 ± error in the legend (paper Fig. 5).

    Args:
        track_residuals: (model, residual) from :func:`analysis.metrics.track_residual_table`.
        resolution: (model, sigma68, sigma68_err) from :func:`analysis.metrics.resolution_by_model`.
        range_sigma68: the x axis spans ± this many times the largest σ68.
    """
    fig = Figure(figsize=_LEGEND_FIGSIZE)
    ax = fig.add_subplot()
    widths = {row["model"]: row for row in resolution.iter_rows(named=True)}
    largest = max((row["sigma68"] for row in widths.values() if row["sigma68"] is not None), default=None)
    if largest is None or not largest > 0:
        _empty(ax, "no successful track fit")
    else:
        half_range = range_sigma68 * largest
        edges = np.linspace(-half_range, half_range, bins + 1)
        for model in model_order(set(widths)):
            residuals = track_residuals.filter(pl.col("model") == model)["residual"].drop_nulls().to_numpy()
            if residuals.size == 0:
                continue
            row = widths[model]
            label = f"{model_style(model)['label']}: σ68 = {format_value_error(row['sigma68'], row['sigma68_err'])}"
            ax.hist(residuals, bins=edges, density=True, histtype="step", **(_line_style(model) | {"label": label}))
        ax.set_xlim(-half_range, half_range)
        ax.set_ylim(bottom=0)
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

    With rows of the limit (``model`` = pipeline.models.LIMIT_ROW) the limit is drawn as a line across each bin,
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
    table's order, a shared y axis), one line per row with its error bars (analysis.scan.points_table). The rows
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
