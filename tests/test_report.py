"""write_report on synthetic predictions with known resolutions (analysis/report.py and the modules it calls:
results, comparisons, render, figures, report_folder)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose

import analysis.report as report_module
import analysis.report_folder as folder_module
from analysis import render
from analysis.comparisons import comparison_blocks
from analysis.figures import MODEL_STYLE, model_style
from analysis.metrics import TAIL_COLUMNS
from analysis.render import format_summary_table
from analysis.report import RESOLUTION_COLUMNS, write_report
from analysis.report_folder import recover_report_dir, staged_report
from analysis.results import SUMMARY_KEYS, compute_results
from pipeline.config import PT_PER_TESLA_METRE, DetectorConfig
from pipeline.dataset import Dataset
from pipeline.errors import MuontrackError
from pipeline.registry import LIMIT_ROW
from pipeline.schema import MODEL_NAMES, PRED_CLUSTERS_SCHEMA, PRED_HITS_SCHEMA, PRED_TRACKS_SCHEMA
from tests.helpers import snapshot

N_EVENTS = 400
N_HITS = 24  # per event, half of them signal
N_LAYERS = 16
MODELS = MODEL_NAMES  # every model the pipeline writes
TRUTH_MODELS = ("truth", "truth_charge", "truth_share")
#: networks whose final weights are their scores (the paper's plain weighted-mean chain)
PAPER_CHAIN = ("baseline_paper", "e2e_paper")
#: models whose score and weight are one hard 0/1 selection
HARD_SELECTIONS = ("classical", "assignment")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PREDICTION_FILES = ("hits", "clusters", "tracks")


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
    selection: dict[str, tuple[float, float]],
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Predictions whose q/pT resolution, hit scores and weights and cluster core share are set per model.

    Scores: the labels for the truth models; a sigmoid of a Gaussian shifted by ±``separation`` for the
    networks, whose weight is the score in the paper chain and a noisier, sharper function of it in the robust
    chain; for the hard selections a 0/1 choice taking a signal hit with probability ``selection[0]`` and a
    background hit with ``selection[1]``, as both score and weight.

    Returns the relative q/pT residual each model was given (NaN for failed fits) and each model's hit weights,
    for independent checks.
    """
    rng = np.random.default_rng(seed)
    truth_hits = hits.collect()
    truth_events = events.collect()
    n_events = truth_events.height
    event_id = truth_events["event_id"].to_numpy()
    pt = truth_events["pt"].to_numpy()
    q = truth_events["q"].to_numpy()
    signal = truth_hits["is_signal"].to_numpy()
    hit_rows, cluster_rows, track_rows, residuals, weights = [], [], [], {}, {}
    for model in MODELS:
        if model in TRUTH_MODELS:
            score = weight = signal.astype(np.float32)
        elif model in HARD_SELECTIONS:
            signal_eff, background_eff = selection[model]
            chosen = rng.uniform(size=signal.size) < np.where(signal, signal_eff, background_eff)
            score = weight = chosen.astype(np.float32)
        else:
            logit = rng.normal(size=signal.size) + np.where(signal, separation[model], -separation[model])
            score = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
            refined = 1.0 / (1.0 + np.exp(-3.0 * (logit + rng.normal(size=signal.size))))
            weight = score if model in PAPER_CHAIN else refined.astype(np.float32)
        weights[model] = weight
        hit_rows.append(
            pl.DataFrame({"event_id": truth_hits["event_id"], "hit_id": truth_hits["hit_id"]}).with_columns(
                model=pl.lit(model), score=pl.Series(score), weight=pl.Series(weight)
            )
        )
        # clusters: a Gaussian core of 0.1 mm plus wide outliers for the share not in the core
        n_clusters = n_events * N_LAYERS
        x_true = rng.uniform(-400, 400, n_clusters).astype(np.float32)
        outlier = rng.uniform(size=n_clusters) > core_share[model]
        offset = np.where(outlier, rng.choice([-1.0, 1.0], n_clusters) * rng.uniform(1.0, 5.0, n_clusters), 0.0)
        x_reco = (x_true + rng.normal(0.0, 0.1, n_clusters) + offset).astype(np.float32)
        cluster_rows.append(
            pl.DataFrame(
                {
                    "event_id": np.repeat(event_id, N_LAYERS),
                    "layer": np.tile(np.arange(N_LAYERS, dtype=np.int16), n_events),
                    "model": [model] * n_clusters,
                    "x_reco": x_reco,
                    "sigma": np.full(n_clusters, 0.1, np.float32),
                    "weight": np.ones(n_clusters, np.float32),
                    "x_true": x_true,
                }
            )
        )
        # tracks: relative q/pT smearing; 2 % failed fits for the non-truth models
        relative = rng.normal(0.0, resolution[model], n_events)
        q_over_pt = (q / pt * (1.0 + relative)).astype(np.float32)
        failed = (rng.uniform(size=n_events) < 0.02) if model not in TRUTH_MODELS else np.zeros(n_events, bool)
        q_over_pt[failed] = np.nan
        true = q.astype(np.float64) / pt.astype(np.float64)
        residuals[model] = np.where(failed, np.nan, (q_over_pt.astype(np.float64) - true) / true)
        track_rows.append(
            pl.DataFrame(
                {
                    "event_id": event_id,
                    "model": [model] * n_events,
                    "pt_pred": np.abs(1.0 / q_over_pt),
                    "q_pred": np.where(q_over_pt < 0, -1, 1).astype(np.int8),
                    "q_over_pt_pred": q_over_pt,
                    "radius": np.full(n_events, 1000.0, np.float32),
                    "fit_status": failed.astype(np.int8),
                    "x_fit": pl.Series(np.full((n_events, N_LAYERS), np.nan, np.float32)).cast(pl.List(pl.Float32)),
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
    return residuals, weights


def _keep_models(report_dir: Path, models: set[str]) -> None:
    """Rewrite the prediction files with the rows of ``models`` only."""
    for name in ("hits", "clusters", "tracks"):
        path = report_dir / "predictions" / f"{name}.parquet"
        pl.read_parquet(path).filter(pl.col("model").is_in(sorted(models))).write_parquet(path)


GOOD_E2E = {
    "resolution": {
        "truth": 0.010,
        "truth_charge": 0.012,
        "truth_share": 0.011,
        "classical": 0.030,
        "baseline_paper": 0.045,
        "e2e_paper": 0.025,
        "baseline": 0.040,
        "e2e": 0.020,
        "assignment": 0.050,
        "share_baseline": 0.035,
        "share_e2e": 0.018,
    },
    "separation": {
        "baseline_paper": 0.6,
        "e2e_paper": 1.0,
        "baseline": 0.6,
        "e2e": 1.2,
        "share_baseline": 0.7,
        "share_e2e": 1.1,
    },
    "core_share": {
        "truth": 1.0,
        "truth_charge": 1.0,
        "truth_share": 1.0,
        "classical": 0.75,
        "baseline_paper": 0.65,
        "e2e_paper": 0.8,
        "baseline": 0.7,
        "e2e": 0.85,
        "assignment": 0.7,
        "share_baseline": 0.75,
        "share_e2e": 0.9,
    },
    "selection": {"classical": (0.9, 0.1), "assignment": (0.85, 0.15)},
}


def _swapped(parameters: dict, pairs: tuple[tuple[str, str], ...]) -> dict:
    """``parameters`` with the settings of each pair of models exchanged."""
    swap = {a: b for pair in pairs for a, b in (pair, pair[::-1])}
    return {key: {swap.get(model, model): value for model, value in table.items()} for key, table in parameters.items()}


# the same with baseline and e2e (and their paper-chain twins) swapped
GOOD_BASELINE = _swapped(GOOD_E2E, (("baseline", "e2e"), ("baseline_paper", "e2e_paper")))
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


def _comparison_lines(report: str) -> list[str]:
    """The bullets of the report's Comparison section, without their list markers."""
    section = report.split("## Comparison", 1)[1].split("\n## ", 1)[0]
    return [line.strip().removeprefix("- ") for line in section.splitlines() if line.strip().startswith("- ")]


def _computed_comparisons(report_dir: Path, hits: pl.LazyFrame, events: pl.LazyFrame) -> list[tuple[str, list[str]]]:
    """comparison_blocks of the predictions in ``report_dir``: the tables without the figures (the slow part of
    write_report), with few bootstrap replicas."""
    predictions = {name: pl.scan_parquet(report_dir / "predictions" / f"{name}.parquet") for name in _PREDICTION_FILES}
    return comparison_blocks(compute_results(predictions, hits, events, n_boot=10))


def _sentence(comparisons: list[str], label: str, candidate: str = "e2e", reference: str = "baseline") -> str:
    """The one comparison sentence about ``candidate`` vs ``reference`` on ``label``."""
    lines = [
        line
        for line in comparisons
        if (line.startswith(f"{candidate} {label} = ") and f" vs {reference} " in line)
        or line.startswith(f"{candidate} is NOT better than {reference} on {label}:")
        or line.startswith(f"{candidate} is NOT significantly better than {reference} on {label}:")
    ]
    assert len(lines) == 1, lines
    return lines[0]


def _compared_pairs(report: str) -> set[tuple[str, str]]:
    """(candidate, reference) of every comparison block of the report."""
    return set(re.findall(r"^- \*\*(\w+) vs (\w+)\*\*:", report, flags=re.MULTILINE))


def _mann_whitney_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC as the Mann–Whitney statistic: (rank sum of the signal − n_s (n_s + 1) / 2) / (n_s n_b), tied scores
    given their average rank (scipy.stats.rankdata), which counts a tie as half a win."""
    from scipy.stats import rankdata

    labels = np.asarray(labels, bool)
    ranks = rankdata(np.asarray(scores, np.float64))
    n_signal = int(labels.sum())
    n_background = labels.size - n_signal
    return float((ranks[labels].sum() - n_signal * (n_signal + 1) / 2) / (n_signal * n_background))


_VALUE_ERROR = re.compile(r"(-?\d+(?:\.(\d+))?) ± (\d+(?:\.(\d+))?)")


def _quotes(text: str, value: float, err: float) -> bool:
    """Whether ``text`` quotes ``value ± err`` as docs/contracts.md says numbers are written: ``v ± e``, both
    rounded to the error's second significant digit (parsed back, not formatted here with the report's code)."""
    for match in _VALUE_ERROR.finditer(text):
        decimals = len(match.group(2) or "")
        if decimals != len(match.group(4) or ""):
            continue
        unit = 10.0**-decimals
        shown_value, shown_err = float(match.group(1)), float(match.group(3))
        close = abs(shown_value - value) <= 0.5 * unit * (1 + 1e-9) and abs(shown_err - err) <= 0.5 * unit * (1 + 1e-9)
        if close and 10 <= round(shown_err / unit) <= 100:
            return True
    return False


def test_write_report_files_and_contents(tmp_path, truth):
    hits, events = truth
    residuals, weights = _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    summary = write_report(tmp_path, hits, events, CONTEXT)

    # summary.json: the documented keys for every model; classification metrics only for the non-truth models
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert list(summary) == list(MODELS)
    for model, row in summary.items():
        assert tuple(row) == SUMMARY_KEYS
        if model in TRUTH_MODELS:
            assert all(row[key] is None for key in SUMMARY_KEYS if key.startswith(("auc", "rejection", "hit_")))
        else:
            assert 0.5 < row["auc"] < 1.0
            assert row["rejection_at_90"] > 1.0
            assert row["rejection_at_95"] > 1.0
    # independent NumPy σ68 on the residuals we injected (failed fits excluded)
    for model in MODELS:
        good = residuals[model][np.isfinite(residuals[model])]
        expected = np.quantile(np.abs(good - np.median(good)), 0.68)
        assert_allclose(summary[model]["sigma68"], expected, rtol=1e-12)
        assert summary[model]["n_events"] == good.size
        assert 0 < summary[model]["sigma68_err"] < 0.2 * expected
    assert summary["e2e"]["auc"] > summary["baseline"]["auc"]
    # the final-weight metrics against NumPy on the injected weights
    signal = hits.collect()["is_signal"].to_numpy()
    for model in (name for name in MODELS if name not in TRUTH_MODELS):
        row, selected = summary[model], weights[model] >= 0.5
        assert_allclose(row["auc_weight"], _mann_whitney_auc(weights[model], signal), rtol=1e-9)
        assert 0 < row["auc_weight_err"] < 0.01
        assert_allclose(row["hit_efficiency"], np.count_nonzero(selected & signal) / np.count_nonzero(signal))
        assert_allclose(row["hit_purity"], np.count_nonzero(selected & signal) / np.count_nonzero(selected))
        n_selected = np.count_nonzero(selected)
        assert_allclose(row["hit_purity_err"], np.sqrt(row["hit_purity"] * (1 - row["hit_purity"]) / n_selected))
        if model in (*PAPER_CHAIN, *HARD_SELECTIONS):
            assert row["auc_weight"] == row["auc"]  # the weight is the score
        else:
            assert abs(row["auc_weight"] - row["auc"]) > 0.01
    assert_allclose(summary["classical"]["hit_efficiency"], 0.9, atol=0.01)
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
    assert "/data/muons-test" in report
    assert "training_seconds" in report
    # the three code versions are told apart, right under the context that shows them
    what_was_run = report[report.index("## What was run") : report.index("Events evaluated per model")]
    assert render.CODE_VERSIONS_NOTE in what_was_run
    assert "training code" in render.CODE_VERSIONS_NOTE
    assert "simulation code" in render.CODE_VERSIONS_NOTE
    assert "13.1" in report
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", report)
    # every figure but the per-layer hit performance: these dataset hits have no layer
    assert sorted(Path(link).name for link in links) == sorted(
        name for key, name in folder_module.FIGURE_NAMES.items() if key != "hit_performance_layer"
    )
    assert "(Hit efficiency and purity per layer: not drawn)" in report
    for link in links:
        assert (tmp_path / link).read_bytes()[:8] == PNG_MAGIC
    assert "## Definitions" in report

    assert "`auc` is the raw score's AUC and `auc_weight` the final weights'" in report
    # no detector in the context (and no truth track columns): no limit row, and the report says why
    assert LIMIT_ROW not in summary
    assert all(row["sigma68_over_limit"] is None for row in summary.values())
    assert "No `limit` row and no σ68 / limit: no detector config was given" in report

    # the comparison says e2e is better, with a significance
    comparisons = _comparison_lines(report)
    assert re.search(r"e2e σ68\(q/pT\) = .* e2e better by \d+\.\dσ", _sentence(comparisons, "σ68(q/pT)"))
    assert "e2e better by" in _sentence(comparisons, "hit AUC (raw score)")
    # every pair is compared, e2e vs classical on the final weights' AUC
    assert _compared_pairs(report) == {
        ("e2e", "baseline"),
        ("e2e", "classical"),
        ("e2e_paper", "baseline_paper"),
        ("e2e", "truth_charge"),
        *SHARE_PAIRS,
    }
    # ... and on the final weights' AUC: the numbers quoted are auc_weight's, not the raw score's
    versus_classical = _sentence(comparisons, "hit AUC (final weights)", reference="classical")
    e2e_weights, classical = summary["e2e"], summary["classical"]
    quoted_e2e, quoted_classical = versus_classical.split(" vs classical ", 1)
    assert _quotes(quoted_e2e, e2e_weights["auc_weight"], e2e_weights["auc_weight_err"]), versus_classical
    # (auc_weight is more than 0.01 from e2e's raw AUC, above: quoting it to 2 digits of its error is not the raw's)
    assert _quotes(quoted_classical, classical["auc_weight"], classical["auc_weight_err"]), versus_classical
    assert "e2e better by" in _sentence(comparisons, "σ68(q/pT)", reference="classical")
    assert "e2e_paper better by" in _sentence(comparisons, "cluster core fraction", "e2e_paper", "baseline_paper")
    # the paper's core-fraction gain is quoted for both network pairs, not against the classical tracker
    gains = [line for line in _comparison_lines(report) if line.startswith("Relative change of the core fraction")]
    assert [line.split(":")[0].split(", ")[1] for line in gains] == [
        "e2e vs baseline",
        "e2e_paper vs baseline_paper",
        "share_e2e vs share_baseline",
    ]
    assert all("+12.7 %" in line for line in gains)
    # e2e's σ68 as a multiple of the charge-centroid limit: the ratio and its error propagated by hand (independent
    # errors: (δr / r)² = (δa / a)² + (δb / b)²)
    (a, da), (b, db) = ((summary[m]["sigma68"], summary[m]["sigma68_err"]) for m in ("e2e", "truth_charge"))
    ratio = a / b
    ratio_err = ratio * math.sqrt((da / a) ** 2 + (db / b) ** 2)
    (ratio_line,) = [line for line in report.splitlines() if "σ68(q/pT) of e2e / truth_charge = " in line]
    assert _quotes(ratio_line.split(" = ", 1)[1], ratio, ratio_err), ratio_line
    assert_allclose(ratio, 0.020 / 0.012, rtol=0.15)
    assert "Not compared" not in report

    # the σ68-in-pT-bins table has a column for every model, truth references included
    pt_table = report.split("### σ68 in bins of true pT", 1)[1].strip().splitlines()[0]
    assert pt_table == "| true pT [GeV] | " + " | ".join(MODELS) + " |"

    # the compact table names every model with its σ68, and fits in 120 characters
    table = format_summary_table(summary)
    assert len(table.splitlines()) == 4 + len(MODELS)  # header, rule, models, two lines of footnote
    for model in MODELS:
        assert model in table
    assert max(map(len, table.splitlines()[:-2])) <= 120


def _flip_charges(report_dir: Path, model: str, event_ids: np.ndarray) -> None:
    """Rewrite ``model``'s tracks of ``event_ids`` with the opposite charge (q_pred and the sign of q/pT)."""
    path = report_dir / "predictions" / "tracks.parquet"
    chosen = (pl.col("model") == model) & pl.col("event_id").is_in(event_ids.tolist())
    tracks = pl.read_parquet(path).with_columns(
        pl.when(chosen).then(-pl.col("q_pred")).otherwise(pl.col("q_pred")).alias("q_pred"),
        pl.when(chosen).then(-pl.col("q_over_pt_pred")).otherwise(pl.col("q_over_pt_pred")).alias("q_over_pt_pred"),
    )
    pq.write_table(tracks.to_arrow().select(PRED_TRACKS_SCHEMA.names).cast(PRED_TRACKS_SCHEMA), path)


def _tail_figures(tracks: pl.DataFrame, events: pl.DataFrame) -> dict[str, dict[str, float | int]]:
    """Per model, NumPy on the tracks as written: successful fits, wrong charges, median and 5 σ68 tails."""
    truth = events.select("event_id", "pt", "q")
    figures = {}
    for (model,), group in tracks.join(truth, on="event_id").partition_by("model", as_dict=True).items():
        q_over_pt = group["q_over_pt_pred"].to_numpy().astype(np.float64)
        ok = (group["fit_status"].to_numpy() == 0) & np.isfinite(q_over_pt)
        true = group["q"].to_numpy() / group["pt"].to_numpy().astype(np.float64)
        r = ((q_over_pt - true) / true)[ok]
        median = np.median(r)
        width = np.quantile(np.abs(r - median), 0.68)
        figures[model] = {
            "n": r.size,
            "bias": median,
            "n_charge_misid": int(np.count_nonzero(group["q_pred"].to_numpy()[ok] != group["q"].to_numpy()[ok])),
            "n_tail": int(np.count_nonzero(np.abs(r - median) > 5 * width)),
        }
    return figures


@pytest.mark.usefixtures("placeholder_figures")
def test_tails_bias_and_charge_in_the_summary_report_and_files(tmp_path, truth):
    """Charge flips planted in baseline's tracks: summary.json, report.md, resolution.csv and the catalog carry the
    wrong-charge counts, rates, bias and tails of a NumPy recomputation from the tracks as written."""
    from scipy.stats import beta, norm

    hits, events = truth
    _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    flipped = np.arange(5, 400, 40)  # 10 events
    _flip_charges(tmp_path, "baseline", flipped)
    summary = write_report(tmp_path, hits, events, CONTEXT)
    tracks = pl.read_parquet(tmp_path / "predictions" / "tracks.parquet")
    expected = _tail_figures(tracks, events.collect())
    alpha = 1.0 - (norm.cdf(1.0) - norm.cdf(-1.0))
    for model in MODELS:
        row, figures = summary[model], expected[model]
        assert row["n_events"] == figures["n"]
        assert_allclose(row["bias"], figures["bias"], rtol=1e-12)
        assert 0 < row["bias_err"] < row["sigma68"]
        for name, count in (("charge_misid_rate", "n_charge_misid"), ("tail_fraction", "n_tail")):
            k, n = figures[count], figures["n"]
            assert row[count] == k, (model, count)
            assert_allclose(row[name], k / n, rtol=1e-12)
            lower = beta.ppf(alpha / 2, k, n - k + 1) if k else 0.0
            assert_allclose((row[f"{name}_lo"], row[f"{name}_hi"]), (lower, beta.ppf(1 - alpha / 2, k + 1, n - k)))
    # the planted flips (r ≈ −2, far beyond 5 σ68) are baseline's only wrong charges, all in its tail
    flipped_ok = tracks.filter(
        (pl.col("model") == "baseline") & pl.col("event_id").is_in(flipped.tolist()) & (pl.col("fit_status") == 0)
    ).height
    assert summary["baseline"]["n_charge_misid"] == flipped_ok > 0
    assert summary["baseline"]["n_tail"] >= flipped_ok
    assert summary["e2e"]["n_charge_misid"] == 0

    # the console table: the counts on the model's line
    table = format_summary_table(summary).splitlines()
    header = table[0].split()
    baseline = next(line for line in table if line.split()[0] == "baseline").split()
    assert baseline[header.index("q-mis")] == str(flipped_ok)
    assert baseline[header.index("tails")] == str(summary["baseline"]["n_tail"])
    # report.md: the section and baseline's row
    report = (tmp_path / "report.md").read_text()
    section = report.split("## Tails, bias and charge", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in section.splitlines() if line.startswith("| baseline | "))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    row = summary["baseline"]
    assert [cells[1], cells[3]] == [str(row["n_events"]), str(flipped_ok)]
    assert _quotes(cells[2], row["bias"], row["bias_err"]), cells[2]
    assert cells[2].count("±") == 1
    assert cells[4].startswith(f"{100 * row['charge_misid_rate']:.3g} % (")
    assert "No pulls: the predictions carry no q/pT error." in section
    # resolution.csv: per bin, the counts add up to the row's
    with (tmp_path / "resolution.csv").open() as handle:
        rows = [line for line in csv.DictReader(handle) if line["model"] == "baseline"]
    assert tuple(rows[0]) == RESOLUTION_COLUMNS
    assert sum(int(line["n_charge_misid"]) for line in rows) == flipped_ok
    for line in rows:
        k, n = int(line["n_charge_misid"]), int(line["n"])
        assert_allclose(float(line["charge_misid_rate"]), k / n, rtol=1e-9)
    # the catalog: summary.json's numbers
    catalog = pl.read_parquet(tmp_path / "summary.parquet")
    for catalog_row in catalog.iter_rows(named=True):
        for key in TAIL_COLUMNS:
            assert catalog_row[key] == summary[catalog_row["model"]][key], (catalog_row["model"], key)


def test_comparison_flips_when_baseline_is_better(tmp_path, truth):
    hits, events = truth
    _write_predictions(tmp_path, hits, events, **GOOD_BASELINE)
    comparisons = [line for _, lines in _computed_comparisons(tmp_path, hits, events) for line in lines]
    for candidate, reference in (("e2e", "baseline"), ("e2e_paper", "baseline_paper")):
        for label in ("σ68(q/pT)", "hit AUC (raw score)", "cluster core fraction"):
            sentence = _sentence(comparisons, label, candidate, reference)
            assert sentence.startswith(f"{candidate} is NOT better than {reference} on {label}"), sentence
            assert f"{reference} better by" in sentence


@pytest.mark.usefixtures("placeholder_figures")
def test_comparison_is_not_a_claim_for_identical_models(tmp_path, truth):
    hits, events = truth
    _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    # replace e2e by a relabelled copy of the baseline: every metric is then exactly equal
    for name in ("hits", "clusters", "tracks"):
        path = tmp_path / "predictions" / f"{name}.parquet"
        table = pl.read_parquet(path)
        copy = table.filter(pl.col("model") == "baseline").with_columns(model=pl.lit("e2e"))
        pl.concat([table.filter(pl.col("model") != "e2e"), copy]).write_parquet(path)
    _keep_models(tmp_path, {"truth", "baseline", "e2e"})  # fewer figure panels: faster
    summary = write_report(tmp_path, hits, events, {})
    assert summary["e2e"] == summary["baseline"]
    comparisons = _comparison_lines((tmp_path / "report.md").read_text())
    for label in ("σ68(q/pT)", "hit AUC (raw score)", "cluster core fraction"):
        sentence = _sentence(comparisons, label)
        assert sentence.startswith(f"e2e is NOT significantly better than baseline on {label}"), sentence
        assert "equal" in sentence


def test_truth_only_predictions(tmp_path, truth):
    hits, events = truth
    _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    _keep_models(tmp_path, set(TRUTH_MODELS))
    summary = write_report(tmp_path, hits, events, {"dataset": "x"})
    assert list(summary) == ["truth", "truth_charge", "truth_share"]
    assert all(row["auc"] is None and row["auc_weight"] is None for row in summary.values())
    report = (tmp_path / "report.md").read_text()
    assert "**No comparison**" in report
    assert _compared_pairs(report) == set()
    assert "e2e vs baseline (no e2e and no baseline predictions)" in _comparison_lines(report)
    assert (tmp_path / "figures" / "roc_rejection.png").read_bytes()[:8] == PNG_MAGIC


#: the share models' comparisons (each when both of its models are present)
SHARE_PAIRS = {("share_e2e", "classical"), ("share_e2e", "share_baseline"), ("share_e2e", "e2e")}


@pytest.mark.parametrize(
    ("dropped", "pairs"),
    [
        (
            {"classical"},
            {("e2e", "baseline"), ("e2e_paper", "baseline_paper"), ("e2e", "truth_charge")}
            | SHARE_PAIRS - {("share_e2e", "classical")},
        ),
        (
            {"baseline_paper", "e2e_paper"},
            {("e2e", "baseline"), ("e2e", "classical"), ("e2e", "truth_charge")} | SHARE_PAIRS,
        ),
        ({"e2e", "assignment"}, {("e2e_paper", "baseline_paper")} | SHARE_PAIRS - {("share_e2e", "e2e")}),
        ({"truth_charge", "baseline"}, {("e2e", "classical"), ("e2e_paper", "baseline_paper")} | SHARE_PAIRS),
        (
            {"share_e2e"},
            {("e2e", "baseline"), ("e2e", "classical"), ("e2e_paper", "baseline_paper"), ("e2e", "truth_charge")},
        ),
    ],
)
def test_comparisons_follow_the_models_present(tmp_path, truth, dropped, pairs):
    hits, events = truth
    _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    _keep_models(tmp_path, set(MODELS) - dropped)
    blocks = _computed_comparisons(tmp_path, hits, events)
    compared = {match.groups() for lead, _ in blocks if (match := re.match(r"\*\*(\w+) vs (\w+)\*\*:", lead))}
    assert compared == pairs
    sentences = {lead: lines for lead, lines in blocks}
    compared_sentences = [line for lead, lines in blocks if not lead.startswith("**No") for line in lines]
    # a sentence about e2e vs classical exactly when classical (and e2e) are present
    classical_sentences = [
        line for line in compared_sentences if " vs classical " in line or "than classical on" in line
    ]
    assert bool(classical_sentences) == bool(pairs & {("e2e", "classical"), ("share_e2e", "classical")})
    ratio_sentences = [line for line in compared_sentences if line.startswith("σ68(q/pT) of e2e / truth_charge = ")]
    assert len(ratio_sentences) == (("e2e", "truth_charge") in pairs)
    gains = [line for line in compared_sentences if line.startswith("Relative change of the core fraction")]
    assert len(gains) == len(
        pairs & {("e2e", "baseline"), ("e2e_paper", "baseline_paper"), ("share_e2e", "share_baseline")}
    )
    # the pairs left out are named, each once, with the missing model
    left_out = next((lines for lead, lines in sentences.items() if lead.startswith("**Not compared**")), [])
    expected_left_out = {
        ("e2e", "baseline"),
        ("e2e", "classical"),
        ("e2e_paper", "baseline_paper"),
        *SHARE_PAIRS,
    } - pairs
    assert {tuple(line.split(" (")[0].split(" vs ")) for line in left_out} == expected_left_out
    assert all(any(f"no {model}" in line for model in dropped) for line in left_out)


def test_every_known_model_has_its_own_style():
    assert set(MODEL_STYLE) == set(MODEL_NAMES)
    looks = {(style["color"], style["linestyle"], style["marker"]) for style in MODEL_STYLE.values()}
    assert len({style["color"] for style in MODEL_STYLE.values()}) == len(MODEL_NAMES)
    assert len(looks) == len(MODEL_NAMES)
    # an unknown model gets a colour of its own, none of the known ones, and the same in every process: two
    # interpreters with other string hashes (PYTHONHASHSEED) give each name the style it gets here
    names = ["e2e_v2", "gnn", "my_tracker"]
    assert all(model_style(name)["color"] not in {style["color"] for style in MODEL_STYLE.values()} for name in names)
    code = (
        f"import json; from analysis.figures import model_style; print(json.dumps([model_style(n) for n in {names!r}]))"
    )
    for hash_seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", code],
            env=os.environ | {"PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(result.stdout) == [model_style(name) for name in names], hash_seed


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


@pytest.mark.parametrize("column", ["score", "weight"])
def test_malformed_predictions_raise(tmp_path, truth, column):
    hits, events = truth
    _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    broken = pl.read_parquet(tmp_path / "predictions" / "hits.parquet").drop(column)
    broken.write_parquet(tmp_path / "predictions" / "hits.parquet")
    with pytest.raises(MuontrackError, match=f"missing columns {column}"):
        write_report(tmp_path, hits, events, {})


# ---------------------------------------------------------------------------------------------------------
# Atomic reports (analysis.report_folder.staged_report) and evaluate --overwrite
# ---------------------------------------------------------------------------------------------------------

#: few models: fewer figure panels, faster reports
FEW_MODELS = frozenset({"truth", "classical", "baseline", "baseline_paper", "e2e"})
#: a fixed environment, so that the catalog does not ask JAX for its device
ENVIRONMENT = {
    "jax_version": "0.0.1",
    "flax_version": "0.0.2",
    "numba_version": "0.0.3",
    "python_version": "3.11.0",
    "device": "cpu",
}


def catalog_context(seed: int, dataset: str = "/data/muons-test", **changes) -> dict:
    """A report context as flows.commands.report_context builds it, for the runs of training seed ``seed``."""
    runs = [
        {
            "run": f"/runs/{model}-s{seed}",
            "model": model,
            "reported_as": rows,
            "preset": "test",
            "epochs": 2,
            "seed": seed,
            "training_seconds": 12.5,
            "code_version": f"0.1.0+train{seed}",
        }
        for model, rows in (("baseline", ["baseline", "baseline_paper"]), ("e2e", ["e2e"]))
    ]
    context = {
        "dataset": dataset,
        "dataset_events": N_EVENTS,
        "dataset_seed": 7,
        "dataset_config_hash": "0123abcd",
        "code_version": "0.1.0+code",
        "runs": runs,
        "environment": ENVIRONMENT,
    }
    return context | changes


def publish_report(
    out: Path, hits: pl.LazyFrame, events: pl.LazyFrame, context: dict, seed: int = 0, models=FEW_MODELS
) -> dict:
    """A whole report (synthetic predictions of ``seed``, then write_report) staged and published at ``out``."""
    with staged_report(out) as staging:
        _write_predictions(staging, hits, events, **GOOD_E2E, seed=seed)
        _keep_models(staging, set(models))
        return write_report(staging, hits, events, context, published_as=out)


def _leftovers(out: Path) -> list[str]:
    """What writers of ``out`` left beside it (its staging and replaced-report folders)."""
    return sorted(path.name for path in out.parent.iterdir() if path.name.startswith(f".{out.name}."))


@pytest.mark.usefixtures("placeholder_figures")
def test_a_killed_report_write_leaves_the_previous_report(tmp_path, truth, monkeypatch):
    hits, events = truth
    out = tmp_path / "reports" / "job"
    publish_report(out, hits, events, catalog_context(0))
    before = snapshot(out)
    assert {"report.md", "summary.json", "summary.parquet", "resolution.parquet", "predictions/hits.parquet"} <= set(
        before
    )

    # a writer killed late: the catalog (written after the figures, report.md and summary.json) never comes, and
    # a kill runs no cleanup
    def killed(*_args, **_kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(report_module, "_write_catalog", killed)
    monkeypatch.setattr(folder_module, "_discard", lambda _path: None)
    with pytest.raises(RuntimeError, match="killed"):
        publish_report(out, hits, events, catalog_context(1), seed=1)
    assert snapshot(out) == before  # every file of the previous report, byte for byte, and nothing else
    (staging,) = _leftovers(out)
    assert re.fullmatch(r"\.job\.staging-\d+-[0-9a-f]+", staging)
    partial = out.parent / staging / "job"
    assert (partial / "report.md").is_file()
    assert not (partial / "summary.parquet").exists()

    # the next writer cleans up what the killed one left, and publishes its own report
    monkeypatch.undo()
    publish_report(out, hits, events, catalog_context(1), seed=1)
    assert _leftovers(out) == []
    assert set(snapshot(out)) == set(before)
    runs = pl.read_parquet(out / "summary.parquet")["run"].drop_nulls().unique().sort().to_list()
    assert runs == ["/runs/baseline-s1", "/runs/e2e-s1"]


@pytest.mark.usefixtures("placeholder_figures")
def test_a_kill_between_the_renames_leaves_a_recoverable_report(tmp_path, truth, monkeypatch):
    hits, events = truth
    out = tmp_path / "job"
    publish_report(out, hits, events, catalog_context(0), models={"truth", "e2e"})
    before = snapshot(out)
    rename = folder_module.os.rename

    def killed_before_moving_in(source, target):
        if ".staging-" in str(source):
            raise RuntimeError("killed")
        rename(source, target)

    monkeypatch.setattr(folder_module.os, "rename", killed_before_moving_in)
    monkeypatch.setattr(folder_module, "_discard", lambda _path: None)
    monkeypatch.setattr(folder_module, "_exchange", lambda _a, _b: False)  # the two-rename fallback
    with pytest.raises(RuntimeError, match="killed"):
        publish_report(out, hits, events, catalog_context(1), seed=1, models={"truth", "e2e"})
    monkeypatch.undo()
    assert not out.exists()
    assert [name.split("-")[0] for name in _leftovers(out)] == [".job.old", ".job.staging"]
    recover_report_dir(out)  # what the next writer does first, with the lock held
    assert snapshot(out) == before
    assert _leftovers(out) == []


@pytest.mark.usefixtures("placeholder_figures")
def test_a_report_is_replaced_in_one_atomic_exchange(tmp_path, truth, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) exists, replacing a report takes no rename at all: there is no moment,
    and so no kill, that leaves readers without a report."""
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir()
    probe_b.mkdir()
    (probe_a / "mark").touch()
    if not folder_module._exchange(probe_a, probe_b):
        pytest.skip("this system or file system has no renameat2(RENAME_EXCHANGE)")
    assert (probe_b / "mark").exists()
    assert not (probe_a / "mark").exists()
    hits, events = truth
    out = tmp_path / "job"
    publish_report(out, hits, events, catalog_context(0), models={"truth", "e2e"})

    def killed(source, _target):
        raise RuntimeError(f"killed at the rename of {source}")

    monkeypatch.setattr(folder_module.os, "rename", killed)
    publish_report(out, hits, events, catalog_context(1), seed=1, models={"truth", "e2e"})
    monkeypatch.undo()
    runs = pl.read_parquet(out / "summary.parquet")["run"].drop_nulls().unique().sort().to_list()
    assert runs == ["/runs/e2e-s1"]
    assert _leftovers(out) == []


def test_a_report_file_in_place_of_the_folder_is_refused(tmp_path):
    out = tmp_path / "report"
    out.write_text("not a folder")
    with pytest.raises(MuontrackError, match="is a file"), staged_report(out):
        pass
    assert out.read_text() == "not a folder"


def test_a_report_without_a_catalog_is_replaced_only_with_overwrite(tmp_path):
    from flows.commands import _check_report_out

    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # a report written before summary.parquet existed
    with pytest.raises(MuontrackError, match=r"not recorded .*; pass --overwrite to replace it"):
        _check_report_out(out, catalog_context(0))
    _check_report_out(out, catalog_context(0), overwrite=True)
    (out / "summary.json").unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MuontrackError, match="holds no muontrack report"):  # never replaced, even with overwrite
        _check_report_out(out, catalog_context(0), overwrite=True)


def _fake_run(path: Path, seed: int) -> Path:
    """A run folder as report_context reads it (config.json only: the predictions are faked)."""
    path.mkdir(parents=True)
    config = {"format": "muontrack-run", "model": "e2e", "preset": "test", "seed": seed, "train_config": {"epochs": 1}}
    (path / "config.json").write_text(json.dumps(config | {"code_version": "0.1.0+fake"}))
    return path


def _fake_predict_all(
    dataset: Dataset,
    _runs: list[Path],
    out: Path,
    progress: bool = False,
    checkpoint: str = "best",
    on_message: object = None,
) -> Path:
    """flows.commands.predict_all with synthetic predictions (no trained network needed), given the dataset the
    evaluation opened (never its folder: the dataset is opened once per command)."""
    assert isinstance(dataset, Dataset), dataset
    del checkpoint, on_message  # synthetic predictions need no parameters and tell no progress

    _write_predictions(out, dataset.hits(), dataset.events().sort("event_id"), **GOOD_E2E)
    _keep_models(out, {"truth", "classical", "e2e"})
    if progress:
        print(f"predict e2e: {dataset.n_events} events, 0.0 s", file=sys.stderr)
    return out / "predictions"


def _muontrack(monkeypatch, capsys, *arguments) -> tuple[int, str, str]:
    """``muontrack ARGUMENTS`` in this process (so that monkeypatches apply): exit status, stdout, stderr."""
    from flows import cli

    monkeypatch.setattr(sys, "argv", ["muontrack", *map(str, arguments)])
    try:
        cli.main()
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.usefixtures("placeholder_figures")
def test_evaluate_refuses_a_report_of_other_runs_without_overwrite(tiny_dataset, tmp_path, monkeypatch, capsys):
    import flows.commands

    monkeypatch.setattr(flows.commands, "predict_all", _fake_predict_all)
    first, second = _fake_run(tmp_path / "runs" / "e2e-s0", 0), _fake_run(tmp_path / "runs" / "e2e-s1", 1)
    out = tmp_path / "report"
    evaluate = ("evaluate", "--data", tiny_dataset, "--out", out)
    status, stdout, stderr = _muontrack(monkeypatch, capsys, *evaluate, "--run", first)
    assert status == 0, stderr
    assert stdout.strip() == f"report: {out / 'report.md'}"
    assert "predict e2e" in stderr
    assert "write report" in stderr

    # the same runs on the same data: a refresh, allowed
    assert _muontrack(monkeypatch, capsys, *evaluate, "--run", first)[0] == 0
    assert _leftovers(out) == []
    before = snapshot(out)

    # other runs: refused in one line naming the folder and --overwrite, the report untouched
    status, stdout, stderr = _muontrack(monkeypatch, capsys, *evaluate, "--run", second)
    assert status != 0
    assert stdout == ""
    assert "Traceback" not in stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"error: report folder {out} holds a report of other runs")
    assert "--overwrite" in line
    assert snapshot(out) == before
    # ... and so is another dataset with the same run
    other_data = tmp_path / "data-copy"
    shutil.copytree(tiny_dataset, other_data)
    status, _, stderr = _muontrack(monkeypatch, capsys, "evaluate", "--data", other_data, "--out", out, "--run", first)
    assert status != 0
    assert "holds a report of other runs" in stderr
    assert "--overwrite" in stderr
    assert snapshot(out) == before

    # with --overwrite it replaces the report; --json prints one JSON document on stdout
    status, stdout, stderr = _muontrack(monkeypatch, capsys, *evaluate, "--run", second, "--overwrite", "--json")
    assert status == 0, stderr
    document = json.loads(stdout)
    assert document["report"] == str(out / "report.md")
    # a real dataset: report_context gives its detector, so the report has the limit row, first
    assert list(document["summary"]) == [LIMIT_ROW, "truth", "classical", "e2e"]
    assert document["summary"] == json.loads((out / "summary.json").read_text())
    catalog = pl.read_parquet(out / "summary.parquet")
    assert catalog.filter(pl.col("model") == "e2e")["run"].to_list() == [str(second.resolve())]
    assert catalog["dataset"].unique().to_list() == [str(tiny_dataset.resolve())]
    assert _leftovers(out) == []


class _OpenCounter:
    """Counts, while installed, every opening of a dataset (each reads its manifest: pipeline.dataset
    ._read_manifest, whichever module imported open_dataset) and every verification of one (Dataset.verify: the
    checksums and the rows' contract, the costly part), by wrapping the real functions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import pipeline.dataset

        self.manifests = self.verifications = 0
        read_manifest, verify = pipeline.dataset._read_manifest, pipeline.dataset.Dataset.verify

        def counted_read_manifest(path: Path) -> dict:
            self.manifests += 1
            return read_manifest(path)

        def counted_verify(dataset: Dataset, force: bool = False) -> int:
            self.verifications += 1
            return verify(dataset, force)

        monkeypatch.setattr(pipeline.dataset, "_read_manifest", counted_read_manifest)
        monkeypatch.setattr(pipeline.dataset.Dataset, "verify", counted_verify)


@pytest.mark.usefixtures("placeholder_figures")
def test_evaluate_opens_the_dataset_once(tiny_dataset, tmp_path, monkeypatch, capsys):
    """``muontrack evaluate`` opens and verifies its dataset once and hands the opened one to every step (the
    context, the predictions, the report): it was opened three times."""
    import flows.commands

    monkeypatch.setattr(flows.commands, "predict_all", _fake_predict_all)
    run = _fake_run(tmp_path / "runs" / "e2e-s0", 0)
    opens = _OpenCounter(monkeypatch)
    status, _, stderr = _muontrack(
        monkeypatch, capsys, "evaluate", "--data", tiny_dataset, "--out", tmp_path / "report", "--run", run
    )
    assert status == 0, stderr
    assert (opens.manifests, opens.verifications) == (1, 1)


@pytest.mark.slow
@pytest.mark.usefixtures("placeholder_figures")
def test_the_evaluate_flow_opens_the_dataset_once_and_reports_as_the_command(tiny_dataset, tmp_path, monkeypatch):
    """The ``evaluate`` flow runs the sequence of ``muontrack evaluate`` with its tasks as the steps: one opening
    of the dataset (it was five, and the report context computed twice), and the report of
    :func:`flows.commands.evaluate_runs` on the same predictions (the same summary.json and resolution.csv)."""
    from prefect.testing.utilities import prefect_test_harness

    import flows.commands
    from flows.end_to_end import evaluate_flow

    monkeypatch.setattr(flows.commands, "predict_all", _fake_predict_all)
    run = _fake_run(tmp_path / "runs" / "e2e-s0", 0)
    flows.commands.evaluate_runs(tiny_dataset, [run], tmp_path / "plain")
    with prefect_test_harness(server_startup_timeout=120):
        opens = _OpenCounter(monkeypatch)
        summary = evaluate_flow(str(tiny_dataset), [str(run)], str(tmp_path / "flow"), overwrite=False)
    assert (opens.manifests, opens.verifications) == (1, 1)
    assert summary == json.loads((tmp_path / "plain" / "summary.json").read_text())
    for name in ("summary.json", "resolution.csv"):
        assert (tmp_path / "flow" / name).read_text() == (tmp_path / "plain" / name).read_text(), name


# ---------------------------------------------------------------------------------------------------------
# The limit row (the Cramér-Rao limit of σ68(q/pT)), against computations written out here
# ---------------------------------------------------------------------------------------------------------


def _clean_cluster_residuals(hits: pl.DataFrame, events: pl.DataFrame) -> np.ndarray:
    """Charge-centroid residuals [mm] of the muon's clean clusters, one (event, layer) at a time: the run of
    contiguous strips holding the muon's signal strips, when it is the only such run of the layer and every strip
    of it is the muon's."""
    x_true = dict(zip(events["event_id"].to_list(), events["x_true"].to_list(), strict=True))
    residuals = []
    for (event_id, layer), group in hits.sort("strip").group_by("event_id", "layer"):
        truth = x_true[event_id][layer]
        if truth is None or not math.isfinite(truth):
            continue
        strips = group["strip"].to_numpy()
        muon = group["is_signal"].to_numpy() & (group["particle_id"].to_numpy() == 0)
        runs = np.split(np.arange(strips.size), np.flatnonzero(np.diff(strips) != 1) + 1)
        with_muon = [run for run in runs if muon[run].any()]
        if len(with_muon) != 1 or not muon[with_muon[0]].all():
            continue
        charge = group["charge"].to_numpy().astype(np.float64)[with_muon[0]]
        x = group["x"].to_numpy().astype(np.float64)[with_muon[0]]
        residuals.append(np.sum(charge * x) / np.sum(charge) - float(np.float32(truth)))
    return np.array(residuals)


def _circle_x(layer_y: np.ndarray, x0: float, theta0: float, q_over_pt: float, b_field: float) -> np.ndarray:
    """x of the circle through (x0, the first layer) with direction theta0 to the y axis and curvature
    0.3 B q/pT (a positive muon bends towards +x), on every layer: the centre-and-radius form."""
    kappa = q_over_pt * PT_PER_TESLA_METRE * b_field / 1000.0  # [1/mm]
    xc, yc = x0 + math.cos(theta0) / kappa, layer_y[0] - math.sin(theta0) / kappa
    return xc - math.copysign(1.0, kappa) * np.sqrt(1.0 / kappa**2 - (layer_y - yc) ** 2)


def _least_squares_widths(events: pl.DataFrame, detector: DetectorConfig, sigma: float) -> np.ndarray:
    """Relative width sigma(q/pT) pT of each event without material: the plain least-squares bound
    sigma^2 [(J^T J)^-1]_(q/pT) over the layers with a finite x_true, J by central finite differences."""
    layer_y = detector.layer_y()
    widths = []
    for row in events.iter_rows(named=True):
        measured = np.isfinite(np.array(row["x_true"], np.float64))
        p = np.array([row["x0"], row["theta0"], row["q"] / row["pt"]], np.float64)
        steps = np.array([1e-3, 1e-6, 1e-6])
        jac = np.stack(
            [
                (
                    _circle_x(layer_y, *(p + step * unit), detector.b_field)
                    - _circle_x(layer_y, *(p - step * unit), detector.b_field)
                )
                / (2 * step)
                for step, unit in zip(steps, np.eye(3), strict=True)
            ],
            axis=1,
        )[measured]
        widths.append(sigma * math.sqrt(np.linalg.inv(jac.T @ jac)[2, 2]) * float(np.float32(row["pt"])))
    return np.array(widths)


def _limit_report(out: Path, dataset: Path, detector: DetectorConfig) -> tuple[dict, pl.DataFrame, pl.DataFrame]:
    """A report of synthetic predictions of a real dataset's events, with ``detector`` in the context: (summary,
    events, hits)."""
    from pipeline.dataset import open_dataset

    data = open_dataset(dataset)
    events = data.events().sort("event_id")
    _write_predictions(out, data.hits(), events, **GOOD_E2E)
    _keep_models(out, {"truth", "truth_charge", "classical", "e2e"})
    context = catalog_context(0) | {"detector": dataclasses.asdict(detector)}
    summary = write_report(out, data.hits(), data.events(), context)
    return summary, events.collect(), data.hits().collect()


@pytest.mark.usefixtures("placeholder_figures")
def test_limit_row_against_an_independent_bound(tiny_dataset, tmp_path):
    """Without material the bound is the plain least-squares one; its σ68 against a Monte Carlo sample of the
    events' Gaussians, and the point resolution against the clean clusters found here."""
    thin = DetectorConfig(x_over_x0=0.0)
    summary, events, hits = _limit_report(tmp_path, tiny_dataset, thin)
    report = (tmp_path / "report.md").read_text()
    residuals = _clean_cluster_residuals(hits, events)
    rms = math.sqrt(np.mean(residuals**2))
    assert 0.8 * np.isfinite(np.array(events["x_true"].to_list(), np.float64)).sum() < residuals.size
    assert f"Its point resolution is {1000 * rms:.2f} µm, the RMS of the charge-centroid residuals of the " in report
    assert f"the {residuals.size} clean clusters" in report

    widths = _least_squares_widths(events, thin, rms)
    limit = summary[LIMIT_ROW]
    assert limit["n_events"] == events.height
    assert limit["sigma68_err"] is None
    # a Monte Carlo sample of the mixture of the events' Gaussians: its σ68 scatters by about 1.3 / sqrt(N) of
    # itself (tests/test_limit.py)
    rng = np.random.default_rng(11)
    draws = 2000
    sample = rng.normal(size=(widths.size, draws)) * widths[:, None]
    sampled = np.quantile(np.abs(sample - np.median(sample)), 0.68)
    assert abs(limit["sigma68"] / sampled - 1) < 4 * 1.3 / math.sqrt(sample.size)
    # ... and the same per 5 GeV bin of true pT (resolution.csv)
    pt = events["pt"].cast(pl.Float64).to_numpy()
    bins = np.minimum(np.floor((pt - 20.0) / 5.0), 5).astype(int)
    with (tmp_path / "resolution.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["model"] == LIMIT_ROW]
    assert [float(row["pt_lo"]) for row in rows] == [20.0, 25.0, 30.0, 35.0, 40.0, 45.0]
    for index, row in enumerate(rows):
        selected = sample[bins == index]
        assert int(row["n"]) == int((bins == index).sum())
        assert row["sigma68_err"] == ""
        expected = np.quantile(np.abs(selected - np.median(selected)), 0.68)
        assert abs(float(row["sigma68"]) / expected - 1) < 4 * 1.3 / math.sqrt(selected.size)
    # the limit row is exact: the σ68 of the mixture of the independent widths' zero-mean Gaussians (median 0 by
    # symmetry), the h that the mixture's |r| stays below with probability 0.68, mean_i (2 Φ(h / w_i) − 1) = 0.68,
    # found by bisection here, agrees to the precision of the finite differences
    from scipy.special import ndtr

    lo, hi = 0.0, float(widths.max()) * 10
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.mean(2 * ndtr(mid / widths) - 1) < 0.68 else (lo, mid)
    assert_allclose(limit["sigma68"], 0.5 * (lo + hi), rtol=1e-6)


@pytest.mark.usefixtures("placeholder_figures")
def test_limit_row_in_the_summary_table_report_and_catalog(tiny_dataset, tmp_path):
    summary, events, _ = _limit_report(tmp_path, tiny_dataset, DetectorConfig())
    assert list(summary) == [LIMIT_ROW, "truth", "truth_charge", "classical", "e2e"]
    limit = summary[LIMIT_ROW]
    assert tuple(limit) == SUMMARY_KEYS
    assert all(limit[key] is None for key in SUMMARY_KEYS if key.startswith(("auc", "rejection", "hit_", "core")))
    assert (limit["sigma68_err"], limit["sigma68_over_limit"], limit["sigma68_over_limit_err"]) == (None, 1.0, None)
    # the limit has no tracks: no tails, bias or charge
    assert all(limit[key] is None for key in TAIL_COLUMNS)
    # the dataset's material costs resolution: the limit is far above the one without it
    thin, _, _ = _limit_report(tmp_path / "thin", tiny_dataset, DetectorConfig(x_over_x0=0.0))
    assert limit["sigma68"] > 1.5 * thin[LIMIT_ROW]["sigma68"]
    # every row's distance to the limit
    for model in ("truth", "truth_charge", "classical", "e2e"):
        row = summary[model]
        assert_allclose(row["sigma68_over_limit"], row["sigma68"] / limit["sigma68"], rtol=1e-12)
        assert_allclose(row["sigma68_over_limit_err"], row["sigma68_err"] / limit["sigma68"], rtol=1e-12)
    # the rows were given 1 %, 1.2 %, 3 % and 2 % (GOOD_E2E): all above the limit of ~0.9 %
    assert 1.0 < summary["truth"]["sigma68_over_limit"] < summary["e2e"]["sigma68_over_limit"]

    # the console table: a ÷limit column with each row's ratio, on the row's line
    table = format_summary_table(summary).splitlines()
    assert "÷limit" in table[0]
    for model, row in summary.items():
        (line,) = [line for line in table if line.split()[0] == model]
        assert f" {row['sigma68_over_limit']:.3f} " in line
    # report.md: the column and the sentence
    report = (tmp_path / "report.md").read_text()
    header = report.split("## Summary", 1)[1].strip().splitlines()[0]
    assert "| σ68(q/pT) | σ68 / limit | events in σ68 |" in header
    e2e = summary["e2e"]
    e2e_line = next(line for line in report.splitlines() if line.startswith("| e2e | "))
    assert _quotes(e2e_line, e2e["sigma68_over_limit"], e2e["sigma68_over_limit_err"]), e2e_line
    assert f"`limit`: the Cramér–Rao limit of σ68(q/pT) on the {events.height} evaluated events" in report

    # the catalog: the limit row first, no training run, the numbers of summary.json, the ratio columns
    catalog = pl.read_parquet(tmp_path / "summary.parquet")
    assert catalog["model"].to_list() == list(summary)
    for row in catalog.iter_rows(named=True):
        for key in ("sigma68", "sigma68_err", "n_events", "sigma68_over_limit", "sigma68_over_limit_err"):
            assert row[key] == summary[row["model"]][key], (row["model"], key)
    assert catalog.filter(pl.col("model") == LIMIT_ROW)["run"].to_list() == [None]
    resolution = pl.read_parquet(tmp_path / "resolution.parquet")
    limit_bins = resolution.filter(pl.col("model") == LIMIT_ROW)
    assert resolution["model"].to_list()[:6] == [LIMIT_ROW] * 6
    assert limit_bins["n"].sum() == limit["n_events"]
    assert limit_bins["sigma68_err"].null_count() == 6
    assert (limit_bins["sigma68"] > 0.5 * limit["sigma68"]).all()


def test_a_malformed_detector_in_the_context_writes_nothing(tiny_dataset, tmp_path):
    from pipeline.dataset import open_dataset

    data = open_dataset(tiny_dataset)
    _write_predictions(tmp_path, data.hits(), data.events().sort("event_id"), **GOOD_E2E)
    partial = {"pitch": 0.5}  # the other fields would silently take their defaults
    for detector, message in (
        (partial, "must hold exactly the fields"),
        (dataclasses.asdict(DetectorConfig()) | {"pitch": -1.0}, "pitch"),
    ):
        with pytest.raises(MuontrackError, match=message):
            write_report(tmp_path, data.hits(), data.events(), {"detector": detector})
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.usefixtures("placeholder_figures")
def test_the_report_draws_each_runs_training_curves_and_names_its_checkpoint(tmp_path, truth, monkeypatch):
    """write_report draws the curves of the runs whose metrics it is handed, from those tables, with the evaluated
    checkpoint's epoch marked, and its Training section says which checkpoint each run was evaluated with."""
    from analysis import report as report_module
    from analysis.training import training_curves

    hits, events = truth
    _write_predictions(tmp_path, hits, events, **GOOD_E2E)
    _keep_models(tmp_path, {"truth", "baseline", "e2e"})
    metrics = pl.DataFrame(
        {
            "epoch": [1, 1, 2, 2, 3, 3],
            "split": ["train", "val"] * 3,
            "loss": [0.9, 0.95, 0.7, 0.8, 0.6, 0.85],
            "sigma68": [None, 0.02, None, 0.011, None, 0.013],
            "learning_rate": [1e-3, None, 5e-4, None, 2.5e-4, None],
            "grad_norm": [2.0, None, 1.0, None, 0.5, None],
        }
    )
    runs = [
        {"run": "/runs/b", "model": "baseline", "checkpoint": "best", "checkpoint_epoch": 2,
         "checkpoint_val_sigma68": 0.011, "best_epoch": 2, "last_epoch": 3},
        {"run": "/runs/e", "model": "e2e", "checkpoint": "best", "checkpoint_epoch": None},
    ]  # fmt: skip
    drawn = []

    def spy(table, marks):
        drawn.append((table, marks))
        return training_curves(table, marks)

    monkeypatch.setattr(report_module, "training_curves", spy)
    write_report(tmp_path, hits, events, {"runs": runs}, training={"/runs/b": metrics})
    # only the run with a metrics table, drawn from that table with its three epochs marked
    assert len(drawn) == 1
    assert drawn[0][0] is metrics
    assert drawn[0][1] == {"evaluated": 2, "best": 2, "last": 3}
    name = folder_module.training_figure_name("baseline")
    assert (tmp_path / "figures" / name).is_file()
    report = (tmp_path / "report.md").read_text()
    section = report.split("## Training", 1)[1].split("\n## ", 1)[0]
    assert "| baseline | best | 2 | 0.011 | 2 | 3 |" in section
    assert "| e2e | best | n/a | n/a | n/a | n/a |" in section
    assert f"![Training curves of baseline](figures/{name})" in section
    assert "(Training curves of e2e: not drawn)" in section
