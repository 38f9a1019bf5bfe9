"""Numba kernels of the toy strip detector: random numbers, circle steps, scattering, strip charges.

Layout follows numba-stats: small scalar kernels first (one physics formula each), then array kernels built
on them, then the event kernels that :mod:`simulation.generate` drives. All jit options live in :func:`jit`.

Units: mm, GeV, tesla, radians. Layers are planes at fixed ``y``; strips measure ``x``; the field is along
``+z``. A track's direction is the angle ``theta`` to the ``+y`` axis, positive towards ``+x``: the
direction vector is ``(sin theta, cos theta)``. The Lorentz force ``q v x B`` on a particle moving towards
``+y`` with ``B`` along ``+z`` points to ``+x`` for ``q > 0``: a positive charge bends towards ``+x`` and
``theta`` grows along its path, ``d theta / ds = kappa`` with the signed curvature
``kappa = q * 0.299792458 * B / (1000 * pT)`` [1/mm].

Material: each layer scatters a track crossing it inside the active width (Highland, ``x/X0`` per layer
times ``1 / cos theta`` for the slanted path, momentum = pT as the motion is in the bending plane, muon mass
for every track), once the crossing is recorded. Energy loss is neglected.

Digitisation: a crossing deposits ``Q = charge_mean * Gamma(k) / k`` (``k = 1 / charge_rms**2``), shared
among strips by a Gaussian of width ``charge_sigma``; charges of all particles are summed per strip and a
strip fires above ``threshold * charge_mean``.

Background: per layer Poisson(noise_strips_per_layer) isolated strips, uniformly placed, with charge
``threshold * charge_mean`` plus an exponential excess of mean ``NOISE_STRIP_EXCESS_MEAN * charge_mean``
(the tail of the electronics noise above threshold), and Poisson(noise_clusters_per_layer) clusters at
uniform x with the normal charge sharing; per event Poisson(extra_tracks_per_event) low-pT tracks (uniform
pT, random charge, angle uniform in +-``EXTRA_TRACK_MAX_ANGLE``) that start on a random layer within
N(0, extra_track_spread) of the muon and cross up to U{extra_track_layers_min..max} consecutive layers.

Random numbers: numba's ``np.random.seed`` takes a 32-bit seed, so 200k per-event seeds would collide
(birthday bound: a handful of identical events per 200k). Every event therefore owns a SplitMix64
generator (64-bit state, held in a one-element ``uint64`` array) seeded with ``event_seed(seed, event_id)``,
which is a bijection of ``event_id`` for a fixed dataset seed. The distributions (normal, gamma, Poisson,
exponential) are drawn from it with the textbook algorithms named in each kernel. Because every event
draws only from its own generator, the rows do not depend on the number of threads or on which events
are simulated together.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

from pipeline.config import PT_PER_TESLA_METRE

#: muon mass [GeV] (PDG); also used for the extra tracks' beta in the Highland formula
MUON_MASS = 0.1056583755
#: extra tracks start with an angle to the y axis drawn uniformly in +- this [rad]
EXTRA_TRACK_MAX_ANGLE = 0.3
#: an isolated noise strip's charge is threshold + an exponential excess of this mean (units of charge_mean)
NOISE_STRIP_EXCESS_MEAN = 0.1
#: strips starting further than this many sigma from a crossing get no charge: the dropped tail is below
#: 3.4e-6 of the cluster charge on each side, far under any sensible threshold (~1e-2)
CHARGE_WINDOW_SIGMAS = 4.5

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_TWO_PI = 2.0 * math.pi
_TWO_POW_M53 = 1.0 / 9007199254740992.0

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_MUL_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_MUL_2 = np.uint64(0x94D049BB133111EB)
_SHIFT_30 = np.uint64(30)
_SHIFT_27 = np.uint64(27)
_SHIFT_31 = np.uint64(31)
_SHIFT_11 = np.uint64(11)
_ONE_U64 = np.uint64(1)

#: events handled by one prange iteration; each chunk allocates its scratch once
_EVENTS_PER_CHUNK = 64


def jit(parallel: bool = False):
    """The one place for jit options: compiled once per signature and cached on disk."""
    return nb.njit(cache=True, nogil=True, error_model="numpy", parallel=parallel)


# ---- random numbers ------------------------------------------------------------------------------------


@jit()
def splitmix64_mix(z):
    """SplitMix64 finaliser (Steele, Lea, Flood 2014): a bijection of uint64 with good avalanche."""
    z = np.uint64(z)
    z = (z ^ (z >> _SHIFT_30)) * _MIX_MUL_1
    z = (z ^ (z >> _SHIFT_27)) * _MIX_MUL_2
    return z ^ (z >> _SHIFT_31)


@jit()
def event_seed_kernel(seed, event_id):
    """64-bit seed of one event's generator from the dataset seed and the event id (both as uint64).

    ``mix(mix(seed + G) + (event_id + 1) * G)`` with the odd golden-ratio constant ``G``: for a fixed
    dataset seed, distinct event ids give distinct seeds (both steps are bijections).
    """
    stream = splitmix64_mix(np.uint64(seed) + _GOLDEN_GAMMA)
    return splitmix64_mix(stream + (np.uint64(event_id) + _ONE_U64) * _GOLDEN_GAMMA)


@jit()
def rng_next(state):
    """Next 64 random bits of the SplitMix64 generator whose state is ``state[0]`` (uint64, updated)."""
    state[0] += _GOLDEN_GAMMA
    return splitmix64_mix(state[0])


@jit()
def rng_uniform(state):
    """Uniform float64 in [0, 1) from the top 53 bits."""
    return float(rng_next(state) >> _SHIFT_11) * _TWO_POW_M53


@jit()
def rng_integer(state, n):
    """Uniform integer in [0, n)."""
    return min(int(rng_uniform(state) * n), n - 1)


@jit()
def rng_sign(state):
    """+1 or -1 with equal probability."""
    return 1 if rng_uniform(state) < 0.5 else -1


@jit()
def rng_normal(state):
    """Standard normal (Box-Muller; the second value of the pair is discarded to keep the state simple)."""
    u1 = 1.0 - rng_uniform(state)  # (0, 1]: log is finite
    u2 = rng_uniform(state)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(_TWO_PI * u2)


@jit()
def rng_exponential(state):
    """Exponential with mean 1 (inversion)."""
    return -math.log(1.0 - rng_uniform(state))


@jit()
def rng_gamma(state, shape):
    """Gamma(shape, scale 1) by Marsaglia and Tsang (2000); shape < 1 via Gamma(shape + 1) * U**(1/shape)."""
    boost = 1.0
    if shape < 1.0:
        boost = (1.0 - rng_uniform(state)) ** (1.0 / shape)
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = rng_normal(state)
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        u = 1.0 - rng_uniform(state)
        if u < 1.0 - 0.0331 * x * x * x * x:
            return d * v * boost
        if math.log(u) < 0.5 * x * x + d * (1.0 - v + math.log(v)):
            return d * v * boost


@jit()
def rng_poisson(state, lam):
    """Poisson(lam): multiplication method for lam < 10, Hormann's PTRS transformed rejection above."""
    return rng_poisson_with_limit(state, lam, math.exp(-lam))


