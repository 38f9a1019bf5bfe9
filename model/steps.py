"""The train state and the pure jitted steps (Flax ``examples/ogbg_molpcba`` style).

:func:`create_train_state` builds a ``TrainState``; :func:`train_step` is a pure jitted
``(state, batch, key, lam) -> (state, metrics)``; ``lam`` (the weight of the pT term) is a traced scalar, so the
lambda schedule never recompiles. :func:`eval_step` gives a batch's loss terms and each event's q/pT.

Everything random is derived from ``(seed, epoch, step)``, never from consumed state: the init key from the
seed, each epoch's data order from ``(seed, epoch)`` (:func:`epoch_shuffle_seed`) and each step's key by folding
``epoch`` and the step index into the seed's key (:func:`step_key`). The learning-rate schedule reads the
optimiser's step count (checkpointed), not the planned number of epochs.

Data parallel (:class:`DataParallel`): the same jitted steps run on every local device at once when their inputs
are placed on a 1-D mesh over the batch axis: the train state replicated, each batch split along its events
(``NamedSharding(mesh, PartitionSpec("batch"))``). ``jit`` compiles the steps for the shardings of their inputs,
so each device runs the network on its share of the events and the compiler sums the losses and gradients
across devices (the outputs, the updated state included, come back replicated). A batch whose size the device
count does not divide is padded with padding events (``event_mask`` False), which no loss term or metric
counts, so the loss stays a mean over the real events. With one device the steps get their inputs exactly as
before, so the results are bit for bit those of the single-device code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.assignment import DEFAULT_ESTIMATOR, Estimator
from model.hyperparameters import ModelConfig, TrainConfig
from model.losses import bce_loss
from model.networks import GAT
from model.objectives import OPTIONAL_TERMS, get_objective
from pipeline.batches import Batch, Geometry


class TrainState(train_state.TrainState):
    """Flax TrainState plus what the loss needs that is not an array (static under jit)."""

    geometry: Geometry = struct.field(pytree_node=False)
    objective: str = struct.field(pytree_node=False)
    #: the gradient estimator of objectives with a solver (TrainConfig.estimator and its options)
    estimator: Estimator = struct.field(pytree_node=False, default=DEFAULT_ESTIMATOR)


@functools.cache
def learning_rate_schedule(train_config: TrainConfig) -> optax.Schedule:
    """The learning rate of the optimiser step with 0-based count ``n``: constant, or halving every
    ``lr_half_life_steps`` (the schedule :func:`make_optimizer` hands to Adam; metrics.parquet reads it)."""
    if train_config.lr_half_life_steps:
        return optax.exponential_decay(
            train_config.learning_rate, transition_steps=train_config.lr_half_life_steps, decay_rate=0.5
        )
    return optax.constant_schedule(train_config.learning_rate)


@functools.cache
def make_optimizer(train_config: TrainConfig) -> optax.GradientTransformation:
    """Adam after clipping the global gradient norm; the learning rate halves every ``lr_half_life_steps``.

    The schedule reads the optimiser's own step count (part of the checkpointed state), never the number of
    epochs planned, so resuming or extending a run does not change it. Cached per config: the optimiser is a
    static part of the TrainState, and the same object lets ``train_step`` reuse its compiled programs.
    """
    # a constant rate goes to Adam as a number, as it always did: a schedule would add a step count to the
    # optimiser state (and so to the checkpoints) for nothing
    learning_rate: float | optax.Schedule = train_config.learning_rate
    if train_config.lr_half_life_steps:
        learning_rate = learning_rate_schedule(train_config)
    parts = []
    if train_config.grad_clip and train_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train_config.grad_clip))
    parts.append(optax.adam(learning_rate))
    return optax.chain(*parts)


def example_batch(batch_size: int, n_nodes: int, n_layers: int) -> Batch:
    """An all-padding batch of the given shape (for initialising parameters and benchmarks)."""
    zeros = np.zeros((batch_size, n_nodes), np.float32)
    return Batch(
        features=np.zeros((batch_size, n_nodes, 4), np.float32),
        x=zeros,
        y=zeros,
        layer=np.zeros((batch_size, n_nodes), np.int32),
        charge=zeros,
        mask=np.zeros((batch_size, n_nodes), bool),
        label=zeros,
        share=zeros,
        hit_id=np.full((batch_size, n_nodes), -1, np.int32),
        event_id=np.full(batch_size, -1, np.int64),
        pt=np.ones(batch_size, np.float32),
        q=np.ones(batch_size, np.float32),
        x_true=np.full((batch_size, n_layers), np.nan, np.float32),
        event_mask=np.zeros(batch_size, bool),
    )


@functools.cache
def gat(model_config: ModelConfig) -> GAT:
    """The GAT of a config, one instance per config (its ``apply`` is static under jit: equal => no retrace)."""
    return GAT(model_config)


def init_params(key: jax.Array, model_config: ModelConfig, example: Batch) -> Any:
    """GAT parameters for ``model_config`` (they depend on ``example``'s shapes only, not its values).

    Jitted: an eager ``init`` would compile every small op of the network separately (seconds on a CPU).
    """
    init = jax.jit(gat(model_config).init)
    return init(key, jnp.asarray(example.features), jnp.asarray(example.mask))["params"]


def abstract_params(model_config: ModelConfig) -> Any:
    """The shapes and dtypes of ``model_config``'s GAT parameters, without computing them (to restore a
    checkpoint into)."""
    return jax.eval_shape(
        lambda key: gat(model_config).init(key, jnp.zeros((1, 8, 4)), jnp.ones((1, 8), bool))["params"],
        jax.random.key(0),
    )


def create_train_state(
    key: jax.Array,
    model_config: ModelConfig,
    train_config: TrainConfig,
    example_batch: Batch,
    *,
    geometry: Geometry,
    objective: str = "e2e",
) -> TrainState:
    """A fresh TrainState: GAT parameters initialised from ``key``, Adam state, step 0."""
    get_objective(objective)
    params = init_params(key, model_config, example_batch)
    return TrainState.create(
        apply_fn=gat(model_config).apply,
        params=params,
        tx=make_optimizer(train_config),
        geometry=geometry,
        objective=objective,
        estimator=Estimator.from_train_config(train_config),
    )


def device_batch(batch: Batch) -> Batch:
    """The batch as JAX sees it: event ids (int64, host bookkeeping only) replaced by row numbers."""
    return batch._replace(event_id=np.arange(len(batch.event_id), dtype=np.int32))


#: the name of the mesh axis the batch's events are split along
BATCH_AXIS = "batch"


def pad_events(batch: Batch, size: int) -> Batch:
    """``batch`` with padding events appended up to ``size`` events (as :func:`example_batch`'s: no hits,
    ``event_mask`` False, pT = 1 GeV, q = +1), which no loss term counts; ``batch`` itself if it has ``size``."""
    n_events, n_nodes = batch.mask.shape
    if size == n_events:
        return batch
    if size < n_events:
        raise ValueError(f"cannot pad a batch of {n_events} events to {size}")
    padding = example_batch(size - n_events, n_nodes, batch.x_true.shape[1])
    return Batch(*(np.concatenate([np.asarray(a), p]) for a, p in zip(batch, padding, strict=True)))


@dataclass(frozen=True)
class DataParallel:
    """Data-parallel placement of the steps' inputs over the devices of a 1-D mesh (module docstring).

    ``state(s)`` replicates a TrainState over the mesh; ``batch(b)`` turns a host batch into the steps' input
    (:func:`device_batch`), padded to a multiple of the device count and split along its events.
    :func:`train_step` and :func:`eval_step` then run on all devices; their outputs are replicated, except the
    per-event ones (``q_over_pt``), which are split like the batch and hold the padding events' rows at the end.
    With one device both are the identity on what the steps receive (the single-device code path, unchanged).
    """

    mesh: Mesh

    @classmethod
    def over(cls, devices: list[jax.Device] | None = None) -> DataParallel:
        """Over ``devices``, by default every local device (``jax.local_devices()``: all GPUs of the host)."""
        return cls(Mesh(np.asarray(devices if devices is not None else jax.local_devices()), (BATCH_AXIS,)))

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    @property
    def batch_sharding(self) -> NamedSharding:
        """The batch's arrays: split along their first (event) axis."""
        return NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))

    @property
    def replicated(self) -> NamedSharding:
        """The train state: a whole copy on every device."""
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_size(self, events: int) -> int:
        """The padded size of a batch of ``events`` events: the next multiple of the device count."""
        return -(-events // self.n_devices) * self.n_devices

    def state(self, state: TrainState) -> TrainState:
        """``state`` replicated on every device (as is with one device)."""
        if self.n_devices == 1:
            return state
        return jax.device_put(state, self.replicated)

    def batch(self, batch: Batch) -> Batch:
        """The steps' input of host batch ``batch``: :func:`device_batch`, padded with padding events to a
        multiple of the device count and split along the events (as is with one device)."""
        if self.n_devices == 1:
            return device_batch(batch)
        padded = pad_events(batch, self.batch_size(len(batch.event_id)))
        return jax.device_put(device_batch(padded), self.batch_sharding)

    def describe(self) -> dict[str, Any]:
        """What RUN/config.json records of the devices: ``platform`` (cpu, gpu, tpu), ``count``, ``kind``."""
        device = self.mesh.devices.flat[0]
        return {"platform": device.platform, "count": self.n_devices, "kind": device.device_kind}


@jax.jit
def train_step(state: TrainState, batch: Batch, key: jax.Array, lam: jax.Array) -> tuple[TrainState, dict]:
    """One optimiser step on one batch. ``lam``: weight of L_pT (traced). Runs where its inputs are: one device,
    or data parallel over a mesh (:class:`DataParallel`).

    Metrics are batch means: the loss terms, ``grad_norm`` (the global L2 norm of the gradients before
    clipping), and where the gradient reaching the logits comes from: ``bce_grad`` and ``solver_grad`` are the
    mean |dL/dlogit| per real hit of the BCE and of everything else (the path through the solver or the
    reconstruction chain), ``solver_grad_nonzero`` the share of real hits where the latter is not 0.
    """
    objective = get_objective(state.objective, state.estimator)

    def logits_fn(params):
        return state.apply_fn({"params": params}, batch.features, batch.mask)

    def loss_fn(logits):
        return objective.loss_fn(logits, batch, state.geometry, lam, key)

    logits, network_vjp = jax.vjp(logits_fn, state.params)
    (loss, aux), logit_grad = jax.value_and_grad(loss_fn, has_aux=True)(logits)
    (grads,) = network_vjp(logit_grad)
    state = state.apply_gradients(grads=grads)
    # a loss that is the BCE alone has the BCE's gradient already; any other needs it on its own
    bce_grad = logit_grad if objective.bce_only else jax.grad(bce_loss)(logits, objective.targets(batch), batch.mask)
    solver_grad = logit_grad - bce_grad
    n_hits = jnp.maximum(jnp.sum(batch.mask), 1)
    metrics = {
        "loss": loss,
        "bce": aux["bce"],
        "pt_loss": aux["pt_loss"],
        "grad_norm": optax.tree.norm(grads),
        "bce_grad": jnp.sum(jnp.where(batch.mask, jnp.abs(bce_grad), 0.0)) / n_hits,
        "solver_grad": jnp.sum(jnp.where(batch.mask, jnp.abs(solver_grad), 0.0)) / n_hits,
        "solver_grad_nonzero": jnp.sum(batch.mask & (solver_grad != 0)) / n_hits,
        **{term: aux[term] for term in OPTIONAL_TERMS if term in aux},
    }
    return state, metrics


@jax.jit
def eval_step(state: TrainState, batch: Batch, lam: jax.Array) -> dict:
    """Loss terms of one batch without updating, plus each event's q/pT through the objective's chain."""
    objective = get_objective(state.objective, state.estimator)
    logits = state.apply_fn({"params": state.params}, batch.features, batch.mask)
    loss, aux = objective.loss_fn(logits, batch, state.geometry, lam, jax.random.key(0))
    return {
        "loss": loss,
        "bce": aux["bce"],
        "pt_loss": aux["pt_loss"],
        "q_over_pt": aux["q_over_pt"],
        **{term: aux[term] for term in OPTIONAL_TERMS if term in aux},
    }


def step_key(seed: int, epoch: int, step_in_epoch: int) -> jax.Array:
    """The PRNG key of one training step, a pure function of (seed, epoch, step within the epoch)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), step_in_epoch)


def epoch_shuffle_seed(seed: int, epoch: int) -> int:
    """The data-order seed of one epoch, a pure function of (training seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(1)[0])
