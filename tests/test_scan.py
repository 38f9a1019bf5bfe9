"""The regime scan (``muontrack scan``, flows.scan, analysis.scan_report): the scale arithmetic and the grid's
validation, the paired comparison, and a tiny scan on the `test` preset that is cached on a second run, resumes
after a deleted report and, extended, computes only its new points."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from analysis.catalog import SCALED_BACKGROUND_FIELDS, background_scale, regime_identity, scaled_background
from analysis.scan_report import COMPARISON_SCHEMA, SCAN_PAIRS, paired_failed_fit_rate, paired_sigma68, seeds_combined
from flows.scan import SCAN_MODELS, ScanGrid, ScanPoint, read_scan_config
from pipeline.config import DETECTORS, BackgroundConfig, DetectorConfig, SimConfig
from pipeline.errors import ConfigError
from tests.helpers import assert_one_line_error, placeholder_figures, run_muontrack, snapshot

#: the detectors of the tiny scan
SCAN_DETECTORS = ("default", "realistic")


# ---------------------------------------------------------------------------------------------------------
# The grid: scale arithmetic and validation
# ---------------------------------------------------------------------------------------------------------


def test_a_background_scale_multiplies_the_three_rates_and_nothing_else():
    base = BackgroundConfig(extra_track_spread=5.0)
    scaled = scaled_background(base, 2.5)
    assert scaled.extra_tracks_per_event == 5.0
    assert scaled.noise_strips_per_layer == 2.5
    assert scaled.noise_clusters_per_layer == 0.625
    # the other fields are the base's, the file's extra_track_spread included
    unscaled = {name: value for name, value in vars(scaled).items() if name not in SCALED_BACKGROUND_FIELDS}
    assert unscaled == {name: value for name, value in vars(base).items() if name not in SCALED_BACKGROUND_FIELDS}
    assert background_scale(scaled) == 2.5
    assert background_scale(BackgroundConfig()) == 1.0
    # not one common multiple of the defaults: no scale
    assert background_scale(replace(BackgroundConfig(), extra_tracks_per_event=4.0)) is None
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="background scale"):
            scaled_background(base, bad)


def test_a_point_is_the_preset_config_with_its_named_detector_and_scaled_background():
    base = SimConfig(shard_events=300)
    point = ScanPoint("realistic", 4.0).sim_config(base)
    assert point.detector == DETECTORS["realistic"]
    assert point.background == scaled_background(base.background, 4.0)
    assert (point.muon, point.shard_events) == (base.muon, base.shard_events)
    # the catalog reads the regime back from the dataset's config
    assert regime_identity({"simulation": point.to_dict()}) == {"detector": "realistic", "background_scale": 4.0}
    custom = replace(point, detector=DetectorConfig(pitch=0.4))
    assert regime_identity({"simulation": custom.to_dict()}) == {"detector": "custom", "background_scale": 4.0}
    assert regime_identity({"dataset": "/nonexistent"}) == {"detector": None, "background_scale": None}


def test_the_default_grid_and_a_file_grid():
    assert [(p.detector, p.background_scale) for p in ScanGrid().points()] == [
        (detector, scale) for detector in ("default", "realistic") for scale in (1.0, 2.0, 4.0, 8.0)
    ]


def _read_and_check(path: Path) -> None:
    """What `muontrack scan` checks of a config file before any work: the grid, and the model and train sections
    against the preset as `run` checks them."""
    from flows.commands import job_preset
    from flows.end_to_end import job_configs

    sections, _grid = read_scan_config(path)
    job_configs(job_preset("test", SCAN_MODELS), sections)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[scan]\ndetector = ['default']\n", "unknown config key scan.detector"),
        ("[scan]\ndetectors = []\n", "scan.detectors must not be empty"),
        ("[scan]\nbackground_scales = []\n", "scan.background_scales must not be empty"),
        ("[scan]\nbackground_scales = [1, 0]\n", "scan.background_scales must be > 0, got 0.0"),
        ("[scan]\nbackground_scales = [-2.0]\n", "scan.background_scales must be > 0, got -2.0"),
        ("[scan]\nbackground_scales = ['2']\n", "scan.background_scales[0] must be a number"),
        ("[scan]\nbackground_scales = [2, 2.0]\n", "scan.background_scales lists 2.0 twice"),
        ("[scan]\ndetectors = ['nope']\n", "unknown detector 'nope'"),
        ("[scans]\ndetectors = ['default']\n", "unknown config key scans"),
        ("[simulation]\ndetector = 'realistic'\n", "simulation.detector cannot be used by `muontrack scan`"),
        (
            "[simulation.background]\nnoise_strips_per_layer = 2.0\n",
            "simulation.background.noise_strips_per_layer cannot be used",
        ),
        ("[train]\nepohcs = 1\n", "unknown config key train.epohcs"),
    ],
)
def test_a_bad_grid_is_a_config_error_naming_the_key(tmp_path, text, fragment):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        _read_and_check(path)
    assert fragment in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_good_grid_file_is_read(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text('{"scan": {"background_scales": [0.5, 3]}, "train": {"epochs": 1}}')
    sections, grid = read_scan_config(path)
    assert sections == {"train": {"epochs": 1}}
    assert grid == ScanGrid(detectors=("default", "realistic"), background_scales=(0.5, 3.0))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[scan]\nbad_key = 1\n", "unknown config key scan.bad_key"),
        ("[scan]\ndetectors = []\n", "scan.detectors must not be empty"),
        ("[scan]\nbackground_scales = [1, -1]\n", "scan.background_scales must be > 0"),
    ],
)
def test_the_cli_refuses_a_bad_grid_in_one_line_before_any_work(tmp_path, text, fragment):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    out = tmp_path / "out"
    result = run_muontrack("scan", "--preset", "test", "--out", out, "--config", path)
    assert_one_line_error(result, fragment)
    assert result.returncode == 2
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# The paired comparison
# ---------------------------------------------------------------------------------------------------------


def _residuals(rows: dict[str, np.ndarray]) -> pl.DataFrame:
    """A track_residual_table of one residual per event and row (NaN: a failed fit)."""
    frames = [
        pl.DataFrame({"model": model, "event_id": np.arange(len(r)), "residual": r}).with_columns(
            pl.col("residual").fill_nan(None), fit_ok=pl.col("residual").is_not_nan()
        )
        for model, r in rows.items()
    ]
    return pl.concat(frames)


def test_the_paired_error_is_that_of_the_difference_on_the_same_events():
    rng = np.random.default_rng(5)
    reference = rng.normal(0.0, 0.01, 2000)
    # the candidate is the reference 3 % narrower, event by event: independent errors (about 2.3 % of σ68 each)
    # cannot tell them apart, the paired difference can
    candidate = 0.97 * reference
    result = paired_sigma68(_residuals({"e2e": candidate, "baseline": reference}), "e2e", "baseline")
    assert result.difference == pytest.approx(-0.03 * result.reference_value, rel=1e-9)
    independent = math.hypot(*(0.023 * value for value in (result.candidate_value, result.reference_value)))
    assert result.difference_err < independent / 5
    assert result.n_sigma > 5
    assert result.n_events == 2000
    # independent rows of the same width: no winner
    other = rng.normal(0.0, 0.01, 2000)
    unrelated = paired_sigma68(_residuals({"e2e": other, "baseline": reference}), "e2e", "baseline")
    assert abs(unrelated.n_sigma) < 3
    assert unrelated.difference_err > 5 * result.difference_err


def test_the_paired_failed_fit_rate_counts_the_events_one_row_failed():
    reference = np.full(400, 0.001)
    candidate = reference.copy()
    candidate[:20] = np.nan
    reference[390:] = np.nan
    result = paired_failed_fit_rate(_residuals({"e2e": candidate, "classical": reference}), "e2e", "classical")
    assert result.candidate_value == pytest.approx(20 / 400)
    assert result.reference_value == pytest.approx(10 / 400)
    assert result.difference == pytest.approx(10 / 400)
    assert result.n_sigma < 0


def test_the_seeds_combined_row_is_the_mean_difference_over_seeds():
    rows = [
        {
            "detector": "default",
            "background_scale": 2.0,
            "seed": seed,
            "candidate": "e2e",
            "reference": "baseline",
            "metric": "sigma68",
            "candidate_value": 0.010 + d,
            "reference_value": 0.010,
            "difference": d,
            "difference_err": 0.0001,
            "n_sigma": -d / 0.0001,
            "winner": None,
            "n_events": 100,
        }
        for seed, d in enumerate((-0.0002, -0.0004, -0.0003))
    ]
    combined = seeds_combined(pl.DataFrame(rows, schema=COMPARISON_SCHEMA)).row(0, named=True)
    assert combined["seed"] is None
    assert combined["difference"] == pytest.approx(-0.0003)
    assert combined["difference_err"] == pytest.approx(0.0001 / math.sqrt(3))
    assert combined["winner"] == "e2e"
    assert combined["n_events"] == 300


# ---------------------------------------------------------------------------------------------------------
# A tiny scan
# ---------------------------------------------------------------------------------------------------------


def _grid_file(folder: Path, scales: tuple[float, ...]) -> Path:
    path = folder / f"grid-{'-'.join(f'{s:g}' for s in scales)}.toml"
    detectors = ", ".join(f'"{name}"' for name in SCAN_DETECTORS)
    path.write_text(f"[scan]\ndetectors = [{detectors}]\nbackground_scales = [{', '.join(map(str, scales))}]\n")
    return path


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """A scan of SCAN_DETECTORS x background scale 1 on the `test` preset, in one Prefect test server kept for the
    module's scans."""
    pytest.importorskip("prefect")
    from prefect.testing.utilities import prefect_test_harness

    from flows.scan import run_scan

    folder = tmp_path_factory.mktemp("scan")
    out = folder / "out"
    with prefect_test_harness(server_startup_timeout=120):
        first = run_scan("test", out, config=_grid_file(folder, (1,)), echo=False)
        yield SimpleNamespace(folder=folder, out=out, first=first, run_scan=run_scan)


