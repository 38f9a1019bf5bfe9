"""Float64 scattering-aware track fit (General Broken Lines as GLS), in Numba: one track per call.

The same estimator, the same steps and the same outputs as the JAX fit of model/scattering_fit.py (whose
docstring has the model and the derivations; Blobel, NIM A 566 (2006) 14; Kleinwort, NIM A 673 (2012) 107):
a circle plus one Highland kink after every crossed layer, ``x_k = x_circle(y_k; p) + sum_{y_j < y_k} G_kj
beta_j + eps_k``, ``beta_j ~ N(0, theta0_j^2)``, ``eps_k ~ N(0, sigma_k^2 / w_k)``, minimised over the circle
and the kinks by Gauss-Newton from the weighted least-squares line, theta0 re-evaluated from the current pT
at every step. It is written out in loops (no allocation per call: :class:`ScatteringScratch`), so the
classical tracker can call :func:`gbl_fit` from its Numba kernels where it calls
``classical.circle.hyper_fit`` (``_fit_chosen``, the DAF's refits): a layer's points become one measurement
(x, w) per layer (several clusters of one layer with DAF probabilities p_j: x = sum p_j x_j / sum p_j,
w = sum p_j, which leaves the chi2 unchanged up to a constant).

It is also the float64 reference of the JAX fit's tests. classical may not import simulation or model
(imports run one way), so the Highland formula is written here in Numba with the constants of pipeline.constants
(simulation.physics.highland_sigma, model.scattering_fit.highland_theta0). :func:`gbl_fit` is one track in Numba,
:func:`fit_tracks` many from NumPy; the material keyword arguments come from pipeline.config.detector_material.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

from pipeline.config import PT_PER_TESLA_METRE
from pipeline.constants import COS_FLOOR, HIGHLAND_LOG, HIGHLAND_SCALE, MUON_MASS
from pipeline.jit import chunk_bounds, jit
from pipeline.schema import STATUS_NONFINITE, STATUS_OK, STATUS_TOO_FEW_LAYERS

#: Gauss-Newton linearisations by default (as model.scattering_fit.DEFAULT_STEPS)
GBL_STEPS = 4
#: Levenberg-Marquardt damping of the unit-diagonal 3x3 track system, in units of float64's eps
DAMPING = 8.0 * float(np.finfo(np.float64).eps)
#: absolute floor of the track system's diagonal [1/mm^2]
_DIAGONAL_FLOOR = 1e-12
#: tracks per prange chunk of :func:`fit_tracks_kernel`
TRACKS_PER_CHUNK = 256


class ScatteringScratch(NamedTuple):
    """Work arrays of :func:`gbl_fit` for ``L`` layers (:func:`new_scattering_scratch`); after a call the
    first five also hold per-layer outputs of that fit."""

    x_circle: np.ndarray  # [L] crossing of the fitted circle [mm]
    variance: np.ndarray  # [L] variance of the smoothed crossing x_fit [mm^2]
    kink: np.ndarray  # [L] fitted kink after each layer [rad]
    theta0: np.ndarray  # [L] Highland width of each kink at the fitted pT [rad]
    u: np.ndarray  # [L] the kinks in units of theta0
    dy: np.ndarray  # [L]
    sin: np.ndarray  # [L]
    cos: np.ndarray  # [L]
    lam: np.ndarray  # [L] w / sigma^2
    residual: np.ndarray  # [L]
    jac: np.ndarray  # [L, 3]
    kinks: np.ndarray  # [L, L] G diag(theta0)
    chol: np.ndarray  # [L, L]
    rhs: np.ndarray  # [L, 4 + L]
    f: np.ndarray  # [L, 3]
    track: np.ndarray  # [3, 3] normal matrix, then its inverse (the covariance)
    track_rhs: np.ndarray  # [3]
    step: np.ndarray  # [3]


@jit()
def new_scattering_scratch(n_layers):
    """An uninitialised :class:`ScatteringScratch` for ``n_layers`` layers."""
    return ScatteringScratch(
        np.empty(n_layers),
        np.empty(n_layers),
        np.empty(n_layers),
        np.empty(n_layers),
        np.empty(n_layers),
        np.empty(n_layers),
        np.empty(n_layers),
        np.empty(n_layers),
        np.empty(n_layers),
        np.empty(n_layers),
        np.empty((n_layers, 3)),
        np.empty((n_layers, n_layers)),
        np.empty((n_layers, n_layers)),
        np.empty((n_layers, 4 + n_layers)),
        np.empty((n_layers, 3)),
        np.empty((3, 3)),
        np.empty(3),
        np.empty(3),
    )


@jit()
def _highland_theta0(q_over_pt, x_over_x0, mass):
    """Highland RMS plane angle [rad] at ``|q/pT|`` [1/GeV] (momentum = pT) through ``x_over_x0`` radiation
    lengths; 0 without material (the Numba twin of model.scattering_fit.highland_theta0)."""
    if not x_over_x0 > 0.0:
        return 0.0
    k = abs(q_over_pt)
    gamma_term = 1.0 + (mass * k) ** 2
    log_term = max(1.0 + HIGHLAND_LOG * math.log(x_over_x0 * gamma_term), 0.0)
    return HIGHLAND_SCALE * k * math.sqrt(gamma_term) * math.sqrt(x_over_x0) * log_term


@jit()
def _direction(sin_ref, kappa, dy):
    s = sin_ref + kappa * dy
    return s, math.sqrt(max(1.0 - s * s, COS_FLOOR * COS_FLOOR))


@jit()
def _linearise(x_ref, sin_ref, kappa, half_span, x_over_x0, to_q_over_pt, x_min, x_max, scratch):
    """Circle crossings, Jacobian and kink matrix at the circle (x_ref, sin_ref, kappa) (into ``scratch``)."""
    dy = scratch.dy
    s = scratch.sin
    c = scratch.cos
    n = dy.shape[0]
    s_ref, c_ref = _direction(sin_ref, kappa, 0.0)
    q_over_pt = kappa * to_q_over_pt
    for k in range(n):
        s[k], c[k] = _direction(sin_ref, kappa, dy[k])
        scratch.x_circle[k] = x_ref + dy[k] * (s_ref + s[k]) / (c_ref + c[k])
        d_theta = dy[k] * (c_ref + s_ref * (s_ref + s[k]) / (c_ref + c[k])) / c[k]
        d_kappa = dy[k] * dy[k] * (1.0 + c[k] * c_ref + s[k] * s_ref) / (c[k] * (c_ref + c[k]) ** 2)
        scratch.jac[k, 0] = 1.0
        scratch.jac[k, 1] = d_theta / (c_ref * half_span)
        scratch.jac[k, 2] = d_kappa * 2.0 / (half_span * half_span)
        inside = x_min <= scratch.x_circle[k] <= x_max
        scratch.theta0[k] = _highland_theta0(q_over_pt, x_over_x0[k] / c[k], MUON_MASS) if inside else 0.0
    for k in range(n):
        for j in range(n):
            d = dy[k] - dy[j]
            if d > 0.0:
                g = d * (c[j] + s[j] * (s[j] + s[k]) / (c[j] + c[k])) / c[k]
                scratch.kinks[k, j] = g * scratch.theta0[j]
            else:
                scratch.kinks[k, j] = 0.0


@jit()
def _inverse3(m):
    """In place: the inverse of the symmetric 3x3 ``m`` on its unit-diagonal form plus DAMPING (as the JAX fit)."""
    d0 = 1.0 / math.sqrt(max(m[0, 0], _DIAGONAL_FLOOR))
    d1 = 1.0 / math.sqrt(max(m[1, 1], _DIAGONAL_FLOOR))
    d2 = 1.0 / math.sqrt(max(m[2, 2], _DIAGONAL_FLOOR))
    a00 = 1.0 + DAMPING
    a11 = 1.0 + DAMPING
    a22 = 1.0 + DAMPING
    a01 = m[0, 1] * d0 * d1
    a02 = m[0, 2] * d0 * d2
    a12 = m[1, 2] * d1 * d2
    c00 = a11 * a22 - a12 * a12
    c01 = a12 * a02 - a01 * a22
    c02 = a01 * a12 - a11 * a02
    c11 = a00 * a22 - a02 * a02
    c12 = a01 * a02 - a00 * a12
    c22 = a00 * a11 - a01 * a01
    det = a00 * c00 + a01 * c01 + a02 * c02
    inv = 1.0 / det if det != 0.0 else 0.0
    m[0, 0] = c00 * inv * d0 * d0
    m[1, 1] = c11 * inv * d1 * d1
    m[2, 2] = c22 * inv * d2 * d2
    m[0, 1] = m[1, 0] = c01 * inv * d0 * d1
    m[0, 2] = m[2, 0] = c02 * inv * d0 * d2
    m[1, 2] = m[2, 1] = c12 * inv * d1 * d2


@jit()
def _solve(scratch):
    """The broken-lines normal equations at the current linearisation (model/scattering_fit.py's ``_solve``):
    fills ``step``, ``track`` (the covariance of the step), ``u`` and ``variance``; returns the chi2."""
    a = scratch.kinks
    jac = scratch.jac
    lam = scratch.lam
    r = scratch.residual
    chol = scratch.chol
    rhs = scratch.rhs
    n = a.shape[0]
    # N_u = I + A^T Lam A, and its Cholesky factor (lower), in place
    for i in range(n):
        for j in range(i + 1):
            acc = 1.0 if i == j else 0.0
            for k in range(n):
                acc += a[k, i] * lam[k] * a[k, j]
            chol[i, j] = acc
    for j in range(n):
        acc = chol[j, j]
        for k in range(j):
            acc -= chol[j, k] * chol[j, k]
        djj = math.sqrt(acc)
        chol[j, j] = djj
        for i in range(j + 1, n):
            acc = chol[i, j]
            for k in range(j):
                acc -= chol[i, k] * chol[j, k]
            chol[i, j] = acc / djj
    # rhs = [A^T Lam J | A^T Lam r | A^T]
    for i in range(n):
        for col in range(3):
            acc = 0.0
            for k in range(n):
                acc += a[k, i] * lam[k] * jac[k, col]
            rhs[i, col] = acc
        acc = 0.0
        for k in range(n):
            acc += a[k, i] * lam[k] * r[k]
        rhs[i, 3] = acc
        for k in range(n):
            rhs[i, 4 + k] = a[k, i]
    # lower solve for every column, upper solve for the first four (E and N_u^-1 A^T Lam r)
    for col in range(4 + n):
        for i in range(n):
            acc = rhs[i, col]
            for k in range(i):
                acc -= chol[i, k] * rhs[k, col]
            rhs[i, col] = acc / chol[i, i]
    for col in range(4):
        for i in range(n - 1, -1, -1):
            acc = rhs[i, col]
            for k in range(i + 1, n):
                acc -= chol[k, i] * rhs[k, col]
            rhs[i, col] = acc / chol[i, i]
    # F = J - A E; N_p = F^T Lam F + E^T E; b = F^T Lam r
    f = scratch.f
    for k in range(n):
        for col in range(3):
            acc = jac[k, col]
            for j in range(n):
                acc -= a[k, j] * rhs[j, col]
            f[k, col] = acc
    m = scratch.track
    b = scratch.track_rhs
    for p in range(3):
        for q in range(3):
            acc = 0.0
            for k in range(n):
                acc += f[k, p] * lam[k] * f[k, q] + rhs[k, p] * rhs[k, q]
            m[p, q] = acc
        acc = 0.0
        for k in range(n):
            acc += f[k, p] * lam[k] * r[k]
        b[p] = acc
    _inverse3(m)
    step = scratch.step
    for p in range(3):
        step[p] = m[p, 0] * b[0] + m[p, 1] * b[1] + m[p, 2] * b[2]
    u = scratch.u
    for j in range(n):
        u[j] = rhs[j, 3] - rhs[j, 0] * step[0] - rhs[j, 1] * step[1] - rhs[j, 2] * step[2]
    chi2 = 0.0
    for k in range(n):
        offset = jac[k, 0] * step[0] + jac[k, 1] * step[1] + jac[k, 2] * step[2]
        for j in range(n):
            offset += a[k, j] * u[j]
        chi2 += lam[k] * (r[k] - offset) ** 2 + u[k] * u[k]
        # P_kk = F C F^T + sum_i (R^-1 A^T)_ik^2
        var = 0.0
        for p in range(3):
            for q in range(3):
                var += f[k, p] * m[p, q] * f[k, q]
        for i in range(n):
            var += rhs[i, 4 + k] * rhs[i, 4 + k]
        scratch.variance[k] = var
    return chi2


@jit()
def gbl_fit(x, y, w, sigma, b_field, x_over_x0, x_min, x_max, steps, scratch, x_fit, pull):
    """Fit one track with multiple scattering (float64; model/scattering_fit.py has the method).

    Args (float64 arrays of the ``L`` layers): ``x`` measured crossings [mm] (ignored where ``w`` is 0),
    ``y`` layer planes [mm], ``w`` weights in [0, 1] (scale the inverse point variance; 0 removes the
    measurement, not the material), ``sigma`` point resolution [mm] per layer, ``x_over_x0`` material per
    layer [X0]; ``b_field`` [T] along +z; ``x_min, x_max`` the active width [mm] (a layer scatters only where
    the track crosses it inside); ``steps`` Gauss-Newton linearisations (>= 1); ``scratch`` from
    :func:`new_scattering_scratch`.

    Writes ``x_fit[L]`` (the smoothed crossings: circle plus fitted kinks) and ``pull[L]`` (module docstring of
    model/scattering_fit.py), and per-layer outputs into ``scratch`` (``x_circle``, ``variance``, ``kink``,
    ``theta0``). Returns ``(q_over_pt [1/GeV], var_q_over_pt [1/GeV^2], chi2, n_used, status)`` with
    ``n_used`` the layers of weight >= 0.5 and ``status`` STATUS_OK, STATUS_TOO_FEW_LAYERS (n_used < 3; the
    values are still computed) or STATUS_NONFINITE (non-finite input where w > 0, or a non-finite result;
    the values are then NaN).
    """
    n = y.shape[0]
    lam = scratch.lam
    n_used = 0
    y_lo = math.inf
    y_hi = -math.inf
    for k in range(n):
        y_lo = min(y_lo, y[k])
        y_hi = max(y_hi, y[k])
        wk = max(w[k], 0.0)
        lam[k] = wk / (sigma[k] * sigma[k]) if wk > 0.0 else 0.0
        if wk >= 0.5:
            n_used += 1
        if lam[k] > 0.0 and not math.isfinite(x[k]):
            for j in range(n):
                x_fit[j] = math.nan
                pull[j] = math.nan
            return math.nan, math.nan, math.nan, n_used, STATUS_NONFINITE
    y_ref = 0.5 * (y_lo + y_hi)
    half_span = 0.5 * (y_hi - y_lo) if y_hi > y_lo else 1.0
    to_q_over_pt = 1e3 / (PT_PER_TESLA_METRE * b_field)
    # the weighted least-squares line: the start (kappa = 0, so the first step has no scattering)
    s_lam = 0.0
    s_dy = 0.0
    s_x = 0.0
    for k in range(n):
        scratch.dy[k] = y[k] - y_ref
        if lam[k] > 0.0:
            s_lam += lam[k]
            s_dy += lam[k] * scratch.dy[k]
            s_x += lam[k] * x[k]
    dy_mean = s_dy / s_lam if s_lam > 0.0 else 0.0
    x_mean = s_x / s_lam if s_lam > 0.0 else 0.0
    s_xy = 0.0
    s_yy = 0.0
    for k in range(n):
        if lam[k] > 0.0:
            d = scratch.dy[k] - dy_mean
            s_xy += lam[k] * d * (x[k] - x_mean)
            s_yy += lam[k] * d * d
    slope = s_xy / s_yy if s_yy > 0.0 else 0.0
    x_ref = x_mean - slope * dy_mean
    sin_ref = slope / math.sqrt(1.0 + slope * slope)
    kappa = 0.0
    chi2 = 0.0
    step = scratch.step
    for _ in range(steps):
        _linearise(x_ref, sin_ref, kappa, half_span, x_over_x0, to_q_over_pt, x_min, x_max, scratch)
        for k in range(n):
            scratch.residual[k] = x[k] - scratch.x_circle[k] if lam[k] > 0.0 else 0.0
        chi2 = _solve(scratch)
        x_ref += step[0]
        sin_ref = min(max(sin_ref + step[1] / half_span, -1.0 + COS_FLOOR), 1.0 - COS_FLOOR)
        kappa += step[2] * 2.0 / (half_span * half_span)
    # outputs from the last linearisation
    q_over_pt = kappa * to_q_over_pt
    var_q_over_pt = scratch.track[2, 2] * (2.0 / (half_span * half_span) * to_q_over_pt) ** 2
    for k in range(n):
        x_lin = scratch.x_circle[k]
        offset = 0.0
        for j in range(n):
            offset += scratch.kinks[k, j] * scratch.u[j]
        x_circle = x_lin + scratch.jac[k, 0] * step[0] + scratch.jac[k, 1] * step[1] + scratch.jac[k, 2] * step[2]
        x_fit[k] = x_circle + offset
        scratch.x_circle[k] = x_circle
        scratch.kink[k] = scratch.u[k] * scratch.theta0[k]
        residual = x[k] - x_fit[k] if math.isfinite(x[k]) else 0.0
        p = scratch.variance[k]
        gain = min(max(1.0 - lam[k] * p, 0.0), 1.0)
        pull_var = gain * (gain * sigma[k] * sigma[k] + p)
        pull[k] = residual / math.sqrt(pull_var) if pull_var > 0.0 else 0.0
    if not (math.isfinite(q_over_pt) and math.isfinite(var_q_over_pt) and math.isfinite(chi2)):
        return math.nan, math.nan, math.nan, n_used, STATUS_NONFINITE
    status = STATUS_OK if n_used >= 3 else STATUS_TOO_FEW_LAYERS
    return q_over_pt, var_q_over_pt, chi2, n_used, status


@jit()
def gbl_fit_removing_outliers(
    x, y, w, sigma, b_field, x_over_x0, x_min, x_max, steps, pull_cut, max_removed, scratch, x_fit, pull, w_used
):
    """:func:`gbl_fit`, then while the largest |pull| of a measured layer exceeds ``pull_cut``: remove
    that layer (weight 0) and refit, at most ``max_removed`` times and never below four layers of weight > 0.
    ``w_used[L]`` gets the final weights. Returns :func:`gbl_fit`'s tuple and the number removed.

    The pull of a measured layer is its residual to the fit *without* it in units of that residual's
    standard deviation (scattering included), so one outlier does not drag the others' pulls up with it.
    """
    n = y.shape[0]
    n_weighted = 0
    for k in range(n):
        w_used[k] = w[k]
        if w[k] > 0.0:
            n_weighted += 1
    result = gbl_fit(x, y, w_used, sigma, b_field, x_over_x0, x_min, x_max, steps, scratch, x_fit, pull)
    removed = 0
    while removed < max_removed and n_weighted > 4 and result[4] != STATUS_NONFINITE:
        worst = -1
        worst_pull = pull_cut
        for k in range(n):
            if w_used[k] > 0.0 and abs(pull[k]) > worst_pull:
                worst_pull = abs(pull[k])
                worst = k
        if worst < 0:
            break
        w_used[worst] = 0.0
        n_weighted -= 1
        removed += 1
        result = gbl_fit(x, y, w_used, sigma, b_field, x_over_x0, x_min, x_max, steps, scratch, x_fit, pull)
    return result, removed


class ScatteringFitResult(NamedTuple):
    """Outputs of :func:`fit_tracks` (NumPy float64 unless stated; ``E`` tracks, ``L`` layers)."""

    q_over_pt: np.ndarray  # [E] [1/GeV]
    var_q_over_pt: np.ndarray  # [E] [1/GeV^2]
    chi2: np.ndarray  # [E]
    n_used: np.ndarray  # int64 [E] layers with weight >= 0.5
    status: np.ndarray  # int8 [E]
    x_fit: np.ndarray  # [E, L] smoothed crossings [mm]
    x_circle: np.ndarray  # [E, L] crossings of the fitted circle [mm]
    x_fit_variance: np.ndarray  # [E, L] [mm^2]
    pull: np.ndarray  # [E, L]
    kink: np.ndarray  # [E, L] [rad]
    theta0: np.ndarray  # [E, L] [rad]
    weight: np.ndarray  # [E, L] the weights of the final fit (outliers removed: 0)
    removed: np.ndarray  # int64 [E] layers removed as outliers


@jit(parallel=True)
def fit_tracks_kernel(x, y, w, sigma, b_field, x_over_x0, x_min, x_max, steps, pull_cut, max_removed):
    """:func:`gbl_fit_removing_outliers` of every row of ``x, w, sigma`` (float64 ``[E, L]``), in
    parallel (``max_removed = 0``: :func:`gbl_fit` alone)."""
    n_tracks, n = x.shape
    q_over_pt = np.empty(n_tracks)
    var = np.empty(n_tracks)
    chi2 = np.empty(n_tracks)
    n_used = np.empty(n_tracks, np.int64)
    status = np.empty(n_tracks, np.int8)
    x_fit = np.empty((n_tracks, n))
    x_circle = np.empty((n_tracks, n))
    variance = np.empty((n_tracks, n))
    pull = np.empty((n_tracks, n))
    kink = np.empty((n_tracks, n))
    theta0 = np.empty((n_tracks, n))
    w_used = np.empty((n_tracks, n))
    removed = np.empty(n_tracks, np.int64)
    n_chunks = (n_tracks + TRACKS_PER_CHUNK - 1) // TRACKS_PER_CHUNK
    for chunk in nb.prange(n_chunks):
        lo, hi = chunk_bounds(chunk, TRACKS_PER_CHUNK, n_tracks)
        scratch = new_scattering_scratch(n)
        for e in range(lo, hi):
            (qp, v, c2, used, st), removed[e] = gbl_fit_removing_outliers(
                x[e],
                y,
                w[e],
                sigma[e],
                b_field,
                x_over_x0,
                x_min,
                x_max,
                steps,
                pull_cut,
                max_removed,
                scratch,
                x_fit[e],
                pull[e],
                w_used[e],
            )
            q_over_pt[e] = qp
            var[e] = v
            chi2[e] = c2
            n_used[e] = used
            status[e] = st
            for k in range(n):
                x_circle[e, k] = scratch.x_circle[k]
                variance[e, k] = scratch.variance[k]
                kink[e, k] = scratch.kink[k]
                theta0[e, k] = scratch.theta0[k]
    return q_over_pt, var, chi2, n_used, status, x_fit, x_circle, variance, pull, kink, theta0, w_used, removed


def fit_tracks(
    x,
    y,
    w,
    sigma,
    *,
    b_field: float,
    x_over_x0,
    x_min: float = -math.inf,
    x_max: float = math.inf,
    steps: int = GBL_STEPS,
    pull_cut: float = math.inf,
    max_removed: int = 0,
) -> ScatteringFitResult:
    """NumPy-facing :func:`gbl_fit` of many tracks: ``x, w`` of shape ``[E, L]`` (or ``[L]`` for one),
    ``y`` ``[L]``, ``sigma`` and ``x_over_x0`` broadcast to them (scalars, ``[L]`` or ``[E, L]``). With
    ``max_removed > 0``, up to that many layers per track whose |pull| exceeds ``pull_cut`` are removed one by
    one, worst first (:func:`gbl_fit_removing_outliers`)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = np.asarray(x, np.float64)
    single = x.ndim == 1
    x = np.atleast_2d(x)
    y = np.ascontiguousarray(y, np.float64)
    if x.ndim != 2 or y.shape != (x.shape[1],):
        raise ValueError(f"x must be [E, L] and y [L], got {x.shape} and {y.shape}")
    w = np.ascontiguousarray(np.broadcast_to(np.asarray(w, np.float64), x.shape))
    sigma = np.ascontiguousarray(np.broadcast_to(np.asarray(sigma, np.float64), x.shape))
    material = np.ascontiguousarray(np.broadcast_to(np.asarray(x_over_x0, np.float64), y.shape))
    out = fit_tracks_kernel(
        np.ascontiguousarray(x),
        y,
        w,
        sigma,
        float(b_field),
        material,
        float(x_min),
        float(x_max),
        int(steps),
        float(pull_cut),
        int(max_removed),
    )
    result = ScatteringFitResult(*out)
    return ScatteringFitResult(*(v[0] for v in result)) if single else result
