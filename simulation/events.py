"""Event kernels of the toy strip detector: the two passes that :mod:`simulation.generate` drives.

An event is a muon (see :mod:`simulation.physics`) plus background, digitised by
:mod:`simulation.digitisation`, with every random number drawn from the event's own generator
(:mod:`simulation.rng`).

Background: per layer Poisson(noise_strips_per_layer) isolated strips, uniformly placed, with charge
``threshold * charge_mean`` plus an exponential excess of mean ``NOISE_STRIP_EXCESS_MEAN * charge_mean``
(the tail of the electronics noise above threshold), and Poisson(noise_clusters_per_layer) clusters at
uniform x with the normal charge sharing; per event Poisson(extra_tracks_per_event) low-pT tracks (uniform
pT, random charge, angle uniform in +-``EXTRA_TRACK_MAX_ANGLE``) that start on a random layer within
N(0, extra_track_spread) of the muon and cross up to U{extra_track_layers_min..max} consecutive layers.
With electronic noise (``detector.electronic_noise``), per layer Poisson(n_strips x P(z > threshold / noise))
strips outside the charge windows fire on their noise alone, their charge drawn from the normal tail above the
threshold (:func:`simulation.rng.rng_normal_tail`); the noise of the strips inside the windows is drawn by
:func:`simulation.digitisation.digitise_sources`.

A crossing deposits ``Q = charge_mean * Gamma(k) / k`` (``k = 1 / charge_rms**2``) before it is shared
among strips.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

from pipeline.jit import chunk_bounds, jit, largest_span
from simulation.digitisation import (
    NOISE_ID,
    NOISE_TAIL_ID,
    HitColumns,
    Sources,
    StripSums,
    add_source,
    cluster_strip_charges,
    digitise_sources,
    new_sources,
    new_strip_sums,
)
from simulation.physics import curvature, propagate_track
from simulation.rng import (
    event_seed_kernel,
    rng_exponential,
    rng_gamma_with_constants,
    rng_integer,
    rng_normal,
    rng_normal_tail,
    rng_poisson,
    rng_poisson_with_limit,
    rng_sign,
    rng_uniform,
)

#: extra tracks start with an angle to the y axis drawn uniformly in +- this [rad]
EXTRA_TRACK_MAX_ANGLE = 0.3
#: an isolated noise strip's charge is threshold + an exponential excess of this mean (units of charge_mean)
NOISE_STRIP_EXCESS_MEAN = 0.1
#: particle id of the muon in the digitisation (extra tracks are 1, 2, ...)
MUON_ID = 0

#: events handled by one prange iteration; each chunk allocates its scratch once
_EVENTS_PER_CHUNK = 64


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
    #: simulation.rng.gamma_constants(charge_shape), computed once instead of per crossing
    charge_gamma_d: float
    charge_gamma_c: float
    threshold_charge: float
    #: electronic noise sigma of a strip [charge units]; 0 without electronic noise
    noise_sigma: float
    #: cross-talk fraction to each neighbouring strip
    crosstalk: float
    #: mean number of strips per layer whose electronic noise alone crosses the threshold (0 without noise)
    noise_tail_per_layer: float
    #: the threshold in units of noise_sigma (where the tail starts)
    noise_tail_z: float
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


class MuonTruth(NamedTuple):
    """The muon's truth per event: ``pt`` [GeV], ``q`` (+-1), ``x0`` [mm] and ``theta0`` [rad] on the first
    layer, shape ``(n_events,)``; ``x_true`` [mm] per layer, shape ``(n_events, n_layers)``."""

    pt: np.ndarray
    q: np.ndarray
    x0: np.ndarray
    theta0: np.ndarray
    x_true: np.ndarray


class HitTable(NamedTuple):
    """The hit columns that pass 2 writes (``pipeline.schema.HITS_SCHEMA``, in its order)."""

    event_id: np.ndarray
    hit_id: np.ndarray
    layer: np.ndarray
    strip: np.ndarray
    x: np.ndarray
    y: np.ndarray
    charge: np.ndarray
    charge_muon: np.ndarray
    is_signal: np.ndarray
    particle_id: np.ndarray


# ---- pass 1: bounds ------------------------------------------------------------------------------------


@jit(refcounts=False)
def _draw_counts(state, params, n_layers, counts):
    """The first draws of every event: the background multiplicities per layer into ``counts`` (int64
    ``[3, n_layers]``: noise strips, noise clusters, electronic-noise tail strips; the last drawn only with
    electronic noise, after the others). Returns the number of extra tracks."""
    n_extra = rng_poisson(state, params.extra_tracks_per_event)
    strips_limit = math.exp(-params.noise_strips_per_layer)
    clusters_limit = math.exp(-params.noise_clusters_per_layer)
    for layer in range(n_layers):
        counts[0, layer] = rng_poisson_with_limit(state, params.noise_strips_per_layer, strips_limit)
        counts[1, layer] = rng_poisson_with_limit(state, params.noise_clusters_per_layer, clusters_limit)
    tail_limit = math.exp(-params.noise_tail_per_layer)
    for layer in range(n_layers):
        # no draw at all without electronic noise: the default detector's streams stay as they were
        counts[2, layer] = rng_poisson_with_limit(state, params.noise_tail_per_layer, tail_limit)
    return n_extra


@jit(refcounts=False)
def _deposit_bound(params, n_layers, n_extra, counts):
    """Upper bound on the strip deposits of an event (every crossing with a full window), hence on its hits."""
    window = 2 * params.half_window + 1
    n_crossings = n_layers + n_extra * min(params.extra_layers_max, n_layers)
    n_single_strips = 0
    for layer in range(n_layers):
        n_crossings += counts[1, layer]
        n_single_strips += counts[0, layer] + counts[2, layer]
    return n_crossings * window + n_single_strips


class FirstDraws(NamedTuple):
    """What pass 1 draws first for every event (:func:`_draw_counts`), kept for pass 2, which resumes each
    event's generator where pass 1 left it instead of drawing it all again."""

    #: the state of the event's generator after these draws, uint64 ``[n_events]``
    state: np.ndarray
    #: number of extra tracks, int64 ``[n_events]``
    n_extra: np.ndarray
    #: background multiplicities, int64 ``[n_events, 3, n_layers]``
    counts: np.ndarray


