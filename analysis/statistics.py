"""Statistics primitives of the evaluation, in NumPy (and SciPy for the one fit): nothing here knows a table.

- σ68 (:func:`sigma68`: :func:`pipeline.stats.sigma68`, the one definition, shared with training, also taking a Polars
  Series) and its bootstrap uncertainty (:func:`bootstrap_sigma68`, whose every replica is that same σ68); the
  median with the bootstrap uncertainty of the same replicas (:func:`bootstrap_median`);
- the Clopper–Pearson interval of a binomial fraction (:func:`clopper_pearson`);
- the exact ROC of a score, its AUC with the Hanley–McNeil error, the background efficiency and rejection at a
  signal efficiency with its binomial error;
- the iterative Gaussian fit of a residual distribution's core (:func:`fit_gaussian_core`);
- a ratio and a relative change with their propagated errors.

The Polars table builders that apply them to the predictions are :mod:`analysis.metrics`. Quantiles use *linear*
interpolation (NumPy's default, method 7 of Hyndman & Fan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline import stats

#: bootstrap replicas for σ68 uncertainties
N_BOOTSTRAP = 200
#: confidence level of a binomial interval (:func:`clopper_pearson`): the ±1σ coverage of a Gaussian, 68.27 %
ONE_SIGMA_LEVEL = math.erf(1.0 / math.sqrt(2.0))
#: half-width of the cluster core window in units of the fitted truth Gaussian sigma (the fit window of
#: :func:`fit_gaussian_core`; the core window of analysis.metrics.core_fraction_table)
CORE_WINDOW_N_SIGMA = 2.0

# Bound the memory of the bootstrap: replicas are drawn in chunks of about this many values.
_BOOTSTRAP_CHUNK_VALUES = 4_000_000


# ---------------------------------------------------------------------------------------------------------
# σ68 and bootstrap
# ---------------------------------------------------------------------------------------------------------


def _finite_1d(values: np.ndarray | pl.Series, what: str) -> np.ndarray:
    """float64 1-D array with NaNs (and Polars nulls) removed; ValueError when nothing is left."""
    if isinstance(values, pl.Series):
        values = values.cast(pl.Float64).fill_null(float("nan")).to_numpy()
    array = np.asarray(values, dtype=np.float64).ravel()
    array = array[~np.isnan(array)]
    if array.size == 0:
        raise ValueError(f"{what}: no non-NaN values")
    return array


def sigma68(residuals: np.ndarray | pl.Series) -> float:
    """Half-width of the interval centred on the median that holds 68 % of the entries.

    Defined as the 0.68 quantile of |r − median(r)| with linear interpolation between order statistics
    (NumPy ``method="linear"``). For a Gaussian it is 0.9945 σ.

    Args:
        residuals: 1-D NumPy array or Polars Series (any shape is flattened); NaNs and nulls are dropped.

    Returns:
        σ68 in the units of the residuals.

    Raises:
        ValueError: no non-NaN residual.
    """
    return stats.sigma68(_finite_1d(residuals, "sigma68"))


def _bootstrap_replicas(r: np.ndarray, n_boot: int, seed: int, statistic) -> np.ndarray:
    """``statistic`` ([k, n] resamples -> [k] values) over ``n_boot`` resamples of ``r`` with replacement, drawn
    in chunks of about :data:`_BOOTSTRAP_CHUNK_VALUES` values from ``np.random.default_rng(seed)``: the same
    ``r``, ``n_boot`` and ``seed`` give the same resamples whatever the statistic."""
    rng = np.random.default_rng(seed)
    replicas = np.empty(n_boot)
    chunk = max(1, _BOOTSTRAP_CHUNK_VALUES // r.size)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        replicas[start:stop] = statistic(r[rng.integers(0, r.size, size=(stop - start, r.size))])
    return replicas


def bootstrap_sigma68(
    residuals: np.ndarray | pl.Series, n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """σ68 and its bootstrap uncertainty.

    Args:
        residuals: 1-D residuals; NaNs dropped.
        n_boot: number of bootstrap replicas (resampling with replacement, same size).
        seed: NumPy generator seed; with it the result depends only on the multiset of residuals.

    Returns:
        (σ68 of the sample, standard deviation (ddof=1) of σ68 over the replicas). The error is NaN for
        fewer than 2 residuals or fewer than 2 replicas.
    """
    # sorted, so the replicas depend on the values only, not on their order (joins do not keep row order)
    r = np.sort(_finite_1d(residuals, "bootstrap_sigma68"))
    value = sigma68(r)
    if r.size < 2 or n_boot < 2:
        return value, float("nan")
    replicas = _bootstrap_replicas(r, n_boot, seed, lambda samples: [stats.sigma68(sample) for sample in samples])
    return value, float(np.std(replicas, ddof=1))


def bootstrap_median(
    residuals: np.ndarray | pl.Series, n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """The median (linear interpolation: the mean of the two middle values of an even sample) and its bootstrap
    uncertainty.

    The resamples are those of :func:`bootstrap_sigma68` with the same ``n_boot`` and ``seed`` (the residuals
    sorted first, so row order does not matter).

    Returns:
        (median of the sample, standard deviation (ddof=1) of the median over the replicas); the error is NaN
        for fewer than 2 residuals or fewer than 2 replicas.
    """
    r = np.sort(_finite_1d(residuals, "bootstrap_median"))
    value = float(np.median(r))
    if r.size < 2 or n_boot < 2:
        return value, float("nan")
    replicas = _bootstrap_replicas(r, n_boot, seed, lambda samples: np.median(samples, axis=1))
    return value, float(np.std(replicas, ddof=1))


# ---------------------------------------------------------------------------------------------------------
# Binomial interval
# ---------------------------------------------------------------------------------------------------------


def clopper_pearson(
    successes: np.ndarray | int, trials: np.ndarray | int, level: float = ONE_SIGMA_LEVEL
) -> tuple[np.ndarray, np.ndarray]:
    """The central Clopper–Pearson ("exact") interval of a binomial fraction k/n (vectorised).

    lower = B⁻¹(α/2; k, n − k + 1), upper = B⁻¹(1 − α/2; k + 1, n − k) with α = 1 − ``level``, B⁻¹ the inverse of
    the regularised incomplete beta function (the quantiles of a Beta distribution); lower = 0 for k = 0 and
    upper = 1 for k = n. It covers the true fraction with at least ``level`` whatever it is, also for k = 0, where
    the normal approximation √(f(1 − f)/n) collapses to 0.

    Args:
        successes: k, integers in [0, n].
        trials: n, integers ≥ 0; n = 0 gives NaN bounds.
        level: the coverage, by default 68.27 % (±1σ of a Gaussian).

    Returns:
        (lower, upper) as float64 arrays of the broadcast shape of ``successes`` and ``trials``.

    Raises:
        ValueError: k outside [0, n], n < 0, or a level outside (0, 1).
    """
    # imported here: scipy is most of the start-up of `muontrack results` and `evaluate`
    from scipy.special import betaincinv

    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if not 0.0 < level < 1.0:
        raise ValueError(f"clopper_pearson: level must be in (0, 1), got {level}")
    if np.any(n < 0) or np.any(k < 0) or np.any(k > n):
        raise ValueError("clopper_pearson: need 0 <= successes <= trials")
    alpha = 1.0 - level
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(k > 0, betaincinv(np.maximum(k, 1.0), n - k + 1.0, alpha / 2.0), 0.0)
        upper = np.where(k < n, betaincinv(k + 1.0, np.maximum(n - k, 1.0), 1.0 - alpha / 2.0), 1.0)
    empty = n == 0
    return np.where(empty, np.nan, lower), np.where(empty, np.nan, upper)


# ---------------------------------------------------------------------------------------------------------
# ROC
# ---------------------------------------------------------------------------------------------------------


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC of a score: a hit is selected when ``score >= threshold``.

    One point per distinct score value (tied scores enter together, so a tie is one diagonal step and the
    trapezoidal AUC counts it 1/2), preceded by (0, 0) at threshold +inf; the last point is (1, 1).

    Args:
        scores: [n] float scores; NaN is not allowed.
        labels: [n] bool (or 0/1) truth, True for signal.

    Returns:
        (signal_eff, background_eff, thresholds), each [m + 1] for m distinct scores; efficiencies are
        non-decreasing, thresholds decreasing from +inf.

    Raises:
        ValueError: mismatched lengths, NaN scores, or a class with no entries.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"roc_curve: {scores.size} scores but {labels.size} labels")
    if np.isnan(scores).any():
        raise ValueError(f"roc_curve: {int(np.isnan(scores).sum())} NaN scores")
    n_signal = int(labels.sum())
    n_background = labels.size - n_signal
    if n_signal == 0 or n_background == 0:
        raise ValueError(f"roc_curve: need both classes, got {n_signal} signal and {n_background} background")
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    true_positives = np.cumsum(sorted_labels)
    false_positives = np.cumsum(~sorted_labels)
    # last position of each group of equal scores: the working point includes the whole tie
    group_end = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    signal_eff = np.r_[0.0, true_positives[group_end] / n_signal]
    background_eff = np.r_[0.0, false_positives[group_end] / n_background]
    thresholds = np.r_[np.inf, sorted_scores[group_end]]
    return signal_eff, background_eff, thresholds


def auc_from_roc(signal_eff: np.ndarray, background_eff: np.ndarray) -> float:
    """Area under the ROC (signal efficiency integrated over background efficiency, trapezoidal rule)."""
    return float(np.trapezoid(signal_eff, background_eff))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC = P(score_signal > score_background) + ½ P(tie), from the exact ROC of :func:`roc_curve`."""
    signal_eff, background_eff, _ = roc_curve(scores, labels)
    return auc_from_roc(signal_eff, background_eff)


