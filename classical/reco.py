"""The classical reconstruction of one event and of many (Numba): clusters, road search, DAF, scattering fit.

Per event (events are independent; :func:`track_events_kernel` runs them in a ``prange``, deterministic):

1. **Clusters** (:mod:`classical.clusters`): contiguous strips per layer, charge centroid.
2. **Road search**: every pair (cluster on an inner-station layer, cluster on an outer-station layer)
   defines a straight line; on each layer the cluster nearest to the line counts when it lies within
   ``road_half_width``. The seeds with most layers are the candidates; each distinct candidate set of
   clusters is judged by a Hyper circle fit that drops layers off by more than ``seed_cut``: most layers
   left, then the smallest squared residuals, wins (not the line's residuals: see :func:`road_search`).
   O(pairs x clusters), plus a few small circle fits per distinct tied cluster set.
3. **Deterministic annealing filter** (in the style of GenFit's DAF): the Hyper circle of the seed's
   clusters starts it; then for each temperature ``T`` every cluster ``j`` of layer ``l`` gets
   ``phi_j = exp(-d_j^2 / (2 T sigma^2))`` (``d_j`` its x residual to the circle on that layer) and the
   assignment probability ``p_j = phi_j / (sum_k phi_k + phi_cut)``, ``phi_cut = exp(-chi2_cut / (2 T))``
   (the layer may stay empty), and the circle is refitted with every cluster weighted by ``p``. At the end
   the probabilities are recomputed with the last circle at the last temperature, and each layer keeps its
   most probable cluster if ``p > 0.5``, else none. The filter runs twice from the same seed, with a hot
   schedule (``temperatures``) and a cold one (``restart_temperatures``); the run that keeps more layers
   (tie: smaller residuals to its circle) wins. Optionally (``scattering_temperatures = k > 0``) the last
   ``k`` refits of each schedule are scattering fits (:mod:`classical.gbl`) of each layer's
   probability-weighted mean cluster, and the residuals that follow count from its smoothed crossing
   ``x_fit`` in units of ``sqrt(T) * sqrt(point_sigma^2 + var(x_fit))``.
4. **Final fit** (:func:`final_fit`): the float64 scattering fit (General Broken Lines:
   :func:`classical.gbl.gbl_fit_removing_outliers`) of the kept clusters' charge
   centroids with point error ``fit_sigma`` and the detector's material; while a layer's |pull| exceeds
   ``pull_cut`` the worst is removed and the track refitted (at most ``max_removed``, never below four
   layers); removed layers count as not kept (weight 0 in the hit and cluster outputs). q/pT comes from the
   fit; pT = 1 / |q/pT|, q its sign, radius = pT / (0.3 B) = 1 / |curvature| of the fitted circle
   (``x_circle``; the smoothed crossings add the kinks).

Parameters (:class:`ClassicalParams`), chosen on the train split of a 20k-event default dataset (seed 0):

- ``point_sigma``: ``hypot(0.03 mm, the detector's point resolution)`` (0.0304 mm for the default detector;
  0.101 mm for ``realistic``); ``0.03 mm``, ``chi2_cut = 9``: the charge centroid of a clean muon cluster lies 0.006 mm
  (sigma68) from the circle through the others, RMS 0.024 mm, 99 % within 0.08 mm; at ``T = 1`` a cluster
  is kept within about ``3 sigma = 0.09 mm``. Wider (0.1, 0.2 mm) keeps more merged clusters and gave
  sigma68(q/pT) 0.0105, 0.0109 instead of 0.0098.
- ``temperatures = 3^10 .. 1``: ``sqrt(T0) * sigma = 7 mm`` covers the road; starting at 81 or 729 left
  about twice as many fits with |r| > 5 %. ``restart_temperatures = (9, 3, 1)`` halved them again (a hot
  run can be pulled off a good seed by extra-track clusters within a few mm).
- ``road_half_width = 5 mm``: the chord through clusters on layers 0 and 15 misses a 20 GeV muon by up to
  4.7 mm in station 2; 2 and 3 mm lost layers and tails, 4 to 8 mm measured the same.
- ``split_ratio = 1``: a single charge cloud gives a unimodal strip profile, so any local minimum marks two
  deposits; splitting raised the hit efficiency from 0.977 to 0.991 and cut the 5 % tails 8x.
- ``seed_cut = 0.5 mm``: 0.2 to 2 mm measured the same.

The final fit (issue 23), measured on the cpu job's dataset (``muontrack simulate --events 20000 --seed 0``,
shard_events 5000), train split (15943 events): sigma68(q/pT) 0.00882 +- 0.00008 against the Hyper fit's
0.00983 +- 0.00007 (the Cramer-Rao bound of the split: 0.00878; the scattering fit of the truth signal-strip
centroids: 0.00882); the cost: about half the throughput (one thread, 20k events, a shared 2-core machine:
13k instead of 23k events/s, ~55 microseconds per event for the fit and its refits).

- ``fit_sigma``: the detector's clean-cluster charge-centroid resolution (pipeline.config.point_resolution:
  0.0052 mm for the default detector, ``rms_mm`` of ``python -m benchmarks.limit --data D --split train``:
  0.00518); 0.0045 and 0.006 gave 0.00881 and 0.00886.
- ``pull_cut = 5``, ``max_removed = 4`` (as benchmarks/limit.py): cuts of 4, 6 and 8 gave 0.00882, 0.00884,
  0.00889; at most 2 removed 0.00883; no removal 0.00916. About 0.1 layer per track is removed (merged
  clusters), hit efficiency 0.991 -> 0.987, purity 0.998 -> 0.999.
- ``scattering_temperatures = 0``: the scattering-aware DAF changed the kept layers of 0.01 % (k = 1) to
  0.04 % (k = 11: every temperature) of the events and gave the same sigma68 (0.00882 with k = 1 and 3) at
  2x (k = 1) to 7x (k = 11) the time of the reconstruction with the Hyper DAF; the Hyper DAF's window
  (``point_sigma``) is wide enough for the kinks, and the final fit's outlier removal does the rest.

Fit status (as model/fit.py): 0 ok, 1 fewer than ``MIN_LAYERS`` layers kept, 2 degenerate (q/pT of 0), 3
non-finite.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

from classical.circle import circle_x_at, hyper_fit
from classical.clusters import ClusterBuffers, cluster_hits, new_cluster_buffers
from classical.gbl import (
    GBL_STEPS,
    ScatteringScratch,
    gbl_fit,
    gbl_fit_removing_outliers,
    new_scattering_scratch,
)
from pipeline.config import PT_PER_TESLA_METRE, DetectorConfig, detector_material, point_resolution
from pipeline.jit import chunk_bounds, jit, largest_span
from pipeline.schema import STATUS_DEGENERATE, STATUS_OK, STATUS_TOO_FEW_LAYERS

#: a track needs at least this many layers
MIN_LAYERS = 3
#: events per prange iteration; each chunk allocates its scratch once
EVENTS_PER_CHUNK = 64
#: exp(-x) is 0 in float64 beyond this
EXP_UNDERFLOW = 745.0
#: seed roles of the layers
ROLE_NONE = 0
ROLE_INNER = 1
ROLE_OUTER = 2


#: [mm] the residual of a clean cluster to the Hyper circle through the others that the scattering kinks give
#: (RMS 0.024 mm on the default detector, see the module docstring); the DAF's point error adds the detector's
#: point resolution to it in quadrature
DAF_SCATTER_SIGMA = 0.03


class ClassicalParams(NamedTuple):
    """Tunable settings of the classical reconstruction (defaults: see the module docstring)."""

    #: [mm] a layer counts for a straight-line seed when its nearest cluster lies this close to the line
    road_half_width: float = 5.0
    #: [mm] a candidate seed's layers further than this from its circle are dropped when judging it
    seed_cut: float = 0.5
    #: [mm] per-point resolution in the DAF weights (wide: the Hyper circle ignores the scattering kinks); None:
    #: ``hypot(DAF_SCATTER_SIGMA, the detector's point resolution)``
    point_sigma: float | None = None
    #: chi2 of the null (empty layer) option
    chi2_cut: float = 9.0
    #: annealing schedule, hot enough at the start (sqrt(T) * point_sigma ~ the road) to leave a wrong seed
    temperatures: tuple[float, ...] = tuple(3.0**k for k in range(10, -1, -1))
    #: a second, cold run from the same seed (empty: none); the run that keeps more layers (tie: smaller
    #: residuals) wins: the hot run can be pulled off a good seed by nearby extra-track clusters
    restart_temperatures: tuple[float, ...] = (9.0, 3.0, 1.0)
    #: split a run of strips at a local charge minimum below this fraction of the smaller peak (0: never)
    split_ratio: float = 1.0
    #: [mm] point error of the scattering fits (the final fit and the DAF's last refits); None: the detector's
    #: clean-cluster charge-centroid resolution (pipeline.config.point_resolution)
    fit_sigma: float | None = None
    #: the final fit removes the layer of largest |pull| above this and refits ...
    pull_cut: float = 5.0
    #: ... at most this many times per track (never below four layers; 0: no removal)
    max_removed: int = 4
    #: the last this many temperatures of each annealing schedule refit with the scattering fit and weigh the
    #: clusters by their residual to its smoothed crossings (0: Hyper circles throughout)
    scattering_temperatures: int = 0


class ClassicalTracks(NamedTuple):
    """Outputs of :func:`track_events_kernel` (NumPy). ``E`` events, ``L`` layers, ``H`` hits."""

    hit_weight: np.ndarray  # float64 [H]: 1 on the strips of the kept clusters (outliers removed), 0 elsewhere
    x_reco: np.ndarray  # float64 [E, L]: kept cluster's charge centroid [mm], 0 where none
    sigma: np.ndarray  # float64 [E, L]: its charge-weighted RMS spread, floored at pitch / sqrt(12)
    layer_weight: np.ndarray  # float64 [E, L]: 1 where a cluster is kept, else 0
    radius: np.ndarray  # float64 [E]: radius of the fitted circle, pT / (0.3 B) [mm] (0 unless the fit is OK)
    pt: np.ndarray  # float64 [E] [GeV]
    q: np.ndarray  # int8 [E]: +1 / -1
    q_over_pt: np.ndarray  # float64 [E] [1/GeV]
    status: np.ndarray  # int8 [E]
    x_fit: np.ndarray  # float64 [E, L]: the final fit's smoothed crossing of each layer [mm], NaN unless the fit is OK


class RecoSettings(NamedTuple):
    """What :func:`track_events_kernel` needs of the geometry and the :class:`ClassicalParams`, as Numba types."""

    layer_y: np.ndarray  # float64 [L]: layer planes [mm]
    seed_role: np.ndarray  # int64 [L]: see :func:`seed_roles`
    temperatures: np.ndarray  # float64: the hot annealing schedule
    restart_temperatures: np.ndarray  # float64: the cold one
    road_half_width: float
    seed_cut: float
    point_sigma: float
    chi2_cut: float
    split_ratio: float
    sigma_floor: float  # [mm] pitch / sqrt(12): the smallest reported cluster spread
    b_field: float  # [T]
    x_over_x0: np.ndarray  # float64 [L]: material of each layer [X0] (0 without multiple scattering)
    x_min: float  # [mm] active width (a layer scatters only inside it)
    x_max: float
    fit_sigma: float
    pull_cut: float
    max_removed: int
    scattering_temperatures: int


class EventScratch(NamedTuple):
    """Scratch of :func:`track_event` for events of up to ``capacity`` hits (see :func:`new_event_scratch`)."""

    clusters: ClusterBuffers
    prob: np.ndarray  # float64 [capacity]: DAF probability of each cluster
    fx: np.ndarray  # float64 [capacity]: points of the circle fits
    fy: np.ndarray  # float64 [capacity]
    fw: np.ndarray  # float64 [capacity]
    chosen: np.ndarray  # int64 [L]: the cluster kept on each layer, -1 where none
    seed_scratch: np.ndarray  # int64 [3, L]: see :func:`road_search`
    fit: ScatteringScratch  # of the scattering fits
    layer_work: np.ndarray  # float64 [8, L]: the scattering fits' per-layer arrays (rows: the ROW_* constants)


@jit()
def new_event_scratch(capacity, n_layers):
    """Uninitialised :class:`EventScratch`."""
    return EventScratch(
        new_cluster_buffers(capacity, n_layers),
        np.empty(capacity, np.float64),
        np.empty(capacity, np.float64),
        np.empty(capacity, np.float64),
        np.empty(capacity, np.float64),
        np.empty(n_layers, np.int64),
        np.empty((3, n_layers), np.int64),
        new_scattering_scratch(n_layers),
        np.empty((8, n_layers), np.float64),
    )


#: rows of :attr:`EventScratch.layer_work`
ROW_X = 0  # measurement of each layer [mm]
ROW_W = 1  # its weight
ROW_SIGMA = 2  # point error [mm]
ROW_X_FIT = 3  # smoothed crossing of the last scattering fit [mm]
ROW_PULL = 4  # pull of the last scattering fit
ROW_W_USED = 5  # weights after outlier removal
ROW_PREDICTION = 6  # the DAF's prediction of each layer [mm]
ROW_VARIANCE = 7  # its variance [mm^2]


def seed_roles(detector: DetectorConfig) -> np.ndarray:
    """Seed role of every layer: ROLE_INNER on the first station, ROLE_OUTER on the last (with a single
    station: its first and second half), ROLE_NONE elsewhere. int64 [L]."""
    roles = np.zeros(detector.n_layers, np.int64)
    counts = detector.layers_per_station
    if len(counts) >= 2:
        roles[: counts[0]] = ROLE_INNER
        roles[detector.n_layers - counts[-1] :] = ROLE_OUTER
    else:
        half = max(1, detector.n_layers // 2)
        roles[:half] = ROLE_INNER
        roles[half:] = ROLE_OUTER
    return roles


@jit()
def _road_layers(x0, y0, slope, cl_x, layer_start, layer_y, road_half_width, min_count, chosen):
    """Nearest cluster of each layer to the line ``x = x0 + slope (y - y0)`` if it lies within the road
    (``chosen[l]``, -1 where none); returns the number of such layers, or -1 as soon as fewer than
    ``min_count`` are still possible (then ``chosen`` is incomplete). A layer's clusters are sorted by x."""
    n_layers = layer_y.shape[0]
    count = 0
    for lay in range(n_layers):
        x_line = x0 + slope * (layer_y[lay] - y0)
        best = road_half_width
        chosen[lay] = -1
        for j in range(layer_start[lay], layer_start[lay + 1]):
            d = cl_x[j] - x_line
            if d >= best:
                break  # the rest lie further right
            if abs(d) < best:
                best = abs(d)
                chosen[lay] = j
        if chosen[lay] >= 0:
            count += 1
        elif count + n_layers - 1 - lay < min_count:
            return -1
    return count