@jit(refcounts=False)
def _bound_events(seed, first_event_id, lo, hi, params, n_layers, state, bounds, draws):
    """:func:`event_deposit_bounds` of events ``lo .. hi - 1`` (scratch: ``state``)."""
    for i in range(lo, hi):
        state[0] = event_seed_kernel(seed, first_event_id + i)
        counts = draws.counts[i]
        n_extra = _draw_counts(state, params, n_layers, counts)
        bounds[i] = _deposit_bound(params, n_layers, n_extra, counts)
        draws.state[i] = state[0]
        draws.n_extra[i] = n_extra


@jit(parallel=True)
def event_deposit_bounds(seed, first_event_id, n_events, params, n_layers, bounds, draws):
    """Pass 1: per-event upper bound on the number of strip deposits (hence hits) into ``bounds`` (int64
    ``[n_events]``), and the draws it took into ``draws`` (:class:`FirstDraws`)."""
    n_chunks = (n_events + _EVENTS_PER_CHUNK - 1) // _EVENTS_PER_CHUNK
    for chunk in nb.prange(n_chunks):
        lo, hi = chunk_bounds(chunk, _EVENTS_PER_CHUNK, n_events)
        state = np.empty(1, dtype=np.uint64)
        _bound_events(seed, first_event_id, lo, hi, params, n_layers, state, bounds, draws)


# ---- pass 2: one event ---------------------------------------------------------------------------------


@jit(inline=True)
def _total_charge(state, params):
    """Total charge of one crossing: charge_mean * Gamma(k) / k, k = 1 / charge_rms**2 (mean charge_mean)."""
    if params.charge_shape <= 0.0:
        return params.charge_mean
    draw = rng_gamma_with_constants(state, params.charge_shape, params.charge_gamma_d, params.charge_gamma_c)
    return params.charge_mean * draw / params.charge_shape


