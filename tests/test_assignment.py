"""The `assignment` model's per-layer window solver and its three gradient estimators."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from model.assignment import (
    HALF_WIDTH_PITCH,
    NO_HIT_COST,
    blackbox_solve,
    candidates,
    hamming_loss,
    identity_solve,
    perturbed_solve,
    project_costs,
    selected_hits,
    solve,
    solve_batch,
    window_membership,
)

N_LAYERS = 3
HALF_WIDTH = 1.0


def brute_force(logits, x, layer, mask, n_layers, half_width):
    """Enumerate every window of every layer and its "no hit" option; keep the cheapest."""
    hit_costs = 1.0 / (1.0 + np.exp(logits.astype(np.float64)))  # 1 - sigmoid
    y = np.zeros(len(logits))
    for ell in range(n_layers):
        best, best_set = NO_HIT_COST, None
        for c in np.flatnonzero(mask & (layer == ell)):
            members = np.flatnonzero(mask & (layer == ell) & (np.abs(x - x[c]) <= half_width))
            total = (hit_costs[members] - 0.5).sum()
            if total < best:
                best, best_set = total, members
        if best_set is not None:
            y[best_set] = 1.0
    return y


def random_event(rng, n=14):
    layer = rng.integers(0, N_LAYERS, n)
    x = np.round(rng.uniform(-3, 3, n) * 2) / 2  # strip-like grid of 0.5
    logits = rng.normal(size=n) * 2
    mask = rng.uniform(size=n) < 0.85
    return logits.astype(np.float32), x.astype(np.float32), layer.astype(np.int32), mask


def selection_of(logits, x, layer, mask):
    """(z over the candidates, the selected hits) of one event, through model.assignment.candidates."""
    batch = SimpleNamespace(x=jnp.asarray(x)[None], layer=jnp.asarray(layer)[None], mask=jnp.asarray(mask)[None])
    geometry = SimpleNamespace(n_layers=N_LAYERS, pitch=HALF_WIDTH / HALF_WIDTH_PITCH)
    choices = candidates(jnp.asarray(logits)[None], batch, geometry)
    z = solve_batch(choices.costs, choices.layer, choices.mask, N_LAYERS)
    return np.asarray(z[0]), np.asarray(selected_hits(z, choices.membership)[0]), np.asarray(choices.layer[0])


@pytest.mark.parametrize("seed", range(20))
def test_forward_equals_brute_force_and_is_never_empty(seed):
    logits, x, layer, mask = random_event(np.random.default_rng(seed))
    z, y, candidate_layer = selection_of(logits, x, layer, mask)
    assert_allclose(y, brute_force(logits, x, layer, mask, N_LAYERS, HALF_WIDTH))
    assert z[: len(x)][~mask].sum() == 0
    for ell in range(N_LAYERS):
        # exactly one choice (a window, or "no hit") on a layer with hits, none on a layer without
        assert z[candidate_layer == ell].sum() == (1 if (mask & (layer == ell)).any() else 0)
    # hits the network believes in (p > 1/2: every window costs < 0 < NO_HIT_COST) always get a window
    _, y_believed, _ = selection_of(np.full_like(logits, 0.1), x, layer, mask)
    for ell in range(N_LAYERS):
        assert y_believed[mask & (layer == ell)].sum() >= (1 if (mask & (layer == ell)).any() else 0)
    # and a layer of hits it rejects (p ~ 0) keeps none of them
    _, y_rejected, _ = selection_of(np.full_like(logits, -20.0), x, layer, mask)
    assert y_rejected.sum() == 0


def _hand_case():
    """One event of three candidates on layer 0 (costs 0.1, 0.3, 0.35) and one on layer 1; one padded slot."""
    costs = jnp.array([[0.1, 0.3, 0.35, -0.2, 0.0]], jnp.float32)
    layer = jnp.array([[0, 0, 0, 1, 0]], jnp.int32)
    mask = jnp.array([[True, True, True, True, False]])
    return costs, layer, mask


def test_blackbox_gradient_matches_kortus_formula():
    costs, layer, mask = _hand_case()
    lam = 2.0
    g = jnp.array([[0.1, 0.0, -0.05, 0.3, 9.0]], jnp.float32)  # the loss prefers candidate 2 to candidate 0
    z = solve_batch(costs, layer, mask, 2)
    assert_allclose(np.asarray(z), [[1, 0, 0, 1, 0]])
    shifted = solve_batch(costs + lam * g, layer, mask, 2)  # costs 0.3, 0.3, 0.25, 0.4: candidate 2 wins
    assert_allclose(np.asarray(shifted), [[0, 0, 1, 1, 0]])
    grad = jax.grad(lambda c: jnp.sum(blackbox_solve(c, layer, mask, 2, lam) * g))(costs)
    # z(C + lam g) - z(C), not divided by lam, over the event's 4 hits; nothing on the padded slot
    assert_allclose(np.asarray(grad), np.array([[-1, 0, 1, 0, 0]]) / 4)
    # gradient descent on the costs makes the preferred candidate cheaper
    assert grad[0, 2] > 0 > grad[0, 0]


def test_blackbox_gradient_is_per_event_and_averaged_over_the_batch():
    costs, layer, mask = _hand_case()
    costs, layer, mask = (jnp.concatenate([a, a]) for a in (costs, layer, mask))
    # the cotangent of a batch mean: one event's dL/dz over 2
    g = jnp.array([[0.1, 0.0, -0.05, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]], jnp.float32) / 2
    grad = jax.grad(lambda c: jnp.sum(blackbox_solve(c, layer, mask, 2, 2.0) * g))(costs)
    assert_allclose(np.asarray(grad), np.array([[-1, 0, 1, 0, 0], [0, 0, 0, 0, 0]]) / (2 * 4))


def test_blackbox_gradient_zero_when_the_perturbation_changes_nothing():
    costs, layer, mask = _hand_case()
    g = jnp.array([[0.1, 0.0, -0.05, 0.3, 0.0]], jnp.float32)
    grad = jax.grad(lambda c: jnp.sum(blackbox_solve(c, layer, mask, 2, 0.5) * g))(costs)  # shift 0.05 + 0.025
    assert_allclose(np.asarray(grad), 0.0)


def test_identity_backward_is_the_negative_identity():
    costs, layer, mask = _hand_case()
    g = jnp.array([[0.3, -0.2, 0.1, 0.4, 7.0]], jnp.float32)
    grad = jax.grad(lambda c: jnp.sum(identity_solve(c, layer, mask, 2) * g))(costs)
    assert_allclose(np.asarray(grad), [[-0.3, 0.2, -0.1, -0.4, 0.0]])
    assert_allclose(np.asarray(jax.grad(lambda c: jnp.sum(identity_solve(c, layer, mask, 2) * 0.0))(costs)), 0.0)


def test_cost_projection_keeps_the_choice_and_has_the_closed_form_jacobian():
    rng = np.random.default_rng(3)
    costs = jnp.asarray(rng.normal(size=6), jnp.float32)
    layer = jnp.array([0, 0, 0, 0, 1, 1], jnp.int32)
    mask = jnp.array([True, True, True, True, True, False])
    projected = project_costs(costs, layer, mask, 2)
    assert_allclose(np.asarray(solve(projected, layer, mask, 2)), np.asarray(solve(costs, layer, mask, 2)))
    c = np.asarray(costs[:4], np.float64)
    n, eps = 4, 0.1
    centred = c - c.mean()
    s = np.sqrt((centred**2).mean() + eps**2)
    assert_allclose(np.asarray(projected[:4]), centred / s, rtol=1e-5)
    assert_allclose(np.asarray(projected[4:]), 0.0, atol=1e-6)  # one candidate: nothing to choose, mean 0
    # d(C~)/dC = (I - 11^T/n) / s - centred centred^T / (n s^3)
    jacobian = (np.eye(n) - 1.0 / n) / s - np.outer(centred, centred) / (n * s**3)
    g = rng.normal(size=6).astype(np.float32)
    grad = jax.grad(lambda x: jnp.sum(project_costs(x, layer, mask, 2) * g))(costs)
    assert_allclose(np.asarray(grad[:4]), jacobian.T @ g[:4], rtol=1e-4, atol=1e-6)
    # the projected gradient has no component along "all costs up" (the direction of cost collapse)
    assert abs(float(grad[:4].sum())) < 1e-5


def test_perturbed_solver_matches_the_gumbel_softmax_and_its_gradient():
    # with Gumbel noise, E[argmax(-C + sigma Z)] is softmax(-C / sigma) per layer (the Gumbel-max trick)
    costs, layer, mask = _hand_case()
    sigma, samples = 0.2, 40_000
    g = jnp.array([[0.5, -1.0, 0.2, 0.7, 0.0]], jnp.float32)

    def smoothed(c):
        return perturbed_solve(c, layer, mask, 2, jax.random.key(0), samples=samples, sigma=sigma, noise="gumbel")

    value, grad = jax.value_and_grad(lambda c: jnp.sum(smoothed(c) * g))(costs)
    logits0 = -np.asarray(costs[0, :3], np.float64) / sigma
    soft = np.exp(logits0 - logits0.max())
    soft /= soft.sum()
    assert_allclose(np.asarray(smoothed(costs))[0, :3], soft, atol=0.01)
    assert_allclose(np.asarray(smoothed(costs))[0, 3:], [1.0, 0.0])
    g0 = np.asarray(g[0, :3], np.float64)
    assert_allclose(float(value), soft @ g0 + 0.7, atol=0.01)
    # d<g, softmax(-C/sigma)>/dC = -(soft * (g - <g, soft>)) / sigma; the lone candidate of layer 1 is chosen
    # whatever its cost (expected gradient 0, up to the Monte Carlo noise of layer 0's outcomes)
    expected = -(soft * (g0 - soft @ g0)) / sigma
    assert_allclose(np.asarray(grad)[0, :4], [*expected, 0.0], atol=0.06)
    assert float(grad[0, 4]) == 0.0  # the padded slot


def test_perturbed_gradient_zero_when_the_noise_changes_nothing():
    costs, layer, mask = _hand_case()
    far = costs.at[0, 0].set(-50.0)  # candidate 0 wins by 50 cost units against noise of scale 0.1
    for noise in ("gumbel", "normal"):
        grad = jax.grad(
            lambda c, noise=noise: jnp.sum(
                perturbed_solve(c, layer, mask, 2, jax.random.key(1), samples=64, sigma=0.1, noise=noise)
                * jnp.arange(5.0)
            )
        )(far)
        assert_allclose(np.asarray(grad), 0.0)


@pytest.mark.parametrize("estimator", ["blackbox", "identity", "perturbed"])
def test_every_estimator_is_finite_under_jit_with_ties_padding_and_empty_events(estimator):
    from model.assignment import Estimator, select_windows

    rng = np.random.default_rng(0)
    events = [random_event(rng) for _ in range(4)]
    logits, x, layer, mask = (jnp.asarray(np.stack(a)) for a in zip(*events, strict=True))
    mask = mask.at[0].set(False)  # an event that is all padding
    logits = logits.at[1].set(0.0)  # an event of exact ties
    batch = SimpleNamespace(x=x, layer=layer, mask=mask)
    geometry = SimpleNamespace(n_layers=N_LAYERS, pitch=HALF_WIDTH / HALF_WIDTH_PITCH)
    config = Estimator(kind=estimator, interpolation=50.0, samples=8)

    def loss(logits):
        choices = candidates(logits, batch, geometry)
        z = select_windows(choices.costs, choices.layer, choices.mask, N_LAYERS, config, jax.random.key(0))
        y = selected_hits(z, choices.membership)
        return jnp.sum((y * x) ** 2) + hamming_loss(y, (x > 0).astype(jnp.float32), mask, mask.any(axis=1))

    value, grad = jax.jit(jax.value_and_grad(loss))(logits)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert_allclose(np.asarray(grad[0]), 0.0)


def test_hamming_loss_counts_wrong_decisions_per_event():
    selection = jnp.array([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    labels = jnp.array([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mask = jnp.array([[True, True, True, True], [True, True, False, False], [True] * 4])
    event_mask = jnp.array([True, True, False])
    # event 0: 2 of 4 wrong; event 1: 0 of 2; event 2 is padding
    assert_allclose(float(hamming_loss(selection, labels, mask, event_mask)), (0.5 + 0.0) / 2)


def test_brute_force_reference_sees_every_window():
    # guards the reference itself: a layer of two separated pairs picks the cheaper pair as a whole
    logits = np.array([1.0, 0.5, 3.0, 2.0], np.float32)
    x = np.array([0.0, 0.5, 5.0, 5.5], np.float32)
    layer = np.zeros(4, np.int32)
    mask = np.ones(4, bool)
    expected = np.array([0, 0, 1, 1], float)
    assert_allclose(brute_force(logits, x, layer, mask, 1, HALF_WIDTH), expected)
    assert_allclose(selection_of(logits, x, layer, mask)[1], expected)
    # a window never spans two layers, however wide
    two_layers = jnp.asarray(np.array([0, 0, 1, 1], np.int32))
    membership = np.asarray(window_membership(jnp.asarray(x), two_layers, jnp.asarray(mask), 10.0))
    assert_allclose(membership, np.kron(np.eye(2), np.ones((2, 2))))
