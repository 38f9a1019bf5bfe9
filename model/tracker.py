"""Differentiable track reconstruction from per-hit weights: clustering per layer, then the circle fit.

Coccaro et al. (arXiv 2512.01647, section 3): the same function serves the end-to-end training (weights =
sigmoid of the network's logits), the factorised baseline (clustering and fit applied after training),
the ``truth`` reference (weights = the truth labels) and ``truth_charge`` (labels times strip charge: the
charge centroid).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from model.cluster import cluster_layers
from model.fit import fit_track
from pipeline.batches import Batch, Geometry


class Reconstruction(NamedTuple):
    """Clusters and track parameters of a batch (JAX arrays)."""

    x_hat: Float[Array, "B L"]  # cluster position per layer [mm] (0 on empty layers)
    sigma: Float[Array, "B L"]  # cluster spread [mm], >= pitch / sqrt(12)
    layer_weight: Float[Array, "B L"]  # summed hit weight per layer
    xc: Float[Array, " B"]  # centre of the fitted circle [mm]
    yc: Float[Array, " B"]  # [mm]
    radius: Float[Array, " B"]  # [mm]
    pt: Float[Array, " B"]  # [GeV]
    q: Float[Array, " B"]  # +1.0 / -1.0
    q_over_pt: Float[Array, " B"]  # signed, smooth [1/GeV]
    status: Int[Array, " B"]  # model.fit.STATUS_* (0: ok)


def reconstruct(hit_weights: Float[ArrayLike, "B N"], batch: Batch, geometry: Geometry) -> Reconstruction:
    """Cluster every layer with ``hit_weights`` (>= 0, shape ``[B, N]``) and fit each event's track.

    Padded nodes (``batch.mask`` False) get weight 0 whatever ``hit_weights`` holds there. Differentiable
    in ``hit_weights``; jit with ``geometry`` static or as an argument (only its length is used statically).
    """
    mask = jnp.asarray(batch.mask, bool)
    weights = jnp.where(mask, jnp.asarray(hit_weights, jnp.float32), 0)
    x = jnp.where(mask, jnp.asarray(batch.x, jnp.float32), 0)
    layer = jnp.where(mask, jnp.asarray(batch.layer, jnp.int32), 0)
    n_layers = len(geometry.layer_y)
    x_hat, sigma, layer_weight = jax.vmap(cluster_layers, in_axes=(0, 0, 0, None, None))(
        x, layer, weights, n_layers, geometry.pitch
    )
    layer_y = jnp.asarray(geometry.layer_y, jnp.float32)
    fit = jax.vmap(fit_track, in_axes=(0, None, 0, 0, None))(x_hat, layer_y, layer_weight, sigma, geometry.b_field)
    return Reconstruction(
        x_hat=x_hat,
        sigma=sigma,
        layer_weight=layer_weight,
        xc=fit.xc,
        yc=fit.yc,
        radius=fit.radius,
        pt=fit.pt,
        q=fit.q,
        q_over_pt=fit.q_over_pt,
        status=fit.status,
    )
