"""Event displays (#26 item 5): the fitted crossings ``x_fit`` of predictions/tracks.parquet against independent
recomputations, the drawn tracks against them, the report's choice of events and its "Event displays" section, and
``muontrack display`` on a tiny report (a figure written, nothing else; refusals in one line)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from analysis import display as display_module
from analysis.display import display_choices, draw, event_display
from analysis.report import write_report
from analysis.report_folder import EVENT_DISPLAY_NAME, FIGURES_DIR, PREDICTIONS_DIR, REPORT_NAME
from classical import predict_classical
from classical.gbl import fit_tracks
from model.inference import predict_truth
from pipeline.batches import split_expr
from pipeline.config import detector_material, point_resolution
from pipeline.dataset import open_dataset
from pipeline.schema import PRED_CLUSTERS_SCHEMA, PRED_HITS_SCHEMA, PRED_TRACKS_SCHEMA, fitted_crossings
from tests.helpers import assert_one_line_error, placeholder_figures, run_muontrack, snapshot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCHEMAS = {"hits": PRED_HITS_SCHEMA, "clusters": PRED_CLUSTERS_SCHEMA, "tracks": PRED_TRACKS_SCHEMA}


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return open_dataset(tiny_dataset)


@pytest.fixture(scope="module")
def tables(dataset) -> dict[str, pl.DataFrame]:
    """The truth references' and classical's prediction tables of the tiny dataset's test split, stacked."""
    parts = [predict_truth(dataset, split="test"), predict_classical(dataset, split="test")]
    return {name: pl.concat([part[name] for part in parts]) for name in SCHEMAS}


def _x_fit(tracks: pl.DataFrame) -> np.ndarray:
    return np.stack([np.asarray(row, np.float64) for row in tracks["x_fit"].to_list()])


def _per_layer(clusters: pl.DataFrame, column: str, n_layers: int) -> np.ndarray:
    return clusters.sort("event_id", "layer")[column].to_numpy().astype(np.float64).reshape(-1, n_layers)


def test_fitted_crossings_are_nan_exactly_where_the_fit_failed():
    x_fit = np.arange(12, dtype=np.float64).reshape(3, 4)
    x_fit[2, 1] = np.inf
    out = fitted_crossings(x_fit, np.array([0, 1, 0]), np.array([0.03, 0.02, 0.01]))
    assert out.dtype == np.float32
    assert_array_equal(out[0], x_fit[0])
    assert np.isnan(out[1]).all()
    assert_array_equal(np.isnan(out[2]), [False, True, False, False])
    # a finite status but no q/pT is a failed fit too
    assert np.isnan(fitted_crossings(x_fit[:1], np.array([0]), np.array([np.nan]))).all()


def test_truth_x_fit_is_the_kasa_circle_of_the_truth_clusters(dataset, tables):
    """``truth`` (the paper chain: weighted means, Kasa): x_fit against a float64 closed-form Kasa circle through
    the row's own clusters (weights W / σ², predictions/clusters.parquet), crossed with each layer plane."""
    layer_y = dataset.config.detector.layer_y().astype(np.float64)
    n_layers = layer_y.size
    tracks = tables["tracks"].filter(pl.col("model") == "truth").sort("event_id")
    clusters = tables["clusters"].filter(pl.col("model") == "truth")
    x_hat, sigma, weight = (_per_layer(clusters, c, n_layers) for c in ("x_reco", "sigma", "weight"))
    ok = tracks["fit_status"].to_numpy() == 0
    assert ok.sum() >= 20
    x_fit = _x_fit(tracks)
    assert np.isnan(x_fit[~ok]).all()
    for e in np.flatnonzero(ok):
        w = np.where(weight[e] >= 1e-6, weight[e] / sigma[e] ** 2, 0.0)
        x0, y0 = np.average(x_hat[e], weights=w), np.average(layer_y, weights=w)
        u, v = x_hat[e] - x0, layer_y - y0
        # minimise sum w (u^2 + v^2 + D u + E v + F)^2: linear least squares in (D, E, F)
        root = np.sqrt(w)
        design = np.stack([u, v, np.ones_like(u)], axis=1) * root[:, None]
        (d, e_, f), *_ = np.linalg.lstsq(design, -(u * u + v * v) * root, rcond=None)
        uc, vc = -d / 2, -e_ / 2
        radius2 = uc * uc + vc * vc - f
        expected = x0 + uc - np.sign(uc) * np.sqrt(radius2 - (layer_y - y0 - vc) ** 2)  # the branch near the points
        assert_allclose(x_fit[e], expected, atol=1e-3, rtol=0, err_msg=f"event {tracks['event_id'][int(e)]}")
    # the robust chain's rows pass through their clusters too (and are not the paper chain's)
    charge = tables["tracks"].filter(pl.col("model") == "truth_charge").sort("event_id")
    assert np.nanmax(np.abs(_x_fit(charge) - x_fit)) > 1e-3