def _stages(record: dict) -> tuple[bool, list[str], bool]:
    """What a point computed: (simulated, trained models, predicted)."""
    return record["simulated"], record["trained"], record["predicted"]


def _by_point(result: dict) -> dict[tuple[str, float], dict]:
    return {(record["detector"], record["background_scale"]): record for record in result["points"]}


def _stored(out: Path) -> dict[str, object]:
    """Every file of the datasets and runs (mtime and content) and the inode of every report's predictions."""
    inodes = {
        str(path.relative_to(out)): path.stat().st_ino for path in sorted(out.glob("reports/*/predictions/*.parquet"))
    }
    return {"data": snapshot(out / "data"), "runs": snapshot(out / "runs"), "predictions": inodes}


@pytest.mark.slow
def test_a_tiny_scan_gives_one_catalog_and_a_scan_report(scanned):
    points = _by_point(scanned.first)
    assert set(points) == {(detector, 1.0) for detector in SCAN_DETECTORS}
    for record in points.values():
        assert _stages(record) == (True, list(SCAN_MODELS), True), record
    # the points' datasets differ (their detectors), and each report's catalog says which regime it is
    assert len({record["dataset"] for record in points.values()}) == len(SCAN_DETECTORS)
    catalog = pl.scan_parquet(str(scanned.out / "reports" / "*" / "summary.parquet")).collect()
    assert set(catalog.select("detector", "background_scale").unique().rows()) == set(points)
    for (detector, _scale), group in catalog.group_by("detector", "background_scale"):
        assert {"limit", "truth_charge", "classical", "baseline", "e2e"} <= set(group["model"].to_list()), detector
    # the scan report: every row of every point, the paired comparisons, a figure per metric
    scan = scanned.out / "scan"
    summary = pl.read_parquet(scan / "summary.parquet")
    assert summary.height == catalog.height
    assert summary.filter(pl.col("model") == "classical")["failed_fit_rate"].is_not_null().all()
    comparisons = pl.read_parquet(scan / "comparisons.parquet")
    assert comparisons.height == len(points) * len(SCAN_PAIRS) * 2
    for row in comparisons.iter_rows(named=True):
        expected = row["candidate"] if row["n_sigma"] >= 2 else row["reference"] if row["n_sigma"] <= -2 else None
        assert row["winner"] == expected, row
    text = (scan / "report.md").read_text()
    for detector in SCAN_DETECTORS:
        assert f"**{detector} × 1**" in text
    assert "e2e vs baseline, σ68(q/pT)" in text
    for metric in ("sigma68", "failed_fit_rate", "hit_efficiency", "hit_purity"):
        for suffix in ("png", "pdf"):
            assert (scan / "figures" / f"scan_{metric}.{suffix}").stat().st_size > 1000, metric


