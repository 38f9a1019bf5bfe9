"""Losses (model/losses.py): BCE against NumPy, the pT term's zeros and bounded gradients, the composite."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from model.losses import (
    FAILED_FIT_LOSS,
    PT_LOSS_DELTA,
    PT_LOSS_SCALE,
    bce_loss,
    composite_loss,
    pt_loss,
    reconstructed_pt_loss,
)
from model.tracker import ROBUST_CHAIN, reconstruct
from tests.synthetic_events import GEOMETRY, make_batch


def test_bce_equals_numpy_on_real_hits_only():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 10)).astype(np.float32)
    labels = (rng.uniform(size=(3, 10)) < 0.4).astype(np.float32)
    mask = rng.uniform(size=(3, 10)) < 0.7
    logits[~mask] = 1e4  # padding: anything, even absurd values, must not count
    p = 1 / (1 + np.exp(-logits[mask].astype(np.float64)))
    expected = -np.mean(labels[mask] * np.log(p) + (1 - labels[mask]) * np.log1p(-p))
    assert_allclose(float(bce_loss(logits, labels, mask)), expected, rtol=1e-6)


def huber_reference(r):
    u = np.abs(r / PT_LOSS_SCALE)
    return np.where(u <= PT_LOSS_DELTA, 0.5 * u**2, PT_LOSS_DELTA * (u - 0.5 * PT_LOSS_DELTA))


def test_pt_loss_zero_for_perfect_predictions_and_matches_reference():
    pt = np.array([20.0, 33.3, 50.0], np.float32)
    q = np.array([1.0, -1.0, -1.0], np.float32)
    mask = np.ones(3, bool)
    assert float(pt_loss(q / pt, q, pt, mask)) < 1e-10
    residual = np.array([0.03, -0.2, -2.0])  # small, large, wrong charge
    predicted = (q / pt * (1 + residual)).astype(np.float32)
    assert_allclose(float(pt_loss(predicted, q, pt, mask)), huber_reference(residual).mean(), rtol=1e-5)


def test_pt_loss_finite_bounded_gradients_for_garbage():
    q_over_pt = np.array([1e3, -5.0, 0.0, 1e-9, 0.04, 3.0], np.float32)
    pt = np.array([20.0, 50.0, 30.0, 25.0, 25.0, np.nan], np.float32)  # the last event is padding
    q = np.array([1.0, -1.0, 1.0, -1.0, 1.0, np.nan], np.float32)
    mask = np.array([True] * 5 + [False])
    value, grad = jax.value_and_grad(pt_loss)(jnp.asarray(q_over_pt), q, pt, mask)
    grad = np.asarray(grad)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(grad))
    # d/d(q/pT) of huber(r / scale) / n_events is at most delta / scale * pT / n_events
    assert np.all(np.abs(grad[:5]) <= PT_LOSS_DELTA / PT_LOSS_SCALE * pt[:5] / 5 * (1 + 1e-6))
    assert grad[5] == 0


def test_a_failed_fit_costs_the_most_any_event_costs():
    pt = np.full(5, 25.0, np.float32)
    q = np.array([1.0, -1.0, 1.0, 1.0, -1.0], np.float32)
    residual = np.array([0.05, -1.0, 3.0, 50.0, 0.0])  # good, q/pT ~ 0, poor, garbage, perfect
    predicted = jnp.asarray(q / pt * (1 + residual), jnp.float32)
    fit_ok = np.array([True, True, True, True, False])
    mask = np.ones(5, bool)

    def per_event(values, ok):
        return np.array(
            [float(pt_loss(values[i : i + 1], q[i : i + 1], pt[i : i + 1], mask[:1], ok[i : i + 1])) for i in range(5)]
        )

    costs = per_event(predicted, fit_ok)
    assert_allclose(costs[:3], huber_reference(residual[:3]), rtol=1e-5)
    assert_allclose(FAILED_FIT_LOSS, huber_reference(np.array(10.0)), rtol=1e-12)
    assert costs[3] == costs[4] == np.float32(FAILED_FIT_LOSS)  # garbage is capped; a failed fit is charged the cap
    assert np.all(costs <= FAILED_FIT_LOSS)  # so failing is never cheaper than any measurement
    # q/pT ~ 0 from a *failed* fit is no longer the bargain the plain Huber term makes it (9.5 < a poor fit)
    assert costs[1] < costs[2] < costs[4]
    # the capped and the failed events pass no gradient; the others do
    grad = np.asarray(jax.grad(lambda v: pt_loss(v, q, pt, mask, fit_ok))(predicted))
    assert np.all(grad[[0, 1, 2]] != 0)
    assert np.all(grad[[3, 4]] == 0)


def _loss_and_grad(logits, batch, lam, cap=math.inf):
    return jax.value_and_grad(lambda lg: composite_loss(lg, batch, GEOMETRY, lam, cap=cap)[0])(logits)


def test_composite_gradient_flows_through_the_fit():
    rng = np.random.default_rng(1)
    batch = make_batch(rng, n_events=3, padded_events=1)
    # a classifier that is roughly right, so the fits are sensible but not perfect
    logits = jnp.asarray(np.where(batch.label > 0, 2.0, -2.0) + rng.normal(0, 1.0, batch.label.shape), jnp.float32)
    (loss0, aux0), grad0 = jax.value_and_grad(lambda lg: composite_loss(lg, batch, GEOMETRY, 0.0), has_aux=True)(logits)
    grad_bce = jax.grad(bce_loss)(logits, batch.label, batch.mask)
    # lam = 0: exactly the BCE gradient, while the pT loss is still computed and finite
    np.testing.assert_array_equal(np.asarray(grad0), np.asarray(grad_bce))
    assert float(loss0) == float(aux0["bce"])
    assert np.isfinite(float(aux0["pt_loss"]))
    assert float(aux0["pt_loss"]) > 0

    lam = 0.5
    _, grad = _loss_and_grad(logits, batch, lam)
    grad_pt = (np.asarray(grad) - np.asarray(grad_bce)) / lam
    assert np.all(np.isfinite(grad_pt))
    assert np.abs(grad_pt[batch.mask]).max() > 1e-4  # the fit passes a gradient back to the hits
    assert np.all(grad_pt[~batch.mask] == 0)  # nothing on padding (incl. the padded event)
    # the pT term's directional derivative equals a central finite difference (float32, smooth direction)
    direction = jnp.asarray(rng.normal(size=logits.shape) * batch.mask, jnp.float32)

    def pt_term(t):
        return composite_loss(logits + t * direction, batch, GEOMETRY, 1.0, cap=math.inf)[1]["pt_loss"]

    h = 1e-2
    finite_difference = (float(pt_term(h)) - float(pt_term(-h))) / (2 * h)
    assert_allclose(float(jnp.sum(grad_pt * direction)), finite_difference, rtol=2e-2)


@pytest.mark.slow
def test_event_gradient_cap_bounds_each_event_and_keeps_the_rest():
    """The cap's hard limits: with an infinite cap the plain gradient; with a finite one each event's penalty gradient
    (L2 over its hits) is the plain one scaled to at most the cap, so events below it are untouched; the forward
    value never changes. In float64, so that the two ways of computing agree to rounding."""
    rng = np.random.default_rng(4)
    batch = make_batch(rng, n_events=4)
    n_events = float(np.sum(batch.event_mask))
    with jax.enable_x64(True):
        weights = jnp.asarray(np.where(batch.label > 0, 0.9, 0.1) * batch.mask, jnp.float64)

        def total(w, cap):  # the sum of the events' penalties
            return reconstructed_pt_loss(w, batch, GEOMETRY, ROBUST_CHAIN, cap=cap)[0] * n_events

        def plain(w):  # no custom gradient at all: reconstruct, then pt_loss
            reco = reconstruct(w, batch, GEOMETRY, ROBUST_CHAIN)
            return pt_loss(reco.q_over_pt, batch.q, batch.pt, batch.event_mask, reco.status == 0) * n_events

        # jitted: op by op, the float64 chain took minutes of dispatch
        total_value = jax.jit(total, static_argnums=1)
        total_grad = jax.jit(jax.grad(total), static_argnums=1)
        reference = np.asarray(jax.jit(jax.grad(plain))(weights))
        assert float(total_value(weights, math.inf)) == pytest.approx(float(jax.jit(plain)(weights)), rel=1e-12)
        assert_allclose(np.asarray(total_grad(weights, math.inf)), reference, rtol=1e-9, atol=1e-12)
        norms = np.linalg.norm(reference, axis=1)
        cap = float(np.median(norms[norms > 0]))  # half the events above, half below
        capped = np.asarray(total_grad(weights, cap))
        assert float(total_value(weights, cap)) == float(total_value(weights, math.inf))
    assert np.sum(norms > cap) >= 1
    for event, norm in enumerate(norms):
        expected = reference[event] * min(1.0, cap / norm) if norm > 0 else reference[event]
        assert_allclose(capped[event], expected, rtol=1e-9, atol=1e-12)
        assert np.linalg.norm(capped[event]) <= cap * (1 + 1e-9)
