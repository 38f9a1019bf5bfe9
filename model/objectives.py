"""Objectives: what each ``--model`` does between the GAT logits and the loss, and the registry of them.

An :class:`Objective` says how a model trains (its loss of the logits), which hit weights it hands to the
reconstruction at inference, and which report rows it gives (``reported_as``). ``baseline`` trains on BCE only
(lambda = 0 throughout; the pT loss through the robust chain is computed on stopped gradients, for monitoring)
and is reported with both reconstruction chains (model.tracker) as ``baseline`` and ``baseline_paper``;
``e2e`` trains on BCE + lambda * L_pT through the robust chain, ``e2e_paper`` through the paper's, with
lambda = 0 for ``lambda_warmup_epochs`` and ``lambda_pt`` afterwards. The ``assignment`` model selects one hard
window per layer (model.assignment).

The share models (``share_baseline``, ``share_e2e``) are the same network with another target: its sigmoid output
s_i is the muon's share of strip i's charge, trained by the cross-entropy against the truth share
``charge_muon / charge`` (pipeline.batches.truth_share_expr) instead of the 0/1 label. Through the robust chain,
whose cluster positions are charge centroids weighted by the hit weight (Σ w q x / Σ w q), the weight s_i makes
the muon's estimated charge s_i q_i the strip's weight: a strip of a merged cluster keeps the muon's part of its
charge instead of all or none of it. ``share_baseline`` trains on the share alone (lambda = 0), ``share_e2e`` adds
lambda * L_pT through the robust chain.

The names come from pipeline.registry, the one registry of model names: the objectives registered here are
exactly its trained models, with the rows it names (checked at import).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from model.assignment import DEFAULT_ESTIMATOR, Estimator, assignment_loss, hard_hit_weights
from model.hyperparameters import TrainConfig
from model.losses import bce_loss, composite_loss, reconstructed_pt_loss
from model.tracker import ASSIGNMENT_CHAIN, PAPER_CHAIN, ROBUST_CHAIN, Chain
from pipeline import registry
from pipeline.batches import Batch, Geometry
from pipeline.errors import ConfigError

#: a loss: (logits [B, N], batch, geometry, lam [], key) -> (loss, {"bce": [], "pt_loss": [], "q_over_pt": [B]})
LossFn = Callable[[jax.Array, Batch, Geometry, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
#: hit weights for clustering and fit: (logits [B, N], batch, geometry) -> weights [B, N] in [0, 1]
HitWeightsFn = Callable[[jax.Array, Batch, Geometry], jax.Array]

#: the optional loss terms an objective may report in its aux dict (None in the metrics where it does not)
OPTIONAL_TERMS = ("hamming", "selected_layers")


@dataclass(frozen=True)
class Objective:
    """How one ``--model`` trains, what hit weights it hands to the reconstruction, and what it reports."""

    name: str
    #: (logits, batch, geometry, lam, key) -> (loss, {"bce", "pt_loss", "q_over_pt"})
    loss_fn: LossFn
    hit_weights: HitWeightsFn
    #: False: lambda = 0 in every epoch (the pT term never drives training)
    uses_lambda: bool
    #: the prediction rows of a trained run: (model name, reconstruction chain); the first is the chain the
    #: model trains through (or, for a model trained on BCE alone, validates with)
    reported_as: tuple[tuple[str, Chain], ...]
    #: for objectives that differentiate through a solver: the same objective with another gradient estimator
    with_estimator: Callable[[Estimator], Objective] | None = None
    #: the loss is the BCE of the logits and nothing else reaches them (the train step then takes the BCE's
    #: gradient from the loss's instead of computing it a second time)
    bce_only: bool = False
    #: the BCE's targets are the truth shares of the strips' charge (``batch.share``) instead of the labels
    share_target: bool = False

    def targets(self, batch: Batch) -> jax.Array:
        """The BCE's per-hit targets of ``batch``: the labels, or the truth shares of a share model."""
        return batch.share if self.share_target else batch.label

    @property
    def chain(self) -> Chain:
        return self.reported_as[0][1]

    def lam(self, epoch: int, train_config: TrainConfig) -> float:
        """lambda of 1-based ``epoch``: 0 for the first ``lambda_warmup_epochs``, then ``lambda_pt``."""
        if not self.uses_lambda or epoch <= train_config.lambda_warmup_epochs:
            return 0.0
        return float(train_config.lambda_pt)


def sigmoid_weights(logits: jax.Array, batch: Batch, geometry: Geometry) -> jax.Array:
    """Per-hit weight w_i = sigmoid(logit_i), zero on padding."""
    del geometry
    return jnp.where(batch.mask, jax.nn.sigmoid(logits), 0.0)