def test_classical_x_fit_is_the_scattering_fit_of_its_kept_clusters(dataset, tables):
    """``classical``: x_fit against its documented final fit (classical.gbl.fit_tracks, float64 General
    Broken Lines, point error the detector's resolution) of the clusters it kept (weight 1), refitted here."""
    detector = dataset.config.detector
    layer_y = detector.layer_y().astype(np.float64)
    tracks = tables["tracks"].filter(pl.col("model") == "classical").sort("event_id")
    clusters = tables["clusters"].filter(pl.col("model") == "classical")
    x_hat, weight = (_per_layer(clusters, c, layer_y.size) for c in ("x_reco", "weight"))
    ok = tracks["fit_status"].to_numpy() == 0
    assert ok.sum() >= 20
    refit = fit_tracks(x_hat[ok], layer_y, weight[ok], point_resolution(detector), **detector_material(detector))
    x_fit = _x_fit(tracks)
    assert_allclose(x_fit[ok], refit.x_fit, atol=2e-4, rtol=0)
    assert_allclose(tracks["q_over_pt_pred"].to_numpy()[ok], refit.q_over_pt, rtol=1e-5)
    assert np.isnan(x_fit[~ok]).all()


def test_the_drawn_tracks_and_clusters_are_the_prediction_tables(dataset, tables):
    detector = dataset.config.detector
    predictions = {name: frame.lazy() for name, frame in tables.items()}
    event_id = int(tables["tracks"]["event_id"][3])
    shown = event_display(
        predictions,
        dataset.hits(),
        dataset.events(),
        event_id,
        detector.layer_y(),
        detector.pitch,
        (detector.x_min, detector.x_max),
    )
    assert [row.model for row in shown.rows] == ["truth", "truth_charge", "truth_share", "classical"]
    figure = draw(shown)
    full, road = figure.axes[:2]
    chord = shown.chord(shown.layer_y)
    x_true = dataset.events().filter(pl.col("event_id") == event_id).collect()["x_true"][0].to_numpy()
    assert_allclose(shown.x_true, x_true)
    for row in shown.rows:
        expected = np.asarray(
            tables["tracks"].filter((pl.col("model") == row.model) & (pl.col("event_id") == event_id))["x_fit"][0],
            np.float64,
        )
        (left,) = [line for line in full.get_lines() if line.get_gid() == f"track:{row.model}"]
        (right,) = [line for line in road.get_lines() if line.get_gid() == f"track:{row.model}"]
        assert_array_equal(left.get_xdata(), expected)
        assert_array_equal(left.get_ydata(), detector.layer_y())
        assert_allclose(right.get_xdata(), expected - chord, atol=1e-9)
        chosen = tables["clusters"].filter(
            (pl.col("model") == row.model) & (pl.col("event_id") == event_id) & (pl.col("weight") >= 0.5)
        )
        (markers,) = [line for line in road.get_lines() if line.get_gid() == f"clusters:{row.model}"]
        y = detector.layer_y()[chosen["layer"].to_numpy()]
        assert_allclose(markers.get_xdata(), chosen["x_reco"].to_numpy() - shown.chord(y), atol=1e-9)
        assert_allclose(markers.get_ydata(), y)


def _residuals(rows: list[tuple[str, int, float | None, bool | None]]) -> pl.DataFrame:
    """A track_residual_table of (model, event_id, residual, charge_misid) rows (residual None: a failed fit)."""
    frame = pl.DataFrame(rows, schema=["model", "event_id", "residual", "charge_misid"], orient="row")
    return frame.with_columns(fit_ok=pl.col("residual").is_not_null())


