"""Differentiable track reconstruction from per-hit weights: clustering per layer, then the circle fit.

Two chains share this code (:class:`Chain`):

- the **paper chain** (Coccaro et al., arXiv 2512.01647, section 3; :data:`PAPER_CHAIN`): one weighted mean
  per layer with the hit weights, then the Kasa circle fit. Every hit of a layer pulls its cluster by
  w x distance, so a background strip a centimetre away with w = 0.3 moves the cluster by millimetres;
- the **robust chain** (:data:`ROBUST_CHAIN`): the same start, then K reweighting steps of a differentiable
  deterministic annealing filter, the unrolled form of GenFit's DAF (Fruhwirth & Strandlie, Comput. Phys.
  Commun. 120 (1999) 197). In step k every hit's weight becomes its prior weight times its soft assignment
  to the current track in its layer,

      u_i = w_i * sigmoid((c^2 - (d_i / s_k)^2) / 2) = w_i * phi_i / (phi_i + phi_cut),

  with d_i = x_i - x_fit(layer_i) the residual to the fitted circle, phi = exp(-d^2 / 2 s_k^2) and the null
  (outlier) term phi_cut = exp(-c^2 / 2): a hit ``c`` widths away keeps half its weight, one much further
  keeps none, and a layer with nothing near the track ends up empty (W_l -> 0 fades it out of the fit).
  The widths s_k anneal from the centimetres of a bad first fit to a fraction of a millimetre. Then the
  layer is re-clustered with u (positions optionally weighted by u x charge: the charge centroid of the
  selected strips) and refitted (Hyper: unbiased on our short arcs).

  The hit-level steps cannot go below the size of a cluster (4 strips, 2 mm): a narrower window would trim a
  clean cluster's edge strips towards the current fit and bias its centroid. What they cannot see is a
  cluster into which an extra track's charge merged: its strips all lie near the track, but its centroid is
  off by tenths of a millimetre, against the 0.006 mm of a clean one. So the chain ends with cluster-level
  steps, GenFit's DAF over the layers' clusters: each layer's weight is multiplied by the soft assignment
  of its cluster's residual r_l = x_hat_l - x_fit(l) at widths t_k annealed down to the resolution of a
  clean centroid (0.03 mm, the classical DAF's point resolution), with the same null term, so a merged
  cluster fades out of the fit (the hit widths stay at their last value). Nothing is stopped: the gradient
  runs from q/pT through every fit and every assignment back to the prior weights.

The paper chain is the robust chain with no reweighting step (and no charge weighting, Kasa); with one
infinitely wide step the robust chain returns the paper chain's clusters, and an infinitely wide
cluster-level step is a hit-level step (tested). The same function serves
the end-to-end training (w = sigmoid of the logits), the factorised baseline (applied after training), the
``truth`` reference (w = the truth labels, paper chain) and ``truth_charge`` (labels x charge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from model.cluster import EMPTY_LAYER_WEIGHT, cluster_layers
from model.fit import FIT_METHODS, TrackFit, fit_track
from model.scattering_fit import ScatteringFit, scattering_fit
from pipeline.batches import Batch, Geometry
from pipeline.config import PT_PER_TESLA_METRE


@dataclass(frozen=True)
class Chain:
    """How hit weights become a track (hashable: a static argument under jit)."""

    #: circle fit of the clusters: "kasa" (the paper) or "hyper" (model.fit)
    fit: str = "kasa"
    #: residual widths s_k [mm] of the reweighting steps, in order; () is the paper chain
    widths: tuple[float, ...] = ()
    #: the null term: a hit this many widths from the track keeps half of its weight
    cut: float = 3.0
    #: cluster positions weighted by weight x charge (the charge centroid) instead of the weight alone
    charge_weighted: bool = False
    #: widths t_k of the cluster-level steps that follow the hit-level ones, in order: each layer's cluster is
    #: kept with its soft assignment to the current track (a DAF over clusters, the null term as for hits); ()
    #: is none. In mm (the residual to the circle) for a circle-fit chain, in units of the pull (the residual to
    #: the track fitted without the layer, over its standard deviation with scattering) with ``scattering_fit``
    layer_widths: tuple[float, ...] = ()
    #: the cluster-level steps and the final fit are the scattering-aware fit (model.scattering_fit, General
    #: Broken Lines, point error: the detector's clean-cluster resolution ``Geometry.point_sigma``); the hit-level
    #: steps keep the circle fit. False: circle fits only
    scattering_fit: bool = False

    @property
    def steps(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(hit widths, cluster widths) of every step: the hit-level steps with no cluster gate (width inf),
        then the cluster-level steps, which keep the last hit width."""
        if not self.widths and not self.layer_widths:
            return ()
        last = self.widths[-1] if self.widths else math.inf
        hit = (*self.widths, *(last,) * len(self.layer_widths))
        cluster = (*(math.inf,) * len(self.widths), *self.layer_widths)
        return hit, cluster

    def __post_init__(self) -> None:
        if self.fit not in FIT_METHODS:
            raise ValueError(f"unknown circle fit {self.fit!r} (known: {', '.join(FIT_METHODS)})")
        if not all(w > 0 for w in (*self.widths, *self.layer_widths)):
            raise ValueError(f"reweighting widths must be > 0, got {self.widths!r}, {self.layer_widths!r}")
        if not self.cut > 0:
            raise ValueError(f"the null-term cut must be > 0, got {self.cut!r}")