@jit(inline=True)
def _add_cluster(state, params, layer, x_center, particle, sources, n_src, n_dep):
    """Append one crossing (a fresh fluctuating total charge shared among strips) as a source; returns the
    new ``(n_src, n_dep)``."""
    first, n = cluster_strip_charges(
        x_center,
        _total_charge(state, params),
        params.x_min,
        params.pitch,
        params.n_strips,
        params.charge_sigma,
        params.half_window,
        sources.deposit[n_dep:],
    )
    if n > 0:
        n_src, n_dep = add_source(sources, n_src, n_dep, layer * params.n_strips + first, n, particle)
    return n_src, n_dep


@jit(inline=True)
def _add_crossings(state, params, x_cross, first_layer, last_layer, particle, sources, n_src, n_dep):
    """A cluster for each crossing ``x_cross[layer]`` inside the active width, layers ``first_layer ..
    last_layer - 1`` (NaN: no crossing)."""
    for layer in range(first_layer, last_layer):
        x = x_cross[layer]
        if params.x_min <= x <= params.x_max:  # False for NaN
            n_src, n_dep = _add_cluster(state, params, layer, x, particle, sources, n_src, n_dep)
    return n_src, n_dep


@jit(refcounts=False)
def _simulate_muon(state, params, layer_y, event, truth, muon_x):
    """Draw the muon (pT, charge, x0, theta0, scattering kicks), write its truth to row ``event`` of
    ``truth`` and its crossings (NaN where it cannot reach a layer) to ``muon_x``."""
    pt = params.pt_min + (params.pt_max - params.pt_min) * rng_uniform(state)
    q = rng_sign(state)
    x0 = params.x0_sigma * rng_normal(state)
    theta0 = params.theta0_sigma * rng_normal(state)
    kappa = curvature(pt, q, params.b_field)
    n_layers = layer_y.shape[0]
    propagate_track(
        x0, theta0, kappa, pt, layer_y, 0, n_layers, params.x_min, params.x_max, params.x_over_x0, state, muon_x
    )
    x_true = truth.x_true
    for layer in range(n_layers):
        x = muon_x[layer]
        x_true[event, layer] = x if params.x_min <= x <= params.x_max else np.nan
    truth.pt[event] = pt
    truth.q[event] = q
    truth.x0[event] = x0
    truth.theta0[event] = theta0


@jit(refcounts=False)
def _simulate_extra_track(state, params, layer_y, particle, muon_x, extra_x, sources, n_src, n_dep):
    """One low-momentum track starting near the muon (see the module doc), with its clusters."""
    n_layers = layer_y.shape[0]
    n_cross = params.extra_layers_min + rng_integer(state, params.extra_layers_max - params.extra_layers_min + 1)
    first = rng_integer(state, n_layers)
    last = min(first + n_cross, n_layers)
    pt = params.extra_pt_min + (params.extra_pt_max - params.extra_pt_min) * rng_uniform(state)
    q = rng_sign(state)
    theta = EXTRA_TRACK_MAX_ANGLE * (2.0 * rng_uniform(state) - 1.0)
    near = muon_x[first]
    if math.isnan(near):  # the muon curled away before this layer (not at default pT)
        near = params.x_min + (params.x_max - params.x_min) * rng_uniform(state)
    x_start = near + params.extra_spread * rng_normal(state)
    kappa = curvature(pt, q, params.b_field)
    propagate_track(
        x_start, theta, kappa, pt, layer_y, first, last, params.x_min, params.x_max, params.x_over_x0, state, extra_x
    )
    return _add_crossings(state, params, extra_x, first, last, particle, sources, n_src, n_dep)


