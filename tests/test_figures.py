"""The report's figures (analysis/figures.py): PNG and PDF of every figure, mplhep's style, atomic saving."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib
import mplhep
import numpy as np
import polars as pl
import pytest
from matplotlib.figure import Figure

from analysis import figures
from analysis.statistics import GaussianFit, roc_curve
from pipeline.models import LIMIT_ROW

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODELS = ("truth", "baseline", "e2e", "classical")
#: the limit row's σ68 in the two pT bins of the inputs
LIMIT = {20.0: 0.015, 35.0: 0.018}
#: rcParams set by mplhep's ROOT style that differ from matplotlib's defaults, checked at drawing time
STYLE_KEYS = ("xtick.direction", "ytick.direction", "xtick.top", "ytick.right", "xaxis.labellocation")


def _tiny_inputs() -> dict[str, object]:
    """A few hundred entries per model, enough to draw every figure."""
    rng = np.random.default_rng(0)
    n = 200
    labels = np.arange(n) % 2 == 0
    hit_scores, rocs, clusters, tracks, resolution, resolution_pt = [], {}, [], [], [], []
    for index, model in enumerate(MODELS):
        if model == "classical":  # a hard 0/1 selection: one ROC working point
            scores = np.where(labels, rng.random(n) < 0.9, rng.random(n) < 0.1).astype(np.float64)
        else:
            scores = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + np.where(labels, 2.0, -2.0))))
        hit_scores.append(pl.DataFrame({"model": model, "score": scores, "is_signal": labels}))
        signal_eff, background_eff, _ = roc_curve(scores, labels)
        rocs[model] = (signal_eff, background_eff)
        clusters.append(pl.DataFrame({"model": model, "residual": rng.normal(0.0, 0.1 * (1 + index), n)}))
        residual = rng.normal(0.0, 0.02 * (1 + index), n)
        tracks.append(pl.DataFrame({"model": model, "residual": residual}))
        resolution.append({"model": model, "sigma68": 0.02 * (1 + index), "sigma68_err": 0.001})
        for pt_lo in (20.0, 35.0):
            resolution_pt.append(
                {
                    "model": model,
                    "pt_lo": pt_lo,
                    "pt_hi": pt_lo + 15.0,
                    "n": n // 2,
                    "sigma68": 0.02 * (1 + index) * pt_lo / 20.0,
                    "sigma68_err": 0.002,
                }
            )
    for pt_lo, value in LIMIT.items():
        resolution_pt.append(
            {"model": LIMIT_ROW, "pt_lo": pt_lo, "pt_hi": pt_lo + 15.0, "n": n, "sigma68": value, "sigma68_err": None}
        )
    return {
        "hit_scores": pl.concat(hit_scores),
        "rocs": rocs,
        "cluster_residuals": pl.concat(clusters),
        "core": GaussianFit(mu=0.0, sigma=0.1, mu_err=0.005, sigma_err=0.005, n_fit=190),
        "track_residuals": pl.concat(tracks),
        "resolution": pl.DataFrame(resolution),
        "resolution_pt": pl.DataFrame(resolution_pt),
    }


INPUTS = _tiny_inputs()

#: every figure the report draws: its file name in the report (analysis/report_folder.py) and how to draw it
FIGURES: dict[str, Callable[[Path], Path]] = {
    "roc_rejection.png": lambda path: figures.plot_rejection_vs_efficiency(INPUTS["rocs"], path),
    "score_histograms.png": lambda path: figures.plot_score_histograms(INPUTS["hit_scores"], path),
    "cluster_residuals.png": lambda path: figures.plot_cluster_residuals(
        INPUTS["cluster_residuals"], INPUTS["core"], path
    ),
    "q_over_pt_residuals.png": lambda path: figures.plot_q_over_pt_residuals(
        INPUTS["track_residuals"], INPUTS["resolution"], path
    ),
    "sigma68_vs_pt.png": lambda path: figures.plot_sigma68_vs_pt(INPUTS["resolution_pt"], path),
    "sigma68_vs_pt_without_limit.png": lambda path: figures.plot_sigma68_vs_pt(
        INPUTS["resolution_pt"].filter(pl.col("model") != LIMIT_ROW), path
    ),
}


def _rc_snapshot() -> dict[str, object]:
    # RcParams.copy() does not resolve the "backend" entry (plain dict(rcParams) could switch pyplot's backend)
    return dict(matplotlib.rcParams.copy())


@pytest.fixture
def saves(monkeypatch) -> list[tuple[Figure, dict[str, object], str]]:
    """Every Figure.savefig call: the figure, the rcParams in force and the format."""
    calls: list[tuple[Figure, dict[str, object], str]] = []
    original = Figure.savefig

    def recording(self, fname, *args, **kwargs):
        calls.append((self, _rc_snapshot(), kwargs.get("format")))
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return calls


@pytest.mark.filterwarnings("error")  # e.g. a glyph the style's font lacks
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_figure_is_written_as_png_and_pdf(tmp_path, name):
    path = tmp_path / "figures" / name
    assert FIGURES[name](path) == path
    pdf = path.with_suffix(".pdf")
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert pdf.stat().st_size > 1000
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert pdf.read_bytes().rstrip().endswith(b"%%EOF")
    # nothing else: no temporary file left behind
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, pdf.name])
    assert figures.figure_paths(path) == [path, pdf]


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figures_are_drawn_in_mplheps_style_without_changing_global_rcparams(tmp_path, saves, name):
    before = _rc_snapshot()
    assert any(before[key] != mplhep.style.ROOT[key] for key in STYLE_KEYS), "the defaults already look like ROOT"
    FIGURES[name](tmp_path / name)
    assert [fmt for _, _, fmt in saves] == ["png", "pdf"]
    for fig, rc, _ in saves:
        # the style is in force while drawing and saving (fonts are looked up then) ...
        for key in STYLE_KEYS:
            assert rc[key] == mplhep.style.ROOT[key], key
        assert rc["font.sans-serif"][0] == "TeX Gyre Heros"
        assert rc["font.size"] == figures._STYLE_OVERRIDES["font.size"]
        # ... and in the figure: ticks inside on all four sides, minor ticks, axis labels at the axis ends (of the
        # panel with the x label, the lowest)
        ax = next(axis for axis in fig.axes if axis.get_xlabel())
        tick = ax.xaxis.get_major_ticks()[0]
        assert tick.tick2line.get_visible()
        assert ax.yaxis.get_major_ticks()[0].tick2line.get_visible()
        assert tick._tickdir == "in"
        assert len(ax.xaxis.get_minorticklocs()) > 0
        assert ax.xaxis.label.get_horizontalalignment() == "right"
        assert ax.xaxis.label.get_position()[0] == 1.0
    # global matplotlib state untouched
    assert _rc_snapshot() == before


def test_axis_labels_carry_hep_units(tmp_path, saves):
    for name, draw in FIGURES.items():
        draw(tmp_path / name)
    labels = {}
    for (fig, _, fmt), name in zip(saves[::2], FIGURES, strict=True):
        assert fmt == "png"
        labels[name] = (next(ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()), fig.axes[0].get_ylabel())
    assert labels["sigma68_vs_pt.png"][0] == "$p_T^{true}$ [GeV]"
    assert labels["sigma68_vs_pt_without_limit.png"][0] == "$p_T^{true}$ [GeV]"
    assert labels["cluster_residuals.png"][0].endswith("[mm]")
    assert labels["cluster_residuals.png"][1].endswith("[1/mm]")
    assert "q/p_T" in labels["q_over_pt_residuals.png"][0]


def test_overwrites_previous_figures(tmp_path):
    path = tmp_path / "roc_rejection.png"
    path.write_bytes(b"old png")
    path.with_suffix(".pdf").write_bytes(b"old pdf")
    FIGURES[path.name](path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roc_rejection.pdf", "roc_rejection.png"]


def test_failed_save_keeps_previous_figures_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "sigma68_vs_pt.png"
    path.write_bytes(b"old png")
    path.with_suffix(".pdf").write_bytes(b"old pdf")
    original = Figure.savefig

    def failing_pdf(self, fname, *args, **kwargs):
        if kwargs.get("format") == "pdf":
            Path(fname).write_bytes(b"%PDF-1.4 truncated")  # a partial file, as a crash mid-write leaves
            raise OSError("disk full")
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", failing_pdf)
    before = _rc_snapshot()
    with pytest.raises(OSError, match="disk full"):
        FIGURES[path.name](path)
    # neither final name was touched: the new PNG only existed under its temporary name
    assert path.read_bytes() == b"old png"
    assert path.with_suffix(".pdf").read_bytes() == b"old pdf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sigma68_vs_pt.pdf", "sigma68_vs_pt.png"]
    assert _rc_snapshot() == before


def test_empty_inputs_still_draw(tmp_path):
    empty_scores = INPUTS["hit_scores"].clear()
    for path in (
        figures.plot_rejection_vs_efficiency({}, tmp_path / "roc.png"),
        figures.plot_score_histograms(empty_scores, tmp_path / "scores.png"),
        figures.plot_q_over_pt_residuals(
            INPUTS["track_residuals"].clear(), INPUTS["resolution"].clear(), tmp_path / "q.png"
        ),
        figures.plot_sigma68_vs_pt(INPUTS["resolution_pt"].clear(), tmp_path / "pt.png"),
    ):
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    assert len(list(tmp_path.iterdir())) == 8


def _errorbar_points(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{colour: (x, y)} of the markers of every error bar drawn in ``ax``."""
    points = {}
    for container in ax.containers:
        line = container.lines[0]
        points[matplotlib.colors.to_hex(line.get_color())] = (
            np.asarray(line.get_xdata()),
            np.asarray(line.get_ydata()),
        )
    return points


