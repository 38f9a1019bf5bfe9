"""Strip clustering: per layer, runs of contiguous strip indices form a cluster (Numba).

A cluster's position is its charge centroid ``sum(q x) / sum(q)``, its spread the charge-weighted RMS
``sqrt(sum(q (x - centroid)^2) / sum(q))``; it keeps its charge sum, its size and the (event-local) hit
indices of its strips. Two hits on the same strip (not written by the simulation) belong to one cluster.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from pipeline.jit import argsort_small, jit


class ClusterBuffers(NamedTuple):
    """Scratch and outputs of :func:`cluster_hits` (arrays of length >= the event's hits; ``layer_start``
    of length ``n_layers + 1``); see :func:`cluster_hits` for their meaning."""

    keys: np.ndarray  # int64: (layer, strip) sort key of each hit
    order: np.ndarray  # int64: the hits sorted by (layer, strip)
    x: np.ndarray  # float64: charge centroid [mm]
    charge: np.ndarray  # float64: charge sum
    sigma: np.ndarray  # float64: charge-weighted RMS spread [mm]
    size: np.ndarray  # int64: strips
    first: np.ndarray  # int64: position of the first strip in ``order``
    layer_start: np.ndarray  # int64 [n_layers + 1]


@jit()
def new_cluster_buffers(capacity, n_layers):
    """Uninitialised :class:`ClusterBuffers` for events of up to ``capacity`` hits."""
    return ClusterBuffers(
        np.empty(capacity, np.int64),
        np.empty(capacity, np.int64),
        np.empty(capacity, np.float64),
        np.empty(capacity, np.float64),
        np.empty(capacity, np.float64),
        np.empty(capacity, np.int64),
        np.empty(capacity, np.int64),
        np.empty(n_layers + 1, np.int64),
    )


@jit()
def _emit_run(order, charge, start, end, split_ratio, cl_first, cl_size, n_clusters):
    """Store the run of contiguous strips ``order[start:end]`` as one or more clusters; returns the new count.

    A single charge cloud gives a unimodal strip profile, so a local minimum means two deposits: the run is
    split at a strip ``k`` (scanning left to right) with ``q[k-1] > q[k] < q[k+1]`` and ``q[k] < split_ratio *
    min(left peak, right peak)`` (peaks: the largest charge on each side within the run). The valley strip
    goes to the side of its larger neighbour. ``split_ratio = 0`` never splits.
    """
    first = start
    k = start + 1
    while k < end - 1:
        q_left = charge[order[k - 1]]
        q_mid = charge[order[k]]
        q_right = charge[order[k + 1]]
        if q_mid < q_left and q_mid < q_right:
            left_peak = 0.0
            for m in range(first, k):
                left_peak = max(left_peak, charge[order[m]])
            right_peak = 0.0
            for m in range(k + 1, end):
                right_peak = max(right_peak, charge[order[m]])
            if q_mid < split_ratio * min(left_peak, right_peak):
                cut = k + 1 if q_left >= q_right else k
                cl_first[n_clusters] = first
                cl_size[n_clusters] = cut - first
                n_clusters += 1
                first = cut
                k = cut + 1
                continue
        k += 1
    cl_first[n_clusters] = first
    cl_size[n_clusters] = end - first
    return n_clusters + 1


@jit()
def cluster_hits(layer, strip, x, charge, n_layers, split_ratio, buffers):
    """Cluster one event's hits (``layer``, ``strip``, ``x`` [mm], ``charge``; all of one length ``n``);
    ``split_ratio``: see :func:`_emit_run` (0: runs of contiguous strips are never split).

    ``buffers`` (:class:`ClusterBuffers`, length >= n): ``order`` gets the hits sorted by (layer, strip);
    cluster ``k`` holds the hits ``order[first[k] : first[k] + size[k]]`` and has centroid ``x[k]``, charge
    sum ``charge[k]`` and spread ``sigma[k]``; clusters are sorted by layer, then strip, and those of layer
    ``l`` are ``layer_start[l] : layer_start[l + 1]``. Hits with a layer outside ``[0, n_layers)`` are
    ignored. Returns the number of clusters.
    """
    keys = buffers.keys
    order = buffers.order
    cl_x = buffers.x
    cl_charge = buffers.charge
    cl_sigma = buffers.sigma
    cl_size = buffers.size
    cl_first = buffers.first
    layer_start = buffers.layer_start
    n = layer.shape[0]
    n_strip_key = np.int64(1) << np.int64(32)
    for i in range(n):
        keys[i] = np.int64(layer[i]) * n_strip_key + np.int64(strip[i])
    argsort_small(keys, n, order)
    for lay in range(n_layers + 1):
        layer_start[lay] = 0
    n_clusters = 0
    run_start = 0
    run_layer = -1
    strip_prev = 0
    for k in range(n + 1):
        lay = -1
        if k < n:
            lay = layer[order[k]]
            if lay < 0 or lay >= n_layers:
                lay = -1
        if run_layer >= 0 and (lay != run_layer or strip[order[k]] - strip_prev > 1):
            n_clusters = _emit_run(order, charge, run_start, k, split_ratio, cl_first, cl_size, n_clusters)
            layer_start[run_layer + 1] = n_clusters  # clusters up to and including this layer
        if k < n and (lay != run_layer or strip[order[k]] - strip_prev > 1):
            run_start = k
        run_layer = lay
        if k < n:
            strip_prev = strip[order[k]]
    # layer_start[l + 1] holds the running count where layer l has clusters, 0 elsewhere: fill the gaps
    for lay in range(1, n_layers + 1):
        layer_start[lay] = max(layer_start[lay], layer_start[lay - 1])
    for c in range(n_clusters):
        q_sum = 0.0
        qx_sum = 0.0
        x_sum = 0.0
        first = cl_first[c]
        size = cl_size[c]
        for k in range(first, first + size):
            i = order[k]
            q_sum += charge[i]
            qx_sum += charge[i] * x[i]
            x_sum += x[i]
        centroid = qx_sum / q_sum if q_sum > 0.0 else x_sum / size
        spread = 0.0
        for k in range(first, first + size):
            i = order[k]
            d = x[i] - centroid
            spread += (charge[i] if q_sum > 0.0 else 1.0) * d * d
        cl_x[c] = centroid
        cl_charge[c] = q_sum
        cl_sigma[c] = math.sqrt(spread / (q_sum if q_sum > 0.0 else size))
    return n_clusters


class Clusters(NamedTuple):
    """The clusters of one event (NumPy), sorted by layer then strip."""

    layer: np.ndarray  # int64 [C]
    x: np.ndarray  # float64 [C]: charge centroid [mm]
    charge: np.ndarray  # float64 [C]
    sigma: np.ndarray  # float64 [C]: charge-weighted RMS spread [mm] (no floor)
    size: np.ndarray  # int64 [C]
    hits: list[np.ndarray]  # the event-local hit indices of each cluster, in strip order


def find_clusters(layer, strip, x, charge, n_layers: int, split_ratio: float = 0.0) -> Clusters:
    """NumPy-facing :func:`cluster_hits` for one event."""
    layer = np.ascontiguousarray(layer, dtype=np.int64)
    strip = np.ascontiguousarray(strip, dtype=np.int64)
    x = np.ascontiguousarray(x, dtype=np.float64)
    charge = np.ascontiguousarray(charge, dtype=np.float64)
    buffers = new_cluster_buffers(layer.shape[0], n_layers)
    m = cluster_hits(layer, strip, x, charge, n_layers, split_ratio, buffers)
    order, cl_x, cl_charge, cl_sigma, cl_size, cl_first, layer_start = buffers[1:]
    cl_layer = np.repeat(np.arange(n_layers), np.diff(layer_start))
    hits = [order[cl_first[c] : cl_first[c] + cl_size[c]].copy() for c in range(m)]
    return Clusters(cl_layer, cl_x[:m].copy(), cl_charge[:m].copy(), cl_sigma[:m].copy(), cl_size[:m].copy(), hits)