@jit(refcounts=False)
def _simulate_noise(state, params, counts, sources, n_src, n_dep):
    """Per layer the noise clusters (normal charge sharing), then the isolated strips above threshold, then
    the electronic-noise tail strips (``counts``: see :func:`_draw_counts`)."""
    deposit = sources.deposit
    for layer in range(counts.shape[1]):
        for _ in range(counts[1, layer]):
            x = params.x_min + (params.x_max - params.x_min) * rng_uniform(state)
            n_src, n_dep = _add_cluster(state, params, layer, x, NOISE_ID, sources, n_src, n_dep)
        for _ in range(counts[0, layer]):
            key = layer * params.n_strips + rng_integer(state, params.n_strips)
            deposit[n_dep] = params.threshold_charge + (
                NOISE_STRIP_EXCESS_MEAN * params.charge_mean * rng_exponential(state)
            )
            n_src, n_dep = add_source(sources, n_src, n_dep, key, 1, NOISE_ID)
        for _ in range(counts[2, layer]):
            key = layer * params.n_strips + rng_integer(state, params.n_strips)
            deposit[n_dep] = params.noise_sigma * rng_normal_tail(state, params.noise_tail_z)
            n_src, n_dep = add_source(sources, n_src, n_dep, key, 1, NOISE_TAIL_ID)
    return n_src, n_dep


@jit(refcounts=False)
def _simulate_sources(state, params, layer_y, event, truth, n_extra, counts, muon_x, extra_x, sources):
    """All charge sources of one event, drawn in the documented order (see :func:`simulate_events_kernel`)
    after its first draws (``n_extra`` and ``counts``: :func:`_draw_counts`, with ``state`` where they left
    it); writes the muon's truth to row ``event`` of ``truth`` and returns the number of sources. Scratch:
    ``muon_x`` and ``extra_x`` (float64 ``[n_layers]``: crossings), ``sources``
    (:class:`~simulation.digitisation.Sources`)."""
    _simulate_muon(state, params, layer_y, event, truth, muon_x)
    n_src, n_dep = _add_crossings(state, params, muon_x, 0, layer_y.shape[0], MUON_ID, sources, 0, 0)
    for particle in range(MUON_ID + 1, MUON_ID + 1 + n_extra):
        n_src, n_dep = _simulate_extra_track(state, params, layer_y, particle, muon_x, extra_x, sources, n_src, n_dep)
    n_src, n_dep = _simulate_noise(state, params, counts, sources, n_src, n_dep)
    return n_src


@jit(inline=True)
def _hit_columns(table, start, stop):
    """Rows ``start:stop`` of the columns of ``table`` (:class:`HitTable`) that the digitisation writes, as
    :class:`HitColumns`; inlined, so that views made without reference counts never reach a caller that
    counts them."""
    return HitColumns(
        table.layer[start:stop],
        table.strip[start:stop],
        table.charge[start:stop],
        table.charge_muon[start:stop],
        table.is_signal[start:stop],
        table.particle_id[start:stop],
    )


@jit(refcounts=False)
def _fill_event_columns(table, start, n, event_id, layer_y, x_min, pitch):
    """The columns of the ``n`` hits at row ``start`` of ``table`` (:class:`HitTable`) that follow from the
    others: event id, hit id (index within the event), strip centre x and layer y [mm]."""
    # views indexed from 0: the compiler then knows the indices are never negative and drops Numba's
    # wraparound of negative indices
    event_ids = table.event_id[start : start + n]
    hit_ids = table.hit_id[start : start + n]
    layers = table.layer[start : start + n]
    strips = table.strip[start : start + n]
    xs = table.x[start : start + n]
    ys = table.y[start : start + n]
    for j in range(n):
        event_ids[j] = event_id
        hit_ids[j] = j
        xs[j] = x_min + (strips[j] + 0.5) * pitch
        ys[j] = layer_y[layers[j]]


class EventScratch(NamedTuple):
    """Scratch arrays of one event, shared by the events of a part (see :func:`_simulate_sources`)."""

    #: the event's generator (simulation.rng), uint64 [1]
    state: np.ndarray
    #: crossings of the muon and of one extra track, float64 [n_layers]
    muon_x: np.ndarray
    extra_x: np.ndarray
    sources: Sources
    sums: StripSums


