"""The blocked multi-layer-logit attention (models.edge_mlp_attention_blocked) equals the dense reference path."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from model.hyperparameters import ModelConfig
from model.networks import GAT, VectorAttention, edge_mlp_attention_blocked, repeat_over_receivers
from pipeline.errors import ConfigError

NODES = 11
#: event 0 full, event 1 partly padded, event 2 all padding
REAL = (NODES, 6, 0)


def _inputs(dim=8, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(0, 2, size=(len(REAL), NODES, dim)).astype(np.float32)
    mask = np.arange(NODES)[None, :] < np.asarray(REAL)[:, None]
    cotangent = rng.normal(size=h.shape).astype(np.float32)
    return jnp.asarray(h), jnp.asarray(mask), jnp.asarray(cotangent)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _value_and_grad(widths, dense, block, remat, params, h, mask, cotangent):
    layer = VectorAttention(widths, 0.2, dense=dense, block=block, remat=remat)

    def loss(p, x):
        return jnp.sum(layer.apply(p, x, mask) * cotangent)

    out = layer.apply(params, h, mask)
    return out, jax.grad(loss, argnums=(0, 1))(params, h)


def _assert_same(got, expected):
    # absolute tolerance on the scale of each array: rounding differs between the two summation orders
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape
        assert np.all(np.isfinite(a))
        assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(float(np.abs(b).max()), 1e-30))


@pytest.mark.parametrize(
    ("widths", "block"),
    [
        ((5, 8), 3),  # the paper's structure (two layers, K = H); 3 does not divide N = 11
        ((5, 8), 1),
        ((5, 8), 16),  # more than N: one block
        ((6, 5, 8), 4),  # two per-edge layers
        ((5, 4), NODES),  # 4 heads of 2 dimensions
    ],
)
def test_blocked_equals_dense_values_and_gradients(widths, block):
    h, mask, cotangent = _inputs()
    params = jax.jit(VectorAttention(widths, 0.2, dense=True).init)(jax.random.key(2), h, mask)
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls
        expected = _value_and_grad(widths, True, 8, "dots", params, h, mask, cotangent)
        got = _value_and_grad(widths, False, block, "dots", params, h, mask, cotangent)
    _assert_same(got, expected)


@pytest.mark.parametrize("remat", ["dots", "full", "none"])
def test_blocked_backward_policies_agree(remat):
    widths = (5, 8)
    h, mask, cotangent = _inputs(seed=1)
    params = jax.jit(VectorAttention(widths, 0.2, dense=True).init)(jax.random.key(3), h, mask)
    with jax.default_matmul_precision("highest"):
        expected = _value_and_grad(widths, True, 8, "dots", params, h, mask, cotangent)
        got = _value_and_grad(widths, False, 3, remat, params, h, mask, cotangent)
    _assert_same(got, expected)


def test_blocked_and_dense_share_the_parameters():
    """Same parameter tree and initial values on both paths (checkpoints load into either)."""
    h, mask, _ = _inputs()
    dense = jax.jit(VectorAttention((5, 8), 0.2, dense=True).init)(jax.random.key(4), h, mask)
    blocked = jax.jit(VectorAttention((5, 8), 0.2, block=3).init)(jax.random.key(4), h, mask)
    assert jax.tree.structure(dense) == jax.tree.structure(blocked)
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(blocked), strict=True):
        assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)


def test_gat_blocked_equals_dense_loss_and_gradients():
    config = ModelConfig(hidden=8, query_mlp=(8,), logit_mlp=(5, 8), update_mlp=(3, 1), attention_block=4)
    reference = dataclasses.replace(config, dense_attention=True)
    rng = np.random.default_rng(5)
    features = jnp.asarray(rng.normal(size=(len(REAL), NODES, 4)).astype(np.float32))
    mask = jnp.asarray(np.arange(NODES)[None, :] < np.asarray(REAL)[:, None])
    labels = jnp.asarray((rng.uniform(size=mask.shape) < 0.5).astype(np.float32))
    params = jax.jit(GAT(reference).init)(jax.random.key(0), features, mask)

    def loss(cfg, p):
        logits = GAT(cfg).apply(p, features, mask)
        return jnp.sum(jnp.where(mask, (jax.nn.sigmoid(logits) - labels) ** 2, 0))

    with jax.default_matmul_precision("highest"):
        expected = jax.jit(jax.value_and_grad(functools.partial(loss, reference)))(params)
        got = jax.jit(jax.value_and_grad(functools.partial(loss, config)))(params)
    _assert_same(got, expected)


def test_repeat_over_receivers_has_the_gradient_of_a_broadcast():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, 3)).astype(np.float32))
    weights = jnp.asarray(np.random.default_rng(7).normal(size=(2, 4, 5, 3)).astype(np.float32))
    out = repeat_over_receivers(x, 4)
    assert_allclose(np.asarray(out), np.broadcast_to(np.asarray(x)[:, None], (2, 4, 5, 3)))
    got = jax.grad(lambda v: jnp.sum(repeat_over_receivers(v, 4) * weights))(x)
    assert_allclose(np.asarray(got), np.asarray(weights).sum(axis=1), rtol=1e-6)


def test_unknown_remat_and_bad_block_size_are_refused():
    h, mask, _ = _inputs()
    with pytest.raises(ValueError, match="remat must be"):
        edge_mlp_attention_blocked(h, h, h, mask, [], 0.2, 4, remat="some")
    with pytest.raises(ConfigError, match="attention_block must be >= 1"):
        ModelConfig(hidden=8, query_mlp=(8,), logit_mlp=(5, 8), update_mlp=(1,), attention_block=0)
