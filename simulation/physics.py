"""Track physics of the toy strip detector: curvature, exact circle steps between layers, Highland scattering.

Units: mm, GeV, tesla, radians. Layers are planes at fixed ``y``; strips measure ``x``; the field is along
``+z``. A track's direction is the angle ``theta`` to the ``+y`` axis, positive towards ``+x``: the
direction vector is ``(sin theta, cos theta)``. The Lorentz force ``q v x B`` on a particle moving towards
``+y`` with ``B`` along ``+z`` points to ``+x`` for ``q > 0``: a positive charge bends towards ``+x`` and
``theta`` grows along its path, ``d theta / ds = kappa`` with the signed curvature
``kappa = q * 0.299792458 * B / (1000 * pT)`` [1/mm].

Material: each layer scatters a track crossing it inside the active width (Highland, ``x/X0`` per layer
times ``1 / cos theta`` for the slanted path, momentum = pT as the motion is in the bending plane, muon mass
for every track), once the crossing is recorded. Energy loss is neglected.

Scalar kernels first (one formula each), then the array kernels built on them.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.config import PT_PER_TESLA_METRE
from pipeline.constants import COS_FLOOR, HIGHLAND_LOG, HIGHLAND_SCALE, MUON_MASS
from pipeline.jit import jit
from simulation.rng import rng_normal

# ---- scalar kernels ------------------------------------------------------------------------------------


@jit()
def curvature(pt, charge, b_field):
    """Signed curvature [1/mm] of a track with transverse momentum ``pt`` [GeV] and charge +-1 in ``b_field``
    [T] along +z; positive means the track bends towards +x (``theta`` grows)."""
    return charge * PT_PER_TESLA_METRE * b_field / (1000.0 * pt)


@jit()
def step_to_plane(x, theta, kappa, dy):
    """Exact circle step from a point ``x`` on one plane to the plane ``dy`` [mm] further in y.

    Along the circle ``sin theta`` grows linearly with y: ``sin theta1 = sin theta + kappa * dy``. The first
    crossing keeps ``cos theta1 >= 0``; the x step ``dy * (sin theta + sin theta1) / (cos theta + cos theta1)``
    equals ``(cos theta - cos theta1) / kappa`` without its cancellation at large radius (and is the straight
    line for ``kappa = 0``).

    Returns ``(x1, theta1, reached)``; ``reached`` is False when the track curls before the plane or already
    moves away from it (``cos theta <= 0``), and then ``x1`` is NaN.
    """
    sin0 = math.sin(theta)
    cos0 = math.cos(theta)
    if cos0 <= 0.0:
        return math.nan, theta, False
    sin1 = sin0 + kappa * dy
    if abs(sin1) >= 1.0:
        return math.nan, theta, False
    cos1 = math.sqrt(1.0 - sin1 * sin1)
    return x + dy * (sin0 + sin1) / (cos0 + cos1), math.atan2(sin1, cos1), True


@jit()
def highland_sigma(p, mass, x_over_x0):
    """RMS plane-projected scattering angle [rad] (Highland formula, PDG 2024 eq. 34.16) of a singly charged
    particle of momentum ``p`` [GeV] and ``mass`` [GeV] through ``x_over_x0`` radiation lengths."""
    scale, beta_squared = highland_constants(p, mass)
    return highland_sigma_with_constants(scale, beta_squared, x_over_x0)


@jit()
def highland_constants(p, mass):
    """The factors of :func:`highland_sigma` that depend only on the track: ``(HIGHLAND_SCALE / (beta p),
    beta**2)``, computed once per track."""
    beta = p / math.sqrt(p * p + mass * mass)
    return HIGHLAND_SCALE / (beta * p), beta * beta


@jit()
def highland_sigma_with_constants(scale, beta_squared, x_over_x0):
    """:func:`highland_sigma` with ``(scale, beta_squared) = highland_constants(p, mass)`` (same value)."""
    if x_over_x0 <= 0.0:
        return 0.0
    return scale * math.sqrt(x_over_x0) * (1.0 + HIGHLAND_LOG * math.log(x_over_x0 / beta_squared))


# ---- array kernels -------------------------------------------------------------------------------------


@jit(refcounts=False)
def propagate_track(
    x_start, theta_start, kappa, momentum, layer_y, first_layer, last_layer, x_min, x_max, x_over_x0, state, x_out
):
    """Follow a track from layer ``first_layer`` (where it is at ``x_start`` with angle ``theta_start``) to
    the layers before ``last_layer``, writing its crossing x [mm] into ``x_out[layer]``.

    With ``x_over_x0 > 0`` the direction gets a Gaussian Highland kick (``momentum`` [GeV], muon mass, path
    length ``x_over_x0 / cos theta``) after each crossing inside the active width [x_min, x_max] (the material
    is the detector); the kicks are drawn from ``state``. Layers the track cannot reach stay NaN.
    Returns the number of layers reached.
    """
    for layer in range(first_layer, last_layer):
        x_out[layer] = math.nan
    x = x_start
    theta = theta_start
    n_reached = 0
    scale, beta_squared = highland_constants(momentum, MUON_MASS)
    for layer in range(first_layer, last_layer):
        if layer > first_layer:
            x, theta, reached = step_to_plane(x, theta, kappa, layer_y[layer] - layer_y[layer - 1])
            if not reached:
                break
        x_out[layer] = x
        n_reached += 1
        if x_over_x0 > 0.0 and x_min <= x <= x_max:
            path = x_over_x0 / max(math.cos(theta), COS_FLOOR)
            theta += highland_sigma_with_constants(scale, beta_squared, path) * rng_normal(state)
    return n_reached


@jit()
def track_crossings(x0, theta0, pt, charge, b_field, layer_y):
    """Crossing x [mm] of a track without scattering on every layer, shape ``(n_layers,)``, NaN where the
    track curls before the layer. The track is at ``x0`` with angle ``theta0`` on the first layer."""
    x_out = np.empty(layer_y.shape[0], dtype=np.float64)
    no_state = np.zeros(1, dtype=np.uint64)
    kappa = curvature(pt, charge, b_field)
    propagate_track(x0, theta0, kappa, pt, layer_y, 0, layer_y.shape[0], -np.inf, np.inf, 0.0, no_state, x_out)
    return x_out
