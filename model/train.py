"""Training: the train state, pure jitted steps, and the resumable epoch loop that writes a RUN folder.

Style of Flax's ogbg_molpcba example: :func:`create_train_state` builds a ``TrainState``; :func:`train_step`
is a pure jitted ``(state, batch, key, lam) -> (state, metrics)`` with a nested ``loss_fn``; ``lam`` (the
weight of the pT term) is a traced scalar, so the lambda schedule never recompiles.

Objectives (one per ``--model``)
    What a model does between the GAT logits and the loss, and how it turns logits into hit weights for
    clustering and fit at inference, is an :class:`Objective` in a registry (:func:`register_objective`,
    :func:`get_objective`). ``baseline`` trains on BCE only (lambda = 0 throughout; the pT loss through the
    robust chain is computed on stopped gradients, for monitoring) and is reported with both reconstruction
    chains (model.tracker) as ``baseline`` and ``baseline_paper``; ``e2e`` trains on BCE + lambda * L_pT through
    the robust chain, ``e2e_paper`` through the paper's, with lambda = 0 for ``lambda_warmup_epochs`` and
    ``lambda_pt`` afterwards. Another hit selection (the ``assignment`` model) registers its own objective.

RUN folder (DESIGN.md, "Files")
    ``config.json``: model, preset, ModelConfig, TrainConfig, dataset (path, config hash, seed, events),
    training seed, code version. ``checkpoints/``: Orbax, one step per finished epoch (step = epoch number),
    the last ``keep_checkpoints`` kept; items ``params``, ``opt_state`` and ``meta`` (epoch, global step).
    ``metrics.parquet`` (:data:`METRICS_SCHEMA`): one ``train`` and one ``val`` row per epoch; ``loss``,
    ``bce``, ``pt_loss`` are means over the epoch's events (batch means weighted by real events), ``step``
    the global step at the end of the epoch, ``seconds`` the wall time of that pass. Train rows also hold
    the epoch's means of ``grad_norm`` (the global L2 norm of the unclipped gradients) and of where the
    gradient reaching the logits comes from (:func:`train_step`: ``bce_grad``, ``solver_grad``,
    ``solver_grad_nonzero``), and ``learning_rate``, the rate of the epoch's last optimiser step; val rows
    hold ``sigma68``, the sigma68 of the relative q/pT residual through the objective's chain (null where no
    event has a finite fit). The ``assignment`` model adds ``hamming`` and ``selected_layers`` to both.
    Columns that do not apply to a row are null. :func:`train_run`'s ``on_epoch`` receives the same
    figures after each epoch (:func:`format_epoch` makes them one line).

Reproducibility and resume
    Everything random is derived from ``(seed, epoch, step)``, never from consumed state: the init key from
    the seed, each epoch's data order from ``(seed, epoch)`` and each step's key by folding ``epoch`` and the
    step index into the seed's key. The learning-rate schedule reads the optimiser's step count (checkpointed),
    not the planned number of epochs. Resuming from the epoch-``k`` checkpoint therefore continues exactly as
    an uninterrupted run would, also when ``--epochs`` grows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from flax import struct
from flax.training import train_state

from model.assignment import DEFAULT_ESTIMATOR, Estimator, assignment_loss, hard_hit_weights
from model.config import ModelConfig, TrainConfig, get_preset
from model.losses import bce_loss, composite_loss
from model.models import GAT
from model.tracker import PAPER_CHAIN, ROBUST_CHAIN, Chain
from pipeline import provenance
from pipeline.batches import Batch, BatchStats, Geometry, iter_batches, split_summary
from pipeline.dataset import Dataset, open_dataset
from pipeline.errors import ConfigError, RunError
from pipeline.locks import exclusive_writer
from pipeline.schema import TRAIN_METRICS_SCHEMA

RUN_FORMAT = "muontrack-run"
RUN_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.parquet"
CHECKPOINT_DIR = "checkpoints"

#: the per-epoch diagnostics of RUN/metrics.parquet beyond pipeline.schema's TRAIN_METRICS_SCHEMA (module
#: docstring; null where they do not apply)
_DIAGNOSTIC_FIELDS = (
    pa.field("grad_norm", pa.float32()),
    pa.field("learning_rate", pa.float32()),
    pa.field("sigma68", pa.float32()),
    # the assignment model's Hamming term and the share of layers with hits that got a window (both splits)
    pa.field("hamming", pa.float32()),
    pa.field("selected_layers", pa.float32()),
    # train rows: mean |dL/dlogit| per hit from the BCE and from the solver (or chain), and the share of hits
    # where the latter is not 0 (train_step)
    pa.field("bce_grad", pa.float32()),
    pa.field("solver_grad", pa.float32()),
    pa.field("solver_grad_nonzero", pa.float32()),
)
#: RUN/metrics.parquet: TRAIN_METRICS_SCHEMA and the diagnostics (those it does not name already)
METRICS_SCHEMA = pa.schema(
    [*TRAIN_METRICS_SCHEMA, *(f for f in _DIAGNOSTIC_FIELDS if f.name not in TRAIN_METRICS_SCHEMA.names)]
)

#: a loss: (logits [B, N], batch, geometry, lam [], key) -> (loss, {"bce": [], "pt_loss": [], "q_over_pt": [B]})
LossFn = Callable[[jax.Array, Batch, Geometry, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
#: hit weights for clustering and fit: (logits [B, N], batch, geometry) -> weights [B, N] in [0, 1]
HitWeightsFn = Callable[[jax.Array, Batch, Geometry], jax.Array]


# ---- objectives ------------------------------------------------------------------------------------------


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


def end_to_end_loss(logits, batch, geometry, lam, key, *, chain: Chain):
    """BCE + lam * L_pT through ``chain`` (paper eq. for the composite loss)."""
    del key
    return composite_loss(logits, batch, geometry, lam, chain)


def baseline_loss(logits, batch, geometry, lam, key, *, chain: Chain):
    """BCE only; L_pT through ``chain`` is evaluated on stopped gradients, so it is logged but never trained on."""
    del lam, key
    bce = bce_loss(logits, batch.label, batch.mask)
    _, aux = composite_loss(jax.lax.stop_gradient(logits), batch, geometry, jnp.float32(0.0), chain)
    return bce, {**aux, "bce": bce}


def network_objective(name: str, *, trained_end_to_end: bool, reported_as: tuple[tuple[str, Chain], ...]) -> Objective:
    """A GAT whose sigmoid scores are the hit weights: trained on BCE (+ lam * L_pT through its first chain)."""
    loss = end_to_end_loss if trained_end_to_end else baseline_loss
    return Objective(
        name,
        functools.partial(loss, chain=reported_as[0][1]),
        sigmoid_weights,
        uses_lambda=trained_end_to_end,
        reported_as=reported_as,
    )


OBJECTIVES: dict[str, Objective] = {}
#: models the CLI knows that have no objective yet
PLANNED_MODELS: tuple[str, ...] = ()


def register_objective(objective: Objective) -> None:
    """Make ``objective.name`` trainable with :func:`train_run` (and usable by inference)."""
    OBJECTIVES[objective.name] = objective


def get_objective(name: str, estimator: Estimator | None = None) -> Objective:
    """The registered objective of a model name (with ``estimator`` where it has a solver); ConfigError for
    unknown or not yet implemented models."""
    if name in OBJECTIVES:
        objective = OBJECTIVES[name]
        if estimator is not None and objective.with_estimator is not None:
            return objective.with_estimator(estimator)
        return objective
    if name in PLANNED_MODELS:
        raise ConfigError(f"model {name!r} is not implemented yet")
    raise ConfigError(f"unknown model {name!r} (known: {', '.join([*OBJECTIVES, *PLANNED_MODELS])})")


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
        reported_as=(("assignment", ROBUST_CHAIN),),
        with_estimator=assignment_objective,
    )


# the factorised baseline is one network reported with both chains; each end-to-end model is trained through
# its own chain (DESIGN.md, the `model` column)
register_objective(
    network_objective(
        "baseline", trained_end_to_end=False, reported_as=(("baseline", ROBUST_CHAIN), ("baseline_paper", PAPER_CHAIN))
    )
)
register_objective(network_objective("e2e", trained_end_to_end=True, reported_as=(("e2e", ROBUST_CHAIN),)))
register_objective(network_objective("e2e_paper", trained_end_to_end=True, reported_as=(("e2e_paper", PAPER_CHAIN),)))
register_objective(assignment_objective())


# ---- state and steps -------------------------------------------------------------------------------------


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


#: the optional loss terms an objective may report in its aux dict (None in the metrics where it does not)
OPTIONAL_TERMS = ("hamming", "selected_layers")


@jax.jit
def train_step(state: TrainState, batch: Batch, key: jax.Array, lam: jax.Array) -> tuple[TrainState, dict]:
    """One optimiser step on one batch. ``lam``: weight of L_pT (traced).

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
    bce_grad = jax.grad(bce_loss)(logits, batch.label, batch.mask)
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