@jit()
def _fit_chosen(chosen, cl_x, layer_y, fx, fy, fw):
    """Unweighted Hyper fit of the chosen cluster of each layer: ``(xc, yc, R, status, n_points, x_first)``."""
    n = 0
    for lay in range(layer_y.shape[0]):
        j = chosen[lay]
        if j >= 0:
            fx[n] = cl_x[j]
            fy[n] = layer_y[lay]
            fw[n] = 1.0
            n += 1
    if n < MIN_LAYERS:
        return math.nan, math.nan, math.nan, STATUS_TOO_FEW_LAYERS, n, math.nan
    xc, yc, radius, status = hyper_fit(fx, fy, fw, n)
    return xc, yc, radius, status, n, fx[0]


@jit()
def _clean_seed(work, cl_x, layer_y, seed_cut, fx, fy, fw):
    """Fit a circle to the clusters ``work[l]`` (-1: none) and drop the worst layer while its |x residual|
    exceeds ``seed_cut`` (keeping >= MIN_LAYERS); returns ``(n_layers_left, sum of squared residuals)``
    (``(0, inf)`` when no circle can be fitted). ``work`` is updated."""
    n_layers = layer_y.shape[0]
    while True:
        xc, yc, radius, status, n, x_first = _fit_chosen(work, cl_x, layer_y, fx, fy, fw)
        if status != STATUS_OK:
            return 0, math.inf
        side = 1.0 if xc >= x_first else -1.0
        ssr = 0.0
        worst = -1
        worst_d = seed_cut
        for lay in range(n_layers):
            j = work[lay]
            if j >= 0:
                d = abs(cl_x[j] - circle_x_at(xc, yc, radius, side, layer_y[lay]))
                if not math.isfinite(d):
                    return 0, math.inf
                ssr += d * d
                if d > worst_d:
                    worst_d = d
                    worst = lay
        if worst < 0 or n <= MIN_LAYERS:
            return n, ssr
        work[worst] = -1


