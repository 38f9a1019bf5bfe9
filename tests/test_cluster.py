"""Differentiable per-layer clustering (model/cluster.py) against a NumPy loop over layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from model.cluster import cluster_layers

N_LAYERS = 6
PITCH = 0.5
FLOOR = PITCH / np.sqrt(12.0)


def random_event(rng, n_hits=50, empty_layers=(4,)):
    """Strip-like hits on N_LAYERS layers (none on `empty_layers`); labels mark a 'muon' cluster per layer."""
    layers = np.array([ell for ell in range(N_LAYERS) if ell not in empty_layers])
    layer = rng.choice(layers, n_hits)
    x = (np.floor(rng.uniform(-500, 500, n_hits) / PITCH) + 0.5) * PITCH
    label = (rng.uniform(size=n_hits) < 0.5).astype(np.float32)
    return x.astype(np.float32), layer.astype(np.int32), label


def numpy_clusters(x, layer, weights, n_layers, pitch):
    """Float64 loop over layers: weighted mean, weighted RMS (floored) and summed weight."""
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    x_hat, sigma, total = np.zeros(n_layers), np.full(n_layers, pitch / np.sqrt(12)), np.zeros(n_layers)
    for ell in range(n_layers):
        on = layer == ell
        total[ell] = weights[on].sum()
        if total[ell] > 0:
            x_hat[ell] = np.sum(weights[on] * x[on]) / total[ell]
            rms = np.sqrt(np.sum(weights[on] * (x[on] - x_hat[ell]) ** 2) / total[ell])
            sigma[ell] = max(rms, pitch / np.sqrt(12))
    return x_hat, sigma, total


def run(x, layer, weights):
    return [np.asarray(v) for v in cluster_layers(x, layer, weights, N_LAYERS, PITCH)]


def test_truth_weights_give_the_plain_mean_of_signal_strips():
    rng = np.random.default_rng(0)
    x, layer, label = random_event(rng)
    label[layer == 2] = 0.0  # a layer with hits but no signal
    x_hat, sigma, weight = run(x, layer, label)
    for ell in range(N_LAYERS):
        signal = x[(layer == ell) & (label == 1)].astype(np.float64)
        assert weight[ell] == signal.size
        if signal.size:
            assert_allclose(x_hat[ell], signal.mean(), rtol=1e-6, atol=1e-4)
            assert_allclose(sigma[ell], max(signal.std(), FLOOR), rtol=1e-5)
        else:
            assert x_hat[ell] == 0.0
            assert sigma[ell] == pytest.approx(FLOOR)


@pytest.mark.parametrize("seed", range(3))
def test_soft_weights_match_numpy(seed):
    rng = np.random.default_rng(seed)
    x, layer, _ = random_event(rng)
    weights = rng.uniform(0, 1, x.size).astype(np.float32)
    for got, expected in zip(run(x, layer, weights), numpy_clusters(x, layer, weights, N_LAYERS, PITCH), strict=True):
        assert_allclose(got, expected, rtol=2e-5, atol=1e-4)


def test_sigma_floor():
    # one strip per layer: zero spread -> pitch / sqrt(12); two strips one pitch apart: RMS = pitch / 2 > floor
    x = np.array([10.25, -3.75, 100.25, 100.75], np.float32)
    layer = np.array([0, 1, 2, 2], np.int32)
    _, sigma, _ = run(x, layer, np.ones(4, np.float32))
    assert_allclose(sigma[[0, 1, 3, 4, 5]], FLOOR, rtol=1e-6)
    assert_allclose(sigma[2], PITCH / 2, rtol=1e-6)


def test_padding_and_zero_weights_change_nothing():
    rng = np.random.default_rng(3)
    x, layer, _ = random_event(rng)
    weights = rng.uniform(0.1, 1, x.size).astype(np.float32)
    reference = run(x, layer, weights)
    # padding as pipeline.batches writes it: layer 0, weight 0, and any (finite) x
    x_pad = np.r_[x, np.float32([9e5, -7e3, 0.0])]
    layer_pad = np.r_[layer, np.int32([0, 0, 0])]
    w_pad = np.r_[weights, np.zeros(3, np.float32)]
    for got, expected in zip(run(x_pad, layer_pad, w_pad), reference, strict=True):
        assert_allclose(got, expected, rtol=1e-6)


def test_gradients_finite_for_empty_and_vanishing_layers():
    rng = np.random.default_rng(4)
    x, layer, _ = random_event(rng, empty_layers=(1, 4))
    weights = rng.uniform(0, 1, x.size).astype(np.float32)
    weights[layer == 3] = 1e-30  # a layer the network has switched off
    weights[layer == 5] = 0.0

    def summary(xx, ww):
        x_hat, sigma, total = cluster_layers(xx, layer, ww, N_LAYERS, PITCH)
        return jnp.stack([x_hat, sigma, total])

    jac_x, jac_w = jax.jacobian(summary, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(weights))
    assert np.all(np.isfinite(np.asarray(jac_x)))
    assert np.all(np.isfinite(np.asarray(jac_w)))
    values = np.asarray(summary(jnp.asarray(x), jnp.asarray(weights)))
    assert np.all(np.isfinite(values))
    assert_allclose(values[:, [1, 3, 4, 5]], [[0] * 4, [FLOOR] * 4, [0, 0, 0, 0]], atol=1e-12 + 1e-6 * FLOOR)


def test_gradients_equal_finite_differences_float64():
    rng = np.random.default_rng(5)
    x, layer, _ = random_event(rng, n_hits=20)
    x = x.astype(np.float64) + rng.normal(0, 0.1, x.size)  # break ties so no sigma sits on its floor
    weights = rng.uniform(0.2, 1.0, x.size)
    with jax.enable_x64(True):

        def fun(ww):
            x_hat, sigma, total = cluster_layers(jnp.asarray(x), layer, ww, N_LAYERS, PITCH)
            return jnp.sum(jnp.sin(x_hat / 50.0) + sigma**1.5 + total**2)

        grad = np.asarray(jax.grad(fun)(jnp.asarray(weights)))
        h = 1e-6
        expected = [
            (float(fun(jnp.asarray(weights + h * e))) - float(fun(jnp.asarray(weights - h * e)))) / (2 * h)
            for e in np.eye(weights.size)
        ]
        assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)


def test_hard_limit_reproduces_the_selection():
    rng = np.random.default_rng(6)
    x, layer, label = random_event(rng)
    selected_x_hat, selected_sigma, selected_weight = numpy_clusters(x, layer, label, N_LAYERS, PITCH)
    logits = np.where(label == 1, 1.0, -1.0) * rng.uniform(0.5, 2.0, x.size)
    errors = []
    for temperature in (1.0, 0.2, 0.05, 0.01):
        soft = jax.nn.sigmoid(jnp.asarray(logits / temperature, jnp.float32))
        x_hat, sigma, weight = run(x, layer, soft)
        errors.append(np.max(np.abs(x_hat - selected_x_hat)))
    assert np.all(np.diff(errors) < 0)
    assert errors[-1] < 1e-3  # mm
    assert_allclose(sigma, selected_sigma, rtol=1e-5, atol=1e-4)
    assert_allclose(weight, selected_weight, atol=1e-5)


def test_vmap_over_events():
    rng = np.random.default_rng(7)
    events = [random_event(rng, n_hits=30) for _ in range(3)]
    xs, layers = np.stack([e[0] for e in events]), np.stack([e[1] for e in events])
    ws = rng.uniform(0, 1, xs.shape).astype(np.float32)
    batched = jax.vmap(cluster_layers, in_axes=(0, 0, 0, None, None))(xs, layers, ws, N_LAYERS, PITCH)
    for i in range(3):
        for got, expected in zip(batched, run(xs[i], layers[i], ws[i]), strict=True):
            assert_allclose(np.asarray(got)[i], expected, rtol=1e-6)