def sigma68(residuals: np.ndarray) -> float:
    """Half-width around the median holding 68 % of the values: the 0.68 quantile of |r - median(r)|.

    The definition of analysis.metrics.sigma68 (linear interpolation), for the validation figure of each
    epoch; non-finite residuals (failed fits) are left out. (model may not import analysis.)
    """
    residuals = np.asarray(residuals, dtype=np.float64)
    residuals = residuals[np.isfinite(residuals)]
    if residuals.size == 0:
        return math.nan
    return float(np.quantile(np.abs(residuals - np.median(residuals)), 0.68, method="linear"))


# ---- compilation cache ------------------------------------------------------------------------------------


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk (JAX's persistent cache), unless the user configured one already.

    Each node bucket costs a compilation of the train and eval steps (seconds to tens of seconds on a CPU);
    with the cache a second run (the other model, inference, a resume, the tests) loads them instead. The
    folder is ``$MUONTRACK_JAX_CACHE`` or ``$XDG_CACHE_HOME/muontrack/jax`` (``~/.cache/muontrack/jax``);
    ``MUONTRACK_JAX_CACHE=""`` turns the cache off.
    """
    if jax.config.jax_compilation_cache_dir:
        return
    folder = os.environ.get("MUONTRACK_JAX_CACHE")
    if folder is None:
        folder = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "muontrack" / "jax")
    if not folder:
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# ---- the RUN folder --------------------------------------------------------------------------------------


def code_version() -> str:
    """Version of the model and batching code (pipeline.provenance), recorded in RUN/config.json."""
    return provenance.code_version("model", "pipeline/batches.py")


def _config_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def run_config(
    model: str,
    preset: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    dataset: Dataset,
    seed: int,
) -> dict[str, Any]:
    """The content of RUN/config.json."""
    return {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "model": model,
        "preset": preset,
        "model_config": _config_dict(model_config),
        "train_config": _config_dict(train_config),
        "dataset": {
            "path": str(Path(dataset.path).resolve()),
            "config_hash": dataset.config.config_hash(),
            "physics_hash": dataset.config.physics_hash(),
            "seed": dataset.seed,
            "n_events": dataset.n_events,
        },
        "seed": seed,
        "reconstruction": _config_dict(get_objective(model).chain),
        "code_version": code_version(),
    }


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes two run configs the same run: everything but the number of epochs and the paths. The code
    version is part of it: checkpoints of other training code are never resumed or served as this code's."""
    train = {k: v for k, v in config.get("train_config", {}).items() if k != "epochs"}
    dataset = {k: v for k, v in config.get("dataset", {}).items() if k != "path"}
    return {
        "model": config.get("model"),
        "preset": config.get("preset"),
        "model_config": config.get("model_config"),
        "train_config": train,
        "dataset": dataset,
        "seed": config.get("seed"),
        "reconstruction": config.get("reconstruction"),
        "code_version": config.get("code_version"),
    }


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """RUN/config.json, checked to be a muontrack run; RunError otherwise."""
    path = run_dir / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise RunError(f"{path} is not readable JSON: {run_dir} is not a muontrack run") from None
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise RunError(f"{run_dir} is not a muontrack run ({CONFIG_NAME} has another format)")
    return config


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_atomically(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def read_metrics(run_dir: Path) -> pl.DataFrame:
    """RUN/metrics.parquet (empty frame of METRICS_SCHEMA when absent)."""
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return pl.from_arrow(METRICS_SCHEMA.empty_table())
    return pl.read_parquet(path)


def _write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)
    _write_atomically(run_dir / METRICS_NAME, lambda p: pq.write_table(table, p, compression="zstd"))


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Orbax logs routine warnings through absl; a CLI user should not see them."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def checkpoint_manager(run_dir: Path, keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    with _quiet_absl():
        return ocp.CheckpointManager((run_dir / CHECKPOINT_DIR).resolve(), options=options)


def latest_epoch(run_dir: Path) -> int:
    """The epoch of the newest complete checkpoint, 0 when there is none."""
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        return 0
    with _quiet_absl(), checkpoint_manager(run_dir) as manager:
        step = manager.latest_step()
    return int(step) if step is not None else 0


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, epoch: int) -> None:
    with _quiet_absl():
        manager.save(
            epoch,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave({"epoch": epoch, "step": int(state.step)}),
            ),
        )
        manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState, epoch: int) -> TrainState:
    """``state`` with parameters, optimiser state and step of the epoch-``epoch`` checkpoint."""
    with _quiet_absl():
        restored = manager.restore(
            epoch,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(state.params)),
                opt_state=ocp.args.StandardRestore(_abstract(state.opt_state)),
                meta=ocp.args.JsonRestore(),
            ),
        )
    return state.replace(
        params=restored["params"], opt_state=restored["opt_state"], step=jnp.asarray(restored["meta"]["step"])
    )