@jit()
def rng_poisson_with_limit(state, lam, limit):
    """:func:`rng_poisson` with ``limit = exp(-lam)`` computed once by the caller (same draws)."""
    if lam <= 0.0:
        return 0
    if lam < 10.0:
        k = 0
        prod = rng_uniform(state)
        while prod > limit:
            k += 1
            prod *= rng_uniform(state)
        return k
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    v_r = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u = rng_uniform(state) - 0.5
        v = rng_uniform(state)
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= v_r:
            return int(k)
        if k < 0.0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(inv_alpha) - math.log(a / (us * us) + b) <= -lam + k * loglam - math.lgamma(k + 1.0):
            return int(k)


# ---- scalar physics kernels ----------------------------------------------------------------------------


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
    if x_over_x0 <= 0.0:
        return 0.0
    beta = p / math.sqrt(p * p + mass * mass)
    return 0.0136 / (beta * p) * math.sqrt(x_over_x0) * (1.0 + 0.038 * math.log(x_over_x0 / (beta * beta)))


def _gaussian_cdf_table() -> np.ndarray:
    """(Phi(z), phi(z)) on the grid z = -_CDF_Z_MAX + k / _CDF_STEPS_PER_UNIT, shape ``(n_nodes, 2)``."""
    z = np.linspace(-_CDF_Z_MAX, _CDF_Z_MAX, int(2 * _CDF_Z_MAX * _CDF_STEPS_PER_UNIT) + 1)
    cdf = np.array([0.5 * math.erfc(-v * _SQRT1_2) for v in z])
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return np.ascontiguousarray(np.stack([cdf, pdf], axis=1))


