"""The performance tables (analysis/performance.py) against hand counts on a small hand-made prediction table, and
their figure (analysis.figures.plot_rates)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.stats import beta

from analysis import performance
from analysis.figures import plot_rates, rate_points
from analysis.metrics import hit_score_table, track_residual_table

#: one event per row: (event_id, true pT [GeV], q)
EVENTS = [(0, 21.0, 1), (1, 24.0, -1), (2, 33.0, 1), (3, 49.0, -1), (4, 55.0, 1)]
#: (event_id, hit_id, layer, is_signal, e2e's final weight); a weight selects its hit from 0.5 on, NaN counts nowhere
HITS = [
    (0, 0, 0, True, 0.9),
    (0, 1, 1, True, 0.5),
    (0, 2, 1, False, 0.7),
    (0, 3, 2, True, 0.1),
    (1, 0, 0, True, 0.8),
    (1, 1, 1, False, 0.2),
    (1, 2, 2, True, float("nan")),
    (2, 0, 0, True, 0.3),
    (2, 1, 1, False, 0.95),
    (2, 2, 2, False, 0.6),
    (3, 0, 0, True, 1.0),
    (3, 1, 2, True, 0.99),
    (4, 0, 0, True, 1.0),  # pT 55: outside the binned range
]
#: (event_id, q_pred, q_over_pt_pred, fit_status) of e2e's tracks
TRACKS = [(0, 1, 1 / 21.0, 0), (1, 1, 1 / 24.0, 0), (2, 1, float("nan"), 1), (3, -1, -1 / 49.0, 0), (4, 1, 0.02, 0)]


def _tables() -> tuple[pl.DataFrame, pl.DataFrame, pl.LazyFrame, pl.LazyFrame]:
    events = pl.DataFrame(EVENTS, schema={"event_id": pl.Int64, "pt": pl.Float32, "q": pl.Int8}, orient="row")
    hits = pl.DataFrame(
        [row[:4] for row in HITS],
        schema={"event_id": pl.Int64, "hit_id": pl.Int32, "layer": pl.Int16, "is_signal": pl.Boolean},
        orient="row",
    )
    pred_hits = pl.DataFrame(
        {
            "event_id": [row[0] for row in HITS],
            "hit_id": [row[1] for row in HITS],
            "model": "e2e",
            "score": [row[4] for row in HITS],
            "weight": [row[4] for row in HITS],
        }
    )
    pred_tracks = pl.DataFrame(
        TRACKS, schema=["event_id", "q_pred", "q_over_pt_pred", "fit_status"], orient="row"
    ).with_columns(model=pl.lit("e2e"))
    hit_scores = hit_score_table(pred_hits.lazy(), hits.lazy())
    track_residuals = track_residual_table(pred_tracks.lazy(), events.lazy())
    return hit_scores, track_residuals, hits.lazy(), events.lazy()


def _clopper_pearson(k: int, n: int) -> tuple[float, float]:
    """The central 68.27 % Clopper–Pearson interval from scipy's Beta quantiles."""
    alpha = 1.0 - 0.682689492137086
    lower = beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    upper = beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
    return lower, upper


def _rows(table: pl.DataFrame, key: str) -> dict:
    return {row[key]: row for row in table.iter_rows(named=True)}


def test_hit_efficiency_and_purity_vs_pt_against_a_hand_count():
    hit_scores, _, hits, events = _tables()
    table = performance.hit_performance(performance.hit_truth_table(hit_scores, hits, events), ["pt_lo", "pt_hi"])
    rows = _rows(table, "pt_lo")
    # [20, 25): events 0 and 1. Signal with a finite weight: 0/0, 0/1, 0/3, 1/0 (1/2 is NaN) = 4, selected 0/0, 0/1,
    # 1/0 = 3 of them; selected hits: those 3 and the background 0/2 = 4
    # [30, 35): event 2: 1 signal, not selected; 2 background selected. [45, 50]: event 3: 2 of 2, purity 2/2.
    # Event 4 (pT 55) is in no bin.
    expected = {20.0: (4, 3, 4), 30.0: (1, 0, 2), 45.0: (2, 2, 2)}
    assert sorted(rows) == sorted(expected)
    for pt_lo, (n_signal, n_selected_signal, n_selected) in expected.items():
        row = rows[pt_lo]
        assert (row["n_signal"], row["n_selected_signal"], row["n_selected"]) == (
            n_signal,
            n_selected_signal,
            n_selected,
        )
        assert row["pt_hi"] == pt_lo + 5.0
        assert row["hit_efficiency"] == pytest.approx(n_selected_signal / n_signal, rel=1e-12)
        assert row["hit_purity"] == pytest.approx(n_selected_signal / n_selected, rel=1e-12)
        lower, upper = _clopper_pearson(n_selected_signal, n_signal)
        assert (row["hit_efficiency_lo"], row["hit_efficiency_hi"]) == pytest.approx((lower, upper), rel=1e-9)
        lower, upper = _clopper_pearson(n_selected_signal, n_selected)
        assert (row["hit_purity_lo"], row["hit_purity_hi"]) == pytest.approx((lower, upper), rel=1e-9)
    # the efficiency of [30, 35) is 0 of 1: a zero rate with a non-zero upper bound
    assert rows[30.0]["hit_efficiency"] == 0.0
    assert rows[30.0]["hit_efficiency_hi"] > 0.1