def test_sigma68_vs_pt_draws_the_limit_and_every_models_ratio_to_it(tmp_path, saves):
    resolution_pt = INPUTS["resolution_pt"]
    # one point far beyond the ratio axis (issue 26: a model at σ68 ~ 5 squashed the others on a linear axis)
    resolution_pt = resolution_pt.with_columns(
        sigma68=pl.when((pl.col("model") == "classical") & (pl.col("pt_lo") == 35.0)).then(5.0).otherwise("sigma68")
    )
    figures.plot_sigma68_vs_pt(resolution_pt, tmp_path / "pt.png")
    fig = saves[0][0]
    top, ratio = fig.axes
    # the σ68 panel: log axis holding every point, the limit a line across each bin at its value
    assert top.get_yscale() == "log"
    (limit_lines,) = [c for c in top.collections if c.get_label() == figures.LIMIT_STYLE["label"]]
    segments = sorted((tuple(seg[0]), tuple(seg[1])) for seg in limit_lines.get_segments())
    assert segments == [((lo, value), (lo + 15.0, value)) for lo, value in sorted(LIMIT.items())]
    low, high = top.get_ylim()
    assert low < min(LIMIT.values())
    assert high > 5.0
    # the ratio panel: each model's σ68 / the limit of its bin, on a linear axis that zooms on the models
    assert ratio.get_yscale() == "linear"
    assert ratio.get_ylim()[1] == figures.RATIO_AXIS_MAX
    drawn, above = _errorbar_points(ratio), _errorbar_points(top)
    arrows = {
        matplotlib.colors.to_hex(line.get_color()): line for line in ratio.get_lines() if line.get_gid() == "beyond"
    }
    for model in MODELS:
        colour = matplotlib.colors.to_hex(figures.model_style(model)["color"])
        rows = resolution_pt.filter(pl.col("model") == model).sort("pt_lo")
        ratios = np.array([value / LIMIT[lo] for lo, value in rows.select("pt_lo", "sigma68").rows()])
        inside = ratios <= figures.RATIO_AXIS_MAX
        x, y = drawn[colour]
        np.testing.assert_allclose(y, ratios[inside], rtol=1e-12)
        np.testing.assert_allclose(x, above[colour][0][inside])  # below the model's points of the σ68 panel
        np.testing.assert_allclose(above[colour][1], rows["sigma68"].to_numpy())
        # a point beyond the axis: an arrow at the top edge of the ratio panel, in its model's colour
        assert len(arrows[colour].get_xdata()) == int((~inside).sum())
        assert np.all(np.asarray(arrows[colour].get_ydata()) > ratio.get_ylim()[0])
        assert np.all(np.asarray(arrows[colour].get_ydata()) < figures.RATIO_AXIS_MAX)
    assert len(arrows[matplotlib.colors.to_hex("tab:green")].get_xdata()) >= 1  # classical's σ68 of 5
    # without the limit: one panel, still a log axis
    figures.plot_sigma68_vs_pt(resolution_pt.filter(pl.col("model") != LIMIT_ROW), tmp_path / "bare.png")
    (only,) = saves[2][0].axes
    assert only.get_yscale() == "log"
    assert not [c for c in only.collections if c.get_label() == figures.LIMIT_STYLE["label"]]
