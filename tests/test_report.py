"""write_report on synthetic predictions with known resolutions (analysis/report.py, analysis/figures.py)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose

from analysis.report import RESOLUTION_COLUMNS, SUMMARY_KEYS, format_summary_table, write_report
from pipeline.errors import MuontrackError
from pipeline.schema import PRED_CLUSTERS_SCHEMA, PRED_HITS_SCHEMA, PRED_TRACKS_SCHEMA

N_EVENTS = 400
N_HITS = 24  # per event, half of them signal
N_LAYERS = 16
MODELS = ("truth", "truth_charge", "baseline", "e2e")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _synthetic_truth(rng: np.random.Generator) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    event_id = np.arange(N_EVENTS, dtype=np.int64)
    events = pl.DataFrame(
        {
            "event_id": event_id,
            "pt": rng.uniform(20.0, 50.0, N_EVENTS).astype(np.float32),
            "q": rng.choice(np.array([-1, 1], np.int8), N_EVENTS),
        }
    )
    hits = pl.DataFrame(
        {
            "event_id": np.repeat(event_id, N_HITS),
            "hit_id": np.tile(np.arange(N_HITS, dtype=np.int32), N_EVENTS),
            "is_signal": np.tile(np.arange(N_HITS) % 2 == 0, N_EVENTS),
        }
    )
    return hits.lazy(), events.lazy()


def _write_predictions(
    report_dir: Path,
    hits: pl.LazyFrame,
    events: pl.LazyFrame,
    resolution: dict[str, float],
    separation: dict[str, float],
    core_share: dict[str, float],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Predictions whose q/pT resolution, score separation and cluster core share are set per model.

    Returns the relative q/pT residual each model was given (NaN for failed fits), for independent checks.
    """
    rng = np.random.default_rng(seed)
    truth_hits = hits.collect()
    truth_events = events.collect()
    pt = truth_events["pt"].to_numpy()
    q = truth_events["q"].to_numpy()
    signal = truth_hits["is_signal"].to_numpy()
    hit_rows, cluster_rows, track_rows, residuals = [], [], [], {}
    for model in MODELS:
        # hit scores: the labels for truth models, otherwise a sigmoid of a shifted Gaussian
        if model in ("truth", "truth_charge"):
            score = signal.astype(np.float32)
        else:
            logit = rng.normal(size=signal.size) + np.where(signal, separation[model], -separation[model])
            score = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        hit_rows.append(
            pl.DataFrame({"event_id": truth_hits["event_id"], "hit_id": truth_hits["hit_id"]}).with_columns(
                model=pl.lit(model), score=pl.Series(score)
            )
        )
        # clusters: a Gaussian core of 0.1 mm plus wide outliers for the share not in the core
        n_clusters = N_EVENTS * N_LAYERS
        x_true = rng.uniform(-400, 400, n_clusters).astype(np.float32)
        outlier = rng.uniform(size=n_clusters) > core_share[model]
        offset = np.where(outlier, rng.choice([-1.0, 1.0], n_clusters) * rng.uniform(1.0, 5.0, n_clusters), 0.0)
        x_reco = (x_true + rng.normal(0.0, 0.1, n_clusters) + offset).astype(np.float32)
        cluster_rows.append(
            pl.DataFrame(
                {
                    "event_id": np.repeat(np.arange(N_EVENTS, dtype=np.int64), N_LAYERS),
                    "layer": np.tile(np.arange(N_LAYERS, dtype=np.int16), N_EVENTS),
                    "model": [model] * n_clusters,
                    "x_reco": x_reco,
                    "sigma": np.full(n_clusters, 0.1, np.float32),
                    "weight": np.ones(n_clusters, np.float32),
                    "x_true": x_true,
                }
            )
        )
        # tracks: relative q/pT smearing; 2 % failed fits for the trained models
        relative = rng.normal(0.0, resolution[model], N_EVENTS)
        q_over_pt = (q / pt * (1.0 + relative)).astype(np.float32)
        failed = (rng.uniform(size=N_EVENTS) < 0.02) if model in ("baseline", "e2e") else np.zeros(N_EVENTS, bool)
        q_over_pt[failed] = np.nan
        true = q.astype(np.float64) / pt.astype(np.float64)
        residuals[model] = np.where(failed, np.nan, (q_over_pt.astype(np.float64) - true) / true)
        track_rows.append(
            pl.DataFrame(
                {
                    "event_id": np.arange(N_EVENTS, dtype=np.int64),
                    "model": [model] * N_EVENTS,
                    "pt_pred": np.abs(1.0 / q_over_pt),
                    "q_pred": np.where(q_over_pt < 0, -1, 1).astype(np.int8),
                    "q_over_pt_pred": q_over_pt,
                    "radius": np.full(N_EVENTS, 1000.0, np.float32),
                    "fit_status": failed.astype(np.int8),
                }
            )
        )
    predictions = report_dir / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    for name, rows, schema in (
        ("hits", hit_rows, PRED_HITS_SCHEMA),
        ("clusters", cluster_rows, PRED_CLUSTERS_SCHEMA),
        ("tracks", track_rows, PRED_TRACKS_SCHEMA),
    ):
        pq.write_table(pl.concat(rows).to_arrow().select(schema.names).cast(schema), predictions / f"{name}.parquet")
    return residuals