def auc_uncertainty(auc_value: float, n_signal: int, n_background: int) -> float:
    """Hanley–McNeil (1982) standard error of an AUC.

    SE² = [A(1−A) + (n_s−1)(Q1−A²) + (n_b−1)(Q2−A²)] / (n_s n_b), Q1 = A/(2−A), Q2 = 2A²/(1+A).
    It treats hits as independent; hits of one event are correlated, so read it as a lower bound.
    """
    a = float(auc_value)
    q1 = a / (2.0 - a)
    q2 = 2.0 * a * a / (1.0 + a)
    variance = (a * (1 - a) + (n_signal - 1) * (q1 - a * a) + (n_background - 1) * (q2 - a * a)) / (
        n_signal * n_background
    )
    return math.sqrt(max(variance, 0.0))


def background_efficiency_at(
    signal_eff: np.ndarray, background_eff: np.ndarray, signal_eff_target: float | np.ndarray
) -> np.ndarray:
    """Background efficiency on the ROC at given signal efficiencies (vectorised).

    Linear interpolation between the two ROC points that bracket the target. Where the ROC runs vertically
    through the target (several points with exactly that signal efficiency) the smallest background
    efficiency is taken: the tightest threshold that reaches the target.

    Args:
        signal_eff, background_eff: [m] ROC from :func:`roc_curve` (non-decreasing, starting at (0, 0)).
        signal_eff_target: scalar or array of targets in [0, 1].

    Returns:
        background efficiency, same shape as ``signal_eff_target``.
    """
    targets = np.asarray(signal_eff_target, dtype=np.float64)
    if np.any((targets < 0) | (targets > 1)):
        raise ValueError("background_efficiency_at: signal efficiency targets must be in [0, 1]")
    upper = np.searchsorted(signal_eff, targets, side="left")  # first point with signal_eff >= target
    upper = np.clip(upper, 0, signal_eff.size - 1)
    lower = np.maximum(upper - 1, 0)
    exact = signal_eff[upper] == targets
    span = np.where(exact, 1.0, signal_eff[upper] - signal_eff[lower])
    fraction = np.where(exact, 1.0, (targets - signal_eff[lower]) / span)
    return background_eff[lower] + fraction * (background_eff[upper] - background_eff[lower])


