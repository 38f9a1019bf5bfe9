"""The graph attention network (model/networks.py) and its presets (model/hyperparameters.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from model.hyperparameters import PRESETS, ModelConfig, TrainConfig, get_preset
from model.networks import GAT, MLP, PADDING_LOGIT, VectorAttention, bitonic_argsort
from pipeline.errors import ConfigError

# the cpu preset's structure: one-layer logits (O(N log N) sorted attention), residual updates
SORTED = ModelConfig(hidden=8, query_mlp=(6, 8), logit_mlp=(8,), update_mlp=(4, 1), residual=True)
DENSE = dataclasses.replace(SORTED, dense_attention=True)  # the same network through the [B, N, N, H] path
# the paper's structure (two-layer logit MLP, no residual), here with 4 heads of 2 dimensions
TWO_LAYER_LOGITS = ModelConfig(hidden=8, query_mlp=(8,), logit_mlp=(5, 4), update_mlp=(3, 1))
CONFIGS = {"sorted": SORTED, "dense": DENSE, "two_layer_logits": TWO_LAYER_LOGITS}


def random_graph(rng, batch=3, nodes=12, real=(12, 7, 0)):
    """Random features; event 0 is full, event 1 partly padded, event 2 all padding."""
    features = rng.normal(size=(batch, nodes, 4)).astype(np.float32)
    mask = np.arange(nodes)[None, :] < np.asarray(real)[:, None]
    return features, mask


@functools.cache
def params_for(name):
    """Parameters of each configuration (independent of the node count), initialised once per module."""
    features, mask = random_graph(np.random.default_rng(0))
    # jitted: eagerly, the sorting network of the attention dispatches hundreds of tiny ops
    return jax.jit(GAT(CONFIGS[name]).init)(jax.random.key(0), jnp.asarray(features), jnp.asarray(mask))


@functools.partial(jax.jit, static_argnums=0)
def apply(name, params, features, mask):
    return GAT(CONFIGS[name]).apply(params, features, mask)


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grad(name, params, features, mask, labels):
    def loss(p):
        logits = GAT(CONFIGS[name]).apply(p, features, mask)
        return jnp.sum(jnp.where(mask, (jax.nn.sigmoid(logits) - labels) ** 2, 0))

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_padding_invariance(name):
    rng = np.random.default_rng(1)
    features, mask = random_graph(rng)
    params = params_for(name)
    reference = np.asarray(apply(name, params, features, mask))
    assert reference.shape == mask.shape
    assert reference.dtype == np.float32
    assert np.all(np.isfinite(reference))  # including the all-padding event
    assert np.all(reference[~mask] == PADDING_LOGIT)
    extra = 9
    garbage = rng.normal(0, 1e3, size=(features.shape[0], extra, 4)).astype(np.float32)
    garbage[0, 0, 0] = np.nan  # even NaN on padding must not leak
    padded_features = np.concatenate([features, garbage], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((mask.shape[0], extra), bool)], axis=1)
    padded = np.asarray(apply(name, params, padded_features, padded_mask))
    assert_allclose(padded[:, : mask.shape[1]][mask], reference[mask], rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(padded))


@pytest.mark.parametrize("name", CONFIGS)
def test_permutation_equivariance(name):
    rng = np.random.default_rng(2)
    features, mask = random_graph(rng)
    params = params_for(name)
    reference = np.asarray(apply(name, params, features, mask))
    perm = rng.permutation(mask.shape[1])  # also interleaves padded nodes among the real ones
    permuted = np.asarray(apply(name, params, features[:, perm], mask[:, perm]))
    assert_allclose(permuted[mask[:, perm]], reference[:, perm][mask[:, perm]], rtol=1e-5, atol=1e-6)


def leaky_relu(x, slope):
    return np.where(x > 0, x, slope * x)


def attention_reference(params, h, mask, widths, slope):
    """Float64 vector attention with the explicit per-edge concatenation [h_i, h_j] and a dense layer on it."""
    h = np.asarray(h, np.float64)
    b, n, dim = h.shape
    concat = np.concatenate(
        [np.broadcast_to(h[:, :, None, :], (b, n, n, dim)), np.broadcast_to(h[:, None, :, :], (b, n, n, dim))], -1
    )  # [B, N_i, N_j, 2H]
    kernel = np.concatenate([params["receiver"]["kernel"], params["sender"]["kernel"]], axis=0)  # [2H, K]
    e = concat @ np.asarray(kernel, np.float64) + np.asarray(params["receiver"]["bias"], np.float64)
    for k in range(len(widths) - 1):
        layer = params[f"edge_dense_{k}"]
        e = leaky_relu(e, slope) @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
    e = leaky_relu(e, slope)
    heads = e.shape[-1]
    per_head = dim // heads
    out = np.zeros_like(h)
    for bb in range(b):
        real = mask[bb]
        if not real.any():
            continue
        scores = e[bb][:, real, :]  # [N_i, n_real, K]: only real senders
        a = np.exp(scores - scores.max(axis=1, keepdims=True))
        a /= a.sum(axis=1, keepdims=True)
        for d in range(dim):  # dimension d is weighed by the score of its head d // per_head
            out[bb, :, d] = a[:, :, d // per_head] @ h[bb][real][:, d]
    return out


@pytest.mark.parametrize(("widths", "dense"), [((8,), False), ((8,), True), ((5, 8), False), ((5, 2), False)])
def test_per_node_first_layer_equals_concat_then_dense(widths, dense):
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls (~1e-3 relative)
        _check_attention_against_reference(widths, dense)


def _check_attention_against_reference(widths, dense):
    rng = np.random.default_rng(3)
    h = rng.normal(0, 2, size=(3, 7, 8)).astype(np.float32)
    mask = np.arange(7)[None, :] < np.array([[7], [4], [0]])
    layer = VectorAttention(widths, 0.2, dense=dense)
    params = jax.jit(layer.init)(jax.random.key(1), jnp.asarray(h), jnp.asarray(mask))
    got = np.asarray(jax.jit(layer.apply)(params, h, mask))
    expected = attention_reference(jax.tree.map(np.asarray, params["params"]), h, mask, widths, 0.2)
    assert_allclose(got[mask], expected[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sorted", "two_layer_logits"])
def test_gat_composes_query_two_attention_layers_and_update(name):
    """Layer 1: query MLP then attention; layer 2: identity query then attention; h += update if residual."""
    with jax.default_matmul_precision("highest"):  # both sides alike on GPUs, whose default is TF32
        _check_composition(name)


def _check_composition(name):
    config = CONFIGS[name]
    features, mask = random_graph(np.random.default_rng(6))
    params = params_for(name)["params"]
    h = MLP(config.query_mlp, config.leaky_relu_slope).apply({"params": params["query"]}, features)
    for layer in ("attention_1", "attention_2"):
        attention = VectorAttention(config.logit_mlp, config.leaky_relu_slope)
        update = jax.jit(attention.apply)({"params": params[layer]}, h, mask)
        h = h + update if config.residual else update
    expected = MLP(config.update_mlp, config.leaky_relu_slope).apply({"params": params["node_update"]}, h)[..., 0]
    got = np.asarray(apply(name, params_for(name), features, mask))
    assert_allclose(got[mask], np.asarray(expected)[mask], rtol=1e-5, atol=1e-6)


def _gradient_inputs():
    rng = np.random.default_rng(4)
    features, mask = random_graph(rng, batch=3, nodes=23, real=(23, 9, 0))
    return features, mask, (rng.uniform(size=mask.shape) < 0.5).astype(np.float32)


def test_sorted_attention_equals_dense_values_and_gradients():
    features, mask, labels = _gradient_inputs()
    params = params_for("sorted")  # the same parameters through both attention paths
    value_sorted, grad_sorted = loss_and_grad("sorted", params, features, mask, labels)
    value_dense, grad_dense = loss_and_grad("dense", params, features, mask, labels)
    assert_allclose(float(value_sorted), float(value_dense), rtol=1e-5)
    # (absolute tolerance on the scale of the whole gradient: a parameter whose exact gradient is 0, e.g. a
    # receiver of an attention layer whose edges all sit on one side of the LeakyReLU kink, gets exactly 0
    # from the sorted form and rounding noise from the dense one)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grad_dense))
    for a, b in zip(jax.tree.leaves(grad_sorted), jax.tree.leaves(grad_dense), strict=True):
        assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * scale)


def test_gradients_finite_with_an_all_padding_event():
    features, mask, labels = _gradient_inputs()
    value, grad = loss_and_grad("two_layer_logits", params_for("two_layer_logits"), features, mask, labels)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grad))
    assert float(np.abs(grad["params"]["query"]["dense_0"]["kernel"]).max()) > 0


@pytest.mark.parametrize("n", [1, 2, 5, 16, 37])
def test_bitonic_argsort_sorts(n):
    rng = np.random.default_rng(n)
    keys = rng.normal(size=(3, 4, n)).astype(np.float32)
    keys[0, 0, : n // 2] = 1.5  # ties
    order = np.asarray(jax.jit(bitonic_argsort)(jnp.asarray(keys)))
    assert np.all(np.sort(order, axis=-1) == np.arange(n))  # a permutation, padding never leaks in
    assert_allclose(np.take_along_axis(keys, order, -1), np.sort(keys, axis=-1))


# ---- presets -------------------------------------------------------------------------------------------------
def test_presets_are_valid_and_paper_follows_table_1():
    assert set(PRESETS) >= {"test", "cpu", "paper"}
    model, train = get_preset("paper")
    assert model.hidden == 512
    assert (4, *model.query_mlp) == (4, 8, 16, 32, 64, 128, 256, 512)
    assert model.logit_mlp == (512, 512)  # [h_i, h_j] (1024) -> 512 -> 512
    assert (model.hidden, *model.update_mlp) == (512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
    assert train.lambda_pt == 0.5
    for name in PRESETS:
        model, train = get_preset(name)
        assert ModelConfig.from_dict(model.to_dict()) == model
        assert TrainConfig.from_dict(train.to_dict()) == train


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="unknown preset 'gpu'"):
        get_preset("gpu")
    with pytest.raises(ConfigError, match=r"query_mlp must end with model\.hidden"):
        ModelConfig(hidden=8, query_mlp=(4,), logit_mlp=(8,), update_mlp=(1,))
    with pytest.raises(ConfigError, match="or a divisor of it"):
        ModelConfig(hidden=8, query_mlp=(8,), logit_mlp=(3,), update_mlp=(1,))
    with pytest.raises(ConfigError, match=r"unknown config key model\.width"):
        ModelConfig.from_dict({**SORTED.to_dict(), "width": 3})
    with pytest.raises(ConfigError, match="node_buckets"):
        TrainConfig(epochs=1, batch_size=1, learning_rate=1e-3, node_buckets=(64, 32))
