"""The ``assignment`` model: one hard window of strips per layer, differentiated through the solver.

Kortus, Keidel, Gauger, *Exploring End-to-end Differentiable Neural Charged Particle Tracking -- A Loss
Landscape Perspective* (arXiv 2407.13420) let a network score candidates, solve a linear assignment problem
per detector layer exactly in the forward pass, and differentiate through the solver.

The combinatorial problem for our muon. A muon leaves one cluster of ~4 contiguous strips per layer, so the
hard decision is *which window of strips is the muon's cluster on each layer*. The candidates of layer
``l`` are the windows ``|x_j - x_c| <= half_width`` centred on each fired strip ``c`` of that layer. A hit's
cost is bounded, ``c_j = 1 - sigmoid(logit_j)`` in [0, 1] (Kortus et al.), and a window costs
``C_w = sum_{j in w} (c_j - 1/2)``: a hit the network believes in (p > 1/2) makes its window cheaper, any
other hit dearer, so the window centred on the muon's cluster beats one on its edge. Each layer also has a
"no hit" option of fixed cost ``NO_HIT_COST`` = 1/4, so a layer whose hits the network all rejects can keep
none; it is not free, or the network could learn to choose it everywhere (every fit failing). Per layer
that has hits the solver takes the cheapest choice: exactly one, never nothing. Its output is a one-hot
``z`` over the candidates of each layer; the selected hits are ``y = z @ M`` with ``M`` the candidates'
membership.

Gradient estimators (``Estimator.kind``), all for ``dL/dC`` given ``g = dL/dz``:

- ``blackbox``: Kortus et al.'s form of Vlastelica et al. (*Differentiation of Blackbox Combinatorial
  Solvers*, ICLR 2020). Re-solve at ``C' = C + lambda * g`` and return ``z(C') - z(C)``, without
  Vlastelica's ``1/lambda``, so each entry is -1, 0 or +1 per event, reduced like the loss terms (a mean over
  the batch's events and each event's hits). ``lambda`` scales ``g`` of one event's loss (the batch mean's
  cotangent times the batch size); it flips only choices whose cost gap is smaller than ``lambda * |g|``.
- ``identity``: Sahoo et al. (*Backpropagation through Combinatorial Algorithms: Identity with Projection
  Works*, ICLR 2023): the solver runs on costs projected per layer (mean subtracted, divided by their RMS
  floored at ``PROJECTION_FLOOR``),
  which changes no choice, and the backward pass is the negative identity ``dL/dC~ = -g``. The projection's
  own Jacobian removes the directions (all costs up, all costs scaled) along which costs collapse.
- ``perturbed``: Berthet et al. (*Learning with Differentiable Perturbed Optimizers*, NeurIPS 2020) through
  ``optax.perturbations.make_perturbed_fun``: ``z`` is the mean one-hot of the argmax of ``-C + sigma * Z``
  over ``samples`` draws (Gumbel noise: in expectation the softmax of ``-C / sigma`` per layer), with the
  score-function gradient, per event.

At inference every estimator selects the same way: the exact cheapest choice per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int
from optax import perturbations

from model.hyperparameters import ESTIMATORS, NOISES, TrainConfig
from model.losses import bce_loss, reconstructed_pt_loss
from model.tracker import ASSIGNMENT_CHAIN

#: the window half-width in strip pitches: a window of up to 5 strips holds the muon's ~4-strip cluster
HALF_WIDTH_PITCH = 2.0
#: the cost of a hit is 1 - p; a window's cost counts each hit as c - HIT_PRICE (hits with p > 1/2 lower it)
HIT_PRICE = 0.5
#: the fixed cost of a layer's "no hit" option: not free, so a window of one doubtful hit (p > 1/4) still
#: beats it, but a layer of hits the network rejects keeps none of them
NO_HIT_COST = 0.25
#: the smallest spread of a layer's window costs the identity estimator's projection divides by (a tenth of a
#: hit's cost range)
PROJECTION_FLOOR = 0.1
#: the noise distributions of the perturbed estimator (by TrainConfig.perturbation_noise)
NOISE_DISTRIBUTIONS = {"gumbel": perturbations.Gumbel, "normal": perturbations.Normal}
if tuple(NOISE_DISTRIBUTIONS) != NOISES:  # the names are pipeline.registry's (TrainConfig checks against them)
    raise AssertionError(f"NOISE_DISTRIBUTIONS {tuple(NOISE_DISTRIBUTIONS)} != pipeline.registry.NOISES {NOISES}")


@dataclass(frozen=True)
class Estimator:
    """How the gradient passes the per-layer solver (the module docstring gives the three forms)."""

    kind: str = "blackbox"
    #: blackbox: the interpolation strength lambda, applied to one event's dL/dz
    interpolation: float = 30.0
    #: perturbed: draws per event, noise scale (in units of window cost) and noise distribution
    samples: int = 32
    sigma: float = 0.5
    noise: str = "gumbel"

    @classmethod
    def from_train_config(cls, config: TrainConfig) -> Estimator:
        return cls(
            kind=config.estimator,
            interpolation=config.solver_lambda,
            samples=config.perturbation_samples,
            sigma=config.perturbation_sigma,
            noise=config.perturbation_noise,
        )


#: TrainConfig's defaults
DEFAULT_ESTIMATOR = Estimator()


# ---- the solver -------------------------------------------------------------------------------------------


def window_membership(
    x: Float[Array, " N"], layer: Int[Array, " N"], mask: Bool[Array, " N"], half_width: float
) -> Float[Array, "N N"]:
    """``M[c, j] = 1`` when hit ``j`` lies in the window centred on hit ``c`` (same layer, ``|x_j-x_c| <= hw``)."""
    same_layer = layer[:, None] == layer[None, :]
    close = jnp.abs(x[:, None] - x[None, :]) <= half_width
    real = mask[:, None] & mask[None, :]
    return (same_layer & close & real).astype(jnp.float32)


def hit_costs(logits: Float[Array, "*B N"]) -> Float[Array, "*B N"]:
    """Bounded hit costs ``1 - sigmoid(logit)`` in [0, 1] (Kortus et al.)."""
    return 1.0 - jax.nn.sigmoid(logits)


def window_costs(
    costs: Float[Array, " N"], membership: Float[Array, "N N"], mask: Bool[Array, " N"]
) -> Float[Array, " N"]:
    """``C_w = sum_{j in w} (c_j - HIT_PRICE)`` for the window centred on each hit; 0 on padding."""
    return jnp.where(mask, membership @ jnp.where(mask, costs - HIT_PRICE, 0.0), 0.0)


def _layer_onehot(layer: Int[Array, " N"], mask: Bool[Array, " N"], n_layers: int) -> Bool[Array, "N L"]:
    return (layer[:, None] == jnp.arange(n_layers)[None, :]) & mask[:, None]


def solve(
    costs: Float[Array, " N"], layer: Int[Array, " N"], mask: Bool[Array, " N"], n_layers: int
) -> Float[Array, " N"]:
    """One-hot per layer: the cheapest candidate of each layer that has one (ties: the first); 0 elsewhere."""
    onehot = _layer_onehot(layer, mask, n_layers)  # [N, L]
    best = jnp.argmin(jnp.where(onehot, costs[:, None], jnp.inf), axis=0)  # [L]
    chosen = (jnp.arange(costs.shape[0])[:, None] == best[None, :]) & onehot.any(axis=0)[None, :]
    return chosen.any(axis=1).astype(jnp.float32)


#: :func:`solve` over a batch: costs, layer, mask of shape [B, N]
solve_batch = jax.vmap(solve, in_axes=(0, 0, 0, None))


def project_costs(
    costs: Float[Array, " N"],
    layer: Int[Array, " N"],
    mask: Bool[Array, " N"],
    n_layers: int,
    eps: float = PROJECTION_FLOOR,
) -> Float[Array, " N"]:
    """Sahoo et al.'s projection per layer: ``(C - mean) / sqrt(rms^2 + eps^2)`` over the layer's candidates.

    ``eps`` bounds the Jacobian by ``1 / eps``: on a layer whose candidates cost nearly the same, dividing by
    their RMS alone would multiply the incoming gradient by millions (seen: gradient norms of 2e6)."""
    onehot = _layer_onehot(layer, mask, n_layers).astype(costs.dtype)  # [N, L]
    count = jnp.maximum(onehot.sum(axis=0), 1.0)  # [L]
    mean = (onehot * costs[:, None]).sum(axis=0) / count
    centred = costs - onehot @ mean
    scale = jnp.sqrt((onehot * centred[:, None] ** 2).sum(axis=0) / count + eps**2)
    # padded entries have no layer (scale 0): divide them by 1, or the masked 0/0 poisons the gradient
    return jnp.where(mask, centred / jnp.where(mask, onehot @ scale, 1.0), 0.0)


# ---- gradient estimators ----------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def blackbox_solve(
    costs: Float[Array, "B N"],
    layer: Int[Array, "B N"],
    mask: Bool[Array, "B N"],
    n_layers: int,
    lam: float,  # noqa: ARG001 (used by the backward pass)
) -> Float[Array, "B N"]:
    """:func:`solve_batch` with Kortus et al.'s blackbox gradient ``z(C + lam * B * g) - z(C)``, over ``B`` and
    each event's number of hits."""
    return solve_batch(costs, layer, mask, n_layers)