def background_rejection_at(signal_eff: np.ndarray, background_eff: np.ndarray, signal_eff_target: float) -> float:
    """Background rejection 1/ε_b at a signal efficiency ε_s (ε_b from :func:`background_efficiency_at`).

    Returns +inf when no background passes at that working point.
    """
    eff = float(background_efficiency_at(signal_eff, background_eff, signal_eff_target))
    return math.inf if eff <= 0 else 1.0 / eff


def rejection_uncertainty(rejection: float, n_background: int) -> float:
    """Binomial uncertainty of a rejection R = 1/ε_b from N_b background hits: R·sqrt((1−ε_b)/(ε_b N_b)).

    Only the background counting is included (the threshold is taken as exact); NaN for infinite R.
    """
    if not math.isfinite(rejection) or rejection <= 0:
        return float("nan")
    eff = 1.0 / rejection
    return rejection * math.sqrt((1.0 - eff) / (eff * n_background))


# ---------------------------------------------------------------------------------------------------------
# Gaussian core fit
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianFit:
    """Result of :func:`fit_gaussian_core` (units of the residuals, mm for clusters)."""

    mu: float
    sigma: float
    mu_err: float
    sigma_err: float
    n_fit: int  # entries inside the final fit window
    method: str = "iterative"  # or "fixed window" (the fallback, see fit_gaussian_core)