#: Coccaro et al.'s reconstruction: weighted mean per layer, Kasa fit
PAPER_CHAIN = Chain()
#: the default for `baseline` and `e2e`: five annealed hit-level steps with the Hyper circle fit, then five
#: cluster-level steps with the scattering-aware fit, gating each layer on its pull down to a width of 2 (with
#: the cut of 2.5 a layer 5 sigma off keeps half of its weight: the outlier cut of the issue-23 study), charge
#: centroids. The hit-level cut was chosen on the validation split (benchmarks/reconstruction_study.py)
ROBUST_CHAIN = Chain(
    fit="hyper",
    widths=(20.0, 5.0, 2.0, 1.0, 0.5),
    cut=2.5,
    charge_weighted=True,
    layer_widths=(30.0, 10.0, 5.0, 3.0, 2.0),
    scattering_fit=True,
)
#: the robust chain before the scattering-aware fit (cluster-level steps on the Hyper circle down to 0.03 mm),
#: kept for the ablation
ROBUST_CIRCLE_CHAIN = Chain(
    fit="hyper",
    widths=(20.0, 5.0, 2.0, 1.0, 0.5),
    cut=2.5,
    charge_weighted=True,
    layer_widths=(1.0, 0.3, 0.1, 0.05, 0.03),
)
#: `assignment` (Kortus et al.) keeps the circle chain it was studied with: through the scattering-aware chain its
#: estimators behave otherwise (measured in the test of 30 steps: identity no longer diverges once the pT term is
#: on), and its study must be redone before it moves
ASSIGNMENT_CHAIN = ROBUST_CIRCLE_CHAIN


class Reconstruction(NamedTuple):
    """Clusters and track parameters of a batch (JAX arrays)."""

    x_hat: Float[Array, "B L"]  # cluster position per layer [mm] (0 on empty layers)
    sigma: Float[Array, "B L"]  # cluster spread [mm], >= pitch / sqrt(12)
    layer_weight: Float[Array, "B L"]  # summed hit weight per layer
    radius: Float[Array, " B"]  # radius of curvature [mm] (of the unscattered circle with the scattering fit)
    pt: Float[Array, " B"]  # [GeV]
    q: Float[Array, " B"]  # +1.0 / -1.0
    q_over_pt: Float[Array, " B"]  # signed, smooth [1/GeV]
    status: Int[Array, " B"]  # pipeline.schema.STATUS_* (0: ok)
    hit_weight: Float[Array, "B N"]  # the weight of each hit in the final clusters (0 on padding)
    x_fit: Float[Array, "B L"]  # the final fit's crossing of each layer [mm] (TrackEstimate.x_fit)


@jax.custom_vjp
def finite_gradient_guard(event_weights: Float[Array, " N"]) -> Float[Array, " N"]:
    """Identity whose backward pass zeroes an event's whole weight gradient when any entry is not finite.

    The safety net of the reconstruction: a degenerate event (all but one layer empty, a fit through two
    points) has no useful q/pT gradient, and under vmap a 0 * inf deep inside such a fit was seen to give
    NaN (one event in a few hundred batches at initialisation), which would poison the whole optimiser step.
    Finite gradients pass unchanged.
    """
    return event_weights


def _guard_fwd(event_weights):
    return event_weights, None


def _guard_bwd(_, cotangent):
    return (jnp.where(jnp.all(jnp.isfinite(cotangent)), cotangent, 0),)


finite_gradient_guard.defvjp(_guard_fwd, _guard_bwd)