def _blackbox_fwd(costs, layer, mask, n_layers, lam):  # noqa: ARG001 (custom_vjp's signature)
    z = solve_batch(costs, layer, mask, n_layers)
    return z, (costs, layer, mask, z)


def _blackbox_bwd(n_layers, lam, residuals, g):
    costs, layer, mask, z = residuals
    n_events = costs.shape[0]
    # g is the cotangent of the batch mean: times the batch size it is one event's dL/dz
    shifted = solve_batch(costs + lam * n_events * g, layer, mask, n_layers)
    # the +-1 entries are reduced like the BCE and Hamming terms, a mean over the batch's events and each
    # event's hits; unreduced, they outweighed the BCE's gradient 13-fold and drove every cost to a tie
    n_hits = jnp.maximum(mask.sum(axis=1, keepdims=True), 1)
    return jnp.where(mask, (shifted - z) / (n_events * n_hits), 0.0), None, None


blackbox_solve.defvjp(_blackbox_fwd, _blackbox_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def identity_solve(
    costs: Float[Array, "B N"], layer: Int[Array, "B N"], mask: Bool[Array, "B N"], n_layers: int
) -> Float[Array, "B N"]:
    """:func:`solve_batch` with the negative-identity backward pass ``dL/dC = -g`` (Sahoo et al.)."""
    return solve_batch(costs, layer, mask, n_layers)


def _identity_fwd(costs, layer, mask, n_layers):
    return solve_batch(costs, layer, mask, n_layers), mask


def _identity_bwd(n_layers, mask, g):  # noqa: ARG001 (custom_vjp's signature)
    return jnp.where(mask, -g, 0.0), None, None


identity_solve.defvjp(_identity_fwd, _identity_bwd)


def perturbed_solve(
    costs: Float[Array, "B N"],
    layer: Int[Array, "B N"],
    mask: Bool[Array, "B N"],
    n_layers: int,
    key: Array,
    *,
    samples: int,
    sigma: float,
    noise: str,
) -> Float[Array, "B N"]:
    """The mean one-hot of the per-layer argmax of ``-C + sigma * Z`` (Berthet et al., via optax), per event.

    One smoothed solver per event: the score-function gradient of a candidate also holds the outcomes of the
    event's other layers, which average to 0. A solver per layer would remove them, but draws the noise of
    all ``N`` candidates once per layer: 16 times the random numbers, which made an epoch 10 times slower.
    """

    def one_event(event_costs, event_layer, event_mask, event_key):
        def argmax(scores):
            return solve(-scores, event_layer, event_mask, n_layers)

        smoothed = perturbations.make_perturbed_fun(argmax, samples, sigma, NOISE_DISTRIBUTIONS[noise]())
        return smoothed(event_key, jnp.where(event_mask, -event_costs, 0.0))

    keys = jax.random.split(key, costs.shape[0])
    return jax.vmap(one_event)(costs, layer, mask, keys)


def select_windows(
    costs: Float[Array, "B N"],
    layer: Int[Array, "B N"],
    mask: Bool[Array, "B N"],
    n_layers: int,
    estimator: Estimator,
    key: Array,
) -> Float[Array, "B N"]:
    """The solver's one-hot ``z`` over window candidates, differentiable by ``estimator``."""
    if estimator.kind == "blackbox":
        return blackbox_solve(costs, layer, mask, n_layers, estimator.interpolation)
    if estimator.kind == "identity":
        projected = jax.vmap(project_costs, in_axes=(0, 0, 0, None))(costs, layer, mask, n_layers)
        return identity_solve(projected, layer, mask, n_layers)
    if estimator.kind == "perturbed":
        return perturbed_solve(
            costs,
            layer,
            mask,
            n_layers,
            key,
            samples=estimator.samples,
            sigma=estimator.sigma,
            noise=estimator.noise,
        )
    raise ValueError(f"unknown gradient estimator {estimator.kind!r} (known: {', '.join(ESTIMATORS)})")


# ---- the `assignment` model's objective ------------------------------------------------------------------


class Candidates(NamedTuple):
    """The choices of every layer: the window centred on each hit, then one "no hit" option per layer."""

    membership: Float[Array, "B C N"]  # hits of each candidate (none for a "no hit" option)
    costs: Float[Array, "B C"]
    layer: Int[Array, "B C"]
    mask: Bool[Array, "B C"]  # real candidates: windows of real hits, "no hit" on layers that have hits


def candidates(logits: Float[Array, "B N"], batch, geometry) -> Candidates:
    """The ``C = N + L`` candidates of each event: ``N`` windows, then the ``L`` layers' "no hit" options."""
    n_events, n_layers = logits.shape[0], geometry.n_layers
    membership = jax.vmap(window_membership, in_axes=(0, 0, 0, None))(
        batch.x, batch.layer, batch.mask, HALF_WIDTH_PITCH * geometry.pitch
    )  # [B, N, N]
    costs = jax.vmap(window_costs)(hit_costs(logits), membership, batch.mask)  # [B, N]
    has_hits = jax.vmap(_layer_onehot, in_axes=(0, 0, None))(batch.layer, batch.mask, n_layers).any(axis=1)
    return Candidates(
        membership=jnp.concatenate([membership, jnp.zeros((n_events, n_layers, logits.shape[1]))], axis=1),
        costs=jnp.concatenate([costs, jnp.full((n_events, n_layers), NO_HIT_COST, costs.dtype)], axis=1),
        layer=jnp.concatenate(
            [batch.layer, jnp.broadcast_to(jnp.arange(n_layers, dtype=batch.layer.dtype), (n_events, n_layers))],
            axis=1,
        ),
        mask=jnp.concatenate([batch.mask, has_hits], axis=1),
    )


def selected_hits(z: Float[Array, "B C"], membership: Float[Array, "B C N"]) -> Float[Array, "B N"]:
    """``y = z @ M``: the hits of the chosen window of each layer (windows of a layer never overlap another's)."""
    return jnp.einsum("bc,bcn->bn", z, membership)


def hard_hit_weights(logits: Float[Array, "B N"], batch, geometry) -> Float[Array, "B N"]:
    """Per-hit weights in {0, 1}: the hits of each layer's cheapest choice (what inference uses)."""
    choices = candidates(logits, batch, geometry)
    z = solve_batch(choices.costs, choices.layer, choices.mask, geometry.n_layers)
    return selected_hits(z, choices.membership)


def hamming_loss(
    selection: Float[Array, "B N"], labels: Float[Array, "B N"], mask: Bool[Array, "B N"], event_mask
) -> Array:
    """Mean over events of the share of an event's hits decided wrongly, ``y (1 - t) + (1 - y) t``."""
    wrong = jnp.where(mask, selection * (1.0 - labels) + (1.0 - selection) * labels, 0.0)
    per_event = wrong.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1)
    return jnp.sum(jnp.where(event_mask, per_event, 0.0)) / jnp.maximum(jnp.sum(event_mask), 1)