# P(|X − μ| < σ/2) for a Gaussian
_HALF_SIGMA_COVERAGE = math.erf(0.5 / math.sqrt(2.0))


def _gaussian(x: np.ndarray, amplitude: float, mu: float, sigma: float) -> np.ndarray:
    return amplitude * np.exp(-0.5 * ((x - mu) / sigma) ** 2)


def _fit_gaussian_histogram(
    counts: np.ndarray, edges: np.ndarray, mu: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares Gaussian fit to bin contents at the bin centres, Poisson errors max(√n, 1)."""
    # imported here: scipy.optimize is most of the start-up of `muontrack results` and `evaluate`
    from scipy.optimize import curve_fit

    centres = 0.5 * (edges[1:] + edges[:-1])
    try:
        return curve_fit(
            _gaussian,
            centres,
            counts,
            p0=(max(counts.max(), 1), mu, sigma),
            sigma=np.sqrt(np.maximum(counts, 1)),
            absolute_sigma=True,
            maxfev=5000,
        )
    except RuntimeError as err:
        raise ValueError(f"fit_gaussian_core: fit did not converge ({err})") from err


def _iterate_window_fit(
    r: np.ndarray, mu: float, sigma: float, window_n_sigma: float, bins_per_sigma: int, max_iterations: int
) -> tuple[float, float, np.ndarray, int]:
    """The iterative window fit of :func:`fit_gaussian_core` on one fixed bin grid -> (μ, σ, cov, n_fit)."""
    anchor, width, start_sigma = mu, sigma / bins_per_sigma, sigma
    seen: set[tuple[int, int]] = set()
    covariance, n_fit = np.full((3, 3), np.nan), 0  # set by the first fit: the first window is always new
    for _ in range(max_iterations):
        first = math.floor((mu - window_n_sigma * sigma - anchor) / width + 0.5)
        last = math.floor((mu + window_n_sigma * sigma - anchor) / width + 0.5)
        if last - first < 4:
            raise ValueError("fit_gaussian_core: fit window shrank below 4 bins")
        if (first, last) in seen:
            return mu, sigma, covariance, n_fit
        seen.add((first, last))
        edges = anchor + width * np.arange(first, last + 1)
        counts, _ = np.histogram(r, bins=edges)
        params, covariance = _fit_gaussian_histogram(counts, edges, mu, sigma)
        n_fit = int(counts.sum())
        mu, sigma = float(params[1]), abs(float(params[2]))
        if not (math.isfinite(sigma) and math.isfinite(mu) and 0 < sigma < 4 * start_sigma):
            # a flat-topped distribution makes the window and σ grow without end
            raise ValueError("fit_gaussian_core: iterative fit ran away (distribution not Gaussian-like)")
    raise ValueError(f"fit_gaussian_core: window did not settle within {max_iterations} iterations")


def fit_gaussian_core(
    residuals: np.ndarray | pl.Series,
    window_n_sigma: float = CORE_WINDOW_N_SIGMA,
    bins_per_sigma: int = 10,
    max_iterations: int = 30,
) -> GaussianFit:
    """Iterative Gaussian fit of the core of a residual distribution.

    Start from μ = median and σ = min(σ68, 2 × the 0.383 quantile of |r − median|) (the second is the σ of
    a Gaussian holding 38.3 % within ±σ/2: robust when the core holds only half the entries). Bins of fixed
    width σ/``bins_per_sigma`` are laid on a grid anchored at the median; each iteration takes the grid bins
    inside μ ± ``window_n_sigma``·σ and fits A·exp(−(x−μ)²/2σ²) to their contents at the bin centres
    (``scipy.optimize.curve_fit``, Poisson errors max(√n, 1)). The window moves with the fit until it
    selects the same bins twice (a fixed point; on a 2-cycle the later fit is kept); a fixed grid, unlike
    re-binning, makes this terminate exactly. Tails outside the window do not pull the fit. If the fitted σ
    ends below half the starting σ, the grid is refined once around the new core.

    Fallback (``method="fixed window"``): where the iteration runs away (σ beyond 4× its start, as for a
    flat-topped distribution) or does not settle, one fit in median ± ``window_n_sigma``·σ68.

    Args:
        residuals: 1-D residuals; NaNs dropped, non-finite values ignored.

    Returns:
        :class:`GaussianFit` with the parameter errors from the fit covariance.

    Raises:
        ValueError: fewer than 10 finite entries, zero spread, no fit converges, or the fallback fit lands
            far from the median/σ68 (e.g. strongly discretised residuals).
    """
    r = _finite_1d(residuals, "fit_gaussian_core")
    r = r[np.isfinite(r)]
    if r.size < 10:
        raise ValueError(f"fit_gaussian_core: need at least 10 residuals, got {r.size}")
    median = float(np.median(r))
    width68 = sigma68(r)
    half_sigma = float(np.quantile(np.abs(r - median), _HALF_SIGMA_COVERAGE, method="linear"))
    start_sigma = min(width68, 2.0 * half_sigma) if half_sigma > 0 else width68  # discrete data: 0 possible
    if not start_sigma > 0:
        raise ValueError("fit_gaussian_core: residuals have zero spread")
    try:
        mu, sigma = median, start_sigma
        for _refinement in range(2):
            grid_sigma = sigma
            mu, sigma, covariance, n_fit = _iterate_window_fit(
                r, mu, sigma, window_n_sigma, bins_per_sigma, max_iterations
            )
            if sigma >= 0.5 * grid_sigma:
                break
        method = "iterative"
    except ValueError:
        edges = np.linspace(median - window_n_sigma * width68, median + window_n_sigma * width68, 41)
        counts, _ = np.histogram(r, bins=edges)
        params, covariance = _fit_gaussian_histogram(counts, edges, median, width68)
        mu, sigma, n_fit, method = float(params[1]), abs(float(params[2])), int(counts.sum()), "fixed window"
        if not (abs(mu - median) < width68 and 0.2 * width68 < sigma < 5 * width68):
            raise ValueError("fit_gaussian_core: no Gaussian-like core (fit far from median and σ68)") from None
    return GaussianFit(
        mu=mu,
        sigma=sigma,
        mu_err=float(np.sqrt(covariance[1, 1])),
        sigma_err=float(np.sqrt(covariance[2, 2])),
        n_fit=n_fit,
        method=method,
    )


# ---------------------------------------------------------------------------------------------------------
# Error propagation
# ---------------------------------------------------------------------------------------------------------


def ratio_with_error(
    numerator: float, numerator_err: float, denominator: float, denominator_err: float
) -> tuple[float, float]:
    """numerator/denominator and its error, propagating both errors as independent; NaNs for a zero or
    non-finite denominator."""
    if denominator == 0 or not math.isfinite(denominator):
        return float("nan"), float("nan")
    err = math.hypot(numerator_err / denominator, numerator * denominator_err / denominator**2)
    return numerator / denominator, err


def relative_change(new: float, new_err: float, reference: float, reference_err: float) -> tuple[float, float]:
    """(new − reference)/reference and its error, propagating both errors as independent."""
    ratio, err = ratio_with_error(new, new_err, reference, reference_err)
    return ratio - 1.0, err
