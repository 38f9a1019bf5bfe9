"""Digitisation of the toy strip detector: charge sharing among strips, summing per strip, cross-talk,
electronic noise, threshold.

A crossing deposits a total charge (drawn by :mod:`simulation.events`) shared among strips by a Gaussian
cloud of width ``charge_sigma``; the charges of all particles are summed per strip, each strip passes the
fraction ``crosstalk`` of its charge to each neighbour, gets Gaussian electronic noise of width
``electronic_noise * charge_mean``, and fires above ``threshold * charge_mean``. The noise is drawn on every
strip inside a charge window; a strip outside all of them fires only where its noise alone crosses the
threshold, which :mod:`simulation.events` draws directly as "tail" sources (a Poisson number per layer, the
charge from the normal tail above the threshold). Cross-talk into a strip outside every window (4.5 sigma of the
cloud from any crossing) is dropped; an isolated noise strip keeps ``1 - 2 crosstalk`` of its charge.

Scalar kernels first (the Gaussian CDF, one strip's share), then the array kernels built on them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from pipeline.jit import argsort_small, jit
from simulation.rng import rng_normal

#: strips starting further than this many sigma from a crossing get no charge: the dropped tail is below
#: 3.4e-6 of the cluster charge on each side, far under any sensible threshold (~1e-2)
CHARGE_WINDOW_SIGMAS = 4.5

_SQRT1_2 = 1.0 / math.sqrt(2.0)

#: Phi is tabulated on |z| <= 8 (Phi(-8) = 6e-16) with 64 nodes per unit; cubic Hermite interpolation with
#: the exact derivative phi is accurate to ~1e-10 absolute and ~5x faster than libm's erfc (8 calls per
#: crossing, the event loop's largest cost).
_CDF_Z_MAX = 8.0
_CDF_STEPS_PER_UNIT = 64
_CDF_STEP = 1.0 / _CDF_STEPS_PER_UNIT


def _gaussian_cdf_table() -> np.ndarray:
    """(Phi(z), phi(z)) on the grid z = -_CDF_Z_MAX + k / _CDF_STEPS_PER_UNIT, shape ``(n_nodes, 2)``."""
    z = np.linspace(-_CDF_Z_MAX, _CDF_Z_MAX, int(2 * _CDF_Z_MAX * _CDF_STEPS_PER_UNIT) + 1)
    cdf = np.array([0.5 * math.erfc(-v * _SQRT1_2) for v in z])
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return np.ascontiguousarray(np.stack([cdf, pdf], axis=1))


_CDF_TABLE = _gaussian_cdf_table()
_CDF_LAST_INTERVAL = _CDF_TABLE.shape[0] - 2


class Sources(NamedTuple):
    """Scratch of one event's charge sources (int64 / float64 arrays of one capacity).

    A source is a run of consecutive strips on one layer that got charge from one particle: source ``s``
    starts at strip key ``key[s] = layer * n_strips + first_strip``, covers ``length[s]`` strips inside the
    layer, and its charges are ``deposit[offset[s] : offset[s] + length[s]]``. ``particle[s]`` is a track id
    >= 0 (0 = the muon), -1 (``NOISE_ID``) for background noise, -2 (``NOISE_TAIL_ID``) for the electronic
    noise of a strip outside every charge window that crossed the threshold.
    """

    key: np.ndarray
    length: np.ndarray
    particle: np.ndarray
    offset: np.ndarray
    #: charge per strip of every source, back to back
    deposit: np.ndarray
    #: scratch of :func:`digitise_sources`: the sources' indices in key order
    order: np.ndarray


#: particle id of background noise sources (noise strips and clusters of the background config)
NOISE_ID = -1
#: particle id of an electronic-noise tail source: its charge is the strip's noise, not a deposit
NOISE_TAIL_ID = -2


class StripSums(NamedTuple):
    """Per-strip accumulators of one run of overlapping sources (float64 / int64 arrays of one capacity)."""

    #: charge of all particles and the background noise
    total: np.ndarray
    #: charge of the muon (track id 0)
    muon: np.ndarray
    #: charge of the noise sources
    noise: np.ndarray
    #: largest single-track contribution (-1 before any track)
    best_charge: np.ndarray
    #: the track that gave it (the lower id on a tie)
    best_track: np.ndarray
    #: electronic noise drawn on the tail above threshold (NOISE_TAIL_ID sources), 0 elsewhere
    tail: np.ndarray


class HitColumns(NamedTuple):
    """The fired strips: one row per hit, in (layer, strip) order."""

    layer: np.ndarray
    strip: np.ndarray
    charge: np.ndarray
    charge_muon: np.ndarray
    is_signal: np.ndarray
    particle_id: np.ndarray


@jit()
def new_sources(capacity):
    """Uninitialised :class:`Sources` for up to ``capacity`` sources and strip deposits."""
    columns = np.empty((5, capacity), dtype=np.int64)
    return Sources(columns[0], columns[1], columns[2], columns[3], np.empty(capacity, dtype=np.float64), columns[4])


@jit()
def new_strip_sums(capacity):
    """Uninitialised :class:`StripSums` for runs of up to ``capacity`` strips."""
    columns = np.empty((5, capacity), dtype=np.float64)
    return StripSums(columns[0], columns[1], columns[2], columns[3], np.empty(capacity, dtype=np.int64), columns[4])


# ---- scalar kernels ------------------------------------------------------------------------------------


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


@jit(inline=True)
def cluster_strip_charges(x_center, total_charge, x_min, pitch, n_strips, sigma, half_window, charges_out):
    """Share ``total_charge`` of a crossing at ``x_center`` [mm] among the strips within ``half_window`` of
    the crossing's strip (Gaussian cloud of width ``sigma`` [mm]); strip ``i`` spans
    ``[x_min + i * pitch, x_min + (i + 1) * pitch]`` and strips outside ``[0, n_strips)`` are skipped.

    Writes the charges of strips ``first, first + 1, ...`` into ``charges_out`` (one :func:`gaussian_cdf`
    per strip edge, shared by neighbouring strips) and returns ``(first, n)``; ``n`` is 0 when the window
    misses the layer.
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


