"""Flax (linen) modules of the hit-classification network: a two-layer graph attention network.

Architecture of Coccaro et al., *Learning to Reconstruct* (arXiv 2512.01647), appendix A and Table 1,
in the vector-attention form of GAT (Velickovic et al., arXiv 1710.10903); small functional blocks in the
style of Jraph's GAT. Each event is a fully connected graph with self edges over its fired strips, padded to
a fixed node budget N and masked.

Shapes: ``B`` events, ``N`` nodes (padded), ``F`` input features, ``H`` hidden size, ``K`` width of an
intermediate attention logit layer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from model.hyperparameters import ModelConfig

#: logit written on padded nodes (sigmoid ~ 2e-9); callers must still mask them out
PADDING_LOGIT = -20.0


class MLP(nn.Module):
    """Dense layers of the given output widths with leaky ReLUs between them (none after the last)."""

    widths: Sequence[int]
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... W"]:
        for k, width in enumerate(self.widths):
            if k > 0:
                x = nn.leaky_relu(x, self.negative_slope)
            x = nn.Dense(width, name=f"dense_{k}")(x)
        return x


def masked_softmax_over_senders(logits: Float[Array, "B N N H"], mask: Bool[Array, "B N"]) -> Float[Array, "B N N H"]:
    """Softmax over the senders j (axis 2) separately for every receiver i and dimension d.

    Padded senders get a large finite negative logit, so they receive exactly zero attention
    (exp underflows) while a fully padded row stays finite (uniform) instead of NaN.
    """
    very_negative = jnp.asarray(jnp.finfo(logits.dtype).min / 2, logits.dtype)
    logits = jnp.where(mask[:, None, :, None], logits, very_negative)
    return jax.nn.softmax(logits, axis=2)


def aggregate(attention: Float[Array, "B N N H"], h: Float[Array, "B N H"]) -> Float[Array, "B N H"]:
    """h_i' = sum_j a_ij ⊙ h_j (Hadamard product per dimension, summed over senders)."""
    return jnp.einsum("bijd,bjd->bid", attention, h)