@pytest.mark.slow
def test_a_second_scan_redoes_nothing(scanned):
    before = _stored(scanned.out)
    with placeholder_figures():
        again = scanned.run_scan("test", scanned.out, config=_grid_file(scanned.folder, (1,)), echo=False)
    for record in again["points"]:
        assert _stages(record) == (False, [], False), record
    assert _stored(scanned.out) == before


@pytest.mark.slow
def test_an_interrupted_scan_resumes_and_an_extended_one_computes_only_its_new_points(scanned):
    out = scanned.out
    first = _by_point(scanned.first)
    # an interrupted scan: the report of one point is gone (its dataset and runs are there)
    lost = first[(SCAN_DETECTORS[-1], 1.0)]
    import shutil

    shutil.rmtree(lost["report"])
    kept = _stored(out)
    with placeholder_figures():
        extended = scanned.run_scan("test", out, config=_grid_file(scanned.folder, (1, 2)), echo=False)
    points = _by_point(extended)
    assert set(points) == {(detector, scale) for detector in SCAN_DETECTORS for scale in (1.0, 2.0)}
    for (detector, scale), record in points.items():
        if scale == 2.0:  # new: everything computed
            assert _stages(record) == (True, list(SCAN_MODELS), True), record
        elif detector == lost["detector"]:  # resumed: only its report
            assert _stages(record) == (False, [], True), record
        else:
            assert _stages(record) == (False, [], False), record
    # the old points' datasets and runs are untouched
    after = _stored(out)
    assert {k: v for k, v in after["data"].items() if k in kept["data"]} == kept["data"]
    assert {k: v for k, v in after["runs"].items() if k in kept["runs"]} == kept["runs"]
    catalog = pl.scan_parquet(str(out / "reports" / "*" / "summary.parquet")).collect()
    assert set(catalog.select("detector", "background_scale").unique().rows()) == set(points)
    summary = pl.read_parquet(out / "scan" / "summary.parquet")
    assert set(summary.select("detector", "background_scale").unique().rows()) == set(points)