@jit(inline=True)
def add_source(sources, n_sources, n_deposits, key, length, particle):
    """Append the source whose ``length`` charges were written at ``sources.deposit[n_deposits:]``; returns
    the new ``(n_sources, n_deposits)``."""
    sources.key[n_sources] = key
    sources.length[n_sources] = length
    sources.particle[n_sources] = particle
    sources.offset[n_sources] = n_deposits
    return n_sources + 1, n_deposits + length


@jit(inline=True)
def share_with_neighbours(values, n, fraction):
    """Cross-talk on ``values[:n]`` in place: each strip keeps ``1 - 2 fraction`` of its value and passes
    ``fraction`` to each neighbour; what would leave the range is dropped."""
    previous = 0.0
    for cell in range(n):
        current = values[cell]
        following = values[cell + 1] if cell + 1 < n else 0.0
        values[cell] = (1.0 - 2.0 * fraction) * current + fraction * (previous + following)
        previous = current


@jit(inline=True)
def _fire_strip(
    total, muon, noise, best_charge, best_track, tail, layer, strip, threshold_charge, noise_sigma, state, hits, n_hits
):
    """One strip of :func:`digitise_sources` from its sums (one value of each :class:`StripSums` column): draw
    its electronic noise, and append it to ``hits`` at row ``n_hits`` when it fires. Returns the new number
    of hits."""
    # a tail source is its strip's noise; elsewhere the noise is drawn here (no draw without noise)
    electronic = tail
    if electronic == 0.0 and noise_sigma > 0.0:
        electronic = noise_sigma * rng_normal(state)
    measured = total + electronic
    if not measured > threshold_charge:
        return n_hits
    # an unsigned row: Numba then leaves out its wraparound of negative indices on each of the six stores
    row = np.uint64(n_hits)
    hits.layer[row] = layer
    hits.strip[row] = strip
    hits.charge[row] = measured
    hits.charge_muon[row] = muon
    hits.is_signal[row] = muon > 0.5 * measured
    # ties go to the lower id, so noise (-1) wins a tie and a cell without tracks is noise
    noise_charge = noise + max(electronic, 0.0)
    hits.particle_id[row] = NOISE_ID if noise_charge >= best_charge else best_track
    return n_hits + 1


@jit(inline=True)
def _fire_lone_source(
    source, layer, first_strip, particle, sources, threshold_charge, noise_sigma, state, hits, n_hits
):
    """:func:`digitise_sources` of a source that overlaps no other, without cross-talk: the strips straight
    from its deposits, with the sums a run of this source alone would hold (the same additions to 0, so the
    same bits). Returns the new number of hits."""
    offset = sources.offset[source]
    for t in range(sources.length[source]):
        charge = sources.deposit[offset + t]
        total = 0.0
        muon = 0.0
        noise = 0.0
        best_charge = -1.0
        best_track = 0
        tail = 0.0
        if particle == NOISE_TAIL_ID:
            tail += charge
        elif particle < 0:
            total += charge
            noise += charge
        else:
            total += charge
            if particle == 0:
                muon += charge
            if charge > best_charge or (charge == best_charge and particle < best_track):
                best_charge = charge
                best_track = particle
        n_hits = _fire_strip(
            total,
            muon,
            noise,
            best_charge,
            best_track,
            tail,
            layer,
            first_strip + t,
            threshold_charge,
            noise_sigma,
            state,
            hits,
            n_hits,
        )
    return n_hits