@jit()
def _judge_candidate(candidate, work, last, chosen, best_n, best_ssr, cl_x, layer_y, seed_cut, fx, fy, fw):
    """One step of :func:`road_search`: clean ``candidate`` and keep it in ``chosen`` if it
    beats the best so far (``best_n`` layers, -1 for none yet, with residuals ``best_ssr``); returns the
    new best ``(n, ssr)``. ``last`` holds the previous candidate."""
    n_layers = layer_y.shape[0]
    same = True  # consecutive seeds mostly select the same clusters: judge each set once
    for lay in range(n_layers):
        if candidate[lay] != last[lay]:
            same = False
        last[lay] = candidate[lay]
    if same:
        return best_n, best_ssr
    for lay in range(n_layers):
        work[lay] = candidate[lay]
    n_left, ssr = _clean_seed(work, cl_x, layer_y, seed_cut, fx, fy, fw)
    if best_n < 0 or n_left > best_n or (n_left == best_n and ssr < best_ssr):
        for lay in range(n_layers):
            chosen[lay] = work[lay] if n_left > 0 else candidate[lay]
        return n_left, ssr
    return best_n, best_ssr


@jit()
def road_search(cl_x, layer_start, layer_y, seed_role, road_half_width, seed_cut, chosen, scratch, fx, fy, fw):
    """Best straight-line seed over all (inner, outer) cluster pairs; writes its clusters (one per layer, -1
    where none) to ``chosen`` and returns their number (0: no seed).

    The seeds with most in-road layers (nearest cluster to the line within ``road_half_width``) are the
    candidates. Among them the line's own residuals are a poor judge: the muon's sagitta (up to 4.7 mm)
    lets an outer cluster of a nearby extra track give a line that fits better, and the nearest cluster to
    a line through the muon is sometimes an extra track's. So each distinct candidate set is cleaned
    (:func:`_clean_seed`: circle fit, drop layers off by more than ``seed_cut``) and the set with most layers
    left, then the smallest circle residuals, wins; ``chosen`` gets the cleaned set. One pass: a seed with
    more in-road layers than all before it restarts the comparison. ``scratch`` is int64 ``[3, L]``;
    ``fx, fy, fw`` float64 scratch of length >= L.
    """
    n_layers = layer_y.shape[0]
    candidate = scratch[0]
    work = scratch[1]
    last = scratch[2]
    for lay in range(n_layers):
        chosen[lay] = -1
        last[lay] = -1
    best_count = 0
    best_n = -1
    best_ssr = math.inf
    for la in range(n_layers):
        if seed_role[la] != ROLE_INNER:
            continue
        for a in range(layer_start[la], layer_start[la + 1]):
            for lb in range(n_layers):
                if seed_role[lb] != ROLE_OUTER:
                    continue
                dy = layer_y[lb] - layer_y[la]
                for b in range(layer_start[lb], layer_start[lb + 1]):
                    slope = (cl_x[b] - cl_x[a]) / dy
                    count = _road_layers(
                        cl_x[a], layer_y[la], slope, cl_x, layer_start, layer_y, road_half_width, best_count, candidate
                    )
                    if count < best_count:
                        continue
                    if count > best_count:
                        best_count = count
                        best_n = -1
                        best_ssr = math.inf
                    best_n, best_ssr = _judge_candidate(
                        candidate, work, last, chosen, best_n, best_ssr, cl_x, layer_y, seed_cut, fx, fy, fw
                    )
    n_chosen = 0
    for lay in range(n_layers):
        if chosen[lay] >= 0:
            n_chosen += 1
    return n_chosen


