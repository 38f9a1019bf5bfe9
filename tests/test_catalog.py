"""The results catalog (analysis/catalog.py): REPORT/summary.parquet and REPORT/resolution.parquet, read across
reports in one Polars query, and `muontrack results`."""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from numpy.testing import assert_allclose

from analysis.catalog import find_summaries
from analysis.report import write_report
from analysis.report_folder import staged_report
from pipeline.errors import MuontrackError
from tests.helpers import assert_one_line_error, placeholder_figures, run_muontrack
from tests.test_report import (
    ENVIRONMENT,
    GOOD_E2E,
    _keep_models,
    _synthetic_truth,
    _write_predictions,
    catalog_context,
    publish_report,
)

#: the catalog's contract, written out here (not imported) so that a change of the schema fails this test
SUMMARY_COLUMNS = {
    "report": pl.String,
    "created": pl.Datetime("us", "UTC"),
    "dataset": pl.String,
    "dataset_config_hash": pl.String,
    "dataset_seed": pl.Int64,
    "dataset_events": pl.Int64,
    "detector": pl.String,
    "background_scale": pl.Float64,
    "code_version": pl.String,
    "model": pl.String,
    "preset": pl.String,
    "train_seed": pl.Int64,
    "epochs": pl.Int64,
    "run": pl.String,
    "run_code_version": pl.String,
    "auc": pl.Float64,
    "auc_err": pl.Float64,
    "rejection_at_90": pl.Float64,
    "rejection_at_90_err": pl.Float64,
    "rejection_at_95": pl.Float64,
    "rejection_at_95_err": pl.Float64,
    "core_fraction": pl.Float64,
    "core_fraction_err": pl.Float64,
    "sigma68": pl.Float64,
    "sigma68_err": pl.Float64,
    "n_events": pl.Int64,
    "sigma68_over_limit": pl.Float64,
    "sigma68_over_limit_err": pl.Float64,
    "bias": pl.Float64,
    "bias_err": pl.Float64,
    "n_charge_misid": pl.Int64,
    "charge_misid_rate": pl.Float64,
    "charge_misid_rate_lo": pl.Float64,
    "charge_misid_rate_hi": pl.Float64,
    "n_tail": pl.Int64,
    "tail_fraction": pl.Float64,
    "tail_fraction_lo": pl.Float64,
    "tail_fraction_hi": pl.Float64,
    "n_merged_clusters": pl.Int64,
    "cluster_sigma68_merged": pl.Float64,
    "cluster_sigma68_clean": pl.Float64,
    "share_bias_merged": pl.Float64,
    "share_sigma68_merged": pl.Float64,
    "jax_version": pl.String,
    "flax_version": pl.String,
    "numba_version": pl.String,
    "python_version": pl.String,
    "device": pl.String,
}
IDENTITY_COLUMNS = dict(list(SUMMARY_COLUMNS.items())[:15])
#: the tails, bias and charge columns, in both files
TAIL_COLUMNS = {
    name: dtype
    for name, dtype in SUMMARY_COLUMNS.items()
    if name in ("bias", "bias_err") or "tail" in name or "charge" in name
}
RESOLUTION_COLUMNS = IDENTITY_COLUMNS | {
    "pt_lo": pl.Float64,
    "pt_hi": pl.Float64,
    "n": pl.Int64,
    "sigma68": pl.Float64,
    "sigma68_err": pl.Float64,
    **TAIL_COLUMNS,
}
#: the models of report "a" (report order)
MODELS_A = ["truth", "truth_charge", "classical", "baseline_paper", "baseline", "e2e"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT with two published reports: reports/a (runs of seed 0) and reports/b (runs of seed 1, truth and e2e
    only, no dataset config hash: an all-null column)."""
    hits, events = _synthetic_truth(np.random.default_rng(5))
    out = tmp_path_factory.mktemp("catalog") / "muontrack-out"
    with placeholder_figures():  # the catalog does not read the figures
        publish_report(out / "reports" / "a", hits, events, catalog_context(0), models=MODELS_A)
        publish_report(
            out / "reports" / "b",
            hits,
            events,
            catalog_context(1, dataset_config_hash=None, runs=[catalog_context(1)["runs"][1]]),
            seed=1,
            models={"truth", "e2e"},
        )
    return out


def test_summary_parquet_has_the_catalog_columns_and_the_summary_rows(reports):
    folder = reports / "reports" / "a"
    catalog = pl.read_parquet(folder / "summary.parquet")
    assert dict(catalog.schema) == SUMMARY_COLUMNS
    summary = json.loads((folder / "summary.json").read_text())
    assert catalog["model"].to_list() == list(summary) == MODELS_A
    # the same numbers as summary.json, plus the errors it lacks
    for row in catalog.iter_rows(named=True):
        expected = summary[row["model"]]
        for key in ("auc", "rejection_at_90", "rejection_at_95", "core_fraction", "sigma68", "sigma68_err", "n_events"):
            assert row[key] == expected[key], (row["model"], key)
        for key in TAIL_COLUMNS:
            assert row[key] == expected[key], (row["model"], key)
        assert row["bias_err"] > 0
        assert row["charge_misid_rate_lo"] <= row["charge_misid_rate"] < row["charge_misid_rate_hi"]
        assert row["tail_fraction_lo"] <= row["tail_fraction"] < row["tail_fraction_hi"]
        if row["model"] in ("truth", "truth_charge"):
            assert row["auc"] is None
            assert row["auc_err"] is None
            assert row["rejection_at_90_err"] is None
        else:
            assert 0 < row["auc_err"] < 0.05
            assert row["rejection_at_90_err"] > 0
            assert row["rejection_at_95_err"] > 0
        assert 0 < row["core_fraction_err"] < 0.05
    # identity: the report folder, the dataset, and the run behind each model row (none for the references)
    first = catalog.row(0, named=True)
    assert first["report"] == str(folder)
    assert first["created"].tzinfo is not None
    assert abs((datetime.now(UTC) - first["created"]).total_seconds()) < 600
    dataset = (first["dataset"], first["dataset_config_hash"], first["dataset_seed"], first["dataset_events"])
    assert dataset == ("/data/muons-test", "0123abcd", 7, 400)
    assert first["code_version"] == "0.1.0+code"
    runs = dict(zip(catalog["model"], catalog["run"], strict=True))
    assert runs == {
        "truth": None,
        "truth_charge": None,
        "classical": None,
        "baseline_paper": "/runs/baseline-s0",  # the baseline network through the paper chain
        "baseline": "/runs/baseline-s0",
        "e2e": "/runs/e2e-s0",
    }
    e2e = catalog.filter(pl.col("model") == "e2e").row(0, named=True)
    assert (e2e["preset"], e2e["train_seed"], e2e["epochs"], e2e["run_code_version"]) == ("test", 0, 2, "0.1.0+train0")
    assert {key: e2e[key] for key in ENVIRONMENT} == ENVIRONMENT
    # resolution.parquet: the rows of resolution.csv, with the identity columns
    resolution = pl.read_parquet(folder / "resolution.parquet")
    assert dict(resolution.schema) == RESOLUTION_COLUMNS
    with (folder / "resolution.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert resolution.height == len(rows) == 6 * len(MODELS_A)
    assert resolution["model"].to_list() == [row["model"] for row in rows]
    assert resolution["n"].to_list() == [int(row["n"]) for row in rows]
    assert_allclose(resolution["sigma68"].to_numpy(), [float(row["sigma68"]) for row in rows], rtol=1e-12)
    for name, dtype in TAIL_COLUMNS.items():
        written = [(int if dtype == pl.Int64 else float)(row[name]) if row[name] else None for row in rows]
        assert resolution[name].to_list() == pytest.approx(written, rel=1e-12), name
    assert resolution.filter(pl.col("model") == "e2e")["run"].unique().to_list() == ["/runs/e2e-s0"]


@pytest.mark.usefixtures("placeholder_figures")
def test_the_environment_is_measured_when_the_context_lacks_it(tmp_path):
    hits, events = _synthetic_truth(np.random.default_rng(6))
    _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    _keep_models(tmp_path, {"truth", "e2e"})
    write_report(tmp_path, hits, events, {})
    catalog = pl.read_parquet(tmp_path / "summary.parquet")
    assert dict(catalog.schema) == SUMMARY_COLUMNS
    row = catalog.row(0, named=True)
    assert row["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert row["jax_version"]
    assert row["flax_version"]
    assert row["numba_version"]
    assert row["device"]
    assert row["dataset"] is None
    assert row["run"] is None


def test_two_reports_in_one_glob_query(reports):
    glob = str(reports / "reports" / "*" / "summary.parquet")
    # b has no dataset config hash at all: its column is null, still a String, and the files concatenate
    b = pl.read_parquet(reports / "reports" / "b" / "summary.parquet")
    assert b["dataset_config_hash"].null_count() == b.height
    assert b.schema["dataset_config_hash"] == pl.String
    per_report = (
        pl.scan_parquet(glob)
        .filter(pl.col("model") == "e2e")
        .select(pl.col("report").str.split("/").list.last(), "train_seed", "run", "dataset_config_hash", "sigma68")
        .sort("report")
        .collect()
    )
    assert per_report["report"].to_list() == ["a", "b"]
    assert per_report["train_seed"].to_list() == [0, 1]
    assert per_report["run"].to_list() == ["/runs/e2e-s0", "/runs/e2e-s1"]
    assert per_report["dataset_config_hash"].to_list() == ["0123abcd", None]
    assert per_report["sigma68"].null_count() == 0
    assert pl.scan_parquet(glob).select(pl.len()).collect().item() == len(MODELS_A) + 2
    resolution = pl.scan_parquet(str(reports / "reports" / "*" / "resolution.parquet"))
    assert resolution.group_by("report").len().collect().height == 2


@pytest.mark.usefixtures("placeholder_figures")
def test_a_report_being_written_is_not_in_the_glob(tmp_path):
    """A staged report lives one level down in a hidden folder: reports/*/summary.parquet cannot see it."""
    hits, events = _synthetic_truth(np.random.default_rng(7))
    root = tmp_path / "out"
    publish_report(root / "reports" / "a", hits, events, catalog_context(0), models={"truth", "e2e"})
    out = root / "reports" / "a"
    glob = str(root / "reports" / "*" / "summary.parquet")
    with staged_report(out) as staging:
        _write_predictions(staging, hits, events, **GOOD_E2E)
        _keep_models(staging, {"truth", "e2e"})
        write_report(staging, hits, events, catalog_context(1), published_as=out)
        assert (staging / "summary.parquet").is_file()
        assert pl.scan_parquet(glob).select("run").collect()["run"].drop_nulls().to_list() == ["/runs/e2e-s0"]
        assert find_summaries([root]) == [out / "summary.parquet"]
    assert pl.scan_parquet(glob).select("run").collect()["run"].drop_nulls().to_list() == ["/runs/e2e-s1"]


def test_results_json_lists_every_model_of_every_report(reports):
    result = run_muontrack("results", reports, "--json", cwd=reports)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(Path(row["report"]).name, row["model"]) for row in rows] == [
        *(("a", model) for model in MODELS_A),
        ("b", "truth"),
        ("b", "e2e"),
    ]
    assert set(rows[0]) == set(SUMMARY_COLUMNS)
    assert datetime.fromisoformat(rows[0]["created"]).tzinfo is not None
    # the default folder is the current one; the text table names the reports and models
    text = run_muontrack("results", cwd=reports / "reports")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert "model" in lines[0]
    assert "sigma68" in lines[0]
    assert len(lines) == 2 + len(MODELS_A) + 2  # header, rule, one line per row
    assert sum(line.split("|")[1].strip() == "b" for line in lines[2:]) == 2


def test_results_without_reports_is_a_one_line_error(tmp_path):
    for arguments, fragments in (((tmp_path,), ()), ((tmp_path / "missing",), ("missing: no such folder",)), ((), ())):
        assert_one_line_error(run_muontrack("results", *arguments, cwd=tmp_path), *fragments)
    with pytest.raises(MuontrackError, match=r"no summary\.parquet under"):
        find_summaries([tmp_path])


@pytest.mark.usefixtures("placeholder_figures")
def test_the_limit_row_and_the_ratio_in_the_catalog(tiny_dataset, tmp_path):
    """A report with the limit beside one without (synthetic truth) and one written before the ratio columns
    existed: one scan reads them all; the limit row comes first in its report, with its ratio 1."""
    import dataclasses

    from analysis.catalog import compact_table, read_catalog
    from pipeline.config import DetectorConfig
    from pipeline.dataset import open_dataset
    from pipeline.registry import LIMIT_ROW

    data = open_dataset(tiny_dataset)
    context = catalog_context(0) | {"detector": dataclasses.asdict(DetectorConfig())}
    with_limit = tmp_path / "reports" / "limit"
    with staged_report(with_limit) as staging:
        _write_predictions(staging, data.hits(), data.events().sort("event_id"), **GOOD_E2E)
        _keep_models(staging, {"truth", "e2e"})
        summary = write_report(staging, data.hits(), data.events(), context, published_as=with_limit)
    hits, events = _synthetic_truth(np.random.default_rng(8))
    publish_report(tmp_path / "reports" / "plain", hits, events, catalog_context(1), seed=1, models={"truth", "e2e"})
    old = tmp_path / "reports" / "old"
    publish_report(old, hits, events, catalog_context(2), seed=2, models={"truth", "e2e"})
    frame = pl.read_parquet(old / "summary.parquet").drop("sigma68_over_limit", "sigma68_over_limit_err", *TAIL_COLUMNS)
    frame.write_parquet(old / "summary.parquet")

    catalog = read_catalog([tmp_path / "reports"])
    per_report = {
        name: group.drop("report")
        for (name,), group in catalog.with_columns(pl.col("report").str.split("/").list.last()).group_by("report")
    }
    assert per_report["limit"]["model"].to_list() == [LIMIT_ROW, "truth", "e2e"]
    limit = per_report["limit"].row(0, named=True)
    assert (limit["sigma68"], limit["sigma68_err"], limit["run"]) == (summary[LIMIT_ROW]["sigma68"], None, None)
    assert all(limit[name] is None for name in TAIL_COLUMNS)  # the limit has no tracks
    e2e = per_report["limit"].filter(pl.col("model") == "e2e").row(0, named=True)
    assert_allclose(e2e["sigma68_over_limit"], e2e["sigma68"] / limit["sigma68"], rtol=1e-12)
    assert_allclose(e2e["sigma68_over_limit_err"], e2e["sigma68_err"] / limit["sigma68"], rtol=1e-12)
    for name in ("plain", "old"):
        assert per_report[name]["model"].to_list() == ["truth", "e2e"]
        assert per_report[name]["sigma68_over_limit"].null_count() == 2
    # a catalog file written before the tails, bias and charge columns reads with them null
    assert per_report["old"].select(list(TAIL_COLUMNS)).null_count().row(0) == (2,) * len(TAIL_COLUMNS)
    assert per_report["plain"]["n_charge_misid"].null_count() == 0
    limit_bins = pl.read_parquet(with_limit / "resolution.parquet").filter(pl.col("model") == LIMIT_ROW)
    assert limit_bins.select(list(TAIL_COLUMNS)).null_count().row(0) == (limit_bins.height,) * len(TAIL_COLUMNS)
    assert round(e2e["sigma68_over_limit"], 3) in compact_table(catalog)["sigma68_over_limit"].to_list()


@pytest.mark.parametrize("width", [80, 100, 140])
def test_results_fit_the_terminal(reports, width):
    """``muontrack results --width W`` (default: the terminal's): no line is wider, every row is there with its
    report, model and sigma68, and a last line names the columns left out; ``--width 0`` every column."""
    from analysis.catalog import NARROWING_ORDER, compact_table, format_catalog, read_catalog

    catalog = read_catalog([reports])
    full = format_catalog(catalog)
    assert max(len(line) for line in full.splitlines()) > 140  # wide enough for the test to mean something
    assert format_catalog(catalog, width=10_000) == full

    assert run_muontrack("results", reports, "--width", "0", cwd=reports).stdout.rstrip("\n") == full
    result = run_muontrack("results", reports, "--width", width, cwd=reports)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) <= width, result.stdout
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:2] == ["report", "model"]
    assert "sigma68" in header
    rows = [line for line in lines[2:] if line.startswith("|")]
    assert [row.split("|")[2].strip() for row in rows] == catalog["model"].to_list()
    note = " ".join(lines[2 + len(rows) :])
    assert note.startswith(f"(left out to fit {width} columns: ")
    left_out = [c for c in compact_table(catalog).columns if c not in header and c != "sigma68_over_limit"]
    assert left_out
    assert all(column in note for column in left_out)
    # the columns left out are the first ones of the documented order
    columns = [c for c in NARROWING_ORDER if c in compact_table(catalog).columns]
    assert set(left_out) == set(columns[: len(left_out)])
