"""The Cramér-Rao limit of the q/pT resolution, per event and as the σ68 of the evaluation (NumPy, float64).

**The bound.** The muon is the simulation's model (simulation/physics.py): an exact circle from its true
(x0, theta0) on the first layer, one Gaussian Highland kink after every layer it crosses inside the active
width (momentum = pT, muon mass, path ``x/X0 / cos theta``), and a Gaussian point error sigma on every layer it
is measured on. Linearised around the true track (the kinks are ~1e-4 rad, so the model is linear in them to
~1e-5 mm) the measurements are Gaussian with mean ``x_circle(p)`` and covariance

    V = sigma^2 I + G diag(theta0^2) G^T,   G_kj = d x_k / d theta_j for y_k > y_j (else 0),

``G_kj = (y_k - y_j) (cos th_j + sin th_j (sin th_j + sin th_k) / (cos th_j + cos th_k)) / cos th_k`` along the
circle (the small-angle ``y_k - y_j`` with the track direction accounted for). The Fisher information of the
three circle parameters is ``J^T V^-1 J`` (J the circle's Jacobian) and the bound on q/pT is the curvature
entry of its inverse. No unbiased estimator of these measurements does better; GLS with this V (model/ and
classical/gbl.py) reaches it, plain least squares does not.

**Its σ68.** With relative widths ``s_i = sigma_i(q/pT) / |q/pT|_i``, the relative residuals of an efficient
fit are the mixture of zero-mean Gaussians N(0, s_i^2). The evaluation's σ68 (pipeline.stats: the 0.68
quantile of |r - median(r)|) of that symmetric mixture is the half-width h with mean_i erf(h / (sqrt 2 s_i)) =
0.68, found here by root finding (no sampling).

**The point resolution** of the bound is that of a clean cluster's charge centroid
(:func:`clean_cluster_residuals`): the muon's cluster on a layer where no other particle or noise strip touches
it, measured against the true crossing.

analysis imports only pipeline, so the Highland formula is written here in NumPy with the constants of
pipeline.constants (simulation.physics.highland_sigma in Numba; the tests check they agree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl
from scipy.optimize import brentq
from scipy.special import erf

from pipeline.config import PT_PER_TESLA_METRE, DetectorConfig
from pipeline.constants import COS_FLOOR, HIGHLAND_LOG, HIGHLAND_SCALE, MUON_MASS
from pipeline.stats import SIGMA68_COVERAGE, sigma68

#: edges of the true-pT bins [GeV] (analysis.metrics.PT_BIN_EDGES; the last bin closed on both sides)
PT_BIN_EDGES = (20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0)


def highland_sigma(p: np.ndarray, x_over_x0: np.ndarray, mass: float = MUON_MASS) -> np.ndarray:
    """Highland RMS plane angle [rad] (PDG 2024 eq. 34.16) at momentum ``p`` [GeV] through ``x_over_x0``
    radiation lengths, element-wise; 0 where there is no material (simulation.physics.highland_sigma)."""
    p = np.asarray(p, np.float64)
    t = np.asarray(x_over_x0, np.float64)
    beta = p / np.sqrt(p * p + mass * mass)
    has = t > 0
    t_safe = np.where(has, t, 1.0)
    value = HIGHLAND_SCALE / (beta * p) * np.sqrt(t_safe) * (1.0 + HIGHLAND_LOG * np.log(t_safe / (beta * beta)))
    return np.where(has, value, 0.0)


def _as_float(values, n: int | None = None) -> np.ndarray:
    a = np.atleast_1d(np.asarray(values, np.float64))
    return a if n is None else np.broadcast_to(a, (n,))


def cramer_rao_sigma(
    detector: DetectorConfig,
    pt,
    q,
    x0,
    theta0,
    point_sigma,
    *,
    measured: np.ndarray | None = None,
) -> np.ndarray:
    """The Cramér-Rao bound on sigma(q/pT) [1/GeV] of each event (module docstring), shape ``[E]``.

    Args:
        detector: the geometry, field and material (``x_over_x0``, ``multiple_scattering``).
        pt, q, x0, theta0: the muon's truth (events table columns), shape ``[E]`` (or scalars).
        point_sigma: point resolution [mm], scalar or ``[L]``.
        measured: bool ``[E, L]``, the layers with a measurement (e.g. ``np.isfinite(x_true)``); default: the
            layers where the unscattered track crosses the active width. Material acts where the track crosses
            the active width, measured or not.

    Events with fewer than three measured layers get an infinite bound.
    """
    pt = _as_float(pt)
    n_events = pt.shape[0]
    q, x0, theta0 = (_as_float(v, n_events) for v in (q, x0, theta0))
    layer_y = detector.layer_y()
    n_layers = layer_y.shape[0]
    sigma = np.broadcast_to(np.asarray(point_sigma, np.float64), (n_layers,))
    kappa = q * PT_PER_TESLA_METRE * detector.b_field / (1000.0 * pt)  # [1/mm]

    # the unscattered circle from the first layer (the simulation's exact plane-to-plane step)
    dy0 = layer_y - layer_y[0]
    s0, c0 = np.sin(theta0)[:, None], np.cos(theta0)[:, None]
    s = s0 + kappa[:, None] * dy0[None, :]
    c = np.sqrt(np.maximum(1.0 - s * s, COS_FLOOR**2))
    reached = np.abs(s) < 1.0
    x = x0[:, None] + dy0[None, :] * (s0 + s) / (c0 + c)
    inside = reached & (x >= detector.x_min) & (x <= detector.x_max)
    measured = inside if measured is None else np.asarray(measured, bool) & reached

    # Jacobian of the crossings w.r.t. (x, sin theta, kappa) at y_ref, in mm per scaled parameter
    y_ref = 0.5 * (layer_y[0] + layer_y[-1])
    half_span = max(0.5 * (layer_y[-1] - layer_y[0]), 1.0)
    s_ref = s0 + kappa[:, None] * (y_ref - layer_y[0])
    c_ref = np.sqrt(np.maximum(1.0 - s_ref * s_ref, COS_FLOOR**2))
    dy = (layer_y - y_ref)[None, :]
    d_theta = dy * (c_ref + s_ref * (s_ref + s) / (c_ref + c)) / c
    d_kappa = dy * dy * (1.0 + c * c_ref + s * s_ref) / (c * (c_ref + c) ** 2)
    jac = np.stack([np.ones_like(d_theta), d_theta / (c_ref * half_span), d_kappa * 2 / half_span**2], axis=-1)

    # scattering covariance of the crossings
    x_over_x0 = detector.x_over_x0 if detector.multiple_scattering else 0.0
    theta_ms = np.where(inside, highland_sigma(pt[:, None], x_over_x0 / c), 0.0)  # [E, L]
    dy_kj = layer_y[:, None] - layer_y[None, :]  # [k, j]
    s_j, c_j, s_k, c_k = s[:, None, :], c[:, None, :], s[:, :, None], c[:, :, None]
    g = np.where(dy_kj > 0, dy_kj * (c_j + s_j * (s_j + s_k) / (c_j + c_k)) / c_k, 0.0)  # [E, k, j]
    # an unmeasured layer: no row in J or G, so it decouples from the others (its V entry is sigma^2 alone)
    jac = np.where(measured[:, :, None], jac, 0.0)
    g = np.where(measured[:, :, None], g, 0.0) * theta_ms[:, None, :]
    v = np.einsum("ekj,elj->ekl", g, g) + np.diag(sigma * sigma)[None]
    fisher = np.einsum("eka,ekb->eab", jac, np.linalg.solve(v, jac))
    ok = measured.sum(axis=1) >= 3
    fisher = np.where(ok[:, None, None], fisher, np.eye(3))
    var_kappa_scaled = np.linalg.inv(fisher)[:, 2, 2]
    to_q_over_pt = 1e3 / (PT_PER_TESLA_METRE * detector.b_field) * 2 / half_span**2
    return np.where(ok, np.sqrt(var_kappa_scaled) * to_q_over_pt, np.inf)


def mixture_sigma68(relative_sigmas, coverage: float = SIGMA68_COVERAGE) -> float:
    """σ68 (pipeline.stats.sigma68's definition) of the equal-weight mixture of N(0, s_i^2): the h with
    mean_i erf(h / (sqrt(2) s_i)) = ``coverage``, by root finding. Non-finite or non-positive s_i: an s_i of
    inf counts as an event that is never inside (a failed fit), NaN is an error."""
    s = np.asarray(relative_sigmas, np.float64).ravel()
    if s.size == 0 or np.isnan(s).any() or (s < 0).any():
        raise ValueError("mixture_sigma68: needs non-negative, non-NaN widths")
    if np.mean(np.isfinite(s)) <= coverage:
        return math.inf
    finite = s[np.isfinite(s)]
    positive = finite[finite > 0]
    n_zero = finite.size - positive.size  # always inside

    def inside(h: float) -> float:
        return (n_zero + np.sum(erf(h / (math.sqrt(2.0) * positive)))) / s.size - coverage

    if inside(0.0) >= 0:
        return 0.0
    hi = float(positive.max())
    while inside(hi) < 0:
        hi *= 2.0
    return float(brentq(inside, 0.0, hi, xtol=1e-15, rtol=1e-12))


def pt_bin_index(pt, edges: Sequence[float] = PT_BIN_EDGES) -> np.ndarray:
    """Bin of each true pT: [e0, e1) -> 0 ... [e_{n-1}, e_n] -> n - 1; -1 outside (analysis.metrics.pt_bin_expr)."""
    pt = np.asarray(pt, np.float64)
    edges = np.asarray(edges, np.float64)
    index = np.searchsorted(edges, pt, side="right") - 1
    index = np.where(pt == edges[-1], len(edges) - 2, index)
    return np.where((pt >= edges[0]) & (pt <= edges[-1]), index, -1)


def limit_table(pt, relative_sigmas, edges: Sequence[float] = PT_BIN_EDGES) -> pl.DataFrame:
    """σ68 of the bound overall and per pT bin: columns ``bin`` ("all" or "20-25" ...), ``pt_lo``, ``pt_hi``,
    ``events``, ``sigma68`` (:func:`mixture_sigma68` of the events' relative widths in the bin)."""
    pt = np.asarray(pt, np.float64)
    rel = np.asarray(relative_sigmas, np.float64)
    index = pt_bin_index(pt, edges)
    rows = [
        {
            "bin": "all",
            "pt_lo": float(edges[0]),
            "pt_hi": float(edges[-1]),
            "events": int(rel.size),
            "sigma68": mixture_sigma68(rel),
        }
    ]
    for b in range(len(edges) - 1):
        sel = rel[index == b]
        rows.append(
            {
                "bin": f"{edges[b]:g}-{edges[b + 1]:g}",
                "pt_lo": float(edges[b]),
                "pt_hi": float(edges[b + 1]),
                "events": int(sel.size),
                "sigma68": mixture_sigma68(sel) if sel.size else math.nan,
            }
        )
    return pl.DataFrame(rows)


def event_bounds(events: pl.DataFrame, detector: DetectorConfig, point_sigma) -> pl.DataFrame:
    """The bound of every event of an events table (columns ``event_id, pt, q, x0, theta0, x_true``): adds
    ``sigma_q_over_pt`` [1/GeV] and ``relative_sigma`` (= sigma_q_over_pt x pT); the measured layers are
    those with a finite ``x_true``."""
    x_true = np.asarray(events["x_true"].to_list(), np.float64).reshape(events.height, detector.n_layers)
    pt = events["pt"].to_numpy().astype(np.float64)
    sigma = cramer_rao_sigma(
        detector,
        pt,
        events["q"].to_numpy(),
        events["x0"].to_numpy(),
        events["theta0"].to_numpy(),
        point_sigma,
        measured=np.isfinite(x_true),
    )
    return events.select("event_id", "pt", "q").with_columns(
        sigma_q_over_pt=pl.Series(sigma), relative_sigma=pl.Series(sigma * pt)
    )


def clean_cluster_residuals(hits: pl.DataFrame | pl.LazyFrame, events: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Charge-centroid residuals of the muon's clean clusters: one row per (event, layer) with columns
    ``event_id, layer, x_centroid, x_true, residual`` [mm].

    A cluster is a run of contiguous fired strips of one layer (classical.clusters). The muon's cluster is the
    run holding its signal strips; it is clean when every strip of the run is the muon's (``particle_id`` 0
    and ``is_signal``) and the layer has no other run with muon strips, i.e. no noise strip or other track
    touches it (a foreign deposit that stays below the muon's charge on every strip it shares is invisible in
    the hits table and is counted as clean). Its position is the charge centroid sum(q x) / sum(q); x_true is
    the muon's true crossing on the layer.
    """
    hits = hits.lazy() if isinstance(hits, pl.DataFrame) else hits
    events = events.lazy() if isinstance(events, pl.DataFrame) else events
    runs = (
        hits.select("event_id", "layer", "strip", "x", "charge", "is_signal", "particle_id")
        .sort("event_id", "layer", "strip")
        .with_columns(
            run=(
                (pl.col("event_id") != pl.col("event_id").shift(1))
                | (pl.col("layer") != pl.col("layer").shift(1))
                | (pl.col("strip") != pl.col("strip").shift(1) + 1)
            )
            .fill_null(True)
            .cum_sum()
        )
        .with_columns(muon=pl.col("is_signal") & (pl.col("particle_id") == 0))
        .group_by("run")
        .agg(
            pl.col("event_id").first(),
            pl.col("layer").first(),
            n=pl.len(),
            n_muon=pl.col("muon").sum(),
            qx=(pl.col("charge").cast(pl.Float64) * pl.col("x").cast(pl.Float64)).sum(),
            q=pl.col("charge").cast(pl.Float64).sum(),
        )
        .filter(pl.col("n_muon") > 0)
    )
    layers = (
        runs.group_by("event_id", "layer")
        .agg(runs=pl.len(), clean=(pl.col("n_muon") == pl.col("n")).all(), qx=pl.col("qx").sum(), q=pl.col("q").sum())
        .filter((pl.col("runs") == 1) & pl.col("clean"))
        .select("event_id", pl.col("layer").cast(pl.Int64), x_centroid=pl.col("qx") / pl.col("q"))
    )
    truth = (
        events.select("event_id", pl.col("x_true").list.eval(pl.element().cast(pl.Float64)))
        .with_columns(layer=pl.int_ranges(pl.col("x_true").list.len()))
        .explode("x_true", "layer")
    )
    return (
        layers.join(truth, on=["event_id", "layer"], how="inner")
        .filter(pl.col("x_true").is_finite())
        .with_columns(residual=pl.col("x_centroid") - pl.col("x_true"))
        .sort("event_id", "layer")
        .collect()
    )


def residual_summary(residuals) -> dict[str, float]:
    """Summary of cluster residuals [mm]: ``sigma68`` (pipeline.stats), ``rms``, ``mean``, ``clusters``."""
    r = np.asarray(residuals, np.float64)
    r = r[np.isfinite(r)]
    return {
        "sigma68": sigma68(r),
        "rms": float(np.sqrt(np.mean(r * r))),
        "mean": float(np.mean(r)),
        "clusters": int(r.size),
    }