#: Phi is tabulated on |z| <= 8 (Phi(-8) = 6e-16) with 64 nodes per unit; cubic Hermite interpolation with
#: the exact derivative phi is accurate to ~1e-10 absolute and ~5x faster than libm's erfc, which was the
#: largest single cost of the event loop (8 calls per crossing).
_CDF_Z_MAX = 8.0
_CDF_STEPS_PER_UNIT = 64
_CDF_TABLE = _gaussian_cdf_table()
_CDF_LAST_INTERVAL = _CDF_TABLE.shape[0] - 2
_CDF_STEP = 1.0 / _CDF_STEPS_PER_UNIT


@jit()
def gaussian_cdf(z):
    """Standard normal cumulative distribution Phi(z), absolute error < 1e-9 (table + cubic Hermite)."""
    if z <= -_CDF_Z_MAX:
        return 0.0
    if z >= _CDF_Z_MAX:
        return 1.0
    t = (z + _CDF_Z_MAX) * _CDF_STEPS_PER_UNIT
    k = min(int(t), _CDF_LAST_INTERVAL)
    u = t - k
    u2 = u * u
    u3 = u2 * u
    return (
        (2.0 * u3 - 3.0 * u2 + 1.0) * _CDF_TABLE[k, 0]
        + (u3 - 2.0 * u2 + u) * _CDF_STEP * _CDF_TABLE[k, 1]
        + (3.0 * u2 - 2.0 * u3) * _CDF_TABLE[k + 1, 0]
        + (u3 - u2) * _CDF_STEP * _CDF_TABLE[k + 1, 1]
    )


@jit()
def strip_charge_fraction(x_lo, x_hi, x_center, sigma):
    """Share of a Gaussian charge cloud (centre ``x_center``, width ``sigma`` [mm]) on the strip [x_lo, x_hi]."""
    return gaussian_cdf((x_hi - x_center) / sigma) - gaussian_cdf((x_lo - x_center) / sigma)


@jit()
def charge_half_window(sigma, pitch):
    """Strips on each side of the crossing's strip that receive charge: the first strip left out starts at
    least ``half_window * pitch >= CHARGE_WINDOW_SIGMAS * sigma`` from the crossing."""
    return max(1, math.ceil(CHARGE_WINDOW_SIGMAS * sigma / pitch - 1e-9))


# ---- array kernels -------------------------------------------------------------------------------------


@jit()
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
    for layer in range(first_layer, last_layer):
        if layer > first_layer:
            x, theta, reached = step_to_plane(x, theta, kappa, layer_y[layer] - layer_y[layer - 1])
            if not reached:
                break
        x_out[layer] = x
        n_reached += 1
        if x_over_x0 > 0.0 and x_min <= x <= x_max:
            path = x_over_x0 / max(math.cos(theta), 1e-3)
            theta += highland_sigma(momentum, MUON_MASS, path) * rng_normal(state)
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


@jit()
def cluster_strip_charges(x_center, total_charge, x_min, pitch, n_strips, sigma, half_window, charges_out):
    """Share ``total_charge`` of a crossing at ``x_center`` [mm] among the strips within ``half_window`` of
    the crossing's strip (Gaussian cloud of width ``sigma`` [mm]); strip ``i`` spans
    ``[x_min + i * pitch, x_min + (i + 1) * pitch]`` and strips outside ``[0, n_strips)`` are skipped.

    Writes the charges of strips ``first, first + 1, ...`` into ``charges_out`` (one erfc per strip edge)
    and returns ``(first, n)``; ``n`` is 0 when the window misses the layer.
    """
    centre_strip = math.floor((x_center - x_min) / pitch)
    first = max(centre_strip - half_window, 0)
    last = min(centre_strip + half_window, n_strips - 1)
    if last < first:
        return 0, 0
    inv_sigma = 1.0 / sigma
    cdf_lo = gaussian_cdf((x_min + first * pitch - x_center) * inv_sigma)
    for j in range(last - first + 1):
        cdf_hi = gaussian_cdf((x_min + (first + j + 1) * pitch - x_center) * inv_sigma)
        charges_out[j] = total_charge * max(cdf_hi - cdf_lo, 0.0)  # the table may step back by one ulp near 1
        cdf_lo = cdf_hi
    return first, last - first + 1