def test_hit_efficiency_and_purity_per_layer_against_a_hand_count():
    hit_scores, _, hits, events = _tables()
    rows = _rows(performance.hit_performance(performance.hit_truth_table(hit_scores, hits, events), ["layer"]), "layer")
    # layer 0: signal 0/0, 1/0, 2/0, 3/0, 4/0 (event 4 counts: no pT cut per layer), selected 0/0, 1/0, 3/0, 4/0
    # layer 1: signal 0/1 selected; background 0/2, 2/1 selected. layer 2: signal 0/3 no, 3/1 yes (1/2 NaN); 2/2 bg yes
    expected = {0: (5, 4, 4), 1: (1, 1, 3), 2: (2, 1, 2)}
    for layer, (n_signal, n_selected_signal, n_selected) in expected.items():
        row = rows[layer]
        assert (row["n_signal"], row["n_selected_signal"], row["n_selected"]) == (
            n_signal,
            n_selected_signal,
            n_selected,
        )
        assert row["hit_efficiency"] == pytest.approx(n_selected_signal / n_signal, rel=1e-12)


def test_failed_fit_and_charge_misid_rates_vs_pt_against_a_hand_count():
    _, track_residuals, _, _ = _tables()
    rows = _rows(performance.track_performance_by_pt(track_residuals), "pt_lo")
    # [20, 25): events 0 (right charge) and 1 (q = -1 reconstructed +1); [30, 35): event 2 failed; [45, 50]: event 3
    expected = {20.0: (2, 0, 2, 1), 30.0: (1, 1, 0, 0), 45.0: (1, 0, 1, 0)}
    assert sorted(rows) == sorted(expected)
    for pt_lo, (n_tracks, n_failed, n, n_charge_misid) in expected.items():
        row = rows[pt_lo]
        assert (row["n_tracks"], row["n_failed"], row["n"], row["n_charge_misid"]) == (
            n_tracks,
            n_failed,
            n,
            n_charge_misid,
        )
        assert row["failed_fit_rate"] == pytest.approx(n_failed / n_tracks, rel=1e-12)
        assert (row["failed_fit_rate_lo"], row["failed_fit_rate_hi"]) == pytest.approx(
            _clopper_pearson(n_failed, n_tracks), rel=1e-9
        )
    assert rows[20.0]["charge_misid_rate"] == 0.5
    assert rows[30.0]["charge_misid_rate"] is None  # no successful fit to count


def test_rate_figure_draws_each_bins_rate_and_interval(tmp_path):
    hit_scores, _, hits, events = _tables()
    table = performance.hit_performance(performance.hit_truth_table(hit_scores, hits, events), ["pt_lo", "pt_hi"])
    (points,) = rate_points(table, "pt", "hit_efficiency")
    np.testing.assert_allclose(points.rate, [3 / 4, 0.0, 1.0])
    np.testing.assert_allclose(points.lo, [20.0, 30.0, 45.0])
    assert np.all((points.x > points.lo) & (points.x < points.hi))
    assert np.all((points.lower <= points.rate) & (points.rate <= points.upper))
    layers = performance.hit_performance(performance.hit_truth_table(hit_scores, hits, events), ["layer"])
    (per_layer,) = rate_points(layers, "layer", "hit_purity")
    np.testing.assert_allclose(per_layer.lo, [-0.5, 0.5, 1.5])
    path = tmp_path / "rates.png"
    assert plot_rates(table, "pt", (("hit_efficiency", "eff."), ("hit_purity", "pur.")), "pT", "t", path) == path
    assert path.with_suffix(".pdf").is_file()