def soft_assignment(residual: Float[ArrayLike, " N"], width: float, cut: float) -> Float[Array, " N"]:
    """phi / (phi + phi_cut) with phi = exp(-residual^2 / 2 width^2), phi_cut = exp(-cut^2 / 2), in (0, 1).

    Written as a sigmoid of (cut^2 - (residual / width)^2) / 2: no underflow of phi far from the track, and a
    finite gradient everywhere.
    """
    pull = jnp.asarray(residual) / width
    return jax.nn.sigmoid(0.5 * (cut * cut - pull * pull))


class TrackEstimate(NamedTuple):
    """What a chain's final fit gives for one event (scalars and ``[L]``; batched by vmap): the common part of
    model.fit.TrackFit and model.scattering_fit.ScatteringFit."""

    pt: Float[Array, ...]  # [GeV]
    q: Float[Array, ...]  # +1.0 / -1.0
    q_over_pt: Float[Array, ...]  # [1/GeV], signed, smooth
    radius: Float[Array, ...]  # radius of curvature [mm]
    status: Int[Array, ...]  # pipeline.schema.STATUS_*
    x_fit: Float[Array, "... L"]  # the fitted track's crossing of each layer [mm]


def _circle_estimate(fit: TrackFit) -> TrackEstimate:
    return TrackEstimate(fit.pt, fit.q, fit.q_over_pt, fit.radius, fit.status, fit.x_fit)


def _scattering_estimate(fit: ScatteringFit, b_field: float) -> TrackEstimate:
    radius = 1e3 * fit.pt / (PT_PER_TESLA_METRE * abs(b_field))  # pT [GeV] = 0.3 B [T] R [m]
    return TrackEstimate(fit.pt, fit.q, fit.q_over_pt, radius, fit.status, fit.x_fit)


def reconstruct_event(
    weights: Float[ArrayLike, " N"],
    x: Float[ArrayLike, " N"],
    layer: Int[ArrayLike, " N"],
    charge: Float[ArrayLike, " N"],
    geometry: Geometry,
    chain: Chain = PAPER_CHAIN,
) -> tuple[Float[Array, " L"], Float[Array, " L"], Float[Array, " L"], TrackEstimate, Float[Array, " N"]]:
    """One event through ``chain``: ``(x_hat, sigma, layer_weight, TrackEstimate, final hit weights)``.

    ``charge`` is in units of the mean cluster charge (``Batch.features[..., 2]``); it only matters with
    ``chain.charge_weighted``. Padding must carry weight 0. Computes in float32, or in float64 when
    ``weights`` or ``x`` is float64 (under ``jax.enable_x64``).
    """
    dtype = jnp.result_type(jnp.asarray(weights).dtype, jnp.asarray(x).dtype, jnp.float32)
    weights = jnp.asarray(weights, dtype)
    x = jnp.asarray(x, dtype)
    layer = jnp.asarray(layer, jnp.int32)
    layer_y = jnp.asarray(geometry.layer_y, dtype)
    n_layers = len(geometry.layer_y)
    charge = jnp.asarray(charge, dtype)

    def cluster(hit_weights):
        positions = hit_weights * charge if chain.charge_weighted else None
        return cluster_layers(x, layer, hit_weights, n_layers, geometry.pitch, positions)

    def cluster_and_fit(hit_weights):
        x_hat, sigma, layer_weight = cluster(hit_weights)
        fit = fit_track(x_hat, layer_y, layer_weight, sigma, geometry.b_field, method=chain.fit)
        return x_hat, sigma, layer_weight, fit

    def reweight(state, widths):
        hit_width, layer_width = widths
        x_hat, fit = state[0], state[3]
        assignment = soft_assignment(x - jnp.take(fit.x_fit, layer), hit_width, chain.cut)
        # a hit-level step has no cluster gate (an infinite width: exactly 1, and no NaN in its gradient)
        gate = jnp.where(jnp.isinf(layer_width), 1.0, soft_assignment(x_hat - fit.x_fit, layer_width, chain.cut))
        hit_weights = weights * assignment * jnp.take(gate, layer)
        return (*cluster_and_fit(hit_weights), hit_weights), None

    state = (*cluster_and_fit(weights), weights)
    if not chain.scattering_fit:
        if chain.steps:
            # a scan, not a Python loop: the step is compiled once, whatever K (an unrolled K = 5 chain took
            # minutes to compile inside the training step)
            state, _ = jax.lax.scan(reweight, state, jnp.asarray(chain.steps, dtype).T)
        x_hat, sigma, layer_weight, fit, hit_weights = state
        return x_hat, sigma, layer_weight, _circle_estimate(fit), hit_weights

    # the scattering-aware chain: the hit-level steps on the circle, then the cluster-level steps and the final
    # fit with the broken-lines fit
    if chain.widths:
        hit_steps = jnp.asarray([chain.widths, [math.inf] * len(chain.widths)], dtype).T
        state, _ = jax.lax.scan(reweight, state, hit_steps)
    material = {"x_over_x0": geometry.x_over_x0, "x_min": geometry.x_min, "x_max": geometry.x_max}

    def scattering(x_hat, layer_weight, gate):
        # a layer's fit weight is its cluster's summed hit weight, capped at 1 (a whole cluster is one
        # measurement of the detector's point resolution), times its gate; 0 on an empty layer, whose x_hat is a
        # placeholder
        fit_weight = jnp.where(layer_weight >= EMPTY_LAYER_WEIGHT, jnp.minimum(layer_weight, 1), 0) * gate
        return scattering_fit(x_hat, layer_y, fit_weight, geometry.point_sigma, geometry.b_field, **material)

    x_hat, sigma, layer_weight, _, hit_weights = state
    state = (x_hat, sigma, layer_weight, scattering(x_hat, layer_weight, 1.0), hit_weights)

    def layer_step(state, pull_width):
        fit = state[3]
        # the hits keep the last hit-level step's assignment, now to the broken line (none without such steps)
        assignment = (
            soft_assignment(x - jnp.take(fit.x_fit, layer), chain.widths[-1], chain.cut) if chain.widths else 1.0
        )
        gate = soft_assignment(fit.pull, pull_width, chain.cut)
        # the gate scales a layer's hits alike: it leaves the cluster's position as it is and acts on its weight
        x_hat, sigma, layer_weight = cluster(weights * assignment)
        final_weights = weights * assignment * jnp.take(gate, layer)
        return (x_hat, sigma, layer_weight * gate, scattering(x_hat, layer_weight, gate), final_weights), None

    if chain.layer_widths:
        state, _ = jax.lax.scan(layer_step, state, jnp.asarray(chain.layer_widths, dtype))
    x_hat, sigma, layer_weight, fit, hit_weights = state
    return x_hat, sigma, layer_weight, _scattering_estimate(fit, geometry.b_field), hit_weights


