"""Metrics against known distributions and brute-force references (analysis/statistics.py, analysis/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from numpy.testing import assert_allclose

from analysis import metrics as m
from analysis import statistics as st

# σ68/σ for a Gaussian: the 0.68 quantile of |N(0, 1)| = Φ⁻¹(0.84)
GAUSSIAN_SIGMA68_OVER_SIGMA = 0.994457883
# asymptotic standard error of σ68 for a Gaussian, in units of σ/√n: sqrt(p(1−p)) / (2 φ(q)), p = 0.68
GAUSSIAN_SIGMA68_SE = math.sqrt(0.68 * 0.32) / (2 * math.exp(-0.5 * 0.994457883**2) / math.sqrt(2 * math.pi))


# --------------------------------------------------------------------------------------------- σ68


def test_sigma68_of_large_gaussian_is_its_sigma():
    rng = np.random.default_rng(1)
    sigma = 2.5
    residuals = rng.normal(0.3, sigma, size=200_000)
    assert_allclose(st.sigma68(residuals), sigma, rtol=0.02)
    assert_allclose(st.sigma68(residuals), GAUSSIAN_SIGMA68_OVER_SIGMA * sigma, rtol=0.006)


def test_sigma68_is_shift_invariant():
    rng = np.random.default_rng(2)
    residuals = rng.standard_t(3, size=5001)
    assert_allclose(st.sigma68(residuals + 1000.0), st.sigma68(residuals), rtol=1e-9)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # median 2, |r − 2| sorted = [0, 1, 1, 2, 8]; position 0.68·4 = 2.72 -> 1 + 0.72·(2 − 1)
        ([0.0, 1.0, 2.0, 3.0, 10.0], 1.72),
        # median 3, |r − 3| sorted = [1, 1, 2, 4]; position 0.68·3 = 2.04 -> 2 + 0.04·(4 − 2)
        ([1.0, 2.0, 4.0, 7.0], 2.08),
    ],
)
def test_sigma68_uses_linear_interpolation(values, expected):
    assert_allclose(st.sigma68(np.array(values)), expected, rtol=1e-12)
    # the same through Polars: a Series, with a null and a NaN that must be dropped
    series = pl.Series([*values, None, float("nan")], dtype=pl.Float64)
    assert_allclose(st.sigma68(series), expected, rtol=1e-12)
    # and the Polars expression used in the tables
    expr_value = pl.DataFrame({"r": values}).select(m.sigma68_expr("r")).item()
    assert_allclose(expr_value, expected, rtol=1e-12)


def test_sigma68_rejects_empty_input():
    with pytest.raises(ValueError, match="no non-NaN values"):
        st.sigma68(np.array([]))
    with pytest.raises(ValueError, match="no non-NaN values"):
        st.sigma68(np.array([np.nan, np.nan]))


def test_bootstrap_error_scales_as_inverse_sqrt_n():
    rng = np.random.default_rng(3)
    n = 2000
    _, err_n = st.bootstrap_sigma68(rng.normal(size=n), n_boot=400, seed=10)
    _, err_4n = st.bootstrap_sigma68(rng.normal(size=4 * n), n_boot=400, seed=11)
    assert_allclose(err_n / err_4n, 2.0, rtol=0.2)
    # and both agree with the asymptotic standard error of a quantile of |N(0, 1)|
    assert_allclose(err_n, GAUSSIAN_SIGMA68_SE / math.sqrt(n), rtol=0.2)
    assert_allclose(err_4n, GAUSSIAN_SIGMA68_SE / math.sqrt(4 * n), rtol=0.2)


def test_bootstrap_value_and_reproducibility():
    residuals = np.random.default_rng(4).normal(size=500)
    value, err = st.bootstrap_sigma68(residuals, n_boot=50, seed=7)
    assert value == st.sigma68(residuals)
    assert st.bootstrap_sigma68(residuals, n_boot=50, seed=7) == (value, err)
    assert st.bootstrap_sigma68(residuals, n_boot=50, seed=8)[1] != err
    # the order of the residuals (row order after a join) does not matter
    assert st.bootstrap_sigma68(residuals[::-1], n_boot=50, seed=7) == (value, err)


# --------------------------------------------------------------------------------------------- ROC


def _brute_force_auc(signal: np.ndarray, background: np.ndarray) -> float:
    wins = 0.0
    for s in signal:
        for b in background:
            wins += 1.0 if s > b else (0.5 if s == b else 0.0)
    return wins / (signal.size * background.size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    # rounding to one decimal makes many ties, within and across the classes
    signal = np.round(rng.normal(0.6, 0.2, size=60), 1)
    background = np.round(rng.normal(0.4, 0.2, size=80), 1)
    scores = np.r_[signal, background]
    labels = np.r_[np.ones(signal.size, bool), np.zeros(background.size, bool)]
    permutation = rng.permutation(scores.size)
    assert_allclose(st.auc(scores[permutation], labels[permutation]), _brute_force_auc(signal, background), rtol=1e-12)


def test_roc_end_points_and_monotonicity():
    rng = np.random.default_rng(5)
    scores = rng.uniform(size=300)
    labels = rng.uniform(size=300) < 0.4
    signal_eff, background_eff, thresholds = st.roc_curve(scores, labels)
    assert (signal_eff[0], background_eff[0]) == (0.0, 0.0)
    assert (signal_eff[-1], background_eff[-1]) == (1.0, 1.0)
    assert thresholds[0] == np.inf
    assert np.all(np.diff(signal_eff) >= 0)
    assert np.all(np.diff(background_eff) >= 0)
    assert np.all(np.diff(thresholds) < 0)
    # each point is the selection score >= threshold, counted directly
    for index in (1, 57, 150, len(thresholds) - 1):
        selected = scores >= thresholds[index]
        assert_allclose(signal_eff[index], selected[labels].mean())
        assert_allclose(background_eff[index], selected[~labels].mean())


def test_roc_rejects_single_class_and_nan():
    with pytest.raises(ValueError, match="need both classes, got 2 signal and 0 background"):
        st.roc_curve(np.array([0.1, 0.2]), np.array([True, True]))
    with pytest.raises(ValueError, match="1 NaN scores"):
        st.roc_curve(np.array([0.1, np.nan]), np.array([True, False]))


def test_rejection_at_90_matches_threshold_scan():
    rng = np.random.default_rng(6)
    signal = rng.normal(2.0, 1.0, size=100)  # continuous: no ties, 90 % = exactly 90 signal hits
    background = rng.normal(0.0, 1.0, size=400)
    scores = np.r_[signal, background]
    labels = np.r_[np.ones(100, bool), np.zeros(400, bool)]
    signal_eff, background_eff, _ = st.roc_curve(scores, labels)
    # the tightest threshold keeping 90 of the 100 signal hits is the 90th highest signal score
    threshold = np.sort(signal)[::-1][89]
    expected = 1.0 / np.mean(background >= threshold)
    assert_allclose(st.background_rejection_at(signal_eff, background_eff, 0.90), expected, rtol=1e-12)


def test_rejection_interpolates_between_scanned_working_points():
    rng = np.random.default_rng(7)
    signal = rng.normal(1.5, 1.0, size=30)
    background = rng.normal(0.0, 1.0, size=200)
    scores = np.r_[signal, background]
    labels = np.r_[np.ones(30, bool), np.zeros(200, bool)]
    # brute force: every threshold, efficiencies by explicit counting, then the bracketing pair
    points = [(0.0, 0.0)]
    for threshold in np.sort(np.unique(scores))[::-1]:
        points.append((np.mean(signal >= threshold), np.mean(background >= threshold)))
    target = 0.95  # 28.5 of 30 signal hits: between two working points
    below = max(p for p in points if p[0] < target)
    above = min(p for p in points if p[0] >= target)
    expected_eff = below[1] + (target - below[0]) / (above[0] - below[0]) * (above[1] - below[1])
    signal_eff, background_eff, _ = st.roc_curve(scores, labels)
    assert_allclose(st.background_rejection_at(signal_eff, background_eff, target), 1.0 / expected_eff, rtol=1e-12)


def test_rejection_is_infinite_for_perfect_separation():
    scores = np.r_[np.linspace(0.6, 1.0, 50), np.linspace(0.0, 0.4, 50)]
    labels = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    signal_eff, background_eff, _ = st.roc_curve(scores, labels)
    assert st.background_rejection_at(signal_eff, background_eff, 0.9) == math.inf
    assert st.auc(scores, labels) == 1.0


def test_hanley_mcneil_against_bootstrap_spread():
    rng = np.random.default_rng(8)
    n_signal, n_background = 400, 600
    values = []
    for _ in range(200):
        scores = np.r_[rng.normal(1.0, 1.0, n_signal), rng.normal(0.0, 1.0, n_background)]
        labels = np.r_[np.ones(n_signal, bool), np.zeros(n_background, bool)]
        values.append(st.auc(scores, labels))
    predicted = st.auc_uncertainty(float(np.mean(values)), n_signal, n_background)
    assert_allclose(np.std(values, ddof=1), predicted, rtol=0.2)


# --------------------------------------------------------------------------------------------- clusters


def test_gaussian_fit_recovers_core_sigma_under_tails():
    rng = np.random.default_rng(9)
    core = rng.normal(0.2, 1.0, size=90_000)
    tails = rng.normal(0.0, 10.0, size=10_000)
    fit = st.fit_gaussian_core(np.r_[core, tails])
    assert_allclose(fit.sigma, 1.0, rtol=0.03)
    assert_allclose(fit.mu, 0.2, atol=0.02)
    # σ68 of the same sample is pulled up by the tails: the fit is doing work
    assert st.sigma68(np.r_[core, tails]) > 1.1


def test_core_fraction_of_gaussian_truth_is_two_sigma_coverage():
    rng = np.random.default_rng(10)
    n = 50_000
    sigma_mm = 0.15
    truth = rng.normal(0.0, sigma_mm, size=n)
    # a model with half its clusters far away and 1000 layers where no cluster was built
    half = n // 2
    degraded = np.r_[rng.normal(0.0, sigma_mm, size=half), rng.choice([-1.0, 1.0], size=half) * 50 * sigma_mm]
    frame = pl.DataFrame(
        {
            "model": ["truth"] * n + ["degraded"] * (n + 1000),
            "residual": np.r_[truth, degraded, np.full(1000, np.nan)],
        }
    ).with_columns(pl.col("residual").fill_nan(None))
    table, fit = m.core_fraction_table(frame)
    rows = {row["model"]: row for row in table.iter_rows(named=True)}
    two_sigma_coverage = math.erf(2 / math.sqrt(2))  # 0.9545
    assert_allclose(rows["truth"]["core_fraction"], two_sigma_coverage, atol=0.005)
    assert_allclose(rows["truth"]["core_fraction_err"], math.sqrt(0.9545 * 0.0455 / n), rtol=0.02)
    assert_allclose(fit.sigma, sigma_mm, rtol=0.02)
    assert rows["degraded"]["n_missing"] == 1000
    assert_allclose(rows["degraded"]["core_fraction"], two_sigma_coverage * half / (n + 1000), atol=0.005)


def test_gaussian_fit_falls_back_for_flat_top_and_refuses_discrete_data():
    rng = np.random.default_rng(12)
    flat = st.fit_gaussian_core(rng.uniform(-1.0, 1.0, size=10_000))
    assert flat.method == "fixed window"
    assert 0.2 < flat.sigma < 1.0
    with pytest.raises(ValueError, match="no Gaussian-like core"):
        st.fit_gaussian_core(np.round(rng.normal(0.0, 0.1, size=10_000) / 0.05) * 0.05)
    with pytest.raises(ValueError, match="zero spread"):
        st.fit_gaussian_core(np.zeros(100))


def test_cluster_residuals_skip_layers_outside_acceptance():
    clusters = pl.LazyFrame(
        {
            "event_id": [1, 1, 1, 2],
            "layer": [0, 1, 2, 0],
            "model": ["truth"] * 4,
            "x_reco": [1.5, float("nan"), 3.0, -2.0],
            "x_true": [1.0, 2.0, float("nan"), -2.25],
        }
    )
    table = m.cluster_residual_table(clusters)
    assert table["layer"].to_list() == [0, 1, 0]  # layer 2 of event 1: muon outside, dropped
    assert table["residual"].to_list() == [0.5, None, 0.25]  # no cluster built -> null


# --------------------------------------------------------------------------------------------- q/pT


def test_q_over_pt_residual_expression_by_hand():
    frame = pl.DataFrame({"q": [-1, 1], "pt": [25.0, 40.0], "q_over_pt_pred": [-0.042, 0.0225]})
    residual = frame.select(m.q_over_pt_residual_expr())["q_over_pt_pred"].to_list()
    # (−0.042 + 0.04)/(−0.04) = 0.05; (0.0225 − 0.025)/0.025 = −0.1
    assert_allclose(residual, [0.05, -0.1], rtol=1e-12)


def _synthetic_tracks(rng: np.random.Generator, n: int) -> tuple[pl.LazyFrame, pl.LazyFrame, dict[str, np.ndarray]]:
    pt = rng.uniform(18.0, 52.0, size=n).astype(np.float32)
    pt[:6] = [20.0, 25.0, 45.0, 50.0, 19.99, 50.01]  # bin edges and just outside
    q = rng.choice(np.array([-1, 1], dtype=np.int8), size=n)
    events = pl.LazyFrame({"event_id": np.arange(n, dtype=np.int64), "pt": pt, "q": q})
    resolution = 0.01 + 0.001 * (pt - 20.0)  # σ grows with pT so the bins differ
    q_over_pt_pred = (q / pt * (1.0 + rng.normal(size=n) * resolution)).astype(np.float32)
    fit_status = np.where(rng.uniform(size=n) < 0.05, 1, 0).astype(np.int8)
    q_over_pt_pred[np.flatnonzero(fit_status == 1)[::2]] = np.nan  # half the failures also lack a value
    tracks = pl.LazyFrame(
        {
            "event_id": np.arange(n, dtype=np.int64),
            "model": ["e2e"] * n,
            "pt_pred": np.abs(1.0 / q_over_pt_pred),
            "q_pred": np.where(q_over_pt_pred < 0, -1, 1).astype(np.int8),
            "q_over_pt_pred": q_over_pt_pred,
            "radius": np.ones(n, np.float32),
            "fit_status": fit_status,
        }
    )
    return tracks, events, {"pt": pt, "q": q, "q_over_pt_pred": q_over_pt_pred, "fit_status": fit_status}


def test_resolution_bins_match_numpy_on_filtered_samples():
    rng = np.random.default_rng(11)
    tracks, events, raw = _synthetic_tracks(rng, 3000)
    residuals = m.track_residual_table(tracks, events)
    table = m.resolution_by_pt(residuals, n_boot=50)
    assert table.columns == ["model", "pt_lo", "pt_hi", "n", "sigma68", "sigma68_err", *m.TAIL_COLUMNS]
    assert table["pt_lo"].to_list() == [20.0, 25.0, 30.0, 35.0, 40.0, 45.0]
    # independent NumPy computation on the raw arrays
    pt = raw["pt"].astype(np.float64)
    true = raw["q"] / pt
    residual = (raw["q_over_pt_pred"].astype(np.float64) - true) / true
    ok = (raw["fit_status"] == 0) & np.isfinite(residual)
    for row in table.iter_rows(named=True):
        upper = pt <= row["pt_hi"] if row["pt_hi"] == 50.0 else pt < row["pt_hi"]
        selected = residual[ok & (pt >= row["pt_lo"]) & upper]
        assert row["n"] == selected.size
        expected = np.quantile(np.abs(selected - np.median(selected)), 0.68)
        assert_allclose(row["sigma68"], expected, rtol=1e-12)
        assert 0 < row["sigma68_err"] < 0.3 * expected
    overall = m.resolution_by_model(residuals, n_boot=50).row(0, named=True)
    assert overall["n_failed"] == int((~ok).sum())
    assert overall["n"] == int(ok.sum())
    assert_allclose(overall["sigma68"], st.sigma68(residual[ok]), rtol=1e-12)


def test_resolution_table_keeps_empty_bins():
    frame = pl.DataFrame(
        {
            "model": ["baseline"] * 3,
            "pt": [21.0, 22.0, 23.0],
            "fit_ok": [True, True, True],
            "residual": [0.01, -0.02, 0.03],
            "charge_misid": [False, True, False],
        }
    )
    table = m.resolution_by_pt(frame, n_boot=20)
    assert table["n"].to_list() == [3, 0, 0, 0, 0, 0]
    assert table["sigma68"].null_count() == 5
    # an empty bin: no wrong charge and no tail counted, no rate, no bias
    assert table["n_charge_misid"].to_list() == [1, 0, 0, 0, 0, 0]
    assert table["n_tail"].to_list() == [0] * 6
    for column in ("bias", "charge_misid_rate", "charge_misid_rate_lo", "tail_fraction", "tail_fraction_hi"):
        assert table[column].null_count() == 5, column


# --------------------------------------------------------------------------------- tails, bias and charge


def _one_sigma_level() -> float:
    """The coverage of ±1σ of a Gaussian, from SciPy (independent of analysis.statistics.ONE_SIGMA_LEVEL)."""
    from scipy.stats import norm

    return float(norm.cdf(1.0) - norm.cdf(-1.0))


def _beta_interval(k: int, n: int) -> tuple[float, float]:
    """The central Clopper–Pearson 68.27 % interval from scipy.stats.beta quantiles (0 and 1 at the ends)."""
    from scipy.stats import beta

    alpha = 1.0 - _one_sigma_level()
    lower = beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    upper = beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
    return float(lower), float(upper)


@pytest.mark.parametrize(("k", "n"), [(3, 40), (0, 40), (40, 40), (1, 1), (7, 2062), (500, 1000)])
def test_clopper_pearson_against_beta_quantiles(k, n):
    lower, upper = st.clopper_pearson(k, n)
    assert_allclose((lower, upper), _beta_interval(k, n), rtol=1e-9, atol=1e-15)
    assert lower <= k / n <= upper


def test_clopper_pearson_covers_at_least_its_level():
    # exact coverage of the interval for a true fraction p: Σ over k of P(k | n, p) where the interval holds p
    from scipy.stats import binom

    n = 30
    k = np.arange(n + 1)
    lower, upper = st.clopper_pearson(k, np.full(k.size, n))
    for p in (0.01, 0.05, 0.2, 0.5):
        covered = (lower <= p) & (p <= upper)
        assert binom.pmf(k[covered], n, p).sum() >= _one_sigma_level() - 1e-12
    # no trials: no interval; an impossible count is refused
    assert np.isnan(st.clopper_pearson(0, 0)).all()
    with pytest.raises(ValueError, match="successes <= trials"):
        st.clopper_pearson(5, 4)


def test_bootstrap_median_error_is_the_median_standard_error():
    rng = np.random.default_rng(21)
    n, sigma = 4000, 0.01
    residuals = rng.normal(0.003, sigma, size=n)
    value, err = st.bootstrap_median(residuals, n_boot=400, seed=3)
    assert value == np.median(residuals)
    # asymptotic standard error of the median of a Gaussian: sqrt(π/2) σ / sqrt(n)
    assert_allclose(err, math.sqrt(math.pi / 2) * sigma / math.sqrt(n), rtol=0.2)
    assert st.bootstrap_median(residuals[::-1], n_boot=400, seed=3) == (value, err)


def _planted_tracks(
    pt: np.ndarray, q: np.ndarray, relative: np.ndarray, flipped: np.ndarray, failed: np.ndarray
) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """Tracks of one model with q/pT = q/pT_true (1 + relative), the charge (and q/pT's sign) flipped where
    ``flipped``, and fit_status 1 where ``failed``."""
    n = pt.size
    q_over_pt = q / pt * (1.0 + relative)
    q_pred = np.where(flipped, -q, q).astype(np.int8)
    q_over_pt = np.where(flipped, -q_over_pt, q_over_pt).astype(np.float32)
    events = pl.LazyFrame({"event_id": np.arange(n, dtype=np.int64), "pt": pt.astype(np.float32), "q": q})
    tracks = pl.LazyFrame(
        {
            "event_id": np.arange(n, dtype=np.int64),
            "model": ["e2e"] * n,
            "pt_pred": np.abs(1.0 / q_over_pt),
            "q_pred": q_pred,
            "q_over_pt_pred": q_over_pt,
            "radius": np.ones(n, np.float32),
            "fit_status": failed.astype(np.int8),
        }
    )
    return tracks, events


def test_charge_misid_rate_of_planted_wrong_charges():
    """3 of 40 successful fits with the wrong charge: rate 3/40 with the Clopper–Pearson interval of the Beta
    quantiles; two failed fits with a wrong charge do not count."""
    rng = np.random.default_rng(31)
    n_ok, wrong = 40, [4, 17, 33]
    pt = rng.uniform(20.0, 50.0, n_ok + 2)
    q = rng.choice(np.array([-1, 1], np.int8), n_ok + 2)
    flipped = np.isin(np.arange(n_ok + 2), [*wrong, n_ok, n_ok + 1])
    failed = np.arange(n_ok + 2) >= n_ok
    tracks, events = _planted_tracks(pt, q, rng.normal(0.0, 0.01, n_ok + 2), flipped, failed)
    residuals = m.track_residual_table(tracks, events)
    row = m.resolution_by_model(residuals, n_boot=20).row(0, named=True)
    assert (row["n"], row["n_failed"], row["n_charge_misid"]) == (n_ok, 2, len(wrong))
    assert_allclose(row["charge_misid_rate"], len(wrong) / n_ok, rtol=1e-12)
    assert_allclose(
        (row["charge_misid_rate_lo"], row["charge_misid_rate_hi"]), _beta_interval(len(wrong), n_ok), rtol=1e-9
    )
    # per pT bin: the wrong charges counted in the bins of their true pT
    bins = m.resolution_by_pt(residuals, n_boot=20)
    edges = np.asarray(m.PT_BIN_EDGES)
    expected = np.bincount(np.searchsorted(edges, pt[wrong], side="right") - 1, minlength=edges.size - 1)
    assert bins["n_charge_misid"].to_list() == expected.tolist()
    for bin_row in bins.iter_rows(named=True):
        if bin_row["n"]:
            assert_allclose(bin_row["charge_misid_rate"], bin_row["n_charge_misid"] / bin_row["n"], rtol=1e-12)
            interval = _beta_interval(bin_row["n_charge_misid"], bin_row["n"])
            assert_allclose((bin_row["charge_misid_rate_lo"], bin_row["charge_misid_rate_hi"]), interval, rtol=1e-9)


def test_bias_and_tails_of_a_planted_shift_and_outliers():
    """A Gaussian core shifted by 0.4 σ, 30 outliers beyond 10 σ68 and 3 charge flips (r ≈ −2): the bias is the
    median, the tails are exactly the planted ones, and both agree with NumPy on the residuals."""
    rng = np.random.default_rng(41)
    n, sigma, shift = 3000, 0.01, 0.004
    pt = rng.uniform(20.0, 50.0, n)
    q = rng.choice(np.array([-1, 1], np.int8), n)
    relative = rng.normal(shift, sigma, n)
    outliers = rng.choice(n, 33, replace=False)
    relative[outliers[:30]] = shift + rng.choice([-1.0, 1.0], 30) * rng.uniform(0.1, 0.3, 30)
    flipped = np.isin(np.arange(n), outliers[30:])
    failed = np.zeros(n, bool)
    failed[rng.choice(np.setdiff1d(np.arange(n), outliers), 50, replace=False)] = True
    tracks, events = _planted_tracks(pt, q, relative, flipped, failed)
    residuals = m.track_residual_table(tracks, events)
    row = m.resolution_by_model(residuals, n_boot=100).row(0, named=True)

    # NumPy on the residuals of the successful fits, as stored (float32 q/pT)
    stored = tracks.collect()["q_over_pt_pred"].to_numpy().astype(np.float64)
    true = q / pt.astype(np.float32).astype(np.float64)
    r = ((stored - true) / true)[~failed]
    median = np.median(r)
    width = np.quantile(np.abs(r - median), 0.68)
    n_tail = int(np.count_nonzero(np.abs(r - median) > 5 * width))
    assert_allclose(row["bias"], median, rtol=1e-12)
    assert abs(row["bias"] - shift) < 3 * row["bias_err"]
    assert_allclose(row["bias_err"], math.sqrt(math.pi / 2) * sigma / math.sqrt(r.size), rtol=0.3)
    assert n_tail == row["n_tail"] == 33  # the planted outliers and charge flips, no core event
    assert row["n_charge_misid"] == 3
    assert_allclose(row["tail_fraction"], 33 / r.size, rtol=1e-12)
    assert_allclose((row["tail_fraction_lo"], row["tail_fraction_hi"]), _beta_interval(33, r.size), rtol=1e-9)

    # per pT bin: each bin's own median and σ68
    for bin_row in m.resolution_by_pt(residuals, n_boot=50).iter_rows(named=True):
        upper = pt <= bin_row["pt_hi"] if bin_row["pt_hi"] == 50.0 else pt < bin_row["pt_hi"]
        selected = ((stored - true) / true)[~failed & (pt >= bin_row["pt_lo"]) & upper]
        bin_median = np.median(selected)
        bin_width = np.quantile(np.abs(selected - bin_median), 0.68)
        assert_allclose(bin_row["bias"], bin_median, rtol=1e-12)
        assert bin_row["n_tail"] == np.count_nonzero(np.abs(selected - bin_median) > 5 * bin_width)
        assert 0 < bin_row["bias_err"] < 0.5 * bin_width


# --------------------------------------------------------------------------------------------- hit weights


def test_hit_weight_table_matches_a_loop_over_hits():
    """Mean weight, share above 0.5 and Σ w·|x − x_true| per event against a plain Python loop, on the
    ``weight`` column (the clusters' weights), not on the classifier ``score``."""
    rng = np.random.default_rng(7)
    n_events, n_layers, n_hits = 5, 4, 30
    x_true = rng.uniform(-100, 100, (n_events, n_layers))
    x_true[2, 1] = np.nan  # the muon left this layer: its hits are left out
    hits = []
    for event in range(n_events):
        for hit in range(n_hits):
            layer = int(rng.integers(n_layers))
            particle = int(rng.choice([0, -1, 3]))
            offset = {0: rng.normal(0, 1), -1: rng.uniform(-300, 300), 3: rng.uniform(-40, 40)}[particle]
            x = np.nan_to_num(x_true[event, layer]) + offset
            hits.append((event, hit, layer, x, particle == 0 and abs(offset) < 2, particle))
    dataset_hits = pl.DataFrame(
        hits, schema=["event_id", "hit_id", "layer", "x", "is_signal", "particle_id"], orient="row"
    ).with_columns(pl.col("layer").cast(pl.Int16), pl.col("x").cast(pl.Float32))
    scores = rng.random(len(hits))
    # the refined weights of a robust-chain model: unrelated to its scores here, so using the wrong column fails
    refined = rng.random(len(hits))
    selection = (rng.random(len(hits)) < 0.3).astype(np.float64)  # a hard selection: score = weight = 1/0
    labels = dataset_hits["is_signal"].cast(pl.Float64).to_numpy()
    pred_hits = pl.concat(
        [
            pl.DataFrame(
                {"event_id": dataset_hits["event_id"], "hit_id": dataset_hits["hit_id"], "score": s, "weight": w}
            ).with_columns(model=pl.lit(name))
            for name, s, w in (
                ("e2e", scores, refined),
                ("assignment", selection, selection),
                ("truth", labels, labels),
            )
        ]
    )
    clusters = pl.DataFrame(
        {
            "event_id": np.repeat(np.arange(n_events), n_layers),
            "layer": np.tile(np.arange(n_layers), n_events).astype(np.int16),
            "model": "truth",
            "x_true": x_true.ravel().astype(np.float32),
        }
    )
    table = m.hit_weight_table(pred_hits.lazy(), dataset_hits.lazy(), clusters.lazy(), edges=(5.0, 50.0))
    assert set(table["model"]) == {"e2e", "assignment"}  # every model but the truth references

    for model, model_weights in (("e2e", refined), ("assignment", selection)):
        expected: dict[tuple[str, str], list[tuple[float, float]]] = {}
        events = set()
        for (event, _, layer, x, signal, particle), weight in zip(hits, model_weights, strict=True):
            truth_x = np.float32(x_true[event, layer])
            if not np.isfinite(truth_x):
                continue
            events.add(event)
            distance = abs(float(np.float32(x)) - float(truth_x))
            origin = "signal" if signal else "noise" if particle == -1 else "extra track"
            klass = "≤ 5 mm" if distance <= 5 else "5–50 mm" if distance <= 50 else "> 50 mm"
            expected.setdefault((origin, klass), []).append((weight, distance))
        rows = table.filter(pl.col("model") == model)
        assert rows.height == len(expected)
        for row in rows.iter_rows(named=True):
            values = np.array(expected[(row["origin"], row["distance_class"])])
            assert row["n_hits"] == len(values)
            assert_allclose(row["mean_weight"], values[:, 0].mean(), rtol=1e-12)
            assert_allclose(row["frac_above_half"], np.mean(values[:, 0] > 0.5), rtol=1e-12)
            assert_allclose(row["pull_per_event"], np.sum(values[:, 0] * values[:, 1]) / len(events), rtol=1e-6)
        order = [m.HIT_ORIGINS.index(origin) for origin in rows["origin"]]
        assert order == sorted(order)


# --------------------------------------------------------------------------------------------- hit classification


def _hit_scores(models: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray) -> pl.DataFrame:
    """A hit_score_table: {model: (score, weight)} over the same hits with the truth ``labels``."""
    return pl.concat(
        [
            pl.DataFrame(
                {
                    "model": name,
                    "event_id": np.zeros(labels.size, np.int64),
                    "hit_id": np.arange(labels.size, dtype=np.int32),
                    "score": np.asarray(score, np.float64),
                    "weight": np.asarray(weight, np.float64),
                    "is_signal": labels,
                }
            )
            for name, (score, weight) in models.items()
        ]
    )


def test_hit_efficiency_and_purity_match_numpy_counts():
    labels = np.array([True, True, True, True, False, False, False, False, False, True])
    # 0.5 is selected (weight >= 0.5); the NaN weight is left out of both counts, not selected
    weight = np.array([0.9, 0.5, 0.2, np.nan, 0.7, 0.1, 0.49, 0.5, 0.0, 1.0])
    table, _ = m.classification_metrics(_hit_scores({"e2e": (np.linspace(0, 1, labels.size), weight)}, labels))
    row = table.row(0, named=True)
    finite = np.isfinite(weight)
    selected = np.zeros(labels.size, bool)
    selected[finite] = weight[finite] >= 0.5
    n_signal = np.count_nonzero(labels & finite)  # 4
    n_selected = np.count_nonzero(selected)  # 5
    n_selected_signal = np.count_nonzero(selected & labels)  # 3
    assert (n_signal, n_selected, n_selected_signal) == (4, 5, 3)
    assert row["n_bad_weights"] == 1
    assert row["n_bad_scores"] == 0
    assert row["n_selected"] == n_selected
    assert_allclose(row["hit_efficiency"], n_selected_signal / n_signal, rtol=1e-12)
    assert_allclose(row["hit_purity"], n_selected_signal / n_selected, rtol=1e-12)
    assert_allclose(row["hit_efficiency_err"], math.sqrt(0.75 * 0.25 / 4), rtol=1e-12)
    assert_allclose(row["hit_purity_err"], math.sqrt(0.6 * 0.4 / 5), rtol=1e-12)


def test_hit_purity_is_null_when_nothing_is_selected():
    labels = np.array([True, False, True, False])
    table, _ = m.classification_metrics(_hit_scores({"e2e": (np.array([0.9, 0.1, 0.8, 0.2]), np.zeros(4))}, labels))
    row = table.row(0, named=True)
    assert row["hit_efficiency"] == 0.0
    assert row["n_selected"] == 0
    assert row["hit_purity"] is None
    assert row["hit_purity_err"] is None


def test_auc_weight_is_the_roc_auc_of_the_weight_column():
    rng = np.random.default_rng(13)
    labels = rng.uniform(size=400) < 0.4
    score = rng.normal(size=400) + np.where(labels, 1.0, -1.0)
    # a non-monotonic change of the score (the refinement moves hits by their position, not their score)
    weight = 1.0 / (1.0 + np.exp(-(score + rng.normal(0.0, 2.0, size=400))))
    table, rocs = m.classification_metrics(_hit_scores({"e2e": (score, weight), "e2e_paper": (score, score)}, labels))
    rows = {row["model"]: row for row in table.iter_rows(named=True)}
    n_signal, n_background = int(labels.sum()), int((~labels).sum())
    expected = st.auc(weight, labels)
    assert_allclose(rows["e2e"]["auc_weight"], expected, rtol=1e-12)
    assert_allclose(rows["e2e"]["auc_weight_err"], st.auc_uncertainty(expected, n_signal, n_background), rtol=1e-12)
    assert_allclose(rows["e2e"]["auc"], st.auc(score, labels), rtol=1e-12)
    assert abs(rows["e2e"]["auc_weight"] - rows["e2e"]["auc"]) > 0.02
    # the plotted ROC stays the score's
    assert_allclose(st.auc_from_roc(*rocs["e2e"]), rows["e2e"]["auc"], rtol=1e-12)
    # where weight = score (the paper chain) the two AUCs are one number
    assert rows["e2e_paper"]["auc_weight"] == rows["e2e_paper"]["auc"]


def test_hard_selection_auc_is_its_single_working_point():
    rng = np.random.default_rng(14)
    labels = rng.uniform(size=500) < 0.5
    selected = np.where(labels, rng.uniform(size=500) < 0.9, rng.uniform(size=500) < 0.2).astype(np.float64)
    table, rocs = m.classification_metrics(_hit_scores({"classical": (selected, selected)}, labels))
    row = table.row(0, named=True)
    signal_eff, background_eff = selected[labels].mean(), selected[~labels].mean()
    assert_allclose(row["auc"], (signal_eff + 1.0 - background_eff) / 2.0, rtol=1e-12)
    assert row["auc_weight"] == row["auc"]
    assert_allclose(row["hit_efficiency"], signal_eff, rtol=1e-12)
    assert rocs["classical"][0].size == 3  # (0, 0), the selection, (1, 1)


def test_ratio_with_error_by_hand():
    ratio, err = st.ratio_with_error(0.02, 0.001, 0.01, 0.0005)
    assert_allclose(ratio, 2.0, rtol=1e-12)
    assert_allclose(err, 2.0 * math.hypot(0.05, 0.05), rtol=1e-12)  # relative errors in quadrature
    change, change_err = st.relative_change(0.02, 0.001, 0.01, 0.0005)
    assert_allclose((change, change_err), (1.0, err), rtol=1e-12)
    assert all(math.isnan(v) for v in st.ratio_with_error(1.0, 0.1, 0.0, 0.1))
