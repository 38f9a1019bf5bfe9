"""Clustering + fit on padded batches (model/tracker.py) against the known muons of synthetic events."""

from __future__ import annotations

import jax
import numpy as np
from numpy.testing import assert_allclose

from model.fit import STATUS_OK, STATUS_TOO_FEW_LAYERS
from model.tracker import reconstruct
from tests.synthetic_events import GEOMETRY, make_batch


def test_truth_weights_recover_the_muon():
    batch = make_batch(np.random.default_rng(0), n_events=5, exact_clusters=True, padded_events=1)
    reco = reconstruct(batch.label, batch, GEOMETRY)
    real = batch.event_mask
    assert_allclose(np.asarray(reco.x_hat)[real], batch.x_true[real], atol=2e-3)  # mm
    assert_allclose(np.asarray(reco.layer_weight)[real], 4.0)
    assert np.all(np.asarray(reco.status)[real] == STATUS_OK)
    assert_allclose(np.asarray(reco.pt)[real], batch.pt[real], rtol=2e-4)
    assert np.all(np.asarray(reco.q)[real] == batch.q[real])
    assert_allclose(np.asarray(reco.q_over_pt)[real], batch.q[real] / batch.pt[real], rtol=2e-4)
    # the all-padding event: flagged, finite
    assert np.all(np.asarray(reco.status)[~real] == STATUS_TOO_FEW_LAYERS)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in reco)


def test_padding_weights_are_ignored_and_jit_agrees():
    rng = np.random.default_rng(1)
    batch = make_batch(rng, n_events=3)
    weights = np.where(batch.label > 0, 0.9, 0.05).astype(np.float32)
    reference = reconstruct(weights, batch, GEOMETRY)
    garbage = np.where(batch.mask, weights, rng.uniform(0, 1, weights.shape)).astype(np.float32)
    for got in (
        reconstruct(garbage, batch, GEOMETRY),
        jax.jit(reconstruct, static_argnums=2)(garbage, batch, GEOMETRY),
        jax.jit(reconstruct)(garbage, batch, GEOMETRY),  # geometry traced
    ):
        for a, b in zip(got, reference, strict=True):
            assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


def test_charge_weighted_truth_runs_and_is_close():
    batch = make_batch(np.random.default_rng(2), n_events=4)
    reco = reconstruct(batch.label * batch.charge, batch, GEOMETRY)
    assert np.all(np.asarray(reco.status) == STATUS_OK)
    # grid strips and random charges: cluster positions within a strip of the crossing
    assert np.all(np.abs(np.asarray(reco.x_hat) - batch.x_true) < 1.0)
    assert np.all(np.asarray(reco.q) == batch.q)