@jit()
def assignment_probabilities(prediction, variance, temperature, point_sigma, chi2_cut, cl_x, layer_start, prob):
    """DAF weights of every cluster at ``temperature`` (see module doc) around the track's predicted crossing
    ``prediction[l]`` of each layer, of variance ``variance[l]`` (0 for a circle): the residual ``d_j`` of
    a cluster of layer ``l`` counts in units of ``sqrt(point_sigma^2 + variance[l])``."""
    sigma2 = point_sigma * point_sigma
    phi_cut = math.exp(-chi2_cut / (2.0 * temperature))
    for lay in range(prediction.shape[0]):
        lo = layer_start[lay]
        hi = layer_start[lay + 1]
        inv = 1.0 / (2.0 * temperature * (sigma2 + variance[lay]))
        total = 0.0
        for j in range(lo, hi):
            d = cl_x[j] - prediction[lay]
            arg = d * d * inv
            phi = math.exp(-arg) if arg < EXP_UNDERFLOW else 0.0  # also 0 for a NaN residual
            prob[j] = phi
            total += phi
        norm = 1.0 / (total + phi_cut)
        for j in range(lo, hi):
            prob[j] *= norm


@jit()
def _circle_predictions(xc, yc, radius, side, layer_y, prediction, variance):
    """The crossings of the circle (xc, yc, radius, side) as the DAF's predictions, of variance 0."""
    for lay in range(layer_y.shape[0]):
        prediction[lay] = circle_x_at(xc, yc, radius, side, layer_y[lay])
        variance[lay] = 0.0


