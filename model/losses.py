"""Training losses: hit classification (BCE) and the momentum term through the differentiable fit.

Coccaro et al. (arXiv 2512.01647, section 3): L = BCE(w, y) + lambda * L_pT, lambda = 0 in the first epochs
(BCE only), then 0.5. The baseline is the same network trained with lambda = 0 throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool, Float

from model.fit import STATUS_OK
from model.tracker import PAPER_CHAIN, Chain, reconstruct
from pipeline.batches import Batch, Geometry

#: residual unit of the pT loss: a 10 % error on q/pT costs 0.5 (the BCE of a decent classifier is ~0.1-0.3)
PT_LOSS_SCALE = 0.1
#: beyond this many units (i.e. a 10 % error) the penalty grows linearly, with a bounded gradient
PT_LOSS_DELTA = 1.0
#: what an event whose fit failed costs (model.fit status != 0), and the most any event costs: the Huber
#: penalty of |r| = 10. Without it an empty selection would be a way out: a failed fit returns q/pT ~ 0,
#: i.e. r = -1, which costs 9.5, less than a poor fit with |r| > 1
FAILED_FIT_LOSS = PT_LOSS_DELTA * (10.0 / PT_LOSS_SCALE - 0.5 * PT_LOSS_DELTA)


def bce_loss(logits: Float[ArrayLike, "B N"], labels: Float[ArrayLike, "B N"], mask: Bool[ArrayLike, "B N"]) -> Array:
    """Mean binary cross-entropy over the real hits (``mask``) of the batch, computed from logits.

    ``labels`` may be soft (in [0, 1]: the share targets); the cross-entropy is then minimal at
    sigmoid(logit) = label, a proper loss for a probability or a fraction.
    """
    mask = jnp.asarray(mask, bool)
    per_hit = optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.float32))
    return jnp.sum(jnp.where(mask, per_hit, 0)) / jnp.maximum(jnp.sum(mask), 1)


def pt_loss(
    q_over_pt_pred: Float[ArrayLike, " B"],
    q_true: Float[ArrayLike, " B"],
    pt_true: Float[ArrayLike, " B"],
    event_mask: Bool[ArrayLike, " B"],
    fit_ok: Bool[ArrayLike, " B"] | None = None,
    *,
    scale: float = PT_LOSS_SCALE,
    delta: float = PT_LOSS_DELTA,
    failed: float = FAILED_FIT_LOSS,
) -> Array:
    """Mean Huber penalty of the relative q/pT residual over the real events (``event_mask``).

    r = (q/pT)_pred / (q/pT)_true - 1 = (q/pT)_pred * pT_true * q_true - 1, the residual whose width is the
    figure of merit (docs/contracts.md, "Metric definitions"), and L_pT = mean(huber(r / scale, delta)). Why this form:

    - relative, not absolute: sigma(pT) grows like pT^2, so an absolute pT (or q/pT) loss would weight the
      20-50 GeV range unevenly; r is dimensionless and comparable across it;
    - on q/pT, not pT: it is smooth through the straight line (model.fit), a wrong charge costs r = -2
      instead of a pole, and garbage fits at initialisation (tiny circles, q/pT of a few 1/GeV, r ~ 100)
      stay finite;
    - Huber: quadratic for |r| < delta * scale (a least-squares fit of the resolution), linear beyond, so the
      gradient per event is bounded by delta / scale and a few garbage fits cannot swamp the batch.

    - capped at ``failed``, the cost of an event whose fit failed (``fit_ok`` False): no event costs more
      than a failed fit, so dropping hits until the fit fails never lowers the loss (a failed fit's q/pT is
      ~0, r = -1, which the Huber term alone would price at only 9.5); beyond the cap (|r| > 10 for the
      defaults) an event passes no gradient, as garbage fits carry no useful direction anyway.

    Events with a failed fit still count (only ``event_mask`` removes events).
    """
    event_mask = jnp.asarray(event_mask, bool)
    # padded events may hold pT = 0 or NaN: replace them before any arithmetic, so no NaN reaches a gradient
    pt_true = jnp.where(event_mask, jnp.asarray(pt_true), 1)
    q_true = jnp.where(event_mask, jnp.asarray(q_true), 1)
    q_over_pt_pred = jnp.where(event_mask, jnp.asarray(q_over_pt_pred), 1)
    residual = q_over_pt_pred * pt_true * q_true - 1
    penalty = jnp.minimum(optax.huber_loss(residual / scale, delta=delta), failed)
    if fit_ok is not None:
        penalty = jnp.where(jnp.asarray(fit_ok, bool), penalty, failed)
    return jnp.sum(jnp.where(event_mask, penalty, 0)) / jnp.maximum(jnp.sum(event_mask), 1)


def composite_loss(
    logits: Float[ArrayLike, "B N"],
    batch: Batch,
    geometry: Geometry,
    lam: float | Float[ArrayLike, ""],
    chain: Chain = PAPER_CHAIN,
    targets: Float[ArrayLike, "B N"] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """BCE(hits) + lam * L_pT(``chain``'s fit of the hits weighted by sigmoid(logits)).

    The BCE's targets are ``targets`` in [0, 1] (default: the labels, ``batch.label``; the share models give the
    truth shares, ``batch.share``).

    Returns ``(loss, {"bce", "pt_loss", "q_over_pt"})``, ``q_over_pt`` the reconstructed value per event. The
    pT term is differentiated through the reconstruction chain (model.tracker) back to the logits. With
    ``lam = 0`` its gradient contribution is exactly 0 (the fit's gradients are finite), so the gradient is
    the BCE gradient alone; the term is still evaluated, so ``pt_loss`` can be logged during the warm-up.
    """
    bce = bce_loss(logits, batch.label if targets is None else targets, batch.mask)
    momentum, q_over_pt = reconstructed_pt_loss(jax.nn.sigmoid(jnp.asarray(logits)), batch, geometry, chain)
    return bce + lam * momentum, {"bce": bce, "pt_loss": momentum, "q_over_pt": q_over_pt}


def reconstructed_pt_loss(
    weights: Float[ArrayLike, "B N"], batch: Batch, geometry: Geometry, chain: Chain
) -> tuple[Array, Array]:
    """``(L_pT, q/pT [B])`` of ``chain``'s fit of the hits weighted by ``weights``; a failed fit costs
    :data:`FAILED_FIT_LOSS`."""
    reco = reconstruct(weights, batch, geometry, chain)
    momentum = pt_loss(reco.q_over_pt, batch.q, batch.pt, batch.event_mask, reco.status == STATUS_OK)
    return momentum, reco.q_over_pt
