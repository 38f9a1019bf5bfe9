"""Clustering + fit on padded batches (model/tracker.py) against the known muons of synthetic events."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from model.tracker import (
    PAPER_CHAIN,
    ROBUST_CHAIN,
    Chain,
    finite_gradient_guard,
    reconstruct,
    reconstruct_event,
    soft_assignment,
)
from pipeline.schema import STATUS_OK, STATUS_TOO_FEW_LAYERS
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


# ---- the robust chain (annealed reweighting) ---------------------------------------------------------------


def _charge_centroids(batch, event: int, weights) -> np.ndarray:
    """Float64 charge centroid per layer of the hits with weight > 0 (NaN on layers without one)."""
    out = np.full(GEOMETRY.n_layers, np.nan)
    for ell in range(GEOMETRY.n_layers):
        on = batch.mask[event] & (batch.layer[event] == ell) & (weights[event] > 0)
        if on.any():
            q = batch.features[event, on, 2].astype(np.float64)
            out[ell] = np.sum(q * batch.x[event, on]) / q.sum()
    return out


def test_soft_assignment_hard_limit_and_gradient():
    residual = np.array([-3.0, -1.02, 0.0, 0.5, 0.98, 1.02, 2.0])
    # cut -> infinity at a fixed road half-width cut * width = 1: the step function |d| < 1
    step = np.asarray(soft_assignment(residual, 1.0 / 200.0, 200.0))
    assert_array_equal(step, (np.abs(residual) < 1).astype(np.float32))
    # the null term: half the weight exactly `cut` widths away
    assert_allclose(np.asarray(soft_assignment(np.array([6.0]), 2.0, 3.0)), 0.5, rtol=1e-6)
    with jax.enable_x64(True):
        d = jnp.asarray(residual)
        grad = np.asarray(jax.vmap(jax.grad(lambda r: soft_assignment(r, 0.7, 3.0)))(d))
        h = 1e-6
        numeric = (np.asarray(soft_assignment(d + h, 0.7, 3.0)) - np.asarray(soft_assignment(d - h, 0.7, 3.0))) / 2 / h
    assert_allclose(grad, numeric, rtol=1e-6, atol=1e-10)


def test_infinitely_wide_step_is_the_paper_chain():
    batch = make_batch(np.random.default_rng(3), n_events=4)
    weights = np.where(batch.label > 0, 0.8, 0.3).astype(np.float32)
    for fit in ("kasa", "hyper"):
        paper = reconstruct(weights, batch, GEOMETRY, Chain(fit=fit))
        wide = reconstruct(weights, batch, GEOMETRY, Chain(fit=fit, widths=(1e12,), cut=3.0))
        assert_allclose(np.asarray(wide.x_hat), np.asarray(paper.x_hat), rtol=1e-6, atol=1e-4)
        assert_allclose(np.asarray(wide.sigma), np.asarray(paper.sigma), rtol=1e-5)
        # every hit keeps the same share sigmoid(cut^2 / 2) of its weight: the fit sees the same relative weights
        assert_allclose(np.asarray(wide.layer_weight), np.asarray(paper.layer_weight) * jax.nn.sigmoid(4.5), rtol=1e-5)
        assert_allclose(np.asarray(wide.q_over_pt), np.asarray(paper.q_over_pt), rtol=1e-4)
    assert_allclose(np.asarray(reconstruct(weights, batch, GEOMETRY, PAPER_CHAIN).hit_weight), weights * batch.mask)


def test_labels_through_the_robust_chain_give_the_charge_centroid():
    batch = make_batch(np.random.default_rng(4), n_events=4, noise_hits=40)
    chain = Chain(fit="hyper", widths=(5.0, 1.0), cut=5.0, charge_weighted=True)
    reco = reconstruct(batch.label, batch, GEOMETRY, chain)
    for e in range(4):
        assert_allclose(np.asarray(reco.x_hat)[e], _charge_centroids(batch, e, batch.label), atol=1e-4)
    assert np.all(np.asarray(reco.status) == STATUS_OK)


def test_annealing_rejects_background_that_the_weighted_mean_keeps():
    """All hits at weight 1: the paper chain averages the noise in, the annealed chain finds the muon.

    Noise spread over the whole metre of a layer pulls the first (weighted-mean) fit by up to ~100 mm, so the
    schedule starts wider than the default's 20 mm (which starts from a network's weights).
    """
    batch = make_batch(np.random.default_rng(5), n_events=6, noise_hits=24)
    everything = batch.mask.astype(np.float32)
    chain = Chain(fit="hyper", widths=(300.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.5), charge_weighted=True)
    robust = reconstruct(everything, batch, GEOMETRY, chain)
    paper = reconstruct(everything, batch, GEOMETRY, PAPER_CHAIN)
    true = batch.q / batch.pt
    robust_error = np.abs(np.asarray(robust.q_over_pt) / true - 1)
    paper_error = np.abs(np.asarray(paper.q_over_pt) / true - 1)
    assert np.all(np.asarray(robust.status) == STATUS_OK)
    # four grid strips and uniform charges per layer: a few percent in q/pT at worst, against > 50 % for the mean
    assert robust_error.max() < 0.1 < np.median(paper_error)
    final = np.asarray(robust.hit_weight)
    for e in range(6):
        signal = batch.mask[e] & (batch.label[e] > 0)
        noise = batch.mask[e] & (batch.label[e] == 0)
        distance = np.abs(batch.x[e] - batch.x_true[e, batch.layer[e]])
        assert np.all(final[e, signal] > 0.9)
        assert np.all(final[e, noise & (distance > 5.0)] < 1e-3)
        near_noise_layers = set(batch.layer[e, noise & (distance < 5.0)].tolist())
        clean = [ell for ell in range(GEOMETRY.n_layers) if ell not in near_noise_layers]
        # the last step (0.5 mm, cut 3) takes up to ~20 % off a strip 1.25 mm from the track: tens of microns
        assert_allclose(np.asarray(robust.x_hat)[e, clean], _charge_centroids(batch, e, batch.label)[clean], atol=0.05)


def _one_event(batch, e: int):
    return batch.x[e], batch.layer[e], batch.features[e, :, 2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "chain",
    [
        Chain(fit="hyper", widths=(20.0, 3.0, 1.0), charge_weighted=True),
        Chain(fit="hyper", widths=(20.0, 3.0, 1.0), charge_weighted=True, layer_widths=(1.0, 0.3)),
        # the scattering-aware fit with the default detector's material (GEOMETRY): kinks in every fit
        Chain(fit="hyper", widths=(20.0, 3.0), charge_weighted=True, layer_widths=(10.0, 3.0), scattering_fit=True),
    ],
    ids=["hit_steps", "hit_and_cluster_steps", "scattering_pull_steps"],
)
def test_robust_chain_gradient_matches_finite_differences(chain):
    assert GEOMETRY.x_over_x0 > 0
    batch = make_batch(np.random.default_rng(6), n_events=1, noise_hits=30)
    rng = np.random.default_rng(7)
    weights = np.where(batch.label[0] > 0, rng.uniform(0.6, 1.0, batch.label.shape[1]), rng.uniform(0, 0.4, 128))
    weights = weights * batch.mask[0]
    x, layer, charge = (np.asarray(v, np.float64) for v in _one_event(batch, 0))
    with jax.enable_x64(True):

        def q_over_pt(w):
            return reconstruct_event(
                w, jnp.asarray(x), jnp.asarray(layer, jnp.int32), jnp.asarray(charge), GEOMETRY, chain
            )[3].q_over_pt

        w = jnp.asarray(weights, jnp.float64)
        grad = np.asarray(jax.grad(q_over_pt)(w))
        directions = rng.normal(size=(4, w.size)) * batch.mask[0]
        for direction in directions:
            h = 1e-6
            numeric = (q_over_pt(w + h * direction) - q_over_pt(w - h * direction)) / (2 * h)
            assert_allclose(grad @ direction, float(numeric), rtol=1e-4, atol=1e-10)
    assert np.any(grad[batch.label[0] == 0] != 0)  # background weights reach q/pT too (nothing is stopped)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["all_zero", "one_layer", "two_layers", "empty_layers"],
)
def test_robust_chain_is_finite_on_degenerate_events(case):
    batch = make_batch(np.random.default_rng(8), n_events=1, noise_hits=10)
    weights = (batch.label[0] * batch.mask[0]).astype(np.float32)
    layer = batch.layer[0]
    if case == "all_zero":
        weights[:] = 0
    elif case == "one_layer":
        weights[layer != 3] = 0
    elif case == "two_layers":
        weights[(layer != 3) & (layer != 12)] = 0
    else:
        weights[(layer >= 4) & (layer <= 13)] = 0
    x, layer, charge = _one_event(batch, 0)
    values, grad = _robust_outputs_and_gradient(jnp.asarray(weights), x, layer, charge)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in values)
    assert np.all(np.isfinite(np.asarray(grad)))


@jax.jit
def _robust_outputs_and_gradient(weights, x, layer, charge):
    """ROBUST_CHAIN's outputs of one event and the gradient of q/pT + sum(x_hat), compiled once for every case."""

    def outputs(w):
        x_hat, _sigma, _layer_weight, fit, final = reconstruct_event(w, x, layer, charge, GEOMETRY, ROBUST_CHAIN)
        return x_hat, fit.q_over_pt, fit.x_fit, final

    return outputs(weights), jax.grad(lambda w: outputs(w)[1] + jnp.sum(outputs(w)[0]))(weights)