@jit()
def _argsort_small(keys, n):
    """Stable insertion argsort of ``keys[:n]``: an event's few dozen sources arrive in nearly sorted runs
    (each particle layer by layer), where this beats np.argsort's quicksort several times over."""
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        key = keys[i]
        j = i
        while j > 0 and keys[order[j - 1]] > key:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i
    return order


@jit()
def _flush_strips(
    comp_start,
    comp_len,
    n_strips,
    threshold_charge,
    acc,
    acc_track,
    hit_layer,
    hit_strip,
    hit_charge,
    hit_is_signal,
    hit_particle,
    n_hits,
):
    """Write the fired strips of one run of overlapping windows (cells ``0 .. comp_len - 1``, strip key
    ``comp_start + cell``) to the hit arrays, in strip order."""
    layer = comp_start // n_strips  # a run never straddles layers: one integer division per run
    first_strip = comp_start - layer * n_strips
    for cell in range(comp_len):
        total = acc[cell, 0]
        if total > threshold_charge:
            hit_layer[n_hits] = layer
            hit_strip[n_hits] = first_strip + cell
            hit_charge[n_hits] = total
            hit_is_signal[n_hits] = acc[cell, 1] > 0.5 * total
            # ties go to the lower id, so noise (-1) wins a tie and a cell without tracks is noise
            hit_particle[n_hits] = -1 if acc[cell, 2] >= acc[cell, 3] else acc_track[cell]
            n_hits += 1
    return n_hits


@jit()
def digitise_sources(
    src_key,
    src_n,
    src_particle,
    src_offset,
    dep_charge,
    n_sources,
    n_strips,
    threshold_charge,
    acc,
    acc_track,
    hit_layer,
    hit_strip,
    hit_charge,
    hit_is_signal,
    hit_particle,
):
    """Sum the charge of overlapping sources per (layer, strip) and keep the strips above ``threshold_charge``.

    A source is a run of consecutive strips on one layer that got charge from one particle: source ``s``
    starts at strip key ``src_key[s] = layer * n_strips + first_strip``, covers ``src_n[s]`` strips inside
    the layer and its charges are ``dep_charge[src_offset[s] : src_offset[s] + src_n[s]]``.
    ``src_particle[s]`` is -1 for noise (any number of sources) or a track id >= 0 (0 = the muon), and a track
    gives at most one source per layer, as a track crosses each layer once.

    A fired strip's ``is_signal`` is "the muon gave more than half of its charge", its ``particle`` the
    particle with the largest summed contribution (ties: the lower id). ``acc`` (float64, shape
    ``(capacity, 4)``) and ``acc_track`` (int64, ``(capacity,)``) are scratch with
    ``capacity >= sum(src_n)``; the hits go to ``hit_*`` (same capacity) in (layer, strip) order.
    Returns the number of hits.

    Sources are visited in key order, so every run of overlapping windows is a contiguous strip range that
    is accumulated densely and flushed when the next source starts past its end: no hashing, one small sort.
    """
    order = _argsort_small(src_key, n_sources)
    n_hits = 0
    comp_start = 0
    comp_end = 0  # exclusive strip key
    for j in range(n_sources):
        s = order[j]
        key = src_key[s]
        if key >= comp_end:  # windows never straddle layers, so this also starts a new run on a new layer
            n_hits = _flush_strips(
                comp_start,
                comp_end - comp_start,
                n_strips,
                threshold_charge,
                acc,
                acc_track,
                hit_layer,
                hit_strip,
                hit_charge,
                hit_is_signal,
                hit_particle,
                n_hits,
            )
            comp_start = key
            comp_end = key
        while comp_end < key + src_n[s]:
            cell = comp_end - comp_start
            acc[cell, 0] = 0.0  # total
            acc[cell, 1] = 0.0  # muon
            acc[cell, 2] = 0.0  # noise
            acc[cell, 3] = -1.0  # largest single-track contribution
            acc_track[cell] = 0
            comp_end += 1
        particle = src_particle[s]
        for t in range(src_n[s]):
            cell = key - comp_start + t
            charge = dep_charge[src_offset[s] + t]
            acc[cell, 0] += charge
            if particle < 0:
                acc[cell, 2] += charge
            else:
                if particle == 0:
                    acc[cell, 1] += charge
                if charge > acc[cell, 3] or (charge == acc[cell, 3] and particle < acc_track[cell]):
                    acc[cell, 3] = charge
                    acc_track[cell] = particle
    return _flush_strips(
        comp_start,
        comp_end - comp_start,
        n_strips,
        threshold_charge,
        acc,
        acc_track,
        hit_layer,
        hit_strip,
        hit_charge,
        hit_is_signal,
        hit_particle,
        n_hits,
    )