GOOD_E2E = {
    "resolution": {"truth": 0.010, "truth_charge": 0.012, "baseline": 0.040, "e2e": 0.020},
    "separation": {"baseline": 0.6, "e2e": 1.2},
    "core_share": {"truth": 1.0, "truth_charge": 1.0, "baseline": 0.7, "e2e": 0.85},
}
# the same with baseline and e2e swapped
GOOD_BASELINE = {
    "resolution": {"truth": 0.010, "truth_charge": 0.012, "baseline": 0.020, "e2e": 0.040},
    "separation": {"baseline": 1.2, "e2e": 0.6},
    "core_share": {"truth": 1.0, "truth_charge": 1.0, "baseline": 0.85, "e2e": 0.7},
}
CONTEXT = {
    "dataset": "/data/muons-test",
    "n_events": N_EVENTS,
    "config": {"detector": {"n_layers": 16, "field_t": 1.0}, "muon": {"pt_min": 20.0, "pt_max": 50.0}},
    "runs": [
        {"model": "baseline", "preset": "test", "epochs": 2, "seed": 0, "training_seconds": 12.5},
        {"model": "e2e", "preset": "test", "epochs": 2, "seed": 0, "training_seconds": 13.1},
    ],
}


@pytest.fixture(scope="module")
def truth() -> tuple[pl.LazyFrame, pl.LazyFrame]:
    return _synthetic_truth(np.random.default_rng(123))


def _sentence(report: str, label: str) -> str:
    """The one comparison bullet about e2e vs baseline on ``label``."""
    lines = [
        line for line in report.splitlines() if line.startswith(f"- e2e {label} =") or f"baseline on {label}:" in line
    ]
    assert len(lines) == 1, lines
    return lines[0]


