"""Differentiable per-layer clustering of weighted hits (Coccaro et al., arXiv 2512.01647, section 3).

Given a weight w_i in [0, 1] per hit (the network's sigmoid output, or the truth labels), each layer l gets

    x_hat_l = sum_i w_i x_i / W_l          the muon position on the layer [mm]
    sigma_l = sqrt(sum_i w_i (x_i - x_hat_l)^2 / W_l), floored at pitch / sqrt(12)   its uncertainty [mm]
    W_l     = sum_i w_i                    the cluster weight

with the sums over the hits of layer l. The floor is the resolution of a single strip (a uniform
distribution over one pitch), so a one-strip cluster does not claim infinite precision.

Optional ``position_weights`` p_i replace w_i in x_hat and sigma (W_l stays sum_i w_i): the robust chain
(model.tracker) uses p_i = w_i * charge_i / charge_mean, the charge centroid of the selected strips, while
W_l keeps counting selected strips. A layer needs sum_i p_i >= EMPTY_POSITION_WEIGHT too (a fired strip holds
at least 1.15 % of the mean cluster charge, so p_i >= 0.0115 w_i), which bounds d x_hat / d p_i likewise.

The sums are element-wise products with a one-hot [N, L] layer matrix followed by a reduction over hits,
not a matmul: accelerators may run float32 matmuls at reduced (TF32/bf16) precision, which would cost
~1e-3 relative on x_hat, i.e. ~0.5 mm at the edge of the detector.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

#: a layer whose summed weight is below this is treated as empty (x_hat = 0, sigma = the floor); it keeps
#: the gradient of x_hat bounded (|d x_hat / d w_i| <= |x_i - x_hat| / EMPTY_LAYER_WEIGHT) and the fit
#: (model.fit.fit_track) gives such layers no weight
EMPTY_LAYER_WEIGHT = 1e-6
#: the same floor for the summed position weights (module docstring)
EMPTY_POSITION_WEIGHT = 1e-2 * EMPTY_LAYER_WEIGHT


def cluster_layers(
    x: Float[ArrayLike, " N"],
    layer: Int[ArrayLike, " N"],
    weights: Float[ArrayLike, " N"],
    n_layers: int,
    pitch: float | Float[ArrayLike, ""],
    position_weights: Float[ArrayLike, " N"] | None = None,
) -> tuple[Float[Array, " L"], Float[Array, " L"], Float[Array, " L"]]:
    """Weighted cluster position, spread and weight per layer for one event (vmap over events).

    Args:
        x: strip centre of each hit [mm], shape ``[N]``.
        layer: layer index of each hit, 0..n_layers-1, shape ``[N]``.
        weights: hit weight >= 0, shape ``[N]``; padding must have weight 0.
        n_layers: number of layers L (static).
        pitch: strip pitch [mm]; sigma is floored at pitch / sqrt(12).
        position_weights: weights >= 0 of x_hat and sigma, shape ``[N]`` (default: ``weights``).

    Returns:
        ``(x_hat, sigma, layer_weight)``, each of shape ``[L]`` (units mm, mm, hit weight). On a layer with
        ``layer_weight < EMPTY_LAYER_WEIGHT`` (no hit, or all weights ~0) x_hat is 0 and sigma the floor;
        values and gradients stay finite.
    """
    x = jnp.asarray(x)
    dtype = jnp.result_type(x.dtype, jnp.asarray(weights).dtype, jnp.float32)
    x = x.astype(dtype)
    weights = jnp.asarray(weights, dtype)
    onehot = (jnp.asarray(layer)[:, None] == jnp.arange(n_layers)[None, :]).astype(dtype)  # [N, L]

    layer_weight = jnp.sum(weights[:, None] * onehot, axis=0)  # [L]
    if position_weights is None:
        position_weights = weights
    weighted = jnp.asarray(position_weights, dtype)[:, None] * onehot  # [N, L]: p_i on its own layer's column
    position_total = jnp.sum(weighted, axis=0)
    has_weight = (layer_weight >= EMPTY_LAYER_WEIGHT) & (position_total >= EMPTY_POSITION_WEIGHT)
    safe_weight = jnp.where(has_weight, position_total, 1)
    x_hat = jnp.where(has_weight, jnp.sum(weighted * x[:, None], axis=0) / safe_weight, 0)

    # spread around the layer's own x_hat (centred sums: no cancellation of large second moments)
    deviation = x[:, None] - x_hat[None, :]  # [N, L]
    variance = jnp.where(has_weight, jnp.sum(weighted * deviation * deviation, axis=0) / safe_weight, 0)
    floor = jnp.asarray(pitch, dtype) / jnp.sqrt(jnp.asarray(12.0, dtype))
    sigma = jnp.sqrt(jnp.maximum(variance, floor * floor))
    return x_hat, sigma, layer_weight