# ---- event kernels -------------------------------------------------------------------------------------


class KernelParams(NamedTuple):
    """Plain-number view of a SimConfig for the event kernels (see pipeline.config for the meaning)."""

    x_min: float
    x_max: float
    pitch: float
    n_strips: int
    charge_sigma: float
    half_window: int
    charge_mean: float
    #: gamma shape 1 / charge_rms**2 of the total cluster charge; 0 means a constant charge
    charge_shape: float
    threshold_charge: float
    b_field: float
    #: 0 when multiple scattering is off
    x_over_x0: float
    pt_min: float
    pt_max: float
    x0_sigma: float
    theta0_sigma: float
    noise_strips_per_layer: float
    noise_clusters_per_layer: float
    extra_tracks_per_event: float
    extra_pt_min: float
    extra_pt_max: float
    extra_layers_min: int
    extra_layers_max: int
    extra_spread: float


@jit()
def _draw_counts(state, params, n_layers, noise_strip_counts, noise_cluster_counts):
    """The first draws of every event: the background multiplicities. Returns the number of extra tracks."""
    n_extra = rng_poisson(state, params.extra_tracks_per_event)
    strips_limit = math.exp(-params.noise_strips_per_layer)
    clusters_limit = math.exp(-params.noise_clusters_per_layer)
    for layer in range(n_layers):
        noise_strip_counts[layer] = rng_poisson_with_limit(state, params.noise_strips_per_layer, strips_limit)
        noise_cluster_counts[layer] = rng_poisson_with_limit(state, params.noise_clusters_per_layer, clusters_limit)
    return n_extra


@jit()
def _deposit_bound(params, n_layers, n_extra, noise_strip_counts, noise_cluster_counts):
    """Upper bound on the strip deposits of an event (every crossing with a full window), hence on its hits."""
    window = 2 * params.half_window + 1
    n_crossings = n_layers + n_extra * min(params.extra_layers_max, n_layers)
    n_noise_strips = 0
    for layer in range(n_layers):
        n_crossings += noise_cluster_counts[layer]
        n_noise_strips += noise_strip_counts[layer]
    return n_crossings * window + n_noise_strips


@jit(parallel=True)
def event_deposit_bounds(seed, first_event_id, n_events, params, n_layers):
    """Pass 1: per-event upper bound on the number of strip deposits (hence hits), shape ``(n_events,)``."""
    bounds = np.empty(n_events, dtype=np.int64)
    n_chunks = (n_events + _EVENTS_PER_CHUNK - 1) // _EVENTS_PER_CHUNK
    for chunk in nb.prange(n_chunks):
        state = np.empty(1, dtype=np.uint64)
        noise_strip_counts = np.empty(n_layers, dtype=np.int64)
        noise_cluster_counts = np.empty(n_layers, dtype=np.int64)
        for i in range(chunk * _EVENTS_PER_CHUNK, min((chunk + 1) * _EVENTS_PER_CHUNK, n_events)):
            state[0] = event_seed_kernel(seed, first_event_id + i)
            n_extra = _draw_counts(state, params, n_layers, noise_strip_counts, noise_cluster_counts)
            bounds[i] = _deposit_bound(params, n_layers, n_extra, noise_strip_counts, noise_cluster_counts)
    return bounds


@jit()
def _total_charge(state, params):
    """Total charge of one crossing: charge_mean * Gamma(k) / k, k = 1 / charge_rms**2 (mean charge_mean)."""
    if params.charge_shape <= 0.0:
        return params.charge_mean
    return params.charge_mean * rng_gamma(state, params.charge_shape) / params.charge_shape