def bitonic_argsort(key: Float[Array, "... n"]) -> Int[Array, "... n"]:
    """Indices that sort ``key`` ascending along the last axis, by a bitonic sorting network.

    Only reshapes, comparisons and selects: on CPU this runs ~2x faster than XLA's comparator-based sort
    for the many short rows (one per event and dimension) of the attention. The rows are padded to a power
    of two with +inf, so ``key`` must hold no +inf (the padding could then tie with it and leak in); ties
    keep no particular order.
    """
    n = key.shape[-1]
    size = 1 << max(0, (n - 1).bit_length())
    lead = key.shape[:-1]
    if size > n:
        key = jnp.concatenate([key, jnp.full((*lead, size - n), jnp.inf, key.dtype)], axis=-1)
    index = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), key.shape)
    block = 2
    while block <= size:
        stride = block // 2
        while stride >= 1:
            # pair position p (bit `stride` clear) with p + stride; blocks with bit `block` clear ascend
            shape = (*lead, size // (2 * stride), 2, stride)
            low_position = np.arange(size).reshape(size // (2 * stride), 2, stride)[:, 0, :]
            ascending = jnp.asarray((low_position & block) == 0)
            k, i = key.reshape(shape), index.reshape(shape)
            swap = jnp.where(ascending, k[..., 0, :] > k[..., 1, :], k[..., 0, :] < k[..., 1, :])
            key = jnp.stack(
                [jnp.where(swap, k[..., 1, :], k[..., 0, :]), jnp.where(swap, k[..., 0, :], k[..., 1, :])], axis=-2
            ).reshape((*lead, size))
            index = jnp.stack(
                [jnp.where(swap, i[..., 1, :], i[..., 0, :]), jnp.where(swap, i[..., 0, :], i[..., 1, :])], axis=-2
            ).reshape((*lead, size))
            stride //= 2
        block *= 2
    return index[..., :n]


def leaky_relu_attention_sorted(
    receiver: Float[Array, "B N H"],
    sender: Float[Array, "B N H"],
    h: Float[Array, "B N H"],
    mask: Bool[Array, "B N"],
    negative_slope: float,
) -> Float[Array, "B N H"]:
    """``aggregate(masked_softmax_over_senders(LeakyReLU(receiver_i + sender_j)), h)`` in O(B N H log^2 N).

    When the attention logit MLP is the single layer e_ij = LeakyReLU(P_i + Q_j) (P = W1 h + b, Q = W2 h),
    exp(e_ij) factorises on each side of the kink: exp(P_i) exp(Q_j) where Q_j > -P_i, and
    exp(alpha P_i) exp(alpha Q_j) where Q_j <= -P_i. Sorting the senders by Q_j (per event and dimension)
    turns both sums over j into a prefix and a suffix sum, read at the position of -P_i, so the [B, N, N, H]
    edge tensor is never formed. Exact up to rounding (same function, same gradient almost everywhere).

    Stabilisation: with Qmax = max over real senders and m_i = LeakyReLU(P_i + Qmax) (the row maximum),
    every factor exp(Q_j - Qmax), exp(alpha (Q_j - Qmax)), exp(P_i + Qmax - m_i), exp(alpha (P_i + Qmax) - m_i)
    is <= 1, and the sender achieving Qmax contributes exactly 1 to the normaliser, which is thus >= 1.
    """
    alpha = negative_slope
    # work in [B, H, N]: one row of senders per event and dimension
    p, q, h = (jnp.swapaxes(a, 1, 2) for a in (receiver, sender, h))
    valid = mask[:, None, :]  # [B, 1, N]
    very_negative = jnp.finfo(q.dtype).min / 2
    q_max = jnp.max(jnp.where(valid, q, very_negative), axis=2, keepdims=True)  # [B, H, 1]
    q_max = jax.lax.stop_gradient(jnp.where(jnp.any(valid, axis=2, keepdims=True), q_max, 0))  # cancels exactly
    shifted = jnp.where(valid, q - q_max, very_negative)  # padded senders weigh exp(.) = 0

    # sort the senders of every row by Q_j; padded senders go last
    key = jnp.where(valid, q, jnp.finfo(q.dtype).max)  # finite: bitonic_argsort pads with +inf
    order = jax.lax.stop_gradient(bitonic_argsort(key))
    key_sorted = jnp.take_along_axis(key, order, axis=2)
    shifted_sorted = jnp.take_along_axis(shifted, order, axis=2)
    h_sorted = jnp.take_along_axis(h, order, axis=2)
    weight_neg = jnp.exp(alpha * shifted_sorted)  # sender factor where P_i + Q_j <= 0
    weight_pos = jnp.exp(shifted_sorted)  # where P_i + Q_j > 0

    def prefix(values: Array) -> Array:  # [B, H, N + 1]: sums over the first k sorted senders
        return jnp.concatenate([jnp.zeros_like(values[..., :1]), jnp.cumsum(values, axis=2)], axis=2)

    def suffix(values: Array) -> Array:  # [B, H, N + 1]: sums over the sorted senders k, k + 1, ...
        rest = jnp.flip(jnp.cumsum(jnp.flip(values, 2), axis=2), 2)
        return jnp.concatenate([rest, jnp.zeros_like(values[..., :1])], axis=2)

    # k_i = number of senders with Q_j <= -P_i (the negative branch), per event and dimension
    count = jax.vmap(jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="right")))
    k = count(key_sorted, -p)  # [B, H, N]

    def at_k(table: Array) -> Array:
        return jnp.take_along_axis(table, k, axis=2)

    row_arg = p + q_max
    row_max = jnp.where(row_arg > 0, row_arg, alpha * row_arg)
    factor_pos = jnp.exp(jnp.minimum(row_arg - row_max, 0))
    factor_neg = jnp.exp(jnp.minimum(alpha * row_arg - row_max, 0))
    normaliser = factor_pos * at_k(suffix(weight_pos)) + factor_neg * at_k(prefix(weight_neg))
    numerator = factor_pos * at_k(suffix(weight_pos * h_sorted)) + factor_neg * at_k(prefix(weight_neg * h_sorted))
    out = numerator / jnp.where(normaliser > 0, normaliser, 1)  # 0 only for an all-padding event
    return jnp.swapaxes(out, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def repeat_over_receivers(x: Float[Array, "B N K"], count: int) -> Float[Array, "B count N K"]:
    """``x`` broadcast to ``count`` receivers, [B, count, N, K]; its gradient sums the ``count`` slices one by one.

    The same function as ``jnp.broadcast_to(x[:, None], ...)``, but the transpose of that broadcast is a reduce
    over axis 1, which XLA:CPU (jax 0.10) runs ~20x slower than the same sum written as ``count`` additions of
    contiguous slices (measured on [2, 128, 128, 512]: ~150 ms against ~8 ms).
    """
    return jnp.broadcast_to(x[:, None], (x.shape[0], count, *x.shape[1:]))


def _repeat_over_receivers_fwd(x: Array, count: int) -> tuple[Array, None]:
    return repeat_over_receivers(x, count), None


def _repeat_over_receivers_bwd(count: int, _: None, grad: Array) -> tuple[Array]:
    total = grad[:, 0]
    for k in range(1, count):
        total = total + grad[:, k]
    return (total,)


repeat_over_receivers.defvjp(_repeat_over_receivers_fwd, _repeat_over_receivers_bwd)


def edge_mlp_attention_blocked(
    receiver: Float[Array, "B N K1"],
    sender: Float[Array, "B N K1"],
    h: Float[Array, "B N H"],
    mask: Bool[Array, "B N"],
    layers: Sequence[tuple[Float[Array, "Ka Kb"], Float[Array, " Kb"]]],
    negative_slope: float,
    block: int,
    remat: str = "dots",
) -> Float[Array, "B N H"]:
    """The multi-layer logit MLP attention of :class:`VectorAttention` one block of ``block`` receivers at a time.

    Same function as the dense path (``logits = receiver_i + sender_j``, then per edge LeakyReLU and the dense
    layers ``layers`` = [(kernel, bias), ...], a final LeakyReLU, masked softmax over the senders and the
    aggregation), but only a [B, block, N, K] slice of the edge tensors exists at a time (``jax.lax.map`` over
    the receiver blocks); the softmax and the aggregation are fused (sum_j p_ij h_j / sum_j p_ij), and each
    per-edge dense layer is one float32 GEMM [B * block * N, Ka] x [Ka, Kb]. ``block`` need not divide N (the
    last block is padded with dummy receivers, whose rows are dropped). The senders' tensors reach the block
    through :func:`repeat_over_receivers`, whose gradient avoids XLA:CPU's slow reduce over the receivers:
    measured on the paper's layer (H = 512, N = 128, batch 2, 2 CPU cores), that and not the blocking itself is
    what makes the backward faster (blocking alone: no gain; both: ~25 % less CPU time than the dense path).

    ``remat`` chooses what the backward pass keeps of each block (``jax.checkpoint`` policies): "dots" keeps the
    outputs of the per-edge matmuls and recomputes the cheap elementwise ops (3 matmuls per layer and step, as
    without blocking), "full" recomputes the whole block (4 matmuls), "none" keeps everything.
    """
    batch, nodes, _ = receiver.shape
    dim = h.shape[-1]
    block = min(block, nodes)
    n_blocks = -(-nodes // block)
    pad = n_blocks * block - nodes
    very_negative = jnp.asarray(jnp.finfo(receiver.dtype).min / 2, receiver.dtype)
    sender_mask = mask[:, None, :, None]  # [B, 1, N_j, 1]

    def one_block(r: Array) -> Array:  # r: [B, block, K1] -> [B, block, H]
        logits = r[:, :, None, :] + repeat_over_receivers(sender, block)  # [B, block, N_j, K1]
        for kernel, bias in layers:
            logits = nn.leaky_relu(logits, negative_slope)
            logits = jnp.dot(logits, kernel) + bias  # one GEMM: [B * block * N, Ka] x [Ka, Kb]
        logits = nn.leaky_relu(logits, negative_slope)
        logits = jnp.where(sender_mask, logits, very_negative)
        weights = jnp.exp(logits - jnp.max(logits, axis=2, keepdims=True))  # [B, block, N_j, K]
        heads = weights.shape[-1]
        values = repeat_over_receivers(h, block).reshape(batch, block, -1, heads, dim // heads)
        numerator = jnp.sum(weights[..., None] * values, axis=2).reshape(batch, -1, dim)
        normaliser = jnp.repeat(jnp.sum(weights, axis=2), dim // heads, axis=-1)
        return numerator / normaliser

    if remat == "dots":
        one_block = jax.checkpoint(one_block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    elif remat == "full":
        one_block = jax.checkpoint(one_block)
    elif remat != "none":
        raise ValueError(f"remat must be 'dots', 'full' or 'none', got {remat!r}")
    blocks = jnp.pad(receiver, ((0, 0), (0, pad), (0, 0))).reshape(batch, n_blocks, block, -1)
    out = jax.lax.map(one_block, jnp.swapaxes(blocks, 0, 1))  # [n_blocks, B, block, H]
    return jnp.swapaxes(out, 0, 1).reshape(batch, n_blocks * block, dim)[:, :nodes]


class _DenseParams(nn.Module):
    """The kernel and bias of an ``nn.Dense(features)`` on ``in_features`` inputs (same names, shapes and
    initialisers, so the same parameters), for code that applies them itself."""

    in_features: int
    features: int

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return kernel, bias


class VectorAttention(nn.Module):
    """One graph attention step with a vector-valued score per edge (paper appendix A).

    e_ij = LeakyReLU(MLP_logit([h_i, h_j])) has K components; a_ij = softmax_j(e_ij) per component, and
    h_i' = sum_j a_ij ⊙ h_j where component k weighs the k-th of K equal slices of h (K = H, the paper's
    choice: one score per dimension; K < H: K heads of H / K dimensions, which needs K / H of the memory).
    The first dense layer of MLP_logit acts on the concatenation [h_i, h_j] (width 2H); it equals
    W1 h_i + W2 h_j + b, so it is computed once per node (``receiver``, ``sender``: [B, N, K1]) and broadcast
    to the edges [B, N, N, K1] instead of materialising the concatenation per edge. The remaining layers of
    MLP_logit (if any) act per edge; they make the attention dynamic (the ranking of the senders depends on
    the receiver), which a single layer cannot: LeakyReLU(P_i + Q_j) is increasing in Q_j for every i. With a
    single-layer MLP_logit and K = H the edge tensor is not formed at all (:func:`leaky_relu_attention_sorted`);
    otherwise it is formed ``block`` receivers at a time (:func:`edge_mlp_attention_blocked`, same function and
    gradient up to rounding). ``dense`` asks for the reference path instead, the whole [B, N, N, K] at once.
    All paths have the same parameters.
    """

    logit_widths: Sequence[int]  # output widths of MLP_logit; the last, K, divides H
    negative_slope: float = 0.2
    dense: bool = False
    #: receivers per block of :func:`edge_mlp_attention_blocked` (multi-layer MLP_logit, not ``dense``)
    block: int = 8
    #: what the backward keeps of each block (:func:`edge_mlp_attention_blocked`)
    remat: str = "dots"

    @nn.compact
    def __call__(self, h: Float[Array, "B N H"], mask: Bool[Array, "B N"]) -> Float[Array, "B N H"]:
        batch, nodes, dim = h.shape
        heads = self.logit_widths[-1]
        first = self.logit_widths[0]
        receiver = nn.Dense(first, name="receiver")(h)  # W1 h_i + b
        sender = nn.Dense(first, use_bias=False, name="sender")(h)  # W2 h_j
        if len(self.logit_widths) == 1 and heads == dim and not self.dense:
            return leaky_relu_attention_sorted(receiver, sender, h, mask, self.negative_slope)
        if not self.dense:
            widths = list(zip(self.logit_widths[:-1], self.logit_widths[1:], strict=True))
            layers = [_DenseParams(a, b, name=f"edge_dense_{k}")() for k, (a, b) in enumerate(widths)]
            return edge_mlp_attention_blocked(
                receiver, sender, h, mask, layers, self.negative_slope, self.block, self.remat
            )
        logits = receiver[:, :, None, :] + sender[:, None, :, :]  # [B, N_i, N_j, K1] = Dense([h_i, h_j])
        for k, width in enumerate(self.logit_widths[1:]):
            logits = nn.leaky_relu(logits, self.negative_slope)
            logits = nn.Dense(width, name=f"edge_dense_{k}")(logits)
        logits = nn.leaky_relu(logits, self.negative_slope)
        attention = masked_softmax_over_senders(logits, mask)  # [B, N, N, K]
        if heads == dim:
            return aggregate(attention, h)
        sliced = h.reshape(batch, nodes, heads, dim // heads)
        return jnp.einsum("bijk,bjkd->bikd", attention, sliced).reshape(batch, nodes, dim)


class GAT(nn.Module):
    """Per-hit logits of the two-layer GAT: sigmoid(logit) is the weight w_i that the hit is the muon's.

    Layer 1: query MLP F -> ... -> H per node, then vector attention. Layer 2: identity query, vector
    attention with its own parameters, then the node update MLP H -> ... -> 1. Padded nodes neither send
    nor receive information that reaches a real node (their features are zeroed and their attention is
    exactly 0), so the outputs on real nodes do not depend on the padding, and the network is
    permutation-equivariant over nodes.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, features: Float[Array, "B N F"], mask: Bool[Array, "B N"]) -> Float[Array, "B N"]:
        cfg = self.config
        mask = mask.astype(bool)
        features = jnp.where(mask[..., None], features, 0)  # padding may hold anything, even NaN
        h = MLP(cfg.query_mlp, cfg.leaky_relu_slope, name="query")(features)
        attention = {
            "logit_widths": cfg.logit_mlp,
            "negative_slope": cfg.leaky_relu_slope,
            "dense": cfg.dense_attention,
            "block": cfg.attention_block,
        }
        for name in ("attention_1", "attention_2"):
            update = VectorAttention(**attention, name=name)(h, mask)
            h = h + update if cfg.residual else update
        logits = MLP(cfg.update_mlp, cfg.leaky_relu_slope, name="node_update")(h)[..., 0]
        return jnp.where(mask, logits, PADDING_LOGIT)