def restore_params(run_dir: Path, abstract_params: Any, epoch: int) -> Any:
    """Only the parameters of one checkpoint (for inference)."""
    with _quiet_absl(), checkpoint_manager(run_dir) as manager:
        restored = manager.restore(epoch, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    return restored["params"]


def _prepare_run_dir(out: Path, config: dict[str, Any], resume: bool) -> int:
    """Check ``out`` against the run to start; return the number of epochs already done there.

    Never modifies anything: a folder holding another run, unrelated files, or a run that needs
    ``--resume`` is refused with a RunError.
    """
    if out.exists() and not out.is_dir():
        raise RunError(f"run folder {out} is a file")
    if not out.exists() or not any(out.iterdir()):
        return 0
    if not (out / CONFIG_NAME).is_file():
        raise RunError(f"run folder {out} is not empty and holds no muontrack run; choose another --out")
    existing = read_run_config(out)
    mine, theirs = _identity(config), _identity(existing)
    if mine != theirs:
        differing = [key for key in mine if mine[key] != theirs[key]]
        raise RunError(f"{out} holds another run (different {', '.join(differing)}); choose another --out")
    done = latest_epoch(out)
    planned = int(existing.get("train_config", {}).get("epochs", 0))
    if not resume:
        if done >= planned:
            raise RunError(
                f"{out} already holds a finished run ({done} epochs); pass --resume with more --epochs to "
                "train further, or choose another --out"
            )
        raise RunError(f"{out} holds an unfinished run ({done} of {planned} epochs); pass --resume to continue it")
    return done


# ---- the training loop -----------------------------------------------------------------------------------


#: the batch-mean metrics averaged over an epoch's events into its metrics row (those a model reports)
_EPOCH_MEANS = (
    "loss",
    "bce",
    "pt_loss",
    *OPTIONAL_TERMS,
    "grad_norm",
    "bce_grad",
    "solver_grad",
    "solver_grad_nonzero",
)


@dataclass
class _Sums:
    """Event-weighted running sums of batch-mean metrics (of those in :data:`_EPOCH_MEANS` a batch reports)."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    events: int = 0

    def add(self, metrics: dict[str, Any], n_events: int) -> None:
        for key in _EPOCH_MEANS:
            if key in metrics:
                self.sums[key] = self.sums.get(key, 0.0) + float(metrics[key]) * n_events
        self.events += n_events

    def means(self) -> dict[str, float]:
        n = max(self.events, 1)
        return {key: total / n for key, total in self.sums.items()}


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("events  loss {task.fields[loss]:.4f}  {task.fields[rate]:.0f} events/s"),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def evaluate(
    state: TrainState,
    dataset: Dataset,
    split: str,
    train_config: TrainConfig,
    lam: float,
    max_events: int | None = None,
) -> tuple[dict[str, float], float]:
    """Mean loss terms over a split (its first ``max_events`` events) and the sigma68 of the q/pT residual."""
    outputs, truths = [], []
    for batch in iter_batches(
        dataset, split, train_config.batch_size, train_config.node_buckets, max_events=max_events
    ):
        outputs.append(eval_step(state, device_batch(batch), jnp.float32(lam)))
        truths.append((batch.q / batch.pt, batch.event_mask))
    sums = _Sums()
    residuals = []
    # one device -> host transfer for the whole split (the steps above only queue work)
    for metrics, (true, event_mask) in zip(jax.device_get(outputs), truths, strict=True):
        sums.add(metrics, int(event_mask.sum()))
        residuals.append(((np.asarray(metrics["q_over_pt"]) - true) / true)[event_mask])
    return sums.means(), sigma68(np.concatenate(residuals)) if residuals else math.nan


#: what ``train_run(on_epoch=...)`` is called with after every finished epoch (see :func:`_epoch_info`)
EpochCallback = Callable[[dict[str, Any]], None]


def format_epoch(info: dict[str, Any]) -> str:
    """One line of progress from an ``on_epoch`` dict: epoch, losses, val sigma68 (if any), lr, grad norm, time."""
    sigma = info.get("val_sigma68")
    return (
        f"{info['model']} epoch {info['epoch']}/{info['epochs']}: train loss {info['train_loss']:.4f}, "
        f"val loss {info['val_loss']:.4f}"
        + (f", val sigma68(q/pT) {sigma:.4f}" if sigma is not None else "")
        + f", lr {info['learning_rate']:.3g}, grad norm {info['grad_norm']:.3g}, {info['seconds']:.1f} s"
    )


def train_run(
    data: str | Path,
    model: str,
    out: str | Path,
    preset: str = "cpu",
    epochs: int | None = None,
    seed: int = 0,
    resume: bool = False,
    progress: bool = False,
    on_epoch: EpochCallback | None = None,
    estimator: str | None = None,
) -> str:
    """Train ``model`` (baseline, e2e, e2e_paper, assignment) on the train split of ``data`` into ``out``.

    Validates on the val split after every epoch, checkpoints every epoch and writes metrics.parquet.
    ``epochs`` overrides the preset's, ``estimator`` its gradient estimator (the ``assignment`` model's). With
    ``resume`` an interrupted (or finished, for more epochs) run of the same configuration continues from its
    newest checkpoint, giving the same result as an uninterrupted run. Returns a one-line summary.

    ``progress`` shows a progress bar and prints one line per epoch (:func:`format_epoch`). ``on_epoch``, if
    given, is called after each epoch's metrics and checkpoint are written with a dict of that epoch's
    figures (:func:`_epoch_info`: ``model``, ``epoch``, ``epochs``, ``step``, ``lambda``, ``learning_rate``,
    ``grad_norm``, ``train_loss``/``bce``/``pt_loss``, ``val_loss``/``bce``/``pt_loss``, ``val_sigma68``
    (None when null), ``train_seconds``, ``val_seconds``, ``seconds``). It only reads: training is the same
    with or without it.

    Raises ConfigError (unknown model or preset, epochs < 1), DatasetError (missing or incomplete dataset),
    RunError (``out`` holds something else, needs ``--resume``, or the loss became NaN).
    """
    with exclusive_writer(out):
        return _train_run_locked(data, model, Path(out), preset, epochs, seed, resume, progress, on_epoch, estimator)


def _train_run_locked(
    data: str | Path,
    model: str,
    out: Path,
    preset: str,
    epochs: int | None,
    seed: int,
    resume: bool,
    progress: bool,
    on_epoch: EpochCallback | None = None,
    estimator: str | None = None,
) -> str:
    objective = get_objective(model)
    model_config, train_config = get_preset(preset)
    if estimator is not None:
        train_config = dataclasses.replace(train_config, estimator=estimator)
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
        train_config = dataclasses.replace(train_config, epochs=epochs)
    dataset = open_dataset(data)
    out = Path(out)
    config = run_config(model, preset, model_config, train_config, dataset, seed)
    done = _prepare_run_dir(out, config, resume)
    if done >= train_config.epochs:
        return f"already trained: {done} epochs (asked for {train_config.epochs}); nothing to do"

    enable_compilation_cache()
    geometry = Geometry.from_detector(dataset.config.detector)
    n_train, _ = split_summary(dataset, "train")
    if n_train == 0:
        raise RunError(f"dataset {dataset.path} has no events in the train split")
    events_per_epoch = min(n_train, train_config.max_train_events or n_train)

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / CONFIG_NAME, config)  # the same identity; only epochs (and paths, code) may change
    state = create_train_state(
        jax.random.key(seed),
        model_config,
        train_config,
        example_batch(1, min(train_config.node_buckets), geometry.n_layers),
        geometry=geometry,
        objective=model,
    )
    rows = read_metrics(out).filter(pl.col("epoch") <= done).to_dicts()
    manager = checkpoint_manager(out, keep=train_config.keep_checkpoints)
    if done:
        state = restore_checkpoint(manager, state, done)

    schedule = learning_rate_schedule(train_config)
    stats = BatchStats()
    start = time.perf_counter()
    val_means: dict[str, float] = {}
    val_sigma = math.nan
    with manager, _progress(progress) as bar:
        task = bar.add_task(
            f"{model} epoch {done + 1}/{train_config.epochs}",
            total=events_per_epoch * (train_config.epochs - done),
            loss=math.nan,
            rate=0.0,
        )
        for epoch in range(done + 1, train_config.epochs + 1):
            lam = objective.lam(epoch, train_config)
            bar.update(task, description=f"{model} epoch {epoch}/{train_config.epochs}")
            first_step = int(state.step)
            step_metrics: list[dict[str, jax.Array]] = []
            step_events: list[int] = []
            epoch_start = time.perf_counter()
            batches = iter_batches(
                dataset,
                "train",
                train_config.batch_size,
                train_config.node_buckets,
                shuffle_seed=epoch_shuffle_seed(seed, epoch),
                max_events=train_config.max_train_events,
                stats=stats,
            )
            for step_in_epoch, batch in enumerate(batches):
                state, metrics = train_step(
                    state, device_batch(batch), step_key(seed, epoch, step_in_epoch), jnp.float32(lam)
                )
                # the metrics stay on the device (no sync per step); they come over once, after the epoch
                step_metrics.append(metrics)
                step_events.append(int(batch.event_mask.sum()))
                if progress:
                    # the bar shows the loss of the step before, which is done by now: reading it does not
                    # wait for the step just queued
                    shown = float(step_metrics[-2]["loss"]) if len(step_metrics) > 1 else math.nan
                    rate = sum(step_events) / max(time.perf_counter() - epoch_start, 1e-9)
                    bar.update(task, advance=step_events[-1], loss=shown, rate=rate)
            sums = _Sums()
            for index, (metrics, n_events) in enumerate(zip(jax.device_get(step_metrics), step_events, strict=True)):
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise RunError(
                        f"training diverged: loss is {loss} at epoch {epoch}, step {first_step + index + 1} "
                        f"(lambda={lam}); lower the learning rate (the last good checkpoint is epoch {epoch - 1})"
                    )
                sums.add(metrics, n_events)
            train_seconds = time.perf_counter() - epoch_start
            step = int(state.step)
            # the rate of the epoch's last step (the schedule is read at the count before that step)
            learning_rate = float(schedule(step - 1))
            rows.append(
                _metrics_row(epoch, step, "train", sums.means(), lam, train_seconds, learning_rate=learning_rate)
            )

            val_start = time.perf_counter()
            val_means, val_sigma = evaluate(state, dataset, "val", train_config, lam)
            val_seconds = time.perf_counter() - val_start
            # null, not NaN, when no validation event has a finite fit
            val_sigma68 = val_sigma if math.isfinite(val_sigma) else None
            rows.append(_metrics_row(epoch, step, "val", val_means, lam, val_seconds, sigma68=val_sigma68))
            # metrics first, checkpoint second: a crash in between leaves rows that resume drops again
            _write_metrics(out, rows)
            save_checkpoint(manager, state, epoch)

            info = _epoch_info(model, train_config.epochs, train_row=rows[-2], val_row=rows[-1])
            if progress:
                bar.console.print(format_epoch(info), markup=False, highlight=False)
            if on_epoch is not None:
                on_epoch(info)

    minutes = (time.perf_counter() - start) / 60
    truncated = f", {stats.n_truncated} of {stats.n_events} train events truncated" if stats.n_truncated else ""
    return (
        f"{train_config.epochs} epochs, val loss {val_means.get('loss', math.nan):.4f} "
        f"bce {val_means.get('bce', math.nan):.4f} pt_loss {val_means.get('pt_loss', math.nan):.4g} "
        f"sigma68(q/pT) {val_sigma:.4f}, {minutes:.1f} min{truncated}"
    )


def _metrics_row(
    epoch: int,
    step: int,
    split: str,
    means: dict[str, float],
    lam: float,
    seconds: float,
    *,
    learning_rate: float | None = None,
    sigma68: float | None = None,
) -> dict[str, Any]:
    """One row of metrics.parquet; the means a model did not report are null."""
    return {
        "epoch": epoch,
        "step": step,
        "split": split,
        "lambda": lam,
        "seconds": seconds,
        "learning_rate": learning_rate,
        "sigma68": sigma68,
        **{key: means.get(key) for key in _EPOCH_MEANS},
    }


def _epoch_info(model: str, epochs: int, *, train_row: dict[str, Any], val_row: dict[str, Any]) -> dict[str, Any]:
    """The dict ``on_epoch`` receives: the figures of one epoch's two metrics rows (before float32), flat."""
    return {
        "model": model,
        "epoch": train_row["epoch"],
        "epochs": epochs,
        "step": train_row["step"],
        "lambda": train_row["lambda"],
        "learning_rate": train_row["learning_rate"],
        "grad_norm": train_row["grad_norm"],
        **{f"train_{key}": train_row[key] for key in ("loss", "bce", "pt_loss")},
        **{f"val_{key}": val_row[key] for key in ("loss", "bce", "pt_loss")},
        "val_sigma68": val_row["sigma68"],
        "train_seconds": train_row["seconds"],
        "val_seconds": val_row["seconds"],
        "seconds": train_row["seconds"] + val_row["seconds"],
    }