@jit()
def _add_cluster(
    state, params, layer, x_center, particle, src_key, src_n, src_particle, src_offset, dep_charge, n_src, n_dep
):
    """Append one crossing (a fresh fluctuating total charge shared among strips) as a source."""
    first, n = cluster_strip_charges(
        x_center,
        _total_charge(state, params),
        params.x_min,
        params.pitch,
        params.n_strips,
        params.charge_sigma,
        params.half_window,
        dep_charge[n_dep:],
    )
    if n > 0:
        src_key[n_src] = layer * params.n_strips + first
        src_n[n_src] = n
        src_particle[n_src] = particle
        src_offset[n_src] = n_dep
        n_src += 1
        n_dep += n
    return n_src, n_dep


@jit(parallel=True)
def simulate_events_kernel(
    seed,
    first_event_id,
    n_events,
    params,
    layer_y,
    deposit_offsets,
    tmp_layer,
    tmp_strip,
    tmp_charge,
    tmp_is_signal,
    tmp_particle,
    n_hits,
    pt_out,
    q_out,
    x0_out,
    theta0_out,
    x_true_out,
):
    """Pass 2: simulate every event; its hits go to ``tmp_*[deposit_offsets[i]:]`` (room for the pass-1
    bound) and their number to ``n_hits[i]``; the muon truth to the ``*_out`` arrays (``x_true_out`` has
    shape ``(n_events, n_layers)``, NaN off the active width or where the muon cannot reach the layer).

    Random draws of one event, in order: background multiplicities; muon pT, charge, x0, theta0, its
    scattering kicks, its crossing charges; per extra track its layers, pT, charge, angle, start, kicks and
    charges; per layer the noise clusters then the noise strips.
    """
    n_layers = layer_y.shape[0]
    n_chunks = (n_events + _EVENTS_PER_CHUNK - 1) // _EVENTS_PER_CHUNK
    for chunk in nb.prange(n_chunks):
        lo = chunk * _EVENTS_PER_CHUNK
        hi = min(lo + _EVENTS_PER_CHUNK, n_events)
        capacity = 0
        for i in range(lo, hi):
            capacity = max(capacity, deposit_offsets[i + 1] - deposit_offsets[i])
        state = np.empty(1, dtype=np.uint64)
        noise_strip_counts = np.empty(n_layers, dtype=np.int64)
        noise_cluster_counts = np.empty(n_layers, dtype=np.int64)
        src_key = np.empty(capacity, dtype=np.int64)
        src_n = np.empty(capacity, dtype=np.int64)
        src_particle = np.empty(capacity, dtype=np.int64)
        src_offset = np.empty(capacity, dtype=np.int64)
        dep_charge = np.empty(capacity, dtype=np.float64)
        acc = np.empty((capacity, 4), dtype=np.float64)
        acc_track = np.empty(capacity, dtype=np.int64)
        muon_x = np.empty(n_layers, dtype=np.float64)
        extra_x = np.empty(n_layers, dtype=np.float64)
        for i in range(lo, hi):
            state[0] = event_seed_kernel(seed, first_event_id + i)
            n_extra = _draw_counts(state, params, n_layers, noise_strip_counts, noise_cluster_counts)
            n_src = 0
            n_dep = 0

            # the muon
            pt = params.pt_min + (params.pt_max - params.pt_min) * rng_uniform(state)
            q = rng_sign(state)
            x0 = params.x0_sigma * rng_normal(state)
            theta0 = params.theta0_sigma * rng_normal(state)
            kappa = curvature(pt, q, params.b_field)
            propagate_track(
                x0, theta0, kappa, pt, layer_y, 0, n_layers, params.x_min, params.x_max, params.x_over_x0, state, muon_x
            )
            for layer in range(n_layers):
                x = muon_x[layer]
                inside = params.x_min <= x <= params.x_max  # False for NaN
                x_true_out[i, layer] = x if inside else np.nan
                if inside:
                    n_src, n_dep = _add_cluster(
                        state, params, layer, x, 0, src_key, src_n, src_particle, src_offset, dep_charge, n_src, n_dep
                    )
            pt_out[i] = pt
            q_out[i] = q
            x0_out[i] = x0
            theta0_out[i] = theta0

            # extra low-momentum tracks starting near the muon
            for k in range(1, n_extra + 1):
                n_cross = params.extra_layers_min + rng_integer(
                    state, params.extra_layers_max - params.extra_layers_min + 1
                )
                first = rng_integer(state, n_layers)
                last = min(first + n_cross, n_layers)
                extra_pt = params.extra_pt_min + (params.extra_pt_max - params.extra_pt_min) * rng_uniform(state)
                extra_q = rng_sign(state)
                extra_theta = EXTRA_TRACK_MAX_ANGLE * (2.0 * rng_uniform(state) - 1.0)
                near = muon_x[first]
                if math.isnan(near):  # the muon curled away before this layer (not at default pT)
                    near = params.x_min + (params.x_max - params.x_min) * rng_uniform(state)
                x_start = near + params.extra_spread * rng_normal(state)
                extra_kappa = curvature(extra_pt, extra_q, params.b_field)
                propagate_track(
                    x_start,
                    extra_theta,
                    extra_kappa,
                    extra_pt,
                    layer_y,
                    first,
                    last,
                    params.x_min,
                    params.x_max,
                    params.x_over_x0,
                    state,
                    extra_x,
                )
                for layer in range(first, last):
                    x = extra_x[layer]
                    if params.x_min <= x <= params.x_max:
                        n_src, n_dep = _add_cluster(
                            state,
                            params,
                            layer,
                            x,
                            k,
                            src_key,
                            src_n,
                            src_particle,
                            src_offset,
                            dep_charge,
                            n_src,
                            n_dep,
                        )

            # noise: clusters with the normal charge sharing, then isolated strips above threshold
            for layer in range(n_layers):
                for _ in range(noise_cluster_counts[layer]):
                    x = params.x_min + (params.x_max - params.x_min) * rng_uniform(state)
                    n_src, n_dep = _add_cluster(
                        state, params, layer, x, -1, src_key, src_n, src_particle, src_offset, dep_charge, n_src, n_dep
                    )
                for _ in range(noise_strip_counts[layer]):
                    src_key[n_src] = layer * params.n_strips + rng_integer(state, params.n_strips)
                    src_n[n_src] = 1
                    src_particle[n_src] = -1
                    src_offset[n_src] = n_dep
                    dep_charge[n_dep] = params.threshold_charge + (
                        NOISE_STRIP_EXCESS_MEAN * params.charge_mean * rng_exponential(state)
                    )
                    n_src += 1
                    n_dep += 1

            off = deposit_offsets[i]
            end = deposit_offsets[i + 1]
            n_hits[i] = digitise_sources(
                src_key,
                src_n,
                src_particle,
                src_offset,
                dep_charge,
                n_src,
                params.n_strips,
                params.threshold_charge,
                acc,
                acc_track,
                tmp_layer[off:end],
                tmp_strip[off:end],
                tmp_charge[off:end],
                tmp_is_signal[off:end],
                tmp_particle[off:end],
            )


