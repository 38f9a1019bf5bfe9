"""Differentiable weighted circle fits (Kasa, Hyper) and the track parameters derived from them.

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

The Hyper fit (A. Al-Sharadqah, N. Chernov, Electron. J. Stat. 3 (2009) 886) is the same algebraic fit
A z + B a + C b + D = 0 under the constraint 8 zbar A^2 + 4 A D + B^2 + C^2 = 1 instead of A = 1; it has no
essential bias. Kasa's curvature is biased high on short noisy arcs, by about sigma^2 / S_bb (the point
variance over the variance of the sagitta profile; +15% for 50 GeV tracks with 0.3 mm point noise in our
detector, benchmarks/circle_fit_bias.py), Hyper's is unbiased to that order (what remains there is
+5e-4 +- 2e-4, measured on 4e5 tracks). In the centred frame its Lagrange conditions are Kasa's with the
2x2 moment matrix shifted by -eta on the diagonal: centre c(eta) = (C - eta I)^-1 m / 2, radius^2 =
|c|^2 + mean(z) - 2 eta, where the multiplier eta (~ the point variance in scaled units) is the smallest
non-negative root of a scalar equation solved by a few Newton steps (:func:`_hyper_eta`). Step 4 and
everything after it are shared; Kasa is eta = 0.

The signed curvature (positive when the centre lies to the right of the direction of travel, i.e. on +x for
a track moving towards +y) is returned as ``kappa = 2 c_b / (c_b^2 + r^2)``. For a real track this equals
``sign(c_b) / r`` to a relative 1e-9 (the difference is ((r - |c_b|) / r)^2 / 2 with r - |c_b| ~ mean(z)/2r),
but unlike ``sign(c_b) / r`` it is smooth everywhere: it goes to 0 continuously both in the straight-line
limit (c_b -> +-inf) and for the degenerate Kasa circles centred on the track line (c_b -> 0), so a gradient
through q/pT exists at the charge flip. For Hyper, mean(z) becomes mean(z) - 2 eta.

The layer crossings ``TrackFit.x_fit`` come from the same frame (:func:`_crossings_x`), never from the
cancelling ``xc +- sqrt(R^2 - (y - yc)^2)`` (which loses ~0.01 mm in float32 at R ~ 1e5 mm).

All sums are element-wise reductions (no matmul), so the fit keeps full float32 precision on accelerators
whose matmuls default to reduced precision. Degenerate inputs (all weights zero, all points equal, exactly
collinear points) give finite values and finite gradients, for both fits; see :func:`kasa_circle_fit`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from model.cluster import EMPTY_LAYER_WEIGHT
from pipeline.config import PT_PER_TESLA_METRE
from pipeline.schema import STATUS_DEGENERATE, STATUS_NONFINITE, STATUS_OK, STATUS_TOO_FEW_LAYERS

# fit_track's status codes (pipeline.schema's STATUS_*, the `fit_status` column): STATUS_TOO_FEW_LAYERS when fewer
# than ``min_layers`` layers carry a cluster weight of at least ``min_layer_weight``; STATUS_DEGENERATE when the
# points are collinear within the float precision (sagitta < ~100 eps of their spread: the Kasa circle is undefined,
# radius huge or capped at ~1/eps times the spread; q_over_pt is ~0); STATUS_NONFINITE when a non-finite value came
# out of the fit (non-finite input)


#: circle fits known to :func:`fit_track` (``method=``)
FIT_METHODS = ("kasa", "hyper")
#: Newton steps for the Hyper multiplier eta (a fori_loop; monotone and quadratic from eta = 0, see _hyper_eta)
HYPER_NEWTON_STEPS = 4
#: eta is kept in [0, HYPER_MAX_ETA_FRACTION * S_bb(0)]: below the pole of the centre at the smallest moment
HYPER_MAX_ETA_FRACTION = 0.99
#: fixed-point steps for the along-track coordinate of a layer crossing (contraction ~ slope x sagitta / R)
CROSSING_STEPS = 3


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


def _check_method(method: str) -> None:
    if method not in FIT_METHODS:
        raise ValueError(f"unknown circle fit method {method!r} (known: {', '.join(FIT_METHODS)})")


class _CircleSolution(NamedTuple):
    """The Kasa or Hyper circle in the centred, scaled, rotated frame, and the frame itself (all scalars)."""

    origin_x: Array  # weighted centroid [input units]
    origin_y: Array
    scale: Array  # RMS distance of the points from the centroid [input units]
    along_x: Array  # unit vector along the track, oriented towards +y
    along_y: Array
    offset_a: Array  # rounding-level mean of the rotated coordinates removed by the last centring [scale units]
    offset_b: Array
    centre_a: Array  # circle centre in the frame [scale units]
    centre_b: Array
    radius: Array  # [scale units]
    kappa: Array  # smooth signed curvature [1/scale units], > 0: centre on the right of travel
    inv_centre_b: Array  # 1 / centre_b, bounded (0 for a straight line) [1/scale units]
    z_shifted: Array  # mean(z) - 2 eta: radius^2 = centre_a^2 + centre_b^2 + z_shifted
    eta: Array  # the Hyper multiplier (0 for Kasa) [scale units^2]
    degenerate: Array  # bool: (numerically) collinear or fewer than two distinct points


class _Moments(NamedTuple):
    """Weighted centred moments of the points in the frame (scalars)."""

    z_mean: Array
    caa: Array
    cbb: Array
    cab: Array
    caz: Array
    cbz: Array


class _Centre(NamedTuple):
    centre_a: Array
    centre_b: Array
    s_bz: Array  # Schur complements of the eta-shifted normal equations
    s_bb: Array
    caa: Array  # Caa - eta
    finite: Array  # bool: the centre is not capped (not collinear)


def _shifted_centre(m: _Moments, eta: Array | float, tiny: Array, big: Array) -> _Centre:
    """Centre of the centred normal equations (C - eta I) (D, E) = -(Caz, Cbz): Kasa for eta = 0."""
    caa = m.caa - eta
    caa_safe = jnp.where(caa > 0, caa, 1)
    s_bb = jnp.maximum(m.cbb - eta - m.cab * m.cab / caa_safe, 0)  # Schur complements (Cab ~ 0 after rotation)
    s_bz = m.cbz - m.cab * m.caz / caa_safe

    # centre along b: c_b = -E/2 = S_bz / (2 S_bb). Collinear points (S_bb -> 0) send it to infinity: cap
    # |c_b| at 1/eps scale units (radius ~1e7 times the point spread in float32), keeping the sign.
    finite = (jnp.abs(s_bz) < 2 * big * s_bb) & (s_bb > tiny)
    # the division sees s_bb only where it is selected: a tiny s_bb in the discarded branch would give a
    # 0 * inf = NaN gradient
    centre_b = jnp.where(finite, s_bz / (2 * jnp.where(finite, s_bb, 1)), jnp.where(s_bz >= 0, big, -big))
    # centre along a: c_a = -D/2 = (Caz + E Cab) / (2 (Caa - eta)), E = -2 c_b
    centre_a = _safe_div(m.caz - 2 * centre_b * m.cab, 2 * caa)
    return _Centre(centre_a=centre_a, centre_b=centre_b, s_bz=s_bz, s_bb=s_bb, caa=caa, finite=finite)


def _hyper_eta(m: _Moments, kasa: _Centre, a: Array, b: Array, zc: Array, wn: Array, tiny: Array, big: Array) -> Array:
    """The Hyper multiplier: the smallest root eta >= 0 of f(eta) = mean(res^2) - 4 eta (|c|^2 + zbar + eta).

    ``res_i = zc_i - 2 c(eta) . p_i`` are the algebraic residuals of the circle with centre c(eta); this form
    of f (equal to Var_z - 2 c.m - 4 eta zbar - 4 eta^2) is a sum of squares of small numbers instead of a
    difference of O(1) moments. f has a pole where c(eta) does, at the smallest eigenvalue of C (~ S_bb), and
    is concave before it, so Newton on f itself overshoots the root (4 steps left curvature errors of 1e-5 on
    0.3 mm noise). The steps are therefore Newton steps on g = f det(C - eta I), the characteristic
    polynomial of the generalised eigenproblem up to a constant, which has no pole and, in every case we
    measured (float64, noise from 0.1 mm to 10 times the sagitta), is convex on [0, root]: from eta = 0 the
    iterates rise monotonically to the root, to machine precision within 3 steps. A fixed number of
    steps is jit-friendly and differentiable (the derivative through the steps converges to the implicit
    one). eta stays in [0, HYPER_MAX_ETA_FRACTION * S_bb(0)], below the pole, so that degenerate inputs stay
    finite (the bound only binds on arcs whose sagitta is lost in the noise); exact circles have f(0) = 0,
    i.e. eta = 0 and Hyper == Kasa (up to the rounding of the residuals).
    """
    eta_max = HYPER_MAX_ETA_FRACTION * kasa.s_bb

    def newton_step(_, carry):
        eta, centre = carry
        res = zc - 2 * centre.centre_a * a - 2 * centre.centre_b * b
        c2 = centre.centre_a * centre.centre_a + centre.centre_b * centre.centre_b
        f = _wmean(wn, res * res) - 4 * eta * (c2 + m.z_mean + eta)
        slope = 4 * (m.z_mean + c2 + 2 * eta)  # -f'(eta), since d(c.m)/d eta = 2 |c|^2
        # Newton on g = f det(C - eta I), det = (Caa - eta) S_bb(eta), d det / d eta = -(Caa + Cbb - 2 eta)
        det = centre.caa * centre.s_bb
        trace = m.caa + m.cbb - 2 * eta
        eta = jnp.clip(eta + _safe_div(f * det, slope * det + f * trace), 0, eta_max)
        return eta, _shifted_centre(m, eta, tiny, big)

    # a loop, not Python-unrolled steps: its body is traced and compiled once (the gradient of the robust chain,
    # which runs this fit in every reweighting step, compiled in about half the time)
    eta, _ = jax.lax.fori_loop(0, HYPER_NEWTON_STEPS, newton_step, (jnp.zeros_like(m.z_mean), kasa))
    return eta


def _circle_solve(x: Array, y: Array, w: Array, method: str) -> _CircleSolution:
    """Weighted Kasa or Hyper fit of one set of points ``x, y, w`` (shape ``[n]``) in a well-conditioned frame."""
    _check_method(method)
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
    offset_a = _wmean(wn, a)
    offset_b = _wmean(wn, b)
    a = a - offset_a
    b = b - offset_b

    # 4. centred normal equations  [Caa - eta, Cab; Cab, Cbb - eta] (D, E) = -(Caz, Cbz),  F = -mean(z) + 2 eta
    # (Kasa: eta = 0; Hyper: eta from _hyper_eta)
    z = a * a + b * b
    z_mean = _wmean(wn, z)
    zc = z - z_mean
    caa, cbb, cab = _wmean(wn, a * a), _wmean(wn, b * b), _wmean(wn, a * b)
    caz, cbz = _wmean(wn, a * zc), _wmean(wn, b * zc)
    moments = _Moments(z_mean=z_mean, caa=caa, cbb=cbb, cab=cab, caz=caz, cbz=cbz)
    big = 1 / eps
    # below `tiny` a moment is treated as exactly zero, which bounds every 1/moment factor of the gradient
    tiny = jnp.sqrt(jnp.finfo(x.dtype).tiny)
    centre = _shifted_centre(moments, 0.0, tiny, big)
    if method == "hyper":
        # Points with no sagitta above rounding (two layers, a straight line) leave Hyper nothing to correct,
        # and their capped Kasa centre (|c_b| = big) overflows the gradient of the Newton steps (seen: NaN on
        # a two-layer event). They get eta = 0, and the Newton steps see a benign set of moments instead (the
        # double `where`: the discarded branch must be finite in value and gradient, not just unselected).
        # "No sagitta" is S_bb below eps^2 Caa: two points give 0, the stiffest real arcs ~1e-10 (4 layers at
        # 200 GeV, in scaled units), 20-50 GeV tracks on 16 layers 1e-6 to 1e-5.
        curved = centre.finite & (centre.s_bb > eps * eps * caa)
        benign = _Moments(*(jnp.full_like(z_mean, v) for v in (1.0, 1.0, 0.5, 0.0, 0.0, 0.5)))
        safe = _Moments(*(jnp.where(curved, v, d) for v, d in zip(moments, benign, strict=True)))
        eta = _hyper_eta(safe, _shifted_centre(safe, 0.0, tiny, big), a, b, zc, wn, tiny, big)
        eta = jnp.where(curved, eta, 0)
        centre = _shifted_centre(moments, eta, tiny, big)
    else:
        eta = jnp.zeros_like(z_mean)
    # = Caa + Cbb - 2 eta >= Caa - Cbb >= 0: eta < S_bb <= Cbb, and a is the major axis
    z_shifted = z_mean - 2 * eta
    centre_a, centre_b, s_bz, s_bb = centre.centre_a, centre.centre_b, centre.s_bz, centre.s_bb
    radius = jnp.sqrt(centre_a * centre_a + centre_b * centre_b + z_shifted)

    # smooth signed curvature 2 c_b / (c_b^2 + r^2) = 2 c_b / (2 c_b^2 + c_a^2 + z_shifted), multiplied through
    # by 2 S_bb^2 so that it stays finite (-> 0) for S_bb -> 0 (straight line) as well as for S_bz -> 0. The
    # pair (S_bz, S_bb) only matters up to a common factor: normalising it by its larger entry keeps numerator
    # and denominator O(1) (z_shifted ~ mean z = 1 in scaled units, so the denominator is >= ~1) and their
    # gradients finite.
    norm = jnp.maximum(jnp.abs(s_bz), s_bb)
    has_curvature = norm > tiny  # False: exactly collinear (b == 0), a straight line, kappa = 0
    inv_norm = jnp.where(has_curvature, 1 / jnp.where(has_curvature, norm, 1), 0)
    s_bz_n, s_bb_n = s_bz * inv_norm, s_bb * inv_norm
    ca_times_sbb = _safe_div(caz * s_bb_n - cab * s_bz_n, 2 * centre.caa)
    kappa = _safe_div(2 * s_bz_n * s_bb_n, s_bz_n * s_bz_n + 2 * z_shifted * s_bb_n * s_bb_n + 2 * ca_times_sbb**2)
    # 1 / c_b = 2 S_bb / S_bz from the same normalised pair: 0 for a straight line, capped at 1/sqrt(eps)
    # (|c_b| >= sqrt(eps) scale units, a circle centred on the track line: degenerate) to keep it finite
    t_max = 1 / jnp.sqrt(eps)
    t_ok = jnp.abs(s_bz_n) * t_max > 2 * s_bb_n
    inv_centre_b = jnp.where(
        t_ok,
        2 * s_bb_n / jnp.where(t_ok, s_bz_n, 1),
        jnp.where(s_bb_n > 0, jnp.where(s_bz_n >= 0, t_max, -t_max), 0),
    )

    return _CircleSolution(
        origin_x=origin_x,
        origin_y=origin_y,
        scale=scale,
        along_x=along_x,
        along_y=along_y,
        offset_a=offset_a,
        offset_b=offset_b,
        centre_a=centre_a,
        centre_b=centre_b,
        radius=radius,
        kappa=kappa,
        inv_centre_b=inv_centre_b,
        z_shifted=z_shifted,
        eta=eta,
        # straight within the float precision: a sagitta below ~100 eps of the point spread is rounding noise
        # (float32: |c_b| > 8e4 scale units, a radius of ~50 km for our tracks, ~15 TeV at 1 T)
        degenerate=~centre.finite | (jnp.abs(centre_b) > big / 100),
    )


def _centre_in_input_frame(sol: _CircleSolution) -> tuple[Array, Array]:
    """Centre of the fitted circle in the input coordinates (undo rotation, scaling and translation)."""
    # b = (along_y, -along_x)
    xc = sol.origin_x + sol.scale * (sol.centre_a * sol.along_x + sol.centre_b * sol.along_y)
    yc = sol.origin_y + sol.scale * (sol.centre_a * sol.along_y - sol.centre_b * sol.along_x)
    return xc, yc


def _crossings_x(sol: _CircleSolution, y_planes: Array) -> Array:
    """x where the fitted circle crosses the planes ``y = y_planes`` (shape ``[L]``), on the near branch.

    Never via ``xc +- sqrt(R^2 - (y - yc)^2)`` (a difference of two ~R numbers): in the frame, the offset of
    the circle from the track axis at the along-coordinate ``a`` is the small root of
    ``b^2 - 2 c_b b + num = 0``, ``num = a^2 - 2 a c_a - z_shifted`` (all O(1)), written with ``t = 1 / c_b``
    as ``b = num t / (1 + sqrt(1 - num t^2))``: no cancellation, and smooth through the straight line
    (t = 0). The ``a`` of each plane follows from a few fixed-point steps on
    ``y_plane = origin_y + scale (a along_y - b along_x)``. Finite with finite gradients for degenerate
    fits (a plane that misses the circle gets the continuation ``b = num t``; a fit along x, where planes
    and track are parallel, gets along_y floored at sqrt(eps)); with no spread (one point, zero weights)
    every plane gets the centroid's x.
    """
    eps = jnp.finfo(y_planes.dtype).eps
    inv_scale = _safe_div(jnp.ones_like(sol.scale), sol.scale)
    inv_along_y = 1 / jnp.maximum(sol.along_y, jnp.sqrt(eps))
    v = (y_planes - sol.origin_y) * inv_scale  # [L], scale units
    t = sol.inv_centre_b

    def near_offset(a: Array) -> Array:
        num = a * a - 2 * a * sol.centre_a - sol.z_shifted
        return num * t / (1 + _safe_sqrt(1 - num * t * t))

    def crossing_step(_, b):
        # a_raw = a + offset_a and b_raw = b + offset_b are the coordinates before the last centring
        a = (v + (b + sol.offset_b) * sol.along_x) * inv_along_y - sol.offset_a
        return near_offset(a)

    b = jax.lax.fori_loop(0, CROSSING_STEPS, crossing_step, jnp.zeros_like(v))
    # x = origin_x + scale (a_raw along_x + b_raw along_y) with a_raw = (v + b_raw along_x) / along_y
    return sol.origin_x + sol.scale * (v * sol.along_x + b + sol.offset_b) * inv_along_y


def _circle_fit(x: ArrayLike, y: ArrayLike, w: ArrayLike, method: str) -> tuple[Array, Array, Array]:
    dtype = _float_dtype(x, y, w)
    x, y, w = (jnp.asarray(v, dtype) for v in (x, y, w))
    sol = _circle_solve(x, y, w, method)
    xc, yc = _centre_in_input_frame(sol)
    return xc, yc, sol.scale * sol.radius


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
    return _circle_fit(x, y, w, "kasa")


def hyper_circle_fit(
    x: Float[ArrayLike, " n"], y: Float[ArrayLike, " n"], w: Float[ArrayLike, " n"]
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """Weighted Hyper circle fit (Al-Sharadqah & Chernov 2009): ``(xc, yc, r)`` like :func:`kasa_circle_fit`.

    The algebraic fit ``A z + B x + C y + D = 0`` (``z = x^2 + y^2``) minimising the weighted mean of
    ``(A z_i + B x_i + C y_i + D)^2`` under the Hyper constraint ``8 zbar A^2 + 4 A D + B^2 + C^2 = 1``
    (centred data), the generalised eigenvector of the smallest non-negative eigenvalue eta. Unlike Kasa
    it has no essential bias: its curvature is unbiased to O(sigma^2) on short noisy arcs, where Kasa's is
    biased high by ~ sigma^2 / S_bb (module docstring). Same frame, same precision and the same
    degenerate-input guarantees as :func:`kasa_circle_fit`; on points exactly on a circle eta = 0 and both
    fits coincide.
    """
    return _circle_fit(x, y, w, "hyper")


class TrackFit(NamedTuple):
    """Track parameters from the circle fit of one event (scalars; batched by vmap)."""

    xc: Float[Array, ...]  # centre of curvature [mm]
    yc: Float[Array, ...]  # [mm]
    radius: Float[Array, ...]  # [mm]
    pt: Float[Array, ...]  # transverse momentum [GeV] = PT_PER_TESLA_METRE * |B| * R [m]
    q: Float[Array, ...]  # charge +1.0 / -1.0 (sign of q_over_pt; +1 for exactly 0)
    q_over_pt: Float[Array, ...]  # signed q / pT [1/GeV], smooth (0 for a straight line)
    status: Int[Array, ...]  # STATUS_OK (0) or one of the STATUS_* codes > 0
    x_fit: Float[Array, "... L"]  # x [mm] where the fitted circle crosses each layer plane (near branch)


def fit_track(
    x_hat: Float[ArrayLike, " L"],
    y_layers: Float[ArrayLike, " L"],
    layer_weight: Float[ArrayLike, " L"],
    sigma: Float[ArrayLike, " L"],
    b_field: float | Float[ArrayLike, ""],
    *,
    min_layers: int = 3,
    min_layer_weight: float = 0.5,
    method: str = "kasa",
) -> TrackFit:
    """Fit one track to its per-layer clusters: Kasa or Hyper circle, then pT, charge, q/pT and the layer x.

    Args:
        x_hat: cluster position on each layer [mm], shape ``[L]``.
        y_layers: y of each layer plane [mm], shape ``[L]``.
        layer_weight: summed hit weight W_l of each cluster, shape ``[L]``.
        sigma: cluster spread sigma_l [mm] (> 0), shape ``[L]``.
        b_field: field along +z [T] (either sign).
        min_layers, min_layer_weight: the fit gets STATUS_TOO_FEW_LAYERS unless at least ``min_layers``
            layers have ``W_l >= min_layer_weight`` (the values are still computed, and differentiable).
        method: the circle fit, one of FIT_METHODS (static): "kasa" (:func:`kasa_circle_fit`, the paper's)
            or "hyper" (:func:`hyper_circle_fit`, no essential curvature bias). ValueError otherwise.

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

    ``x_fit[l]`` is the x where the fitted circle crosses the plane ``y = y_layers[l]`` on the branch near
    the points, computed without cancellation (float32: within 6e-5 mm of the float64 crossing at
    R ~ 1e5 mm, of which 3e-5 mm is the rounding of x ~ 300 mm itself), for every layer (weighted or not).
    It is finite with finite gradients for every finite input, also when the status is not OK: a straight
    line for collinear points or two layers, the centroid's x for one point, 0 for no weight at all.
    """
    _check_method(method)
    dtype = _float_dtype(x_hat, y_layers, layer_weight, sigma)
    x_hat, y_layers, layer_weight, sigma = (jnp.asarray(v, dtype) for v in (x_hat, y_layers, layer_weight, sigma))
    b_field = jnp.asarray(b_field, dtype)

    has_weight = layer_weight >= EMPTY_LAYER_WEIGHT
    fit_weight = jnp.where(has_weight, _safe_div(jnp.where(has_weight, layer_weight, 0), sigma * sigma), 0)
    sol = _circle_solve(x_hat, y_layers, fit_weight, method)
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
    x_fit = _crossings_x(sol, y_layers)
    x_fit = jnp.where(jnp.isfinite(x_fit), x_fit, 0)
    status = jnp.where(
        n_layers_used < min_layers,
        STATUS_TOO_FEW_LAYERS,
        jnp.where(~finite, STATUS_NONFINITE, jnp.where(sol.degenerate, STATUS_DEGENERATE, STATUS_OK)),
    ).astype(jnp.int32)
    return TrackFit(xc=xc, yc=yc, radius=radius, pt=pt, q=q, q_over_pt=q_over_pt, status=status, x_fit=x_fit)