def assignment_loss(logits, batch, geometry, lam, key, *, estimator: Estimator) -> tuple[Array, dict[str, Array]]:
    """BCE(logits) + Hamming(selection, truth) + lam * L_pT(robust fit of the selected hits).

    The BCE trains the scores as hit probabilities (and gives the ROC). The Hamming and pT terms reach the
    logits only through ``estimator``'s gradient of the per-layer solver. Aux: ``bce``, ``pt_loss``,
    ``q_over_pt``, ``hamming`` and ``selected_layers`` (the share of layers with hits that chose a window).
    """
    choices = candidates(logits, batch, geometry)
    z = select_windows(choices.costs, choices.layer, choices.mask, geometry.n_layers, estimator, key)
    selection = selected_hits(z, choices.membership)
    momentum, q_over_pt = reconstructed_pt_loss(selection, batch, geometry, ASSIGNMENT_CHAIN)
    bce = bce_loss(logits, batch.label, batch.mask)
    hamming = hamming_loss(selection, batch.label, batch.mask, batch.event_mask)
    # the share of (event, layer) with hits whose choice is a window, not "no hit"
    n_hits = logits.shape[1]
    windows = jax.vmap(_layer_onehot, in_axes=(0, 0, None))(batch.layer, batch.mask, geometry.n_layers)
    chose_window = jnp.einsum("bn,bnl->bl", z[:, :n_hits], windows.astype(z.dtype))  # [B, L]
    has_hits = windows.any(axis=1) & batch.event_mask[:, None]
    selected_layers = jnp.sum(jnp.where(has_hits, chose_window, 0.0)) / jnp.maximum(jnp.sum(has_hits), 1)
    loss = bce + hamming + lam * momentum
    return loss, {
        "bce": bce,
        "pt_loss": momentum,
        "q_over_pt": q_over_pt,
        "hamming": hamming,
        "selected_layers": selected_layers,
    }