@jit(parallel=True)
def compact_hits_kernel(
    first_event_id,
    deposit_offsets,
    hit_offsets,
    layer_y,
    x_min,
    pitch,
    tmp_layer,
    tmp_strip,
    tmp_charge,
    tmp_is_signal,
    tmp_particle,
    event_id,
    hit_id,
    layer,
    strip,
    x,
    y,
    charge,
    is_signal,
    particle_id,
):
    """Pass 3: copy each event's hits from its bound-sized slot to the dense output at ``hit_offsets``,
    filling event id, hit id (index within the event), strip centre x and layer y [mm]."""
    n_events = hit_offsets.shape[0] - 1
    for i in nb.prange(n_events):
        src = deposit_offsets[i]
        dst = hit_offsets[i]
        for j in range(hit_offsets[i + 1] - dst):
            lay = tmp_layer[src + j]
            s = tmp_strip[src + j]
            event_id[dst + j] = first_event_id + i
            hit_id[dst + j] = j
            layer[dst + j] = lay
            strip[dst + j] = s
            x[dst + j] = x_min + (s + 0.5) * pitch
            y[dst + j] = layer_y[lay]
            charge[dst + j] = tmp_charge[src + j]
            is_signal[dst + j] = tmp_is_signal[src + j]
            particle_id[dst + j] = tmp_particle[src + j]