def end_to_end_loss(logits, batch, geometry, lam, key, *, chain: Chain, share_target: bool = False):
    """BCE + lam * L_pT through ``chain`` (paper eq. for the composite loss); the BCE against the truth shares
    with ``share_target``."""
    del key
    return composite_loss(logits, batch, geometry, lam, chain, batch.share if share_target else batch.label)


def baseline_loss(logits, batch, geometry, lam, key, *, chain: Chain, share_target: bool = False):
    """BCE only; L_pT through ``chain`` is evaluated on stopped gradients, so it is logged but never trained on."""
    del lam, key
    bce = bce_loss(logits, batch.share if share_target else batch.label, batch.mask)
    weights = jax.nn.sigmoid(jax.lax.stop_gradient(jnp.asarray(logits)))
    momentum, q_over_pt = reconstructed_pt_loss(weights, batch, geometry, chain)
    return bce, {"bce": bce, "pt_loss": momentum, "q_over_pt": q_over_pt}


def network_objective(
    name: str, *, trained_end_to_end: bool, reported_as: tuple[tuple[str, Chain], ...], share_target: bool = False
) -> Objective:
    """A GAT whose sigmoid scores are the hit weights: trained on BCE (+ lam * L_pT through its first chain),
    against the labels, or against the truth shares with ``share_target``."""
    loss = end_to_end_loss if trained_end_to_end else baseline_loss
    return Objective(
        name,
        functools.partial(loss, chain=reported_as[0][1], share_target=share_target),
        sigmoid_weights,
        uses_lambda=trained_end_to_end,
        reported_as=reported_as,
        bce_only=not trained_end_to_end,
        share_target=share_target,
    )


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> None:
    """Make ``objective.name`` trainable with model.train.train_run (and usable by inference)."""
    OBJECTIVES[objective.name] = objective


def get_objective(name: str, estimator: Estimator | None = None) -> Objective:
    """The registered objective of a model name (with ``estimator`` where it has a solver); ConfigError for
    an unknown model."""
    if name in OBJECTIVES:
        objective = OBJECTIVES[name]
        if estimator is not None and objective.with_estimator is not None:
            return objective.with_estimator(estimator)
        return objective
    raise ConfigError(f"unknown model {name!r} (known: {', '.join(OBJECTIVES)})")


@functools.cache
def assignment_objective(estimator: Estimator = DEFAULT_ESTIMATOR) -> Objective:
    """The ``assignment`` model (Kortus et al.): one hard window per layer, the gradient through the solver by
    ``estimator`` (model.assignment). Its selection is reconstructed with the robust chain. One instance per
    estimator, so a train step compiled for it is reused."""
    return Objective(
        "assignment",
        functools.partial(assignment_loss, estimator=estimator),
        hard_hit_weights,
        uses_lambda=True,
        reported_as=(("assignment", ASSIGNMENT_CHAIN),),
        with_estimator=assignment_objective,
    )


# the factorised baseline is one network reported with both chains; each end-to-end model is trained through
# its own chain (docs/contracts.md, "The `model` column")
register_objective(
    network_objective(
        "baseline", trained_end_to_end=False, reported_as=(("baseline", ROBUST_CHAIN), ("baseline_paper", PAPER_CHAIN))
    )
)
register_objective(network_objective("e2e", trained_end_to_end=True, reported_as=(("e2e", ROBUST_CHAIN),)))
register_objective(network_objective("e2e_paper", trained_end_to_end=True, reported_as=(("e2e_paper", PAPER_CHAIN),)))
register_objective(assignment_objective())
register_objective(
    network_objective(
        "share_baseline", trained_end_to_end=False, reported_as=(("share_baseline", ROBUST_CHAIN),), share_target=True
    )
)
register_objective(
    network_objective(
        "share_e2e", trained_end_to_end=True, reported_as=(("share_e2e", ROBUST_CHAIN),), share_target=True
    )
)


def _check_registry() -> None:
    """The objectives are pipeline.registry's trained models, in its order, each with the rows it names."""
    if tuple(OBJECTIVES) != registry.TRAINED_MODELS:
        raise AssertionError(f"objectives {tuple(OBJECTIVES)} != pipeline.registry's {registry.TRAINED_MODELS}")
    for name, objective in OBJECTIVES.items():
        rows, named = tuple(row for row, _ in objective.reported_as), registry.get_model(name).rows
        if rows != named:
            raise AssertionError(f"objective {name} reports {rows}, pipeline.registry names {named}")


_check_registry()