@jit()
def _scattering_refit(settings, scratch):
    """The DAF's refit with multiple scattering: each layer's clusters become one measurement (``x = sum_j p_j
    x_j / sum_j p_j``, weight ``sum_j p_j`` <= 1, point error ``fit_sigma``), fitted by
    :func:`classical.gbl.gbl_fit`; its smoothed crossings and their variances become the
    predictions. Returns False (predictions unchanged) when the fit does not succeed."""
    layer_y = settings.layer_y
    cl_x = scratch.clusters.x
    layer_start = scratch.clusters.layer_start
    prob = scratch.prob
    work = scratch.layer_work
    for lay in range(layer_y.shape[0]):
        sw = 0.0
        swx = 0.0
        for j in range(layer_start[lay], layer_start[lay + 1]):
            sw += prob[j]
            swx += prob[j] * cl_x[j]
        work[ROW_X, lay] = swx / sw if sw > 0.0 else 0.0
        work[ROW_W, lay] = min(sw, 1.0)
        work[ROW_SIGMA, lay] = settings.fit_sigma
    status = gbl_fit(
        work[ROW_X],
        layer_y,
        work[ROW_W],
        work[ROW_SIGMA],
        settings.b_field,
        settings.x_over_x0,
        settings.x_min,
        settings.x_max,
        GBL_STEPS,
        scratch.fit,
        work[ROW_X_FIT],
        work[ROW_PULL],
    )[4]
    if status != STATUS_OK:
        return False
    for lay in range(layer_y.shape[0]):
        work[ROW_PREDICTION, lay] = work[ROW_X_FIT, lay]
        work[ROW_VARIANCE, lay] = scratch.fit.variance[lay]
    return True