@jit(refcounts=False)
def digitise_sources(sources, n_sources, n_strips, threshold_charge, noise_sigma, crosstalk, state, sums, hits):
    """Sum the charge of the first ``n_sources`` :class:`Sources` per (layer, strip), apply the cross-talk
    ``crosstalk`` and Gaussian electronic noise of width ``noise_sigma`` (drawn from the generator ``state``
    strip by strip in (layer, strip) order, none when it is 0), and keep the strips above ``threshold_charge``.

    A track gives at most one source per layer (it crosses each layer once), noise any number. A fired
    strip's ``charge_muon`` is the muon's charge on it after the cross-talk and before the noise, its
    ``is_signal`` "the muon gave more than half of its charge", its ``particle_id`` the contributor with the
    largest deposit before the cross-talk, the background and the (positive) electronic noise counted together
    as noise (-1; ties: the lower id). ``sums`` (:class:`StripSums`) is scratch with capacity >= the total
    length of the sources; the hits go to ``hits`` (:class:`HitColumns`, same capacity) in (layer, strip)
    order. Returns the number of hits.

    Sources are visited in key order, so every run of overlapping windows is a contiguous strip range that
    is accumulated densely and flushed when the next source starts past its end: no hashing, one small sort.
    A source that overlaps no other (most of them) is digitised straight from its deposits when there is no
    cross-talk.
    """
    key_of, length_of, particle_of, offset_of, deposit, order = sources
    total, muon, noise, best_charge, best_track, tail = sums
    argsort_small(key_of, n_sources, order)
    n_hits = 0
    run_start = 0
    run_end = 0  # exclusive strip key
    # one pass more than there are sources: the last one only flushes the last run
    for j in range(n_sources + 1):
        s = order[j] if j < n_sources else 0
        key = key_of[s] if j < n_sources else run_end
        if key >= run_end:  # windows never straddle layers, so this also starts a new run on a new layer
            # flush the run of overlapping windows so far: its fired strips, in strip order
            n_cells = run_end - run_start
            if n_cells > 0:
                layer = run_start // n_strips  # a run never straddles layers: one integer division per run
                first_strip = run_start - layer * n_strips
                if crosstalk > 0.0:
                    share_with_neighbours(total, n_cells, crosstalk)
                    share_with_neighbours(muon, n_cells, crosstalk)
                for cell in range(n_cells):
                    n_hits = _fire_strip(
                        total[cell],
                        muon[cell],
                        noise[cell],
                        best_charge[cell],
                        best_track[cell],
                        tail[cell],
                        layer,
                        first_strip + cell,
                        threshold_charge,
                        noise_sigma,
                        state,
                        hits,
                        n_hits,
                    )
            if j == n_sources:
                break
            run_start = key
            run_end = key
            if crosstalk == 0.0 and (j + 1 == n_sources or key_of[order[j + 1]] >= key + length_of[s]):
                layer = key // n_strips
                n_hits = _fire_lone_source(
                    s,
                    layer,
                    key - layer * n_strips,
                    particle_of[s],
                    sources,
                    threshold_charge,
                    noise_sigma,
                    state,
                    hits,
                    n_hits,
                )
                continue
        while run_end < key + length_of[s]:
            cell = run_end - run_start
            total[cell] = 0.0
            muon[cell] = 0.0
            noise[cell] = 0.0
            best_charge[cell] = -1.0
            best_track[cell] = 0
            tail[cell] = 0.0
            run_end += 1
        particle = particle_of[s]
        for t in range(length_of[s]):
            cell = key - run_start + t
            charge = deposit[offset_of[s] + t]
            if particle == NOISE_TAIL_ID:
                tail[cell] += charge
            elif particle < 0:
                total[cell] += charge
                noise[cell] += charge
            else:
                total[cell] += charge
                if particle == 0:
                    muon[cell] += charge
                if charge > best_charge[cell] or (charge == best_charge[cell] and particle < best_track[cell]):
                    best_charge[cell] = charge
                    best_track[cell] = particle
    return n_hits
