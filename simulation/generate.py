"""Simulate events of the toy strip detector into NumPy columns that match ``pipeline.schema``.

The entry point :func:`generate_events` runs two parallel Numba passes over the events (each event with its
own generator seeded by :func:`event_seed`):

1. draw each event's background multiplicities and bound its number of strip deposits (in chunks of events);
2. resume each event's generator where pass 1 left it and simulate the event (muon, extra tracks, noise,
   digitisation), writing its hits straight into the hit columns: one part of the events per Numba thread,
   each part back to back from the bound offset of its first event; the parts are then moved down to close
   the gaps between them (with one thread there is nothing to move).

Physics and units (mm, GeV, T, rad) are described in :mod:`simulation.physics`, the digitisation in
:mod:`simulation.digitisation`, the background in :mod:`simulation.events`; in short: a muon with
pT ~ U[pt_min, pt_max], charge +-1, x0 ~ N(0, x0_sigma) and angle theta0 ~ N(0, theta0_sigma) to the y axis
on the first layer follows exact circles between the layer planes (a positive charge bends towards +x for
B > 0 along +z), with a Highland kick after each layer; every crossing deposits a gamma-fluctuating charge
shared among strips by a Gaussian of width ``charge_sigma``; charges are summed per strip and a strip fires
above ``threshold * charge_mean``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from pipeline.config import DetectorConfig, SimConfig
from pipeline.errors import ConfigError
from simulation.digitisation import charge_half_window
from simulation.events import (
    FirstDraws,
    HitTable,
    KernelParams,
    MuonTruth,
    event_deposit_bounds,
    simulate_events_kernel,
)
from simulation.rng import event_seed_kernel, gamma_constants

_UINT64_LIMIT = 2**64
_INT64_LIMIT = 2**63

#: column name -> dtype of the hits table (pipeline.schema.HITS_SCHEMA)
HIT_DTYPES: dict[str, np.dtype] = {
    "event_id": np.dtype(np.int64),
    "hit_id": np.dtype(np.int32),
    "layer": np.dtype(np.int16),
    "strip": np.dtype(np.int32),
    "x": np.dtype(np.float32),
    "y": np.dtype(np.float32),
    "charge": np.dtype(np.float32),
    "charge_muon": np.dtype(np.float32),
    "is_signal": np.dtype(np.bool_),
    "particle_id": np.dtype(np.int32),
}

#: column name -> dtype of the events table (pipeline.schema.EVENTS_SCHEMA); x_true is (n_events, n_layers)
EVENT_DTYPES: dict[str, np.dtype] = {
    "event_id": np.dtype(np.int64),
    "pt": np.dtype(np.float32),
    "q": np.dtype(np.int8),
    "x0": np.dtype(np.float32),
    "theta0": np.dtype(np.float32),
    "n_hits": np.dtype(np.int32),
    "x_true": np.dtype(np.float32),
}


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) < _UINT64_LIMIT:
        raise ConfigError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _check_event_range(first_event_id: int, n_events: int) -> tuple[int, int]:
    for name, value in (("first_event_id", first_event_id), ("n_events", n_events)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if int(first_event_id) + int(n_events) > _INT64_LIMIT:
        raise ConfigError("event ids must stay below 2**63")
    return int(first_event_id), int(n_events)


def event_seed(seed: int, event_id: int) -> int:
    """The 64-bit seed (a Python int in [0, 2**64)) of event ``event_id``'s generator in a dataset with
    ``seed``: a SplitMix64 mix of both, computed by the same Numba kernel the simulation uses."""
    seed = _check_seed(seed)
    if isinstance(event_id, bool) or not isinstance(event_id, int | np.integer) or not 0 <= event_id < _INT64_LIMIT:
        raise ConfigError(f"event_id must be an integer in [0, 2**63), got {event_id!r}")
    return int(event_seed_kernel(np.uint64(seed), np.uint64(event_id)))


def noise_tail_probability(detector: DetectorConfig) -> float:
    """The probability that a strip no particle touched fires on its electronic noise alone, P(z > threshold /
    noise) for a standard normal z (0 without electronic noise)."""
    if detector.electronic_noise <= 0:
        return 0.0
    return 0.5 * math.erfc(detector.threshold_in_noise_sigmas / math.sqrt(2.0))


def kernel_params(config: SimConfig) -> KernelParams:
    """The numbers the event kernels need, as plain floats and ints (stable Numba types)."""
    det, muon, bkg = config.detector, config.muon, config.background
    charge_shape = float(1.0 / det.charge_rms**2) if det.charge_rms > 0 else 0.0
    gamma_d, gamma_c = gamma_constants(charge_shape)
    return KernelParams(
        x_min=float(det.x_min),
        x_max=float(det.x_max),
        pitch=float(det.pitch),
        n_strips=int(det.n_strips),
        charge_sigma=float(det.charge_sigma),
        half_window=int(charge_half_window(det.charge_sigma, det.pitch)),
        charge_mean=float(det.charge_mean),
        charge_shape=charge_shape,
        charge_gamma_d=float(gamma_d),
        charge_gamma_c=float(gamma_c),
        threshold_charge=float(det.threshold * det.charge_mean),
        noise_sigma=float(det.electronic_noise * det.charge_mean),
        crosstalk=float(det.crosstalk),
        noise_tail_per_layer=float(det.n_strips * noise_tail_probability(det)),
        noise_tail_z=float(min(det.threshold_in_noise_sigmas, 1e300)),
        b_field=float(det.b_field),
        x_over_x0=float(det.x_over_x0) if det.multiple_scattering else 0.0,
        pt_min=float(muon.pt_min),
        pt_max=float(muon.pt_max),
        x0_sigma=float(muon.x0_sigma),
        theta0_sigma=float(muon.theta0_sigma),
        noise_strips_per_layer=float(bkg.noise_strips_per_layer),
        noise_clusters_per_layer=float(bkg.noise_clusters_per_layer),
        extra_tracks_per_event=float(bkg.extra_tracks_per_event),
        extra_pt_min=float(bkg.extra_track_pt_min),
        extra_pt_max=float(bkg.extra_track_pt_max),
        extra_layers_min=int(bkg.extra_track_layers_min),
        extra_layers_max=int(bkg.extra_track_layers_max),
        extra_spread=float(bkg.extra_track_spread),
    )


class ShardBuffers:
    """Arrays that :func:`generate_events` reuses from one call to the next (one set per thread).

    A fresh hit table of a 20k-event shard is ~85 MB whose first touch (page faults, zeroing by the kernel)
    costs about as much CPU as simulating the shard (measured on one thread: 0.40 s for the first shard,
    0.18 s for each next one); a writer that simulates shard after shard therefore hands the same buffers
    to every call. The columns returned by a
    call are views of these buffers: they are overwritten by the next call with the same buffers, so the
    caller must be done with them (written, copied) before it. Memory: the largest shard's rows, held while
    the object lives (bound-sized buffers, of which only the touched prefix is resident).
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def take(self, name: str, size: int, dtype: np.dtype) -> np.ndarray:
        """A 1-D array of ``size`` elements of ``dtype`` (uninitialised), reused when large enough."""
        array = self._arrays.get(name)
        if array is None or array.dtype != dtype or array.shape[0] < size:
            # 1/8 headroom: the bound of the next shard is rarely larger; the untouched tail costs no memory
            array = np.empty(size + size // 8, dtype=dtype)
            self._arrays[name] = array
        return array[:size]


def _new_array(buffers: ShardBuffers | None, name: str, size: int, dtype: np.dtype) -> np.ndarray:
    return np.empty(size, dtype=dtype) if buffers is None else buffers.take(name, size, dtype)


def generate_events(
    config: SimConfig,
    seed: int,
    first_event_id: int,
    n_events: int,
    *,
    buffers: ShardBuffers | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Simulate events ``first_event_id .. first_event_id + n_events - 1``.

    Returns ``(hits, events)``, dicts of NumPy columns keyed and typed as ``HITS_SCHEMA`` and
    ``EVENTS_SCHEMA`` (see ``HIT_DTYPES`` and ``EVENT_DTYPES``):

    - ``hits``: one row per fired strip, sorted by (event_id, hit_id); inside an event the hits are in
      (layer, strip) order and ``hit_id`` is the row's index within the event. ``x`` is the strip centre and
      ``y`` the layer plane [mm]; ``charge`` is in units of ``charge_mean``'s unit.
    - ``events``: one row per event; ``pt`` [GeV], ``q`` (+-1), ``x0`` [mm] and ``theta0`` [rad] of the muon
      on the first layer; ``n_hits`` = rows of the event in ``hits``; ``x_true`` float32 of shape
      ``(n_events, n_layers)``: the muon's crossing x [mm] per layer, NaN where it is off the active width or
      cannot reach the layer.

    The rows depend only on (config, seed, event ids): a shorter run gives the first rows of a longer one
    and the number of Numba threads does not matter. The hit columns are C-contiguous views of the first
    rows of buffers sized by an upper bound on the hits: the unused tail costs address space but no memory.
    It is never touched with one Numba thread; with ``k`` threads, parts 2 to ``k`` start at their bound
    offsets, so at most ``(k - 1) / k`` of the difference between bound and hits is touched too.

    ``buffers``: take the arrays from a :class:`ShardBuffers` (the returned columns are then views of it,
    overwritten by its next use); by default every call allocates its own.
    """
    if not isinstance(config, SimConfig):
        raise ConfigError(f"config must be a SimConfig, got {type(config).__name__}")
    seed = _check_seed(seed)
    first_event_id, n_events = _check_event_range(first_event_id, n_events)
    params = kernel_params(config)
    layer_y = np.ascontiguousarray(config.detector.layer_y(), dtype=np.float64)
    n_layers = layer_y.shape[0]
    seed_u64 = np.uint64(seed)

    truth = MuonTruth(
        pt=_new_array(buffers, "pt", n_events, EVENT_DTYPES["pt"]),
        q=_new_array(buffers, "q", n_events, EVENT_DTYPES["q"]),
        x0=_new_array(buffers, "x0", n_events, EVENT_DTYPES["x0"]),
        theta0=_new_array(buffers, "theta0", n_events, EVENT_DTYPES["theta0"]),
        x_true=_new_array(buffers, "x_true", n_events * n_layers, EVENT_DTYPES["x_true"]).reshape(n_events, n_layers),
    )
    n_hits = _new_array(buffers, "n_hits", n_events, EVENT_DTYPES["n_hits"])

    # Pass 1 bounds every event's hits. The hit columns are allocated for the sum of the bounds, but each
    # thread of pass 2 writes its part of the events densely from the bound offset of the part's first event
    # (untouched pages of a large np.empty are never backed by memory), and the parts are then moved down
    # to close the gaps: one part (one Numba thread) moves nothing.
    draws = FirstDraws(
        state=_new_array(buffers, "draws_state", n_events, np.dtype(np.uint64)),
        n_extra=_new_array(buffers, "draws_n_extra", n_events, np.dtype(np.int64)),
        counts=_new_array(buffers, "draws_counts", n_events * 3 * n_layers, np.dtype(np.int64)).reshape(
            n_events, 3, n_layers
        ),
    )
    deposit_offsets = np.zeros(n_events + 1, dtype=np.int64)
    event_deposit_bounds(
        seed_u64, np.int64(first_event_id), np.int64(n_events), params, n_layers, deposit_offsets[1:], draws
    )
    np.cumsum(deposit_offsets, out=deposit_offsets)
    n_bound = int(deposit_offsets[-1])
    hits = HitTable(*(_new_array(buffers, name, n_bound, HIT_DTYPES[name]) for name in HitTable._fields))
    n_parts = max(1, min(numba.get_num_threads(), n_events))
    part_edges = np.array([part * n_events // n_parts for part in range(n_parts + 1)], dtype=np.int64)
    part_hits = np.zeros(n_parts, dtype=np.int64)
    simulate_events_kernel(
        np.int64(first_event_id),
        params,
        layer_y,
        deposit_offsets,
        draws,
        part_edges,
        hits,
        n_hits,
        truth,
        part_hits,
    )
    total_hits = 0
    for part in range(n_parts):
        start, count = int(deposit_offsets[part_edges[part]]), int(part_hits[part])
        if start != total_hits:
            for column in hits:
                # the part moves down (start > total_hits); NumPy copies overlapping ranges correctly
                column[total_hits : total_hits + count] = column[start : start + count]
        total_hits += count
    hits = {name: column[:total_hits] for name, column in zip(HitTable._fields, hits, strict=True)}
    events = {
        "event_id": np.arange(first_event_id, first_event_id + n_events, dtype=np.int64),
        "pt": truth.pt,
        "q": truth.q,
        "x0": truth.x0,
        "theta0": truth.theta0,
        "n_hits": n_hits,
        "x_true": truth.x_true,
    }
    return hits, events