@jit()
def annealing_filter(xc, yc, radius, side, temperatures, settings, scratch, chosen):
    """Run the DAF from the circle (xc, yc, radius) and settle: ``chosen[l]`` = the most probable cluster of
    layer ``l`` if its probability exceeds 0.5, else -1. ``scratch.prob`` gets the final probabilities. The
    refits are weighted Hyper fits of all clusters, except at the last ``settings.scattering_temperatures``
    temperatures: :func:`_scattering_refit`. With no temperatures ``chosen`` is left as it is (the road's
    clusters)."""
    layer_y = settings.layer_y
    cl_x = scratch.clusters.x
    layer_start = scratch.clusters.layer_start
    prob, fx, fy, fw = scratch.prob, scratch.fx, scratch.fy, scratch.fw
    prediction = scratch.layer_work[ROW_PREDICTION]
    variance = scratch.layer_work[ROW_VARIANCE]
    n_layers = layer_y.shape[0]
    n_clusters = layer_start[n_layers]
    for lay in range(n_layers):
        for j in range(layer_start[lay], layer_start[lay + 1]):
            fx[j] = cl_x[j]
            fy[j] = layer_y[lay]
    n_steps = temperatures.shape[0]
    if n_steps == 0:  # no annealing: keep the road's clusters
        return
    first_scattering = n_steps - settings.scattering_temperatures
    _circle_predictions(xc, yc, radius, side, layer_y, prediction, variance)
    for step in range(n_steps):
        assignment_probabilities(
            prediction, variance, temperatures[step], settings.point_sigma, settings.chi2_cut, cl_x, layer_start, prob
        )
        if step >= first_scattering:
            if not _scattering_refit(settings, scratch):
                break
            continue
        sw = 0.0
        swx = 0.0
        for j in range(n_clusters):
            fw[j] = prob[j]
            sw += prob[j]
            swx += prob[j] * cl_x[j]
        xc_new, yc_new, radius_new, status = hyper_fit(fx, fy, fw, n_clusters)
        if status != STATUS_OK:
            break
        xc = xc_new
        yc = yc_new
        radius = radius_new
        side = 1.0 if xc >= swx / sw else -1.0
        _circle_predictions(xc, yc, radius, side, layer_y, prediction, variance)
    assignment_probabilities(
        prediction,
        variance,
        temperatures[n_steps - 1],
        settings.point_sigma,
        settings.chi2_cut,
        cl_x,
        layer_start,
        prob,
    )
    for lay in range(n_layers):
        chosen[lay] = -1
        best = 0.5
        for j in range(layer_start[lay], layer_start[lay + 1]):
            if prob[j] > best:
                best = prob[j]
                chosen[lay] = j


@jit()
def _anneal_from_seed(seed, temperatures, settings, scratch, out):
    """Run :func:`annealing_filter` from the circle of the clusters ``seed`` with the schedule
    ``temperatures``; ``out`` gets the settled clusters. Returns their ``(number of layers, sum of squared
    residuals to their circle)`` (``(0, inf)`` without a circle), by which two runs are compared."""
    layer_y = settings.layer_y
    cl_x = scratch.clusters.x
    fx, fy, fw = scratch.fx, scratch.fy, scratch.fw
    for lay in range(layer_y.shape[0]):
        out[lay] = seed[lay]
    xc, yc, radius, status, _, x_first = _fit_chosen(seed, cl_x, layer_y, fx, fy, fw)
    if status != STATUS_OK:
        return 0, math.inf
    side = 1.0 if xc >= x_first else -1.0
    annealing_filter(xc, yc, radius, side, temperatures, settings, scratch, out)
    return _clean_seed(out, cl_x, layer_y, math.inf, fx, fy, fw)


