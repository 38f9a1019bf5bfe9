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

from analysis import figures, performance
from analysis.statistics import GaussianFit
from pipeline.registry import LIMIT_ROW

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
    hit_scores, clusters, tracks, resolution, resolution_pt = [], [], [], [], []
    for index, model in enumerate(MODELS):
        if model == "classical":  # a hard 0/1 selection: one ROC working point
            scores = np.where(labels, rng.random(n) < 0.9, rng.random(n) < 0.1).astype(np.float64)
        else:
            scores = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + np.where(labels, 2.0, -2.0))))
        hit_scores.append(
            pl.DataFrame(
                {
                    "model": model,
                    "event_id": np.arange(n) // 10,
                    "hit_id": np.arange(n) % 10,
                    "score": scores,
                    "weight": np.clip(scores + rng.normal(0.0, 0.1, n), 0.0, 1.0),
                    "is_signal": labels,
                }
            )
        )
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
    hits = (
        pl.concat(hit_scores)
        .with_columns(pt_lo=20.0 + 10.0 * (pl.col("event_id") % 3), layer=pl.col("hit_id") % 4)
        .with_columns(pt_hi=pl.col("pt_lo") + 10.0)
    )
    track_table = pl.concat(tracks).with_columns(
        pt=pl.Series(rng.uniform(20.0, 50.0, n * len(MODELS))),
        fit_ok=pl.Series(rng.uniform(size=n * len(MODELS)) > 0.05),
        charge_misid=pl.Series(rng.uniform(size=n * len(MODELS)) < 0.02),
    )
    return {
        "hit_performance_pt": performance.hit_performance(hits, ["pt_lo", "pt_hi"]),
        "hit_performance_layer": performance.hit_performance(hits, ["layer"]),
        "track_performance_pt": performance.track_performance_by_pt(track_table),
        "hit_scores": pl.concat(hit_scores),
        "cluster_residuals": pl.concat(clusters),
        "core": GaussianFit(mu=0.0, sigma=0.1, mu_err=0.005, sigma_err=0.005, n_fit=190),
        "track_residuals": pl.concat(tracks),
        "resolution": pl.DataFrame(resolution),
        "resolution_pt": pl.DataFrame(resolution_pt),
    }


INPUTS = _tiny_inputs()
HIT_PANELS = (("hit_efficiency", "hit efficiency"), ("hit_purity", "hit purity"))

