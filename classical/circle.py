"""Float64 Hyper circle fit (Al-Sharadqah & Chernov 2009) and circle helpers, in Numba.

The Hyper fit is the algebraic fit ``A z + B x + C y + D = 0`` (``z = x^2 + y^2``) that minimises
``A^T M A`` subject to ``A^T N A = 1`` with the moment matrix ``M`` and Hyper's constraint matrix ``N``; it has
no essential bias (unlike Kasa). Chernov's ``CircleFitByHyper`` solves it on points centred on their
centroid: with the centred moments ``Mxx, Myy, Mxy, Mxz, Myz, Mzz`` and ``Mz = Mxx + Myy`` the smallest
non-negative generalised eigenvalue ``eta`` is the root, found by Newton from 0, of

    P(eta) = A0 + eta * (A1 + eta * (A2 + 4 eta^2))
    A2 = 4 Cov_xy - 3 Mz^2 - Mzz,   A1 = Var_z Mz + 4 Cov_xy Mz - Mxz^2 - Myz^2,
    A0 = Mxz (Mxz Myy - Myz Mxy) + Myz (Myz Mxx - Mxz Mxy) - Var_z Cov_xy,
    Cov_xy = Mxx Myy - Mxy^2,   Var_z = Mzz - Mz^2,

and the circle is ``DET = eta^2 - eta Mz + Cov_xy``, centre = ``((Mxz (Myy - eta) - Myz Mxy) / (2 DET),
(Myz (Mxx - eta) - Mxz Mxy) / (2 DET))`` + centroid, ``R = sqrt(|centre - centroid|^2 + Mz - 2 eta)``.
tests/test_classical.py checks this against a NumPy generalised-eigenvalue solution.

Weights: every moment (and the centroid) is a ``w``-weighted mean, the natural weighted generalisation
(model/fit.py's weighted Hyper does the same); points with ``w = 0`` do not count.

Precision: for our tracks (R ~ 7e4-1.7e5 mm over a 1.6 m arc) the centred float64 moments lose at most ~5
of the 16 digits in ``A0`` and ``Cov_xy``; the fitted centre and radius agree with the eigenvalue solution
to ~1e-12 relative (measured in the test).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.config import PT_PER_TESLA_METRE
from pipeline.jit import jit
from pipeline.schema import STATUS_DEGENERATE, STATUS_NONFINITE, STATUS_OK

# fit status codes: pipeline.schema's STATUS_* (the `fit_status` column)

#: points whose centred covariance determinant is below this fraction of ``Mxx * Myy`` are collinear to
#: ~1e-6 of their spread (a real track: >= 1e-6 even for the straightest, most slanted muon)
COLLINEAR_TOLERANCE = 1e-12
NEWTON_MAX_STEPS = 50


@jit()
def hyper_fit(x, y, w, n):
    """Weighted Hyper fit of the first ``n`` points ``(x[i], y[i])`` with weights ``w[i] >= 0``.

    Returns ``(xc, yc, radius, status)``; ``status`` is STATUS_OK, STATUS_DEGENERATE (no positive weight,
    coincident or collinear points, vanishing determinant) or STATUS_NONFINITE (NaN/inf inputs). The circle
    values are NaN unless the status is OK.
    """
    sw = 0.0
    mx = 0.0
    my = 0.0
    for i in range(n):
        if w[i] > 0.0:
            sw += w[i]
            mx += w[i] * x[i]
            my += w[i] * y[i]
    if not sw > 0.0:
        return math.nan, math.nan, math.nan, STATUS_DEGENERATE
    if not (math.isfinite(sw) and math.isfinite(mx) and math.isfinite(my)):
        return math.nan, math.nan, math.nan, STATUS_NONFINITE
    mx /= sw
    my /= sw
    mxx = 0.0
    myy = 0.0
    mxy = 0.0
    mxz = 0.0
    myz = 0.0
    mzz = 0.0
    for i in range(n):
        wi = w[i]
        if wi > 0.0:
            xi = x[i] - mx
            yi = y[i] - my
            zi = xi * xi + yi * yi
            mxx += wi * xi * xi
            myy += wi * yi * yi
            mxy += wi * xi * yi
            mxz += wi * xi * zi
            myz += wi * yi * zi
            mzz += wi * zi * zi
    mxx /= sw
    myy /= sw
    mxy /= sw
    mxz /= sw
    myz /= sw
    mzz /= sw
    mz = mxx + myy
    cov_xy = mxx * myy - mxy * mxy
    if not math.isfinite(mzz + cov_xy):
        return math.nan, math.nan, math.nan, STATUS_NONFINITE
    if not cov_xy > COLLINEAR_TOLERANCE * mxx * myy:
        return math.nan, math.nan, math.nan, STATUS_DEGENERATE
    var_z = mzz - mz * mz
    a2 = 4.0 * cov_xy - 3.0 * mz * mz - mzz
    a1 = var_z * mz + 4.0 * cov_xy * mz - mxz * mxz - myz * myz
    a0 = mxz * (mxz * myy - myz * mxy) + myz * (myz * mxx - mxz * mxy) - var_z * cov_xy
    a22 = a2 + a2
    # Newton from eta = 0 (Chernov): stop when a step no longer reduces |P|
    eta = 0.0
    p = a0
    for _ in range(NEWTON_MAX_STEPS):
        dp = a1 + eta * (a22 + 16.0 * eta * eta)
        if dp == 0.0:
            break
        eta_new = eta - p / dp
        if eta_new == eta or not math.isfinite(eta_new):
            break
        p_new = a0 + eta_new * (a1 + eta_new * (a2 + 4.0 * eta_new * eta_new))
        if abs(p_new) >= abs(p):
            break
        eta = eta_new
        p = p_new
    det = eta * eta - eta * mz + cov_xy
    if det == 0.0:
        return math.nan, math.nan, math.nan, STATUS_DEGENERATE
    cx = (mxz * (myy - eta) - myz * mxy) / (2.0 * det)
    cy = (myz * (mxx - eta) - mxz * mxy) / (2.0 * det)
    r2 = cx * cx + cy * cy + mz - 2.0 * eta
    if not (math.isfinite(cx) and math.isfinite(cy) and math.isfinite(r2)) or r2 < 0.0:
        return math.nan, math.nan, math.nan, STATUS_NONFINITE
    return cx + mx, cy + my, math.sqrt(r2), STATUS_OK


@jit()
def circle_x_at(xc, yc, radius, side, y):
    """x where the circle crosses the plane ``y`` on the branch ``x = xc - side * sqrt(R^2 - (y - yc)^2)``
    (``side = +1``: the centre lies on the +x side of the track); NaN where the circle does not reach ``y``."""
    dy = y - yc
    h2 = (radius - dy) * (radius + dy)
    if not h2 >= 0.0:
        return math.nan
    return xc - side * math.sqrt(h2)


@jit()
def track_parameters(xc, radius, x_ref, b_field):
    """``(pt [GeV], q (+1/-1), q_over_pt [1/GeV])`` of a fitted circle of ``radius`` [mm] with centre x ``xc``
    for a track near ``x_ref`` moving towards +y in ``b_field`` [T] along +z.

    With B > 0 a positive track bends towards +x: its centre of curvature lies on the +x (right-hand) side.
    """
    side = 1.0 if xc >= x_ref else -1.0
    q = side if b_field >= 0.0 else -side
    pt = PT_PER_TESLA_METRE * abs(b_field) * radius * 1e-3
    return pt, q, q / pt


def hyper_circle_fit_f64(x, y, w=None) -> tuple[float, float, float, int]:
    """NumPy-facing :func:`hyper_fit`: ``(xc, yc, radius, status)`` of points ``x, y`` (weights ``w``, default
    all 1)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    w = np.ones_like(x) if w is None else np.ascontiguousarray(w, dtype=np.float64)
    if not x.shape == y.shape == w.shape or x.ndim != 1:
        raise ValueError(f"x, y and w must be 1-D of one length, got {x.shape}, {y.shape}, {w.shape}")
    xc, yc, radius, status = hyper_fit(x, y, w, x.shape[0])
    return float(xc), float(yc), float(radius), int(status)
