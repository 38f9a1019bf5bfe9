"""Small hand-built padded batches for the model tests (no simulation, no files).

Each event has a muon on a closed-form circle (the simulation's sign convention: a positive charge in
B > 0 bends towards +x), four signal strips per layer around its crossing, and uniform noise strips.
"""

from __future__ import annotations

import numpy as np

from pipeline.batches import Batch, Geometry
from pipeline.config import PT_PER_TESLA_METRE, DetectorConfig

DETECTOR = DetectorConfig()
GEOMETRY = Geometry.from_detector(DETECTOR)
LAYER_Y = DETECTOR.layer_y()


def crossings(pt: float, q: float, x0: float, theta0: float, b_field: float = GEOMETRY.b_field) -> np.ndarray:
    """x [mm] of the circle through (x0, 0) with direction angle theta0 (to +y) on every layer, float64."""
    kappa = q * PT_PER_TESLA_METRE * b_field / (1000.0 * pt)
    sin_theta = np.sin(theta0) + kappa * LAYER_Y
    return x0 + (np.cos(theta0) - np.sqrt(1.0 - sin_theta**2)) / kappa


def make_batch(
    rng: np.random.Generator,
    n_events: int = 4,
    n_nodes: int = 128,
    noise_hits: int = 20,
    exact_clusters: bool = False,
    padded_events: int = 0,
) -> Batch:
    """A padded batch of ``n_events`` real events (+ ``padded_events`` empty ones), ``n_nodes`` per event.

    ``exact_clusters``: the four signal strips sit at the crossing +-0.25 and +-0.75 mm, so their plain
    mean is the crossing itself (off the strip grid; a reference with no digitisation error). Otherwise
    they are the four grid strips nearest to the crossing.
    """
    n_layers = DETECTOR.n_layers
    total = n_events + padded_events
    x = np.full((total, n_nodes), 1234.5, np.float32)  # padding holds finite garbage
    y = np.zeros((total, n_nodes), np.float32)
    layer = np.zeros((total, n_nodes), np.int32)
    charge = np.zeros((total, n_nodes), np.float32)
    mask = np.zeros((total, n_nodes), bool)
    label = np.zeros((total, n_nodes), np.float32)
    hit_id = np.full((total, n_nodes), -1, np.int32)
    pt = np.zeros(total, np.float32)
    q = np.zeros(total, np.float32)
    x_true = np.full((total, n_layers), np.nan, np.float32)
    for e in range(n_events):
        pt[e] = rng.uniform(20.0, 50.0)
        q[e] = rng.choice([-1.0, 1.0])
        x_true[e] = crossings(pt[e], q[e], rng.normal(0, 100), rng.normal(0, 0.05))
        hits = []
        for ell in range(n_layers):
            if exact_clusters:
                strips = x_true[e, ell] + np.array([-0.75, -0.25, 0.25, 0.75])
            else:
                centre = DETECTOR.strip_center(np.floor((x_true[e, ell] - DETECTOR.x_min) / DETECTOR.pitch))
                strips = centre + DETECTOR.pitch * np.array([-1.0, 0.0, 1.0, 2.0])
            hits += [(s, ell, c, 1.0) for s, c in zip(strips, rng.uniform(0.05, 0.4, 4), strict=True)]
        for _ in range(noise_hits):
            hits.append((DETECTOR.strip_center(rng.integers(DETECTOR.n_strips)), rng.integers(n_layers), 0.1, 0.0))
        assert len(hits) <= n_nodes
        order = rng.permutation(len(hits))
        for k, i in enumerate(order):
            x[e, k], layer[e, k], charge[e, k], label[e, k] = hits[i]
            y[e, k] = LAYER_Y[layer[e, k]]
            mask[e, k] = True
            hit_id[e, k] = k
    features = np.stack([x / 500.0, y / 1575.0, charge, layer / 15.0], axis=-1).astype(np.float32)
    features[~mask] = 7.0  # garbage the model must ignore
    event_mask = np.arange(total) < n_events
    return Batch(
        features=features,
        x=x,
        y=y,
        layer=layer,
        charge=charge,
        mask=mask,
        label=label,
        share=label.copy(),  # no strip is shared: the muon's strips are all its own
        hit_id=hit_id,
        event_id=np.arange(total, dtype=np.int64),
        pt=pt,
        q=q,
        x_true=x_true,
        event_mask=event_mask,
    )