def test_robust_chain_under_jit_and_vmap_agrees():
    """The batched chain (vmap under jit) against each event alone (jit of one event; op by op, ten float32
    fits in scans take minutes): the track and clusters equal to float32 rounding, which XLA may order
    differently in the two. The weights follow the pull gates, and float32 pulls are good to about 0.02
    (model.scattering_fit): a layer near a gate's edge then keeps a weight that differs by up to ~2 %, and
    q/pT follows."""
    batch = make_batch(np.random.default_rng(9), n_events=3)
    weights = np.where(batch.label > 0, 0.9, 0.2).astype(np.float32)
    batched = jax.jit(reconstruct, static_argnums=(2, 3))(weights, batch, GEOMETRY, ROBUST_CHAIN)
    one_event = jax.jit(reconstruct_event, static_argnums=(4, 5))
    for e in range(3):
        mask = batch.mask[e]
        x, layer, charge = (np.where(mask, v, 0) for v in _one_event(batch, e))  # as reconstruct pads
        x_hat, sigma, layer_weight, fit, final = one_event(
            np.where(mask, weights[e], 0), x, layer, charge, GEOMETRY, ROBUST_CHAIN
        )
        for a, b in ((batched.x_hat[e], x_hat), (batched.status[e], fit.status)):
            assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        assert_allclose(np.asarray(batched.sigma[e]), np.asarray(sigma), rtol=1e-4, atol=1e-6)
        for a, b in ((batched.layer_weight[e], layer_weight), (batched.hit_weight[e], final)):
            assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2, atol=1e-6)
        # those weights move q/pT by up to a few 1e-3 of itself, well inside its resolution (~1e-2)
        assert_allclose(np.asarray(batched.q_over_pt[e]), np.asarray(fit.q_over_pt), rtol=5e-3)