@jit()
def _new_event_scratch(n_layers, capacity):
    """Uninitialised :class:`EventScratch` for events of up to ``capacity`` strip deposits."""
    return EventScratch(
        np.empty(1, dtype=np.uint64),
        np.empty(n_layers, dtype=np.float64),
        np.empty(n_layers, dtype=np.float64),
        new_sources(capacity),
        new_strip_sums(capacity),
    )


@jit()
def _simulate_part(first_event_id, lo, hi, params, layer_y, deposit_offsets, draws, hits, n_hits, truth):
    """Events ``lo .. hi - 1`` of :func:`simulate_events_kernel`, sharing one set of scratch arrays; returns
    their number of hits."""
    scratch = _new_event_scratch(layer_y.shape[0], largest_span(deposit_offsets, lo, hi, 0))
    return _simulate_events(
        first_event_id, lo, hi, params, layer_y, deposit_offsets, draws, hits, n_hits, truth, scratch
    )


@jit(refcounts=False)
def _simulate_events(first_event_id, lo, hi, params, layer_y, deposit_offsets, draws, hits, n_hits, truth, scratch):
    """The event loop of :func:`_simulate_part`, on its scratch (:class:`EventScratch`). It and every kernel
    it calls are compiled without reference counts: they would count each array argument of every call."""
    state, muon_x, extra_x, sources, sums = scratch
    row = deposit_offsets[lo]
    for i in range(lo, hi):
        state[0] = draws.state[i]
        n_src = _simulate_sources(
            state, params, layer_y, i, truth, draws.n_extra[i], draws.counts[i], muon_x, extra_x, sources
        )
        # the rows so far never pass the bounds so far, so the event's bound fits below the next one's rows
        n = digitise_sources(
            sources,
            n_src,
            params.n_strips,
            params.threshold_charge,
            params.noise_sigma,
            params.crosstalk,
            state,
            sums,
            _hit_columns(hits, row, row + deposit_offsets[i + 1] - deposit_offsets[i]),
        )
        _fill_event_columns(hits, row, n, first_event_id + i, layer_y, params.x_min, params.pitch)
        n_hits[i] = n
        row += n
    return row - deposit_offsets[lo]


@jit(parallel=True)
def simulate_events_kernel(
    first_event_id, params, layer_y, deposit_offsets, draws, part_edges, hits, n_hits, truth, part_hits
):
    """Pass 2: simulate every event from its first draws (:class:`FirstDraws`, pass 1) into ``hits``
    (:class:`HitTable`, room for the pass-1 bounds ``deposit_offsets``), its number of hits into
    ``n_hits[i]`` and the muon truth into ``truth`` (:class:`MuonTruth`; ``x_true`` NaN off the active width
    or where the muon cannot reach the layer).

    The events are cut into parts at ``part_edges``, one per thread; each part writes the hits of its events
    back to back from the bound offset of its first event, ``deposit_offsets[part_edges[p]]``, and their
    number to ``part_hits[p]``: the parts are dense, the caller closes the gaps between them.

    Random draws of one event, in order: background multiplicities; muon pT, charge, x0, theta0, its
    scattering kicks, its crossing charges; per extra track its layers, pT, charge, angle, start, kicks and
    charges; per layer the noise clusters, the noise strips, then the electronic-noise tail strips; last, the
    electronic noise of every strip inside a charge window, in (layer, strip) order.
    """
    for part in nb.prange(part_edges.shape[0] - 1):
        # the part's work is a function of its own: Numba's parfor lowering handles the NamedTuple arguments
        # poorly (stores to their arrays are lost, and loops run ~1.7x slower)
        lo, hi = part_edges[part], part_edges[part + 1]
        part_hits[part] = _simulate_part(
            first_event_id, lo, hi, params, layer_y, deposit_offsets, draws, hits, n_hits, truth
        )
