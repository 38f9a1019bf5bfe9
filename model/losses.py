"""Training losses: hit classification (BCE) and the momentum term through the differentiable fit.

Coccaro et al. (arXiv 2512.01647, section 3): L = BCE(w, y) + lambda * L_pT, lambda = 0 in the first epochs
(BCE only), then 0.5. The baseline is the same network trained with lambda = 0 throughout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool, Float

from model.tracker import PAPER_CHAIN, Chain, event_inputs, reconstruct_event
from pipeline.batches import Batch, Geometry
from pipeline.schema import STATUS_OK

#: residual unit of the pT loss: a 10 % error on q/pT costs 0.5 (the BCE of a decent classifier is ~0.1-0.3)
PT_LOSS_SCALE = 0.1
#: beyond this many units (i.e. a 10 % error) the penalty grows linearly, with a bounded gradient
PT_LOSS_DELTA = 1.0
#: what an event whose fit failed costs (model.fit status != 0), and the most any event costs: the Huber
#: penalty of |r| = 10. Without it an empty selection would be a way out: a failed fit returns q/pT ~ 0,
#: i.e. r = -1, which costs 9.5, less than a poor fit with |r| > 1
FAILED_FIT_LOSS = PT_LOSS_DELTA * (10.0 / PT_LOSS_SCALE - 0.5 * PT_LOSS_DELTA)


#: the most an event's pT penalty may pass back to its hit weights: the L2 norm over the event's hits of
#: d(penalty) / d(weights) is scaled down to this when larger (:func:`reconstructed_pt_loss`). A merged strip moves
#: its cluster by tenths of a millimetre and q/pT by about a percent, so an honest event gradient is of order one;
#: through a near-degenerate fit (a layer fading out of the gates, a fit of almost empty layers) single events
#: reach 1e6-1e13, also in float64, and one such event dominated the e2e training step (gradient norm 1e11-1e16 at
#: four times the background: benchmarks/gradient_probe.py, docs/studies.md). Per-example clipping, as in
#: differentially private SGD; the forward value is untouched.
EVENT_GRADIENT_CAP = 10.0


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
    cap: float = EVENT_GRADIENT_CAP,
) -> tuple[Array, dict[str, Array]]:
    """BCE(hits) + lam * L_pT(``chain``'s fit of the hits weighted by sigmoid(logits)).

    The BCE's targets are ``targets`` in [0, 1] (default: the labels, ``batch.label``; the share models give the
    truth shares, ``batch.share``); ``cap`` bounds each event's pT gradient (:func:`reconstructed_pt_loss`).

    Returns ``(loss, {"bce", "pt_loss", "q_over_pt"})``, ``q_over_pt`` the reconstructed value per event. The
    pT term is differentiated through the reconstruction chain (model.tracker) back to the logits. With
    ``lam = 0`` its gradient contribution is exactly 0 (the fit's gradients are finite), so the gradient is
    the BCE gradient alone; the term is still evaluated, so ``pt_loss`` can be logged during the warm-up.
    """
    bce = bce_loss(logits, batch.label if targets is None else targets, batch.mask)
    momentum, q_over_pt = reconstructed_pt_loss(jax.nn.sigmoid(jnp.asarray(logits)), batch, geometry, chain, cap)
    return bce + lam * momentum, {"bce": bce, "pt_loss": momentum, "q_over_pt": q_over_pt}


def event_penalty(
    q_over_pt_pred: Float[ArrayLike, ...],
    q_true: Float[ArrayLike, ...],
    pt_true: Float[ArrayLike, ...],
    fit_ok: Bool[ArrayLike, ...],
) -> Array:
    """One event's term of :func:`pt_loss` (elementwise): the Huber penalty of its relative q/pT residual, capped
    at, and for a failed fit equal to, :data:`FAILED_FIT_LOSS`."""
    residual = jnp.asarray(q_over_pt_pred) * jnp.asarray(pt_true) * jnp.asarray(q_true) - 1
    penalty = jnp.minimum(optax.huber_loss(residual / PT_LOSS_SCALE, delta=PT_LOSS_DELTA), FAILED_FIT_LOSS)
    return jnp.where(jnp.asarray(fit_ok, bool), penalty, FAILED_FIT_LOSS)


@functools.cache
def _capped_event_penalty(geometry: Geometry, chain: Chain, cap: float):
    """``(weights, x, layer, charge, q, pt) -> (penalty, q/pT)`` of one event through ``chain``, whose gradient in
    ``weights`` is that of the penalty with its L2 norm scaled down to ``cap`` when larger, and zero when not finite
    (the reconstruction's finite-gradient guard, model.tracker.finite_gradient_guard). One function per
    (geometry, chain, cap), so the jitted steps that use it compile once."""

    def penalty_of(weights, x, layer, charge, q, pt):
        fit = reconstruct_event(weights, x, layer, charge, geometry, chain)[3]
        return event_penalty(fit.q_over_pt, q, pt, fit.status == STATUS_OK), fit.q_over_pt

    @jax.custom_vjp
    def capped(weights, x, layer, charge, q, pt):
        return penalty_of(weights, x, layer, charge, q, pt)

    def forward(weights, x, layer, charge, q, pt):
        out, pullback = jax.vjp(lambda w: penalty_of(w, x, layer, charge, q, pt), weights)
        return out, pullback

    def backward(pullback, cotangents):
        penalty_cotangent, q_over_pt_cotangent = cotangents
        # the gradient of the penalty itself (unit cotangent), capped, then scaled by what flows in
        (gradient,) = pullback((jnp.ones_like(penalty_cotangent), jnp.zeros_like(q_over_pt_cotangent)))
        gradient = jnp.where(jnp.all(jnp.isfinite(gradient)), gradient, 0)
        norm = jnp.sqrt(jnp.sum(gradient * gradient))
        factor = jnp.where(norm > cap, cap / jnp.where(norm > 0, norm, 1), 1)
        return (penalty_cotangent * factor * gradient, None, None, None, None, None)

    capped.defvjp(forward, backward)
    return capped


def reconstructed_pt_loss(
    weights: Float[ArrayLike, "B N"],
    batch: Batch,
    geometry: Geometry,
    chain: Chain,
    cap: float = EVENT_GRADIENT_CAP,
) -> tuple[Array, Array]:
    """``(L_pT, q/pT [B])`` of ``chain``'s fit of the hits weighted by ``weights``; a failed fit costs
    :data:`FAILED_FIT_LOSS`. The same value as :func:`pt_loss` of model.tracker.reconstruct's fit; its gradient in
    ``weights`` passes at most ``cap`` (L2 norm over an event's hits) of each event's penalty gradient
    (:data:`EVENT_GRADIENT_CAP`; ``math.inf``: the plain gradient, less the non-finite ones)."""
    event_mask = jnp.asarray(batch.event_mask, bool)
    weights, x, layer, charge = event_inputs(weights, batch)
    dtype = x.dtype
    # padded events may hold pT = 0 or NaN: replace them before any arithmetic, so no NaN reaches a gradient
    q = jnp.where(event_mask, jnp.asarray(batch.q, dtype), 1)
    pt = jnp.where(event_mask, jnp.asarray(batch.pt, dtype), 1)
    penalty, q_over_pt = jax.vmap(_capped_event_penalty(geometry, chain, float(cap)))(weights, x, layer, charge, q, pt)
    momentum = jnp.sum(jnp.where(event_mask, penalty, 0)) / jnp.maximum(jnp.sum(event_mask), 1)
    return momentum, q_over_pt
