"""Differentiable weighted circle fit (Kasa) and the track parameters derived from it.

Coccaro et al. (arXiv 2512.01647, section 3) fit the per-layer cluster positions with the Kasa method
(I. Kasa, IEEE Trans. Instrum. Meas. 25 (1976) 8): minimise the algebraic distance

    sum_i w_i (x_i^2 + y_i^2 + D x_i + E y_i + F)^2

over (D, E, F); the circle has centre (-D/2, -E/2) and radius^2 = (D^2 + E^2)/4 - F.

Why not the textbook 3x3 normal equations: our tracks have R ~ 7e4-1.7e5 mm over a 1.6 m arc with a few
mm of sagitta. Written in raw coordinates, F ~ R^2 ~ 1e10 mm^2 and the radius comes out of the cancellation
(D^2 + E^2)/4 - F; in float32 (7 digits) nothing of the curvature survives. The fit here is the *same*
minimiser, written in a frame where every step is well conditioned:

1. Translate to the weighted centroid. The algebraic distance of a circle is translation-covariant, so this
   only relabels (D, E, F); with centred points the optimal F is -mean(z) (z = x^2 + y^2) and drops out,
   leaving a 2x2 system in (D, E) built from centred second and third moments.
2. Scale by the RMS distance s from the centroid (the Kasa minimiser is scale-covariant too), so all moments
   are O(1) whatever the units.
3. Rotate to the principal axes of the points: ``a`` along the track (oriented towards +y) and ``b`` its
   right-hand normal. In this frame the 2x2 system is almost diagonal: the curvature lives in the tiny
   spread of ``b`` (the sagitta), which is computed directly from the rotated points instead of from the
   difference of large moments.
4. Solve by the Schur complement on ``b``; the centre in the frame is (c_a, c_b) with
   c_b = S_bz / (2 S_bb), and radius^2 = c_a^2 + c_b^2 + mean(z): a sum of positive terms, no cancellation.

The signed curvature (positive when the centre lies to the right of the direction of travel, i.e. on +x for
a track moving towards +y) is returned as ``kappa = 2 c_b / (c_b^2 + r^2)``. For a real track this equals
``sign(c_b) / r`` to a relative 1e-9 (the difference is ((r - |c_b|) / r)^2 / 2 with r - |c_b| ~ mean(z)/2r),
but unlike ``sign(c_b) / r`` it is smooth everywhere: it goes to 0 continuously both in the straight-line
limit (c_b -> +-inf) and for the degenerate Kasa circles centred on the track line (c_b -> 0), so a gradient
through q/pT exists at the charge flip.

All sums are element-wise reductions (no matmul), so the fit keeps full float32 precision on accelerators
whose matmuls default to reduced precision. Degenerate inputs (all weights zero, all points equal, exactly
collinear points) give finite values and finite gradients; see :func:`kasa_circle_fit`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from model.cluster import EMPTY_LAYER_WEIGHT
from pipeline.config import PT_PER_TESLA_METRE

#: fit_track status codes
STATUS_OK = 0
#: fewer than ``min_layers`` layers carry a cluster weight of at least ``min_layer_weight``
STATUS_TOO_FEW_LAYERS = 1
#: the points are collinear within the float precision (sagitta < ~100 eps of their spread): the Kasa circle
#: is undefined (radius huge or capped at ~1/eps times the spread); q_over_pt is ~0
STATUS_DEGENERATE = 2
#: a non-finite value came out of the fit (non-finite input)
STATUS_NONFINITE = 3


# ---- safe elementwise helpers (finite values *and* finite gradients at the singular points) --------------
def _safe_div(numerator: Array, denominator: Array) -> Array:
    """numerator / denominator, and 0 where the denominator is 0 (with a zero, not NaN, gradient there)."""
    ok = denominator != 0
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1), 0)


def _safe_sqrt(value: Array) -> Array:
    """sqrt(max(value, 0)) whose gradient at 0 is 0 instead of inf (so that 0 * grad stays finite)."""
    ok = value > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, value, 1)), 0)


def _float_dtype(*arrays: ArrayLike) -> jnp.dtype:
    """The floating dtype of the computation: float32 unless an input is float64 (under x64)."""
    return jnp.result_type(*(jnp.asarray(a).dtype for a in arrays), jnp.float32)


def _wmean(normalised_weights: Array, values: Array) -> Array:
    return jnp.sum(normalised_weights * values, axis=-1)


class _KasaSolution(NamedTuple):
    """The Kasa minimiser in the centred, scaled, rotated frame, and the frame itself (all scalars)."""

    origin_x: Array  # weighted centroid [input units]
    origin_y: Array
    scale: Array  # RMS distance of the points from the centroid [input units]
    along_x: Array  # unit vector along the track, oriented towards +y
    along_y: Array
    centre_a: Array  # circle centre in the frame [scale units]
    centre_b: Array
    radius: Array  # [scale units]
    kappa: Array  # smooth signed curvature [1/scale units], > 0: centre on the right of travel
    degenerate: Array  # bool: (numerically) collinear or fewer than two distinct points


def _kasa_solve(x: Array, y: Array, w: Array) -> _KasaSolution:
    """Weighted Kasa fit of one set of points ``x, y, w`` (shape ``[n]``) in a well-conditioned frame."""
    eps = jnp.finfo(x.dtype).eps
    wn = _safe_div(w, jnp.sum(w))  # normalised weights: scale-invariant, all zero if the total is zero

    # 1. centre on the weighted centroid; the second pass removes the rounding error of the first
    origin_x = _wmean(wn, x)
    origin_y = _wmean(wn, y)
    u = x - origin_x
    v = y - origin_y
    du = _wmean(wn, u)
    dv = _wmean(wn, v)
    origin_x, origin_y, u, v = origin_x + du, origin_y + dv, u - du, v - dv

    # 2. scale to unit RMS distance from the centroid
    scale = _safe_sqrt(_wmean(wn, u * u + v * v))
    inv_scale = _safe_div(jnp.ones_like(scale), scale)
    u, v = u * inv_scale, v * inv_scale

    # 3. principal axis of the weighted point cloud. With p = Cvv - Cuu, q = 2 Cuv, the major axis makes the
    # angle theta with +y where tan(2 theta) = q / p; the half angle of the complex number p + i q is the
    # direction of |p + i q| + p + i q, which gives (x, y) ∝ (q, |.| + p) without cancellation for p >= 0
    # (track closer to y than to x), and the same construction around +x for p < 0.
    cuu, cvv, cuv = _wmean(wn, u * u), _wmean(wn, v * v), _wmean(wn, u * v)
    p, q = cvv - cuu, 2 * cuv
    modulus = _safe_sqrt(p * p + q * q)
    dir_x = jnp.where(p >= 0, q, modulus - p)
    dir_y = jnp.where(p >= 0, modulus + p, q)
    norm_sq = dir_x * dir_x + dir_y * dir_y
    has_axis = norm_sq > 0  # False only for an isotropic cloud (e.g. a single point): any frame will do
    inv_norm = _safe_div(jnp.ones_like(norm_sq), _safe_sqrt(norm_sq))
    along_x = jnp.where(has_axis, dir_x * inv_norm, 0)
    along_y = jnp.where(has_axis, dir_y * inv_norm, 1)
    flip = jnp.where(along_y < 0, -1, 1)  # orient along the direction of travel (+y)
    along_x, along_y = along_x * flip, along_y * flip
    # b is the right-hand normal of a: for a = +y, b = +x
    a = u * along_x + v * along_y
    b = u * along_y - v * along_x
    a = a - _wmean(wn, a)
    b = b - _wmean(wn, b)

    # 4. centred Kasa normal equations  [Caa Cab; Cab Cbb] (D, E) = -(Caz, Cbz),  F = -mean(z)
    z = a * a + b * b
    z_mean = _wmean(wn, z)
    zc = z - z_mean
    caa, cbb, cab = _wmean(wn, a * a), _wmean(wn, b * b), _wmean(wn, a * b)
    caz, cbz = _wmean(wn, a * zc), _wmean(wn, b * zc)
    caa_safe = jnp.where(caa > 0, caa, 1)
    s_bb = jnp.maximum(cbb - cab * cab / caa_safe, 0)  # Schur complements (Cab ~ 0 after the rotation)
    s_bz = cbz - cab * caz / caa_safe

    # centre along b: c_b = -E/2 = S_bz / (2 S_bb). Collinear points (S_bb -> 0) send it to infinity: cap
    # |c_b| at 1/eps scale units (radius ~1e7 times the point spread in float32), keeping the sign.
    big = 1 / eps
    # below `tiny` a moment is treated as exactly zero, which bounds every 1/moment factor of the gradient
    tiny = jnp.sqrt(jnp.finfo(x.dtype).tiny)
    finite_centre = (jnp.abs(s_bz) < 2 * big * s_bb) & (s_bb > tiny)
    centre_b = jnp.where(finite_centre, _safe_div(s_bz, 2 * s_bb), jnp.where(s_bz >= 0, big, -big))
    # centre along a: c_a = -D/2 = (Caz + E Cab) / (2 Caa), E = -2 c_b
    centre_a = _safe_div(caz - 2 * centre_b * cab, 2 * caa)
    radius = jnp.sqrt(centre_a * centre_a + centre_b * centre_b + z_mean)

    # smooth signed curvature 2 c_b / (c_b^2 + r^2) = 2 c_b / (2 c_b^2 + c_a^2 + mean z), multiplied through by
    # 2 S_bb^2 so that it stays finite (-> 0) for S_bb -> 0 (straight line) as well as for S_bz -> 0. The pair
    # (S_bz, S_bb) only matters up to a common factor: normalising it by its larger entry keeps numerator and
    # denominator O(1) (mean z = 1 in scaled units, so the denominator is >= 1) and their gradients finite.
    norm = jnp.maximum(jnp.abs(s_bz), s_bb)
    has_curvature = norm > tiny  # False: exactly collinear (b == 0), a straight line, kappa = 0
    inv_norm = jnp.where(has_curvature, 1 / jnp.where(has_curvature, norm, 1), 0)
    s_bz_n, s_bb_n = s_bz * inv_norm, s_bb * inv_norm
    ca_times_sbb = _safe_div(caz * s_bb_n - cab * s_bz_n, 2 * caa)
    kappa = _safe_div(2 * s_bz_n * s_bb_n, s_bz_n * s_bz_n + 2 * z_mean * s_bb_n * s_bb_n + 2 * ca_times_sbb**2)

    return _KasaSolution(
        origin_x=origin_x,
        origin_y=origin_y,
        scale=scale,
        along_x=along_x,
        along_y=along_y,
        centre_a=centre_a,
        centre_b=centre_b,
        radius=radius,
        kappa=kappa,
        # straight within the float precision: a sagitta below ~100 eps of the point spread is rounding noise
        # (float32: |c_b| > 8e4 scale units, a radius of ~50 km for our tracks, ~15 TeV at 1 T)
        degenerate=~finite_centre | (jnp.abs(centre_b) > big / 100),
    )


def _centre_in_input_frame(sol: _KasaSolution) -> tuple[Array, Array]:
    """Centre of the fitted circle in the input coordinates (undo rotation, scaling and translation)."""
    # b = (along_y, -along_x)
    xc = sol.origin_x + sol.scale * (sol.centre_a * sol.along_x + sol.centre_b * sol.along_y)
    yc = sol.origin_y + sol.scale * (sol.centre_a * sol.along_y - sol.centre_b * sol.along_x)
    return xc, yc


def kasa_circle_fit(
    x: Float[ArrayLike, " n"], y: Float[ArrayLike, " n"], w: Float[ArrayLike, " n"]
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """Weighted Kasa circle fit of the points ``(x, y)`` with non-negative weights ``w`` (all shape ``[n]``).

    Returns the centre ``(xc, yc)`` and the radius ``r`` (same units as ``x, y``), the exact minimiser of
    ``sum_i w_i ((x_i - xc)^2 + (y_i - yc)^2 - r^2)^2`` computed in a centred, scaled, principal-axis frame
    (module docstring), so that the short arcs of huge radius of our tracks keep ~1e-5 relative precision in
    float32. Only relative weights matter; points with ``w = 0`` are ignored (their coordinates must still
    be finite). jit-, vmap- and grad-safe: for all-zero weights, coincident or exactly collinear points the
    result is finite with finite gradients (collinear points get a radius capped at ~1/eps times their
    spread, i.e. a straight line, centre on the right of the direction of travel +y when the side is
    undetermined). Computes in float32, or in float64 when an input is float64 under ``jax.enable_x64``.
    """
    dtype = _float_dtype(x, y, w)
    x, y, w = (jnp.asarray(v, dtype) for v in (x, y, w))
    sol = _kasa_solve(x, y, w)
    xc, yc = _centre_in_input_frame(sol)
    return xc, yc, sol.scale * sol.radius


class TrackFit(NamedTuple):
    """Track parameters from the circle fit of one event (scalars; batched by vmap)."""

    xc: Float[Array, ...]  # centre of curvature [mm]
    yc: Float[Array, ...]  # [mm]
    radius: Float[Array, ...]  # [mm]
    pt: Float[Array, ...]  # transverse momentum [GeV] = PT_PER_TESLA_METRE * |B| * R [m]
    q: Float[Array, ...]  # charge +1.0 / -1.0 (sign of q_over_pt; +1 for exactly 0)
    q_over_pt: Float[Array, ...]  # signed q / pT [1/GeV], smooth (0 for a straight line)
    status: Int[Array, ...]  # STATUS_OK (0) or one of the STATUS_* codes > 0


def fit_track(
    x_hat: Float[ArrayLike, " L"],
    y_layers: Float[ArrayLike, " L"],
    layer_weight: Float[ArrayLike, " L"],
    sigma: Float[ArrayLike, " L"],
    b_field: float | Float[ArrayLike, ""],
    *,
    min_layers: int = 3,
    min_layer_weight: float = 0.5,
) -> TrackFit:
    """Fit one track to its per-layer clusters: Kasa circle, then pT, charge and q/pT.

    Args:
        x_hat: cluster position on each layer [mm], shape ``[L]``.
        y_layers: y of each layer plane [mm], shape ``[L]``.
        layer_weight: summed hit weight W_l of each cluster, shape ``[L]``.
        sigma: cluster spread sigma_l [mm] (> 0), shape ``[L]``.
        b_field: field along +z [T] (either sign).
        min_layers, min_layer_weight: the fit gets STATUS_TOO_FEW_LAYERS unless at least ``min_layers``
            layers have ``W_l >= min_layer_weight`` (the values are still computed, and differentiable).

    The fit weight of layer l is ``W_l / sigma_l^2``: inverse variance, as a least-squares fit of
    measurements with resolution sigma_l would use, times the cluster's total hit weight, so that a layer the
    network barely selects (W_l -> 0) fades out of the fit smoothly. This is our reading of the paper's
    "layer-wise weights ... incorporated in each matrix element" (its formula is not in the text we have).
    Layers with ``W_l < EMPTY_LAYER_WEIGHT`` (model.cluster: x_hat is a placeholder there) get weight 0.

    Charge convention (as in the simulation): with B > 0 along z a positive muon moving towards +y bends
    towards +x, i.e. its centre of curvature lies on the +x (right-hand) side of the track.
    ``q_over_pt = 1000 * kappa / (PT_PER_TESLA_METRE * B)`` with ``kappa`` the smooth signed curvature
    [1/mm] (module docstring), so ``|q_over_pt| = 1/pt`` for any real track and it passes continuously
    through 0 at the straight line.
    """
    dtype = _float_dtype(x_hat, y_layers, layer_weight, sigma)
    x_hat, y_layers, layer_weight, sigma = (jnp.asarray(v, dtype) for v in (x_hat, y_layers, layer_weight, sigma))
    b_field = jnp.asarray(b_field, dtype)

    has_weight = layer_weight >= EMPTY_LAYER_WEIGHT
    fit_weight = jnp.where(has_weight, _safe_div(jnp.where(has_weight, layer_weight, 0), sigma * sigma), 0)
    sol = _kasa_solve(x_hat, y_layers, fit_weight)
    xc, yc = _centre_in_input_frame(sol)
    radius = sol.scale * sol.radius  # [mm]
    kappa = _safe_div(sol.kappa, sol.scale)  # [1/mm]

    pt = PT_PER_TESLA_METRE * jnp.abs(b_field) * radius * 1e-3
    q_over_pt = _safe_div(1e3 * kappa, PT_PER_TESLA_METRE * b_field)
    q = jnp.where(q_over_pt >= 0, 1.0, -1.0).astype(dtype)

    n_layers_used = jnp.sum(layer_weight >= min_layer_weight)
    finite = jnp.isfinite(radius) & jnp.isfinite(q_over_pt) & jnp.isfinite(xc) & jnp.isfinite(yc)
    # a fit with fewer than two weighted layers has no circle: report zeros (status says why) rather than
    # NaN, which would poison a whole batch's loss; the gradients of that branch are finite (tested)
    xc, yc, radius, pt, q_over_pt = (jnp.where(finite, v, 0) for v in (xc, yc, radius, pt, q_over_pt))
    status = jnp.where(
        n_layers_used < min_layers,
        STATUS_TOO_FEW_LAYERS,
        jnp.where(~finite, STATUS_NONFINITE, jnp.where(sol.degenerate, STATUS_DEGENERATE, STATUS_OK)),
    ).astype(jnp.int32)
    return TrackFit(xc=xc, yc=yc, radius=radius, pt=pt, q=q, q_over_pt=q_over_pt, status=status)