def test_finite_gradient_guard_zeroes_only_events_with_non_finite_gradients():
    weights = jnp.ones((3, 4))
    upstream = jnp.array([[1.0, 2.0, 3.0, 4.0], [1.0, jnp.nan, 0.0, 0.0], [0.0, 0.0, jnp.inf, 1.0]])
    _, pullback = jax.vjp(jax.vmap(finite_gradient_guard), weights)
    (grad,) = pullback(upstream)
    assert_array_equal(np.asarray(grad), [[1, 2, 3, 4], [0, 0, 0, 0], [0, 0, 0, 0]])


# ---- cluster-level steps (a DAF over the layers' clusters) -------------------------------------------------


def test_infinitely_wide_cluster_steps_are_hit_level_steps():
    """A cluster-level step keeps the last hit-level width; with an infinite cluster width it is that hit step."""
    batch = make_batch(np.random.default_rng(10), n_events=4, noise_hits=30)
    weights = np.where(batch.label > 0, 0.8, 0.3).astype(np.float32)
    hits_only = reconstruct(
        weights, batch, GEOMETRY, Chain(fit="hyper", widths=(20.0, 2.0, 0.5, 0.5, 0.5), charge_weighted=True)
    )
    chain = Chain(fit="hyper", widths=(20.0, 2.0, 0.5), charge_weighted=True, layer_widths=(1e12, 1e12))
    wide = reconstruct(weights, batch, GEOMETRY, chain)
    assert_allclose(np.asarray(wide.x_hat), np.asarray(hits_only.x_hat), rtol=1e-6, atol=1e-4)
    # every layer keeps the same share sigmoid(cut^2 / 2) of its weight: the fit sees the same relative weights
    share = float(jax.nn.sigmoid(4.5))
    assert_allclose(np.asarray(wide.layer_weight), np.asarray(hits_only.layer_weight) * share, rtol=1e-5)
    assert_allclose(np.asarray(wide.hit_weight), np.asarray(hits_only.hit_weight) * share, rtol=1e-4, atol=1e-7)
    assert_allclose(np.asarray(wide.q_over_pt), np.asarray(hits_only.q_over_pt), rtol=1e-4)


