"""Random numbers of the simulation: one SplitMix64 generator per event, and the distributions drawn from it.

numba's ``np.random.seed`` takes a 32-bit seed, so 200k per-event seeds would collide (birthday bound: a
handful of identical events per 200k). Every event therefore owns a SplitMix64 generator (64-bit state, held
in a one-element ``uint64`` array) seeded with ``event_seed_kernel(seed, event_id)``, which is a bijection of
``event_id`` for a fixed dataset seed. The distributions (normal, gamma, Poisson, exponential) are drawn from
it with the textbook algorithms named in each kernel. Because every event draws only from its own generator,
the rows do not depend on the number of threads or on which events are simulated together.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.jit import jit

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


@jit(inline=True)
def rng_next(state):
    """Next 64 random bits of the SplitMix64 generator whose state is ``state[0]`` (uint64, updated)."""
    state[0] += _GOLDEN_GAMMA
    return splitmix64_mix(state[0])


@jit(inline=True)
def rng_uniform(state):
    """Uniform float64 in [0, 1) from the top 53 bits."""
    return float(rng_next(state) >> _SHIFT_11) * _TWO_POW_M53


@jit(inline=True)
def rng_integer(state, n):
    """Uniform integer in [0, n)."""
    return min(int(rng_uniform(state) * n), n - 1)


@jit(inline=True)
def rng_sign(state):
    """+1 or -1 with equal probability."""
    return 1 if rng_uniform(state) < 0.5 else -1


@jit(inline=True)
def rng_normal(state):
    """Standard normal (Box-Muller; the second value of the pair is discarded to keep the state simple)."""
    u1 = 1.0 - rng_uniform(state)  # (0, 1]: log is finite
    u2 = rng_uniform(state)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(_TWO_PI * u2)


@jit(inline=True)
def rng_exponential(state):
    """Exponential with mean 1 (inversion)."""
    return -math.log(1.0 - rng_uniform(state))


@jit()
def gamma_constants(shape):
    """``(d, c)`` of Marsaglia and Tsang's method for Gamma(``shape``): ``d = shape' - 1/3`` and
    ``c = 1 / sqrt(9 d)``, with ``shape' = shape + 1`` for ``shape < 1`` (see :func:`rng_gamma`)."""
    if shape < 1.0:
        shape += 1.0
    d = shape - 1.0 / 3.0
    return d, 1.0 / math.sqrt(9.0 * d)


@jit(inline=True)
def rng_gamma(state, shape):
    """Gamma(shape, scale 1) by Marsaglia and Tsang (2000); shape < 1 via Gamma(shape + 1) * U**(1/shape)."""
    d, c = gamma_constants(shape)
    return rng_gamma_with_constants(state, shape, d, c)


@jit(inline=True)
def rng_gamma_with_constants(state, shape, d, c):
    """:func:`rng_gamma` with ``(d, c) = gamma_constants(shape)`` computed once by the caller (same draws)."""
    boost = 1.0
    if shape < 1.0:
        boost = (1.0 - rng_uniform(state)) ** (1.0 / shape)
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


@jit(refcounts=False)
def rng_poisson(state, lam):
    """Poisson(lam): multiplication method for lam < 10, Hormann's PTRS transformed rejection above."""
    return rng_poisson_with_limit(state, lam, math.exp(-lam))


@jit(inline=True)
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


@jit(inline=True)
def rng_normal_tail(state, t):
    """A standard normal drawn on its tail ``z > t`` (``t >= 0``): Robert's (1995) rejection from a shifted
    exponential of rate ``alpha = (t + sqrt(t^2 + 4)) / 2``, accepted with ``exp(-(z - alpha)^2 / 2)`` (at
    least 0.85 of the proposals for t >= 1)."""
    alpha = 0.5 * (t + math.sqrt(t * t + 4.0))
    while True:
        z = t + rng_exponential(state) / alpha
        if rng_uniform(state) <= math.exp(-0.5 * (z - alpha) * (z - alpha)):
            return z