@jit()
def _choose_clusters(settings, scratch):
    """Steps 2 and 3 of the module doc on the clustered event: the road search seeds the DAF, which runs
    with the hot schedule and again with the cold one (the run that keeps more layers, tie: smaller
    residuals, wins). ``scratch.chosen`` gets the kept cluster of each layer (-1: none); with no
    temperatures, or a road of fewer than MIN_LAYERS layers, it keeps the road's clusters."""
    layer_y = settings.layer_y
    chosen = scratch.chosen
    n_road = road_search(
        scratch.clusters.x,
        scratch.clusters.layer_start,
        layer_y,
        settings.seed_role,
        settings.road_half_width,
        settings.seed_cut,
        chosen,
        scratch.seed_scratch,
        scratch.fx,
        scratch.fy,
        scratch.fw,
    )
    if n_road < MIN_LAYERS or settings.temperatures.shape[0] == 0:
        return
    seed = scratch.seed_scratch[0]
    alternative = scratch.seed_scratch[1]
    for lay in range(layer_y.shape[0]):
        seed[lay] = chosen[lay]
    n_best, ssr_best = _anneal_from_seed(seed, settings.temperatures, settings, scratch, chosen)
    if settings.restart_temperatures.shape[0] == 0:
        return
    n_alt, ssr_alt = _anneal_from_seed(seed, settings.restart_temperatures, settings, scratch, alternative)
    if n_alt > n_best or (n_alt == n_best and ssr_alt < ssr_best):
        for lay in range(layer_y.shape[0]):
            chosen[lay] = alternative[lay]


@jit()
def final_fit(settings, scratch):
    """Step 4 of the module doc on the chosen clusters ``scratch.chosen``: the scattering fit of their charge
    centroids (point error ``fit_sigma``), removing up to ``max_removed`` layers of |pull| > ``pull_cut``
    (:func:`classical.gbl.gbl_fit_removing_outliers`); the removed layers are dropped from
    ``scratch.chosen``. Returns ``(q_over_pt, status)`` (status 1 without a fit when fewer than MIN_LAYERS
    are chosen); ``scratch.fit`` and ``scratch.layer_work`` hold the fit's per-layer outputs."""
    layer_y = settings.layer_y
    chosen = scratch.chosen
    cl_x = scratch.clusters.x
    work = scratch.layer_work
    n = 0
    for lay in range(layer_y.shape[0]):
        j = chosen[lay]
        work[ROW_SIGMA, lay] = settings.fit_sigma
        work[ROW_X, lay] = cl_x[j] if j >= 0 else 0.0
        work[ROW_W, lay] = 1.0 if j >= 0 else 0.0
        if j >= 0:
            n += 1
    if n < MIN_LAYERS:
        return math.nan, STATUS_TOO_FEW_LAYERS
    (q_over_pt, _, _, _, status), _ = gbl_fit_removing_outliers(
        work[ROW_X],
        layer_y,
        work[ROW_W],
        work[ROW_SIGMA],
        settings.b_field,
        settings.x_over_x0,
        settings.x_min,
        settings.x_max,
        GBL_STEPS,
        settings.pull_cut,
        settings.max_removed,
        scratch.fit,
        work[ROW_X_FIT],
        work[ROW_PULL],
        work[ROW_W_USED],
    )
    for lay in range(layer_y.shape[0]):
        if not work[ROW_W_USED, lay] > 0.0:
            chosen[lay] = -1
    return q_over_pt, status


@jit()
def track_event(layer, strip, x, charge, settings, scratch, hit_weight, x_reco, sigma, layer_weight, x_fit):
    """Reconstruct one event (hit arrays of length ``n``; ``settings``: :class:`RecoSettings`; ``scratch``:
    :class:`EventScratch` of capacity >= n). Writes ``hit_weight[n]`` and ``x_reco / sigma / layer_weight[L]``
    (the clusters of the final fit: outliers removed), ``x_fit[L]`` (the final fit's smoothed crossings, NaN
    unless the returned status is OK) and returns ``(radius, pt, q, q_over_pt, status)``;
    ``radius`` is that of the fitted circle (the scattering fit's ``x_circle``), ``pT / (0.3 B)``."""
    layer_y = settings.layer_y
    n_layers = layer_y.shape[0]
    clusters = scratch.clusters
    chosen = scratch.chosen
    cluster_hits(layer, strip, x, charge, n_layers, settings.split_ratio, clusters)
    _choose_clusters(settings, scratch)
    q_over_pt, status = final_fit(settings, scratch)
    for i in range(layer.shape[0]):
        hit_weight[i] = 0.0
    for lay in range(n_layers):
        j = chosen[lay]
        x_reco[lay] = 0.0
        sigma[lay] = settings.sigma_floor
        layer_weight[lay] = 0.0
        if j >= 0:
            x_reco[lay] = clusters.x[j]
            sigma[lay] = max(clusters.sigma[j], settings.sigma_floor)
            layer_weight[lay] = 1.0
            for k in range(clusters.first[j], clusters.first[j] + clusters.size[j]):
                hit_weight[clusters.order[k]] = 1.0
    for lay in range(n_layers):
        x_fit[lay] = math.nan
    if status != STATUS_OK:
        return 0.0, 0.0, 1, 0.0, status
    pt = 1.0 / abs(q_over_pt)
    radius = pt / (PT_PER_TESLA_METRE * abs(settings.b_field)) * 1e3
    if not (math.isfinite(pt) and math.isfinite(radius) and q_over_pt != 0.0):
        return 0.0, 0.0, 1, 0.0, STATUS_DEGENERATE
    for lay in range(n_layers):
        x_fit[lay] = scratch.layer_work[ROW_X_FIT, lay]
    return radius, pt, 1 if q_over_pt > 0.0 else -1, q_over_pt, STATUS_OK