def test_cluster_steps_drop_a_displaced_cluster_and_keep_the_rest():
    """Labels as weights, exact clusters of equal charges; layer 9's cluster moved by 0.4 mm (a merged cluster).

    The hit-level steps (0.5 mm at the end) keep it whole; the cluster-level steps (down to 0.03 mm) drop that
    layer only, and the fit then equals the fit without it.
    """
    batch = make_batch(np.random.default_rng(11), n_events=3, noise_hits=0, exact_clusters=True)
    moved = (batch.layer == 9) & (batch.label > 0) & batch.mask
    features = batch.features.copy()
    features[..., 2] = 1.0  # equal charges: every charge centroid is the exact crossing
    batch = batch._replace(x=np.where(moved, batch.x + 0.4, batch.x).astype(np.float32), features=features)
    base = Chain(fit="hyper", widths=(5.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0), charge_weighted=True)
    chain = Chain(fit="hyper", widths=(5.0, 2.0, 1.0), charge_weighted=True, layer_widths=(1.0, 0.3, 0.1, 0.05, 0.03))
    with jax.enable_x64(True):
        weights = np.asarray(batch.label, np.float64)
        reco = reconstruct(weights, batch, GEOMETRY, chain)
        kept = reconstruct(weights, batch, GEOMETRY, base)
        without = reconstruct(np.where(batch.layer == 9, 0.0, weights), batch, GEOMETRY, base)
    layer_weight = np.asarray(reco.layer_weight)
    assert np.all(np.asarray(kept.layer_weight)[:, 9] > 3.0)  # the hit-level steps keep the displaced cluster
    assert np.all(layer_weight[:, 9] < 1e-3)
    # the other layers keep their hit-level weight times the null-term share sigmoid(cut^2 / 2) of a zero residual
    share = float(jax.nn.sigmoid(4.5))
    assert_allclose(
        np.delete(layer_weight, 9, axis=1), np.delete(np.asarray(kept.layer_weight), 9, axis=1) * share, rtol=1e-3
    )
    true = batch.q / batch.pt
    assert_allclose(np.asarray(reco.q_over_pt), np.asarray(without.q_over_pt), rtol=2e-3)
    assert_allclose(np.asarray(reco.q_over_pt), true, rtol=1e-3)
    assert np.all(np.abs(np.asarray(kept.q_over_pt) / true - 1) > 5e-3)  # what keeping it costs


# ---- the scattering-aware chain (cluster-level steps gate on pulls, model.scattering_fit) -----------------

#: the robust chain's hit-level steps, then pull gates: what ROBUST_CHAIN is, on the synthetic events' geometry
SCATTERING = Chain(
    fit="hyper",
    widths=(5.0, 2.0, 1.0),
    charge_weighted=True,
    layer_widths=(30.0, 10.0, 5.0, 3.0, 2.0),
    scattering_fit=True,
)