def test_the_report_shows_e2es_worst_fits_then_the_charge_misidentified_events():
    table = _residuals(
        [
            ("e2e", 1, 0.01, False),
            ("e2e", 2, -0.5, False),
            ("e2e", 3, 0.3, False),
            ("e2e", 4, None, None),
            ("e2e", 5, 0.02, True),
            ("baseline", 5, 0.9, True),
            ("baseline", 7, 0.01, True),
            ("baseline", 2, 0.01, True),
            ("baseline", 4, 2.0, False),  # the largest residual, but not e2e's
        ]
    )
    choices = display_choices(table)
    assert [event for event, _ in choices] == [2, 3, 5, 7]
    assert choices[0][1] == "e2e's worst fit no. 1: relative q/pT residual -0.5; charge misidentified by baseline"
    assert choices[2][1] == "charge misidentified by baseline, e2e"
    many = _residuals([("classical", k, 0.0, True) for k in range(20)])
    assert [event for event, _ in display_choices(many)] == list(range(display_module.MAX_DISPLAYS))
    assert display_choices(_residuals([("baseline", 1, 0.1, False)])) == []


@pytest.fixture(scope="module")
def tiny_report(tiny_dataset, tables, tmp_path_factory) -> tuple[Path, int]:
    """A report of the tiny dataset's truth references and classical, one classical fit's charge flipped (so the
    report displays that event); (report folder, the flipped event)."""
    from flows.commands import report_context

    report = tmp_path_factory.mktemp("display") / "report"
    (report / PREDICTIONS_DIR).mkdir(parents=True)
    tracks = tables["tracks"]
    flipped = int(tracks.filter((pl.col("model") == "classical") & (pl.col("fit_status") == 0))["event_id"][0])
    is_flipped = (pl.col("model") == "classical") & (pl.col("event_id") == flipped)
    tracks = tracks.with_columns(
        q_pred=pl.when(is_flipped).then(-pl.col("q_pred")).otherwise("q_pred"),
        q_over_pt_pred=pl.when(is_flipped).then(-pl.col("q_over_pt_pred")).otherwise("q_over_pt_pred"),
    )
    for name, frame in {**tables, "tracks": tracks}.items():
        pq.write_table(
            frame.to_arrow().select(SCHEMAS[name].names).cast(SCHEMAS[name]),
            report / PREDICTIONS_DIR / f"{name}.parquet",
        )
    dataset = open_dataset(tiny_dataset)
    with placeholder_figures():
        write_report(report, dataset.hits(), dataset.events(), report_context(tiny_dataset, []))
    return report, flipped


def test_the_report_links_a_display_of_the_charge_misidentified_event(tiny_report):
    report, flipped = tiny_report
    text = (report / REPORT_NAME).read_text()
    section = text.split("## Event displays", 1)[1].split("\n## ", 1)[0]
    name = EVENT_DISPLAY_NAME.format(event_id=flipped)
    assert f"- Event {flipped}: charge misidentified by classical" in section
    assert f"({FIGURES_DIR}/{name})" in section
    assert (report / FIGURES_DIR / name).is_file()
    assert len(list((report / FIGURES_DIR).glob("event_display_*.png"))) == 1


def test_display_writes_one_figure_and_nothing_else(tiny_report, tmp_path):
    report, flipped = tiny_report
    before = snapshot(report)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_muontrack("display", "--report", report, "--event", flipped, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in cwd.iterdir()) == [f"display-{flipped}.png"]
    assert (cwd / f"display-{flipped}.png").read_bytes().startswith(PNG_MAGIC)
    assert snapshot(report) == before


def test_display_refuses_an_event_outside_the_test_split_in_one_line(tiny_report, dataset, tmp_path):
    report, flipped = tiny_report
    before = snapshot(report)
    train_event = int(dataset.events().filter(split_expr("train")).select("event_id").collect()["event_id"][0])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for arguments, fragment in (
        (("--report", report, "--event", train_event), f"event {train_event} is not in the test split"),
        (("--report", report, "--event", -1), "event -1 is not in the test split"),
        (("--report", tmp_path / "missing", "--event", flipped), "does not exist"),
        (("--report", report, "--event", flipped, "--out", report / "d.png"), "inside the report"),
        (("--report", report, "--event", flipped, "--out", "d.txt"), ".png"),
    ):
        result = run_muontrack("display", *arguments, cwd=cwd)
        assert result.returncode == 1, result
        assert_one_line_error(result, fragment)
    assert list(cwd.iterdir()) == []
    assert snapshot(report) == before