@jit(parallel=True)
def track_events_kernel(event_start, layer, strip, x, charge, settings):
    """Reconstruct every event; event ``e``'s hits are rows ``event_start[e] : event_start[e + 1]`` of the
    flat hit arrays (``layer``, ``strip``: integers; ``x`` [mm], ``charge``: float64); ``settings``:
    :class:`RecoSettings`. Returns the fields of :class:`ClassicalTracks` in order."""
    n_events = event_start.shape[0] - 1
    n_layers = settings.layer_y.shape[0]
    hit_weight = np.zeros(layer.shape[0], np.float64)
    x_reco = np.zeros((n_events, n_layers), np.float64)
    sigma = np.full((n_events, n_layers), settings.sigma_floor, np.float64)
    layer_weight = np.zeros((n_events, n_layers), np.float64)
    radius = np.zeros(n_events, np.float64)
    pt = np.zeros(n_events, np.float64)
    q = np.ones(n_events, np.int8)
    q_over_pt = np.zeros(n_events, np.float64)
    status = np.zeros(n_events, np.int8)
    x_fit = np.full((n_events, n_layers), np.nan, np.float64)
    n_chunks = (n_events + EVENTS_PER_CHUNK - 1) // EVENTS_PER_CHUNK
    for chunk in nb.prange(n_chunks):
        lo, hi = chunk_bounds(chunk, EVENTS_PER_CHUNK, n_events)
        scratch = new_event_scratch(largest_span(event_start, lo, hi, 1), n_layers)
        for e in range(lo, hi):
            a = event_start[e]
            b = event_start[e + 1]
            r, p, c, qp, s = track_event(
                layer[a:b],
                strip[a:b],
                x[a:b],
                charge[a:b],
                settings,
                scratch,
                hit_weight[a:b],
                x_reco[e],
                sigma[e],
                layer_weight[e],
                x_fit[e],
            )
            radius[e] = r
            pt[e] = p
            q[e] = c
            q_over_pt[e] = qp
            status[e] = s
    return hit_weight, x_reco, sigma, layer_weight, radius, pt, q, q_over_pt, status, x_fit


def track_events(
    event_start,
    layer,
    strip,
    x,
    charge,
    detector: DetectorConfig,
    params: ClassicalParams | None = None,
) -> ClassicalTracks:
    """NumPy-facing :func:`track_events_kernel` for the geometry of ``detector`` (flat hit arrays, sorted by
    event; ``event_start`` of length ``E + 1``)."""
    params = ClassicalParams() if params is None else params
    material = detector_material(detector)
    fit_sigma = point_resolution(detector) if params.fit_sigma is None else params.fit_sigma
    daf_sigma = math.hypot(DAF_SCATTER_SIGMA, fit_sigma) if params.point_sigma is None else params.point_sigma
    settings = RecoSettings(
        layer_y=np.ascontiguousarray(detector.layer_y(), dtype=np.float64),
        seed_role=seed_roles(detector),
        temperatures=np.ascontiguousarray(params.temperatures, dtype=np.float64),
        restart_temperatures=np.ascontiguousarray(params.restart_temperatures, dtype=np.float64),
        road_half_width=float(params.road_half_width),
        seed_cut=float(params.seed_cut),
        point_sigma=float(daf_sigma),
        chi2_cut=float(params.chi2_cut),
        split_ratio=float(params.split_ratio),
        sigma_floor=float(detector.pitch) / math.sqrt(12.0),
        b_field=material["b_field"],
        x_over_x0=np.full(detector.n_layers, material["x_over_x0"], np.float64),
        x_min=material["x_min"],
        x_max=material["x_max"],
        fit_sigma=float(fit_sigma),
        pull_cut=float(params.pull_cut),
        max_removed=int(params.max_removed),
        scattering_temperatures=int(params.scattering_temperatures),
    )
    out = track_events_kernel(
        np.ascontiguousarray(event_start, dtype=np.int64),
        np.ascontiguousarray(layer, dtype=np.int64),
        np.ascontiguousarray(strip, dtype=np.int64),
        np.ascontiguousarray(x, dtype=np.float64),
        np.ascontiguousarray(charge, dtype=np.float64),
        settings,
    )
    return ClassicalTracks(*out)
