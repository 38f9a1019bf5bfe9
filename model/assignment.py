"""Per-layer hard hit selection with blackbox-differentiated combinatorics (the ``assignment`` model).

Kortus, Keidel, Gauger, *Exploring End-to-end Differentiable Neural Charged Particle Tracking -- A Loss
Landscape Perspective* (arXiv 2407.13420) make tracking end-to-end differentiable by letting a network score
candidates, solving a linear assignment problem per detector layer exactly in the forward pass, and
differentiating through the solver with the blackbox method of Vlastelica et al. (*Differentiation of
Blackbox Combinatorial Solvers*, ICLR 2020).

The combinatorial problem for our muon. A muon leaves one cluster of ~4 contiguous strips per layer, so the
natural hard decision is *which contiguous window of strips is the muon's cluster on each layer*, not an
independent yes/no per strip (that would just be thresholding, with no combinatorial structure) nor a
one-to-one matching (there is a single track). The candidate set of layer ``l`` is every window of
``|x_j - x_c| <= half_width`` around a fired strip ``c`` of that layer, plus the empty selection. Given
per-hit scores ``w`` (the GAT logits), the solver maximises the linear objective ``<w, y>`` over those
indicator vectors ``y`` — independently per layer, exactly, by enumeration (``N`` windows of ``N`` hits,
the same ``N x N`` cost as one attention layer). A layer whose best window has a negative summed score is
left empty, so layers the muon missed (outside the acceptance) need not pick up noise.

Backward (``mode="blackbox"``): with ``g = dL/dy`` the solver is called again on ``w' = w - lam * g`` and
``dL/dw = (y(w) - y(w')) / lam`` (the maximisation form of Vlastelica et al.'s ``-(y - y_lam)/lam`` for
``argmin``). ``lam`` (the interpolation strength; Kortus et al. found 25-75 useful) trades the informativeness
of the gradient against its faithfulness to the true piecewise-constant loss. ``mode="straight_through"`` uses
the identity ``dL/dw = g`` instead. Both are ``jax.custom_vjp`` rules and work under ``jit`` and ``vmap``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

#: a score no real window reaches: used to keep padded candidates out of the argmax
_NEG = -1e30


def window_membership(
    x: Float[Array, " N"], layer: Int[Array, " N"], mask: Bool[Array, " N"], half_width: float
) -> Float[Array, "N N"]:
    """``M[c, j] = 1`` when hit ``j`` lies in the window centred on hit ``c`` (same layer, ``|x_j-x_c| <= hw``)."""
    same_layer = layer[:, None] == layer[None, :]
    close = jnp.abs(x[:, None] - x[None, :]) <= half_width
    real = mask[:, None] & mask[None, :]
    return (same_layer & close & real).astype(jnp.float32)


def solve_windows(
    scores: Float[Array, " N"],
    x: Float[Array, " N"],
    layer: Int[Array, " N"],
    mask: Bool[Array, " N"],
    n_layers: int,
    half_width: float,
) -> Float[Array, " N"]:
    """Exact per-layer maximisation of ``<scores, y>`` over windows (or nothing); returns ``y`` in {0, 1}."""
    membership = window_membership(x, layer, mask, half_width)  # [C, N]
    window_score = membership @ jnp.where(mask, scores, 0.0)  # [C]
    window_score = jnp.where(mask, window_score, _NEG)
    layer_onehot = (layer[:, None] == jnp.arange(n_layers)[None, :]) & mask[:, None]  # [C, L]
    per_layer = jnp.where(layer_onehot, window_score[:, None], _NEG)  # [C, L]
    best = jnp.argmax(per_layer, axis=0)  # [L]: the best window of each layer
    best_score = jnp.max(per_layer, axis=0)  # [L]
    take = best_score > 0.0  # an empty layer, or one whose best window scores <= 0, selects nothing
    chosen = jnp.where(take[:, None], membership[best], 0.0)  # [L, N]
    return jnp.clip(chosen.sum(axis=0), 0.0, 1.0)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def select_hits(
    scores: Float[Array, " N"],
    x: Float[Array, " N"],
    layer: Int[Array, " N"],
    mask: Bool[Array, " N"],
    n_layers: int,
    half_width: float,
    lam: float,
    mode: str,
) -> Float[Array, " N"]:
    """Hard per-layer window selection with a blackbox (or straight-through) gradient w.r.t. ``scores``."""
    return solve_windows(scores, x, layer, mask, n_layers, half_width)


def _select_fwd(scores, x, layer, mask, n_layers, half_width, lam, mode):
    y = solve_windows(scores, x, layer, mask, n_layers, half_width)
    return y, (scores, x, layer, mask, y)


def _select_bwd(n_layers, half_width, lam, mode, residuals, g):
    scores, x, layer, mask, y = residuals
    if mode == "straight_through":
        grad = g
    elif mode == "blackbox":
        y_perturbed = solve_windows(scores - lam * g, x, layer, mask, n_layers, half_width)
        grad = (y - y_perturbed) / lam
    else:
        raise ValueError(f"unknown assignment gradient mode {mode!r}")
    grad = jnp.where(mask, grad, 0.0)
    # x, layer and mask are inputs of the problem, not decisions: no gradient flows to them
    return grad, jnp.zeros_like(x), None, None


select_hits.defvjp(_select_fwd, _select_bwd)

#: ``select_hits`` over a batch: scores, x, layer, mask of shape [B, N]
select_hits_batch = jax.vmap(select_hits, in_axes=(0, 0, 0, 0, None, None, None, None))


# ---- the `assignment` model's objective ------------------------------------------------------------------


def hard_hit_weights(
    logits: Float[Array, "B N"], batch, geometry, *, half_width_pitch: float, interpolation: float, mode: str
) -> Float[Array, "B N"]:
    """Per-hit weights in {0, 1}: the hits of the best window of each layer (the forward pass of the solver)."""
    return select_hits_batch(
        logits,
        batch.x,
        batch.layer,
        batch.mask,
        len(geometry.layer_y),
        half_width_pitch * geometry.pitch,
        interpolation,
        mode,
    )


def assignment_loss(
    logits, batch, geometry, lam, key, *, half_width_pitch: float, interpolation: float, mode: str
) -> tuple[Array, dict[str, Array]]:
    """BCE(logits) + lam * L_pT(fit of the hard per-layer selection), the pT term differentiated blackbox-wise.

    The BCE keeps the scores calibrated as hit probabilities (and gives the ROC); the pT term reaches the
    logits only through the solver's blackbox gradient, i.e. by changing which window each layer picks.
    """
    from model.fit import STATUS_OK
    from model.losses import bce_loss, pt_loss
    from model.tracker import reconstruct

    del key
    weights = hard_hit_weights(
        logits, batch, geometry, half_width_pitch=half_width_pitch, interpolation=interpolation, mode=mode
    )
    reco = reconstruct(weights, batch, geometry)
    bce = bce_loss(logits, batch.label, batch.mask)
    momentum = pt_loss(reco.q_over_pt, batch.q, batch.pt, batch.event_mask, reco.status == STATUS_OK)
    return bce + lam * momentum, {"bce": bce, "pt_loss": momentum, "q_over_pt": reco.q_over_pt}