#: every figure the report draws: its file name in the report (analysis/report_folder.py) and how to draw it
FIGURES: dict[str, Callable[[Path], Path]] = {
    "roc_rejection.png": lambda path: figures.plot_rejection_vs_efficiency(INPUTS["hit_scores"], path),
    "score_histograms.png": lambda path: figures.plot_score_histograms(INPUTS["hit_scores"], path),
    "cluster_residuals.png": lambda path: figures.plot_cluster_residuals(
        INPUTS["cluster_residuals"], INPUTS["core"], path
    ),
    "q_over_pt_residuals.png": lambda path: figures.plot_q_over_pt_residuals(
        INPUTS["track_residuals"], INPUTS["resolution"], path
    ),
    "sigma68_vs_pt.png": lambda path: figures.plot_sigma68_vs_pt(INPUTS["resolution_pt"], path),
    "hit_efficiency_purity_vs_pt.png": lambda path: figures.plot_rates(
        INPUTS["hit_performance_pt"], "pt", HIT_PANELS, "$p_T^{true}$ [GeV]", "hits vs pT", path
    ),
    "hit_efficiency_purity_vs_layer.png": lambda path: figures.plot_rates(
        INPUTS["hit_performance_layer"], "layer", HIT_PANELS, "layer", "hits per layer", path
    ),
    "failed_fit_charge_misid_vs_pt.png": lambda path: figures.plot_rates(
        INPUTS["track_performance_pt"],
        "pt",
        (("failed_fit_rate", "failed fits"), ("charge_misid_rate", "charge misid.")),
        "$p_T^{true}$ [GeV]",
        "tracks vs pT",
        path,
    ),
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
        figures.plot_rejection_vs_efficiency(empty_scores, tmp_path / "roc.png"),
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


# ---------------------------------------------------------------------------------------------------------
# What each figure draws, against NumPy on the prediction tables (not the pixels)
# ---------------------------------------------------------------------------------------------------------

N_EVENTS, N_HITS, N_LAYERS = 300, 10, 8
#: models of the prediction tables below: baseline_paper shares baseline's scores (one classifier, two chains)
PREDICTED = ("truth", "truth_charge", "classical", "baseline_paper", "baseline", "e2e")


def _prediction_tables() -> tuple[dict[str, pl.LazyFrame], pl.LazyFrame, pl.LazyFrame, dict[str, dict]]:
    """Prediction tables (hits, clusters, tracks), the dataset's hits and events, and the raw arrays written per
    model, for NumPy references: a flat-topped truth row, narrow clean-cluster rows, a paper chain with wide tails,
    failed fits and NaN weights."""
    rng = np.random.default_rng(26)
    event_id = np.arange(N_EVENTS, dtype=np.int64)
    pt = rng.uniform(20.0, 50.0, N_EVENTS)
    q = rng.choice(np.array([-1, 1], np.int8), N_EVENTS)
    signal = rng.uniform(size=N_EVENTS * N_HITS) < 0.4
    hits = pl.DataFrame(
        {
            "event_id": np.repeat(event_id, N_HITS),
            "hit_id": np.tile(np.arange(N_HITS, dtype=np.int32), N_EVENTS),
            "layer": np.tile(np.arange(N_HITS, dtype=np.int16) % N_LAYERS, N_EVENTS),
            "is_signal": signal,
        }
    )
    events = pl.DataFrame({"event_id": event_id, "pt": pt.astype(np.float32), "q": q})
    network_score = 1.0 / (1.0 + np.exp(-(rng.normal(size=signal.size) + np.where(signal, 1.5, -1.5))))
    cluster_width = {"truth": None, "truth_charge": 0.005, "classical": 0.0052, "baseline_paper": 0.8}
    cluster_width |= {"baseline": 0.006, "e2e": 0.03}
    track_width = {"truth": 0.03, "truth_charge": 0.009, "classical": 0.0092, "baseline_paper": 2.0}
    track_width |= {"baseline": 0.0096, "e2e": 0.0095}
    raw: dict[str, dict] = {}
    hit_rows, cluster_rows, track_rows = [], [], []
    for model in PREDICTED:
        if model in ("truth", "truth_charge"):
            score = weight = signal.astype(np.float32)
        elif model == "classical":
            score = weight = (signal ^ (rng.uniform(size=signal.size) < 0.05)).astype(np.float32)
        else:
            score = network_score if model != "e2e" else network_score ** rng.uniform(0.8, 1.25, signal.size)
            score = score.astype(np.float32)
            weight = score if model == "baseline_paper" else rng.uniform(size=signal.size).astype(np.float32)
            if model == "e2e":
                weight[:7] = np.nan
        n_clusters = N_EVENTS * N_LAYERS
        x_true = rng.uniform(-100.0, 100.0, n_clusters).astype(np.float32)
        x_true[::50] = np.nan  # the muon outside the layer: no residual
        if cluster_width[model] is None:
            offset = rng.uniform(-0.2, 0.2, n_clusters)  # unweighted strips: flat-topped
        else:
            offset = rng.normal(0.0, cluster_width[model], n_clusters)
            offset[::9] += rng.normal(0.0, 0.3, offset[::9].size)  # tails
        x_reco = (x_true + offset).astype(np.float32)
        x_reco[3::97] = np.nan  # no cluster built
        relative = rng.normal(0.0, track_width[model], N_EVENTS)
        q_over_pt = (q / pt * (1.0 + relative)).astype(np.float32)
        status = ((rng.uniform(size=N_EVENTS) < 0.03) & (model not in ("truth", "truth_charge"))).astype(np.int8)
        raw[model] = {"score": score, "weight": weight, "x_true": x_true, "x_reco": x_reco}
        raw[model] |= {"q_over_pt": q_over_pt, "status": status}
        hit_rows.append(hits.select("event_id", "hit_id").with_columns(model=pl.lit(model), score=score, weight=weight))
        cluster_rows.append(
            pl.DataFrame(
                {
                    "event_id": np.repeat(event_id, N_LAYERS),
                    "layer": np.tile(np.arange(N_LAYERS, dtype=np.int16), N_EVENTS),
                    "model": model,
                    "x_reco": x_reco,
                    "sigma": np.float32(0.1),
                    "weight": np.float32(1.0),
                    "x_true": x_true,
                }
            )
        )
        track_rows.append(
            pl.DataFrame(
                {
                    "event_id": event_id,
                    "model": model,
                    "pt_pred": np.abs(1.0 / q_over_pt),
                    "q_pred": np.sign(q_over_pt).astype(np.int8),
                    "q_over_pt_pred": q_over_pt,
                    "radius": np.float32(1000.0),
                    "fit_status": status,
                }
            )
        )
    predictions = {
        "hits": pl.concat(hit_rows).lazy(),
        "clusters": pl.concat(cluster_rows).lazy(),
        "tracks": pl.concat(track_rows).lazy(),
    }
    raw["truth_table"] = {"signal": signal, "pt": pt.astype(np.float32).astype(np.float64), "q": q}
    return predictions, hits.lazy(), events.lazy(), raw


@pytest.fixture(scope="module")
def computed():
    """(report results of the prediction tables, raw arrays per model)."""
    from analysis.results import compute_results

    predictions, hits, events, raw = _prediction_tables()
    return compute_results(predictions, hits, events, n_boot=20), raw


def _sigma68(values: np.ndarray) -> float:
    return float(np.quantile(np.abs(values - np.median(values)), 0.68))


def _numpy_roc(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC points at every distinct value (selected: value >= threshold) and the Mann–Whitney AUC."""
    thresholds = np.unique(values)[::-1]
    signal_eff = np.r_[0.0, [(values[labels] >= t).mean() for t in thresholds]]
    background_eff = np.r_[0.0, [(values[~labels] >= t).mean() for t in thresholds]]
    above = (values[labels][:, None] > values[~labels][None, :]).mean()
    ties = (values[labels][:, None] == values[~labels][None, :]).mean()
    return signal_eff, background_eff, float(above + 0.5 * ties)


def test_roc_figure_draws_each_distinct_curve_once_with_its_auc(tmp_path, saves, computed):
    results, raw = computed
    signal = raw["truth_table"]["signal"]
    for column, groups in (
        ("score", [("classical",), ("baseline_paper", "baseline"), ("e2e",)]),
        ("weight", [("classical",), ("baseline_paper",), ("baseline",), ("e2e",)]),
    ):
        curves = figures.roc_curves(results.hit_scores, column)
        assert [curve.models for curve in curves] == groups
        for curve in curves:
            values = raw[curve.models[0]][column].astype(np.float64)
            finite = np.isfinite(values)
            signal_eff, background_eff, area = _numpy_roc(values[finite], signal[finite])
            np.testing.assert_allclose(curve.signal_eff, signal_eff, rtol=1e-12)
            np.testing.assert_allclose(curve.background_eff, background_eff, rtol=1e-12)
            np.testing.assert_allclose(curve.auc, area, rtol=1e-12)
    figures.plot_rejection_vs_efficiency(results.hit_scores, tmp_path / "roc.png")
    score_ax, weight_ax = saves[0][0].axes
    labels = [line.get_label() for line in score_ax.get_lines() if not line.get_label().startswith("_")]
    assert len(labels) == 3
    assert labels[1].startswith("baseline (BCE), paper reco = robust reco: AUC = ")
    weight_labels = [line.get_label() for line in weight_ax.get_lines() if not line.get_label().startswith("_")]
    e2e = next(label for label in weight_labels if label.startswith("end-to-end"))
    values = raw["e2e"]["weight"].astype(np.float64)
    assert e2e.endswith(f"AUC = {_numpy_roc(values[np.isfinite(values)], signal[np.isfinite(values)])[2]:.4f}")


def test_score_histograms_share_one_scale_and_draw_shared_scores_once(tmp_path, saves, computed):
    results, raw = computed
    signal = raw["truth_table"]["signal"]
    panels = figures.score_panels(results.hit_scores, bins=50)
    assert [panel.models for panel in panels] == [("classical",), ("baseline_paper", "baseline"), ("e2e",)]
    for panel in panels:
        scores = raw[panel.models[0]]["score"].astype(np.float64)
        edges = np.linspace(0.0, 1.0, 51)
        np.testing.assert_allclose(panel.edges, edges)
        np.testing.assert_allclose(panel.signal, np.histogram(scores[signal], edges, density=True)[0], rtol=1e-12)
        np.testing.assert_allclose(panel.background, np.histogram(scores[~signal], edges, density=True)[0], rtol=1e-12)
    figures.plot_score_histograms(results.hit_scores, tmp_path / "scores.png")
    axes = [ax for ax in saves[0][0].axes if ax.get_visible() and ax.axison]
    assert len(axes) == 3
    assert len({ax.get_ylim() for ax in axes}) == 1
    for ax, panel in zip(axes, panels, strict=True):
        drawn = [patch.get_data().values for patch in ax.patches]
        np.testing.assert_array_equal(drawn[0], panel.signal)
        np.testing.assert_array_equal(drawn[1], panel.background)


def _cluster_residuals(raw: dict, model: str) -> np.ndarray:
    x_true, x_reco = raw[model]["x_true"].astype(np.float64), raw[model]["x_reco"].astype(np.float64)
    residual = (x_reco - x_true)[np.isfinite(x_true)]
    return residual[np.isfinite(residual)]


def test_cluster_residual_figure_bins_the_narrow_rows_on_their_own_scale(tmp_path, saves, computed):
    results, raw = computed
    core = results.core_fit
    data = figures.cluster_residual_data(results.cluster_residuals, core)
    residuals = {model: _cluster_residuals(raw, model) for model in PREDICTED}
    widths = {model: _sigma68(values) for model, values in residuals.items()}
    wide_edges = np.linspace(core.mu - 8 * core.sigma, core.mu + 8 * core.sigma, 81)
    assert [h.models for h in data.wide] == [(model,) for model in PREDICTED]
    for histogram in data.wide:
        values = residuals[histogram.models[0]]
        counts = np.histogram(values, wide_edges)[0]
        np.testing.assert_allclose(histogram.density, counts / (values.size * np.diff(wide_edges)), rtol=1e-12)
        assert histogram.n_outside == values.size - counts.sum()
    # the zoom: rows within 3 × the narrowest σ68, bins of a fifth of it (a few µm, not the wide panel's 20 µm)
    narrowest = min(widths.values())
    zoomed = [model for model in PREDICTED if widths[model] <= 3 * narrowest]
    assert zoomed == ["truth_charge", "classical", "baseline"]
    zoom_edges = np.linspace(-8 * narrowest, 8 * narrowest, 81)
    assert [h.models[0] for h in data.zoom] == zoomed
    for histogram in data.zoom:
        values = residuals[histogram.models[0]]
        np.testing.assert_allclose(histogram.edges, zoom_edges, rtol=1e-12)
        expected = np.histogram(values, zoom_edges)[0] / (values.size * np.diff(zoom_edges))
        np.testing.assert_allclose(histogram.density, expected, rtol=1e-12)
        np.testing.assert_allclose(histogram.sigma68, widths[histogram.models[0]], rtol=1e-12)
    np.testing.assert_allclose(data.truth_sigma68, widths["truth"], rtol=1e-12)
    np.testing.assert_allclose(data.truth_median, np.median(residuals["truth"]), rtol=1e-12)
    # drawn as computed; the truth σ68 interval instead of a Gaussian that does not describe a flat top
    figures.plot_cluster_residuals(results.cluster_residuals, core, tmp_path / "clusters.png")
    wide_ax, zoom_ax = saves[0][0].axes
    assert [patch.get_data().values.tolist() for patch in wide_ax.patches[1:]] == [
        h.density.tolist() for h in data.wide
    ]
    assert [patch.get_data().values.tolist() for patch in zoom_ax.patches] == [h.density.tolist() for h in data.zoom]
    interval = sorted(line.get_xdata()[0] for line in wide_ax.get_lines())
    np.testing.assert_allclose(interval, data.truth_median + np.array([-1, 1]) * widths["truth"], rtol=1e-12)


def _track_residuals(raw: dict, model: str) -> tuple[np.ndarray, np.ndarray]:
    """(relative q/pT residual of the successful fits, their true pT)."""
    truth = raw["truth_table"]
    true = truth["q"].astype(np.float64) / truth["pt"]
    q_over_pt = raw[model]["q_over_pt"].astype(np.float64)
    ok = (raw[model]["status"] == 0) & np.isfinite(q_over_pt)
    return ((q_over_pt - true) / true)[ok], truth["pt"][ok]


def test_q_over_pt_figure_zooms_on_the_rows_near_the_limit(tmp_path, saves, computed):
    results, raw = computed
    residuals = {model: _track_residuals(raw, model)[0] for model in PREDICTED}
    half_range = 6 * np.median([_sigma68(values) for values in residuals.values()])
    edges = np.linspace(-half_range, half_range, 97)
    histograms = figures.q_over_pt_histograms(results.track_residuals)
    assert [h.models[0] for h in histograms] == list(PREDICTED)
    for histogram in histograms:
        values = residuals[histogram.models[0]]
        np.testing.assert_allclose(histogram.edges, edges, rtol=1e-12)
        counts = np.histogram(values, edges)[0]
        np.testing.assert_allclose(histogram.density, counts / (values.size * np.diff(edges)), rtol=1e-12)
    # the paper chain's tails no longer set the axis: most of its fits lie beyond it, few of the others'
    outside = {h.models[0]: h.n_outside / h.n_entries for h in histograms}
    assert outside["baseline_paper"] > 0.8
    assert outside["baseline"] < 0.01
    figures.plot_q_over_pt_residuals(results.track_residuals, results.resolution, tmp_path / "q.png")
    (ax,) = saves[0][0].axes
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.get_xlim(), (-half_range, half_range), rtol=1e-12)
    for patch, histogram in zip(ax.patches, histograms, strict=True):
        np.testing.assert_array_equal(patch.get_data().values, histogram.density)
        assert f"σ68 = {figures.format_value_error(*_resolution(results, histogram.models[0]))}" in patch.get_label()


def _resolution(results, model: str) -> tuple[float, float]:
    row = results.resolution.filter(pl.col("model") == model).row(0, named=True)
    return row["sigma68"], row["sigma68_err"]


def test_sigma68_vs_pt_points_against_numpy(tmp_path, saves, computed):
    results, raw = computed
    figures.plot_sigma68_vs_pt(results.resolution_pt, tmp_path / "pt.png")
    drawn = _errorbar_points(saves[0][0].axes[0])
    edges = np.array([20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0])
    for model in PREDICTED:
        residuals, pt = _track_residuals(raw, model)
        index = np.clip(np.searchsorted(edges, pt, side="right") - 1, 0, len(edges) - 2)
        expected = [_sigma68(residuals[index == b]) for b in range(len(edges) - 1)]
        colour = matplotlib.colors.to_hex(figures.model_style(model)["color"])
        np.testing.assert_allclose(drawn[colour][1], expected, rtol=1e-12)
