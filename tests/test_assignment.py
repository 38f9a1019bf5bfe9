"""The per-layer window selection of the `assignment` model and its blackbox gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from model.assignment import select_hits, select_hits_batch, solve_windows

N_LAYERS = 3
HALF_WIDTH = 1.0


def brute_force(scores, x, layer, mask, n_layers, half_width):
    """Enumerate every window (and the empty choice) of every layer; keep the best."""
    y = np.zeros(len(scores))
    for ell in range(n_layers):
        best, best_set = 0.0, None  # the empty selection scores 0
        for c in np.flatnonzero(mask & (layer == ell)):
            members = np.flatnonzero(mask & (layer == ell) & (np.abs(x - x[c]) <= half_width))
            total = scores[members].sum()
            if total > best:
                best, best_set = total, members
        if best_set is not None:
            y[best_set] = 1.0
    return y


def random_event(rng, n=14):
    layer = rng.integers(0, N_LAYERS, n)
    x = np.round(rng.uniform(-3, 3, n) * 2) / 2  # strip-like grid of 0.5
    scores = rng.normal(size=n)
    mask = rng.uniform(size=n) < 0.85
    return scores.astype(np.float32), x.astype(np.float32), layer.astype(np.int32), mask


@pytest.mark.parametrize("seed", range(20))
def test_forward_equals_brute_force(seed):
    scores, x, layer, mask = random_event(np.random.default_rng(seed))
    y = solve_windows(jnp.asarray(scores), jnp.asarray(x), jnp.asarray(layer), jnp.asarray(mask), N_LAYERS, HALF_WIDTH)
    assert_allclose(np.asarray(y), brute_force(scores, x, layer, mask, N_LAYERS, HALF_WIDTH))


def _hand_case():
    # layer 0: a strong window at x in {0, 0.5} and a weaker one at x = 3; layer 1: one positive hit
    x = jnp.array([0.0, 0.5, 3.0, 1.0, 9.0], jnp.float32)
    layer = jnp.array([0, 0, 0, 1, 1], jnp.int32)
    mask = jnp.array([True, True, True, True, False])
    scores = jnp.array([1.0, 0.5, 1.2, 0.3, 5.0], jnp.float32)
    return scores, x, layer, mask


def test_blackbox_gradient_matches_formula():
    scores, x, layer, mask = _hand_case()
    lam = 2.0
    g = jnp.array([1.0, 1.0, -1.0, 0.0, 0.0], jnp.float32)  # the loss prefers hit 2 over hits 0, 1

    def loss(s):
        return jnp.dot(select_hits(s, x, layer, mask, 2, HALF_WIDTH, lam, "blackbox"), g)

    y = solve_windows(scores, x, layer, mask, 2, HALF_WIDTH)
    assert_allclose(np.asarray(y), [1, 1, 0, 1, 0])
    y_perturbed = solve_windows(scores - lam * g, x, layer, mask, 2, HALF_WIDTH)
    assert_allclose(np.asarray(y_perturbed), [0, 0, 1, 1, 0])  # the perturbation flips the choice
    grad = jax.grad(loss)(scores)
    assert_allclose(np.asarray(grad), np.asarray((y - y_perturbed) / lam))
    # gradient descent on the scores moves towards the window the loss prefers
    assert grad[2] < 0 < grad[0]


def test_blackbox_gradient_zero_when_solution_does_not_change():
    scores, x, layer, mask = _hand_case()
    g = jnp.array([1.0, 1.0, -1.0, 0.0, 0.0], jnp.float32)
    lam = 0.01  # too small a perturbation to flip any window

    grad = jax.grad(lambda s: jnp.dot(select_hits(s, x, layer, mask, 2, HALF_WIDTH, lam, "blackbox"), g))(scores)
    assert_allclose(np.asarray(grad), 0.0)


def test_straight_through_passes_the_incoming_gradient():
    scores, x, layer, mask = _hand_case()
    g = jnp.array([0.3, -0.2, 0.1, 0.4, 7.0], jnp.float32)
    grad = jax.grad(lambda s: jnp.dot(select_hits(s, x, layer, mask, 2, HALF_WIDTH, 10.0, "straight_through"), g))(
        scores
    )
    assert_allclose(np.asarray(grad), [0.3, -0.2, 0.1, 0.4, 0.0])  # nothing flows to the padded hit


def test_finite_under_jit_and_vmap_with_empty_events():
    rng = np.random.default_rng(0)
    events = [random_event(rng) for _ in range(4)]
    scores, x, layer, mask = (jnp.asarray(np.stack(a)) for a in zip(*events, strict=True))
    mask = mask.at[0].set(False)  # an event that is all padding

    def loss(s):
        y = select_hits_batch(s, x, layer, mask, N_LAYERS, HALF_WIDTH, 50.0, "blackbox")
        return jnp.sum((y * x) ** 2)

    value, grad = jax.jit(jax.value_and_grad(loss))(scores)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert_allclose(np.asarray(grad[0]), 0.0)
    for b in range(4):
        expected = brute_force(*(np.asarray(a[b]) for a in (scores, x, layer, mask)), N_LAYERS, HALF_WIDTH)
        y = select_hits_batch(scores, x, layer, mask, N_LAYERS, HALF_WIDTH, 50.0, "blackbox")[b]
        assert_allclose(np.asarray(y), expected)