def event_inputs(
    hit_weights: Float[ArrayLike, "B N"], batch: Batch
) -> tuple[Float[Array, "B N"], Float[Array, "B N"], Int[Array, "B N"], Float[Array, "B N"]]:
    """``(weights, x, layer, charge)`` of a batch as :func:`reconstruct_event` takes them (vmap over events): 0 on
    padded nodes whatever they hold, float32 or float64 as ``hit_weights`` and ``batch.x``, ``charge`` in units of
    the mean cluster charge (``Batch.features[..., 2]``)."""
    mask = jnp.asarray(batch.mask, bool)
    dtype = jnp.result_type(jnp.asarray(hit_weights).dtype, jnp.asarray(batch.x).dtype, jnp.float32)
    weights = jnp.where(mask, jnp.asarray(hit_weights, dtype), 0)
    x = jnp.where(mask, jnp.asarray(batch.x, dtype), 0)
    layer = jnp.where(mask, jnp.asarray(batch.layer, jnp.int32), 0)
    charge = jnp.where(mask, jnp.asarray(batch.features, dtype)[..., 2], 0)
    return weights, x, layer, charge


def reconstruct(
    hit_weights: Float[ArrayLike, "B N"], batch: Batch, geometry: Geometry, chain: Chain = PAPER_CHAIN
) -> Reconstruction:
    """Cluster every layer with ``hit_weights`` (>= 0, shape ``[B, N]``) and fit each event's track.

    Padded nodes (``batch.mask`` False) get weight 0 whatever ``hit_weights`` holds there. Differentiable
    in ``hit_weights``; jit with ``geometry`` static or as an argument (only its length is used statically),
    ``chain`` static.
    """
    weights, x, layer, charge = event_inputs(hit_weights, batch)
    x_hat, sigma, layer_weight, fit, final_weights = jax.vmap(
        lambda w, xs, ls, cs: reconstruct_event(finite_gradient_guard(w), xs, ls, cs, geometry, chain)
    )(weights, x, layer, charge)
    return Reconstruction(
        x_hat=x_hat,
        sigma=sigma,
        layer_weight=layer_weight,
        radius=fit.radius,
        pt=fit.pt,
        q=fit.q,
        q_over_pt=fit.q_over_pt,
        status=fit.status,
        hit_weight=final_weights,
        x_fit=fit.x_fit,
    )