def test_write_report_files_and_contents(tmp_path, truth):
    hits, events = truth
    residuals = _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    summary = write_report(tmp_path, hits, events, CONTEXT)

    # summary.json: the documented keys for every model; classification metrics only for trained models
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert list(summary) == list(MODELS)
    for model, row in summary.items():
        assert tuple(row) == SUMMARY_KEYS
        if model.startswith("truth"):
            assert row["auc"] is None and row["rejection_at_90"] is None and row["rejection_at_95"] is None
        else:
            assert 0.5 < row["auc"] < 1.0 and row["rejection_at_90"] > 1.0 and row["rejection_at_95"] > 1.0
    # independent NumPy σ68 on the residuals we injected (failed fits excluded)
    for model in MODELS:
        good = residuals[model][np.isfinite(residuals[model])]
        expected = np.quantile(np.abs(good - np.median(good)), 0.68)
        assert_allclose(summary[model]["sigma68"], expected, rtol=1e-12)
        assert summary[model]["n_events"] == good.size
        assert 0 < summary[model]["sigma68_err"] < 0.2 * expected
    assert summary["e2e"]["auc"] > summary["baseline"]["auc"]
    # the injected core shares come back (truth Gaussian: ±2σ holds 95.45 %)
    assert_allclose(summary["truth"]["core_fraction"], 0.9545, atol=0.01)
    assert_allclose(summary["baseline"]["core_fraction"], 0.7 * 0.9545, atol=0.03)

    # resolution.csv: the documented columns, 6 pT bins per model
    with (tmp_path / "resolution.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == RESOLUTION_COLUMNS
    assert len(rows) == 6 * len(MODELS)
    assert {float(row["pt_lo"]) for row in rows} == {20.0, 25.0, 30.0, 35.0, 40.0, 45.0}
    assert sum(int(row["n"]) for row in rows if row["model"] == "e2e") == summary["e2e"]["n_events"]

    # report.md: context rendered, every figure linked and present as a PNG
    report = (tmp_path / "report.md").read_text()
    assert "/data/muons-test" in report and "training_seconds" in report and "13.1" in report
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", report)
    assert len(links) == 5
    for link in links:
        assert (tmp_path / link).read_bytes()[:8] == PNG_MAGIC
    assert "## Definitions" in report

    # the comparison says e2e is better, with a significance
    assert re.search(r"e2e σ68\(q/pT\) = .* e2e better by \d+\.\dσ", _sentence(report, "σ68(q/pT)"))
    assert "e2e better by" in _sentence(report, "hit AUC")

    # the compact table names every model with its σ68
    table = format_summary_table(summary)
    assert len(table.splitlines()) == 2 + len(MODELS)
    for model in MODELS:
        assert model in table


def test_comparison_flips_when_baseline_is_better(tmp_path, truth):
    hits, events = truth
    _write_predictions(tmp_path, hits, events, **GOOD_BASELINE)
    summary = write_report(tmp_path, hits, events, {})
    assert summary["e2e"]["sigma68"] > summary["baseline"]["sigma68"]
    report = (tmp_path / "report.md").read_text()
    for label in ("σ68(q/pT)", "hit AUC", "cluster core fraction"):
        sentence = _sentence(report, label)
        assert sentence.startswith(f"- e2e is NOT better than baseline on {label}"), sentence
        assert "baseline better by" in sentence


def test_comparison_is_not_a_claim_for_identical_models(tmp_path, truth):
    hits, events = truth
    _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    # replace e2e by a relabelled copy of the baseline: every metric is then exactly equal
    for name in ("hits", "clusters", "tracks"):
        path = tmp_path / "predictions" / f"{name}.parquet"
        table = pl.read_parquet(path)
        copy = table.filter(pl.col("model") == "baseline").with_columns(model=pl.lit("e2e"))
        pl.concat([table.filter(pl.col("model") != "e2e"), copy]).write_parquet(path)
    summary = write_report(tmp_path, hits, events, {})
    assert summary["e2e"] == summary["baseline"]
    report = (tmp_path / "report.md").read_text()
    for label in ("σ68(q/pT)", "hit AUC", "cluster core fraction"):
        sentence = _sentence(report, label)
        assert sentence.startswith(f"- e2e is NOT significantly better than baseline on {label}"), sentence
        assert "equal" in sentence


def test_truth_only_predictions(tmp_path, truth):
    hits, events = truth
    _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    for name in ("hits", "clusters", "tracks"):
        path = tmp_path / "predictions" / f"{name}.parquet"
        pl.read_parquet(path).filter(pl.col("model").str.starts_with("truth")).write_parquet(path)
    summary = write_report(tmp_path, hits, events, {"dataset": "x"})
    assert list(summary) == ["truth", "truth_charge"]
    assert all(row["auc"] is None for row in summary.values())
    report = (tmp_path / "report.md").read_text()
    assert "No 'baseline' predictions" in report
    assert (tmp_path / "figures" / "roc_rejection.png").read_bytes()[:8] == PNG_MAGIC


def test_missing_predictions_raise_and_write_nothing(tmp_path, truth):
    hits, events = truth
    (tmp_path / "report.md").write_text("previous report\n")
    with pytest.raises(MuontrackError, match="predictions"):
        write_report(tmp_path, hits, events, {})
    _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    (tmp_path / "predictions" / "tracks.parquet").unlink()
    with pytest.raises(MuontrackError, match=r"tracks\.parquet"):
        write_report(tmp_path, hits, events, {})
    assert (tmp_path / "report.md").read_text() == "previous report\n"
    assert not (tmp_path / "summary.json").exists()
    assert not (tmp_path / "figures").exists()


def test_malformed_predictions_raise(tmp_path, truth):
    hits, events = truth
    _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    broken = pl.read_parquet(tmp_path / "predictions" / "hits.parquet").drop("score")
    broken.write_parquet(tmp_path / "predictions" / "hits.parquet")
    with pytest.raises(MuontrackError, match="missing columns score"):
        write_report(tmp_path, hits, events, {})