@pytest.mark.slow
def test_the_scattering_chain_ends_with_the_scattering_fit_of_its_clusters():
    """The wiring against a direct call: with gates that keep every layer (a width of 1e12 pulls: each keeps
    sigmoid(cut^2 / 2) of its weight), the track is model.scattering_fit.scattering_fit of the chain's final
    clusters, each weighted min(W, 1) times its gate; the clusters are the hit-level steps' (the last step's
    assignment now to the broken line)."""
    from model.scattering_fit import scattering_fit

    batch = make_batch(np.random.default_rng(12), n_events=3, noise_hits=20)
    weights = np.where(batch.label > 0, 0.9, 0.1).astype(np.float32)
    hit_steps = Chain(fit="hyper", widths=(5.0, 2.0, 1.0, 1.0), charge_weighted=True)
    wide = Chain(fit="hyper", widths=(5.0, 2.0, 1.0), charge_weighted=True, layer_widths=(1e12,), scattering_fit=True)
    clusters = reconstruct(weights, batch, GEOMETRY, hit_steps)
    reco = reconstruct(weights, batch, GEOMETRY, wide)
    gate = float(jax.nn.sigmoid(4.5))
    summed = np.asarray(reco.layer_weight) / gate
    fit_weight = np.where(summed >= 1e-6, np.minimum(summed, 1), 0) * gate  # an empty layer's x_hat is no point
    for e in range(3):
        fit = scattering_fit(
            reco.x_hat[e],
            jnp.asarray(GEOMETRY.layer_y),
            jnp.asarray(fit_weight[e], jnp.float32),
            GEOMETRY.point_sigma,
            GEOMETRY.b_field,
            GEOMETRY.x_over_x0,
            x_min=GEOMETRY.x_min,
            x_max=GEOMETRY.x_max,
        )
        assert_allclose(float(reco.q_over_pt[e]), float(fit.q_over_pt), rtol=5e-4)  # float32, weights rounded
    assert_allclose(np.asarray(reco.x_hat), np.asarray(clusters.x_hat), atol=1e-3)


@pytest.mark.slow
def test_pull_gates_drop_a_displaced_cluster_and_keep_the_rest():
    """Layer 9's cluster moved by 0.4 mm (a merged cluster): the hit-level steps keep it, the pull gates drop it
    and the track equals the fit without that layer."""
    batch = make_batch(np.random.default_rng(11), n_events=3, noise_hits=0, exact_clusters=True)
    moved = (batch.layer == 9) & (batch.label > 0) & batch.mask
    features = batch.features.copy()
    features[..., 2] = 1.0  # equal charges: every charge centroid is the exact crossing
    batch = batch._replace(x=np.where(moved, batch.x + 0.4, batch.x).astype(np.float32), features=features)
    no_gates = Chain(
        fit="hyper", widths=(5.0, 2.0, 1.0), charge_weighted=True, layer_widths=(1e12,), scattering_fit=True
    )
    geometry = GEOMETRY._replace(point_sigma=0.005)  # the point error the 0.4 mm displacement was chosen for
    with jax.enable_x64(True):
        weights = np.asarray(batch.label, np.float64)
        reco = reconstruct(weights, batch, geometry, SCATTERING)
        kept = reconstruct(weights, batch, geometry, no_gates)
        without = reconstruct(np.where(batch.layer == 9, 0.0, weights), batch, geometry, no_gates)
    assert np.all(np.asarray(kept.layer_weight)[:, 9] > 3.0)  # the hit-level steps keep the displaced cluster
    assert np.all(np.asarray(reco.layer_weight)[:, 9] < 1e-3)
    others, others_kept = (np.delete(np.asarray(r.layer_weight), 9, axis=1) for r in (reco, kept))
    assert np.all(others[others_kept > 0.5] > 0.9 * others_kept[others_kept > 0.5])  # the other layers stay
    true = batch.q / batch.pt
    assert_allclose(np.asarray(reco.q_over_pt), np.asarray(without.q_over_pt), rtol=1e-3)
    assert_allclose(np.asarray(reco.q_over_pt), true, rtol=1e-3)
    assert np.all(np.abs(np.asarray(kept.q_over_pt) / true - 1) > 2e-3)  # what keeping it costs
