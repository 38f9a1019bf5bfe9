"""Inference: prediction tables of a trained run, and of the truth references, on one split of a dataset.

The three tables have exactly the columns and types of pipeline.schema's PRED_HITS_SCHEMA,
PRED_CLUSTERS_SCHEMA and PRED_TRACKS_SCHEMA (docs/contracts.md, "Report folder"):

- ``hits``: one row per hit of the split (event_id, hit_id, model, score, weight); ``score`` is
  sigmoid(logit) for a trained model and the truth label (1.0 / 0.0) for the truth references; ``weight`` the
  hit's weight in the final clusters of the row's reconstruction chain (model.tracker);
- ``clusters``: one row per event and layer (event_id, layer, model, x_reco, sigma, weight, x_true) from the
  differentiable clustering with the model's hit weights;
- ``tracks``: one row per event (event_id, model, pt_pred, q_pred, q_over_pt_pred, radius, fit_status, x_fit);
  ``x_fit`` is the final fit's crossing of every layer (the chain's TrackEstimate.x_fit), all NaN when the fit
  failed (pipeline.schema.fitted_crossings).

A run gives one row set per entry of its objective's ``reported_as`` (the ``baseline`` network: ``baseline``
with the robust chain and ``baseline_paper`` with the paper's), all from one forward pass of the network.

Unlike training, inference never truncates an event: the node buckets are extended to hold the largest
event of the split. Rows are sorted by event_id (then hit_id or layer).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl

from model.hyperparameters import ModelConfig
from model.objectives import get_objective
from model.run_folder import (
    CHECKPOINTS,
    CONFIG_NAME,
    DEFAULT_CHECKPOINT,
    best_checkpoint_epoch,
    latest_epoch,
    read_run_config,
    restore_params,
)
from model.steps import abstract_params, device_batch, gat
from model.tracker import PAPER_CHAIN, ROBUST_CHAIN, Chain, reconstruct
from pipeline.batches import Batch, Geometry, check_buckets, iter_batches, split_summary
from pipeline.dataset import Dataset, open_dataset
from pipeline.errors import ConfigError, RunError
from pipeline.registry import get_model
from pipeline.schema import PRED_CLUSTERS_SCHEMA, PRED_HITS_SCHEMA, PRED_TRACKS_SCHEMA, fitted_crossings

#: node budgets rounded up to this when a split holds events larger than the run's buckets
BUCKET_STEP = 64
#: events per batch of the truth references (no network, memory linear in N)
TRUTH_BATCH_SIZE = 256
#: events per batch of a run's inference (not the run's training batch). Larger batches measured no faster on a
#: CPU (the forward's cost is per event: the GAT's sorted attention), and up to 128 events per batch an
#: event's rows do not depend on the batch it is in, bit for bit (tests/test_evaluate_dask.py); at 256 the
#: reconstruction chain's rounding changed (the GAT's scores did not), which the DAF's reweighting amplifies
INFERENCE_BATCH_SIZE = 64


def _as_dataset(dataset: Dataset | str | Path) -> Dataset:
    return dataset if isinstance(dataset, Dataset) else open_dataset(dataset)


def inference_buckets(buckets: tuple[int, ...], max_hits: int) -> tuple[int, ...]:
    """``buckets`` plus, if needed, one budget (a multiple of BUCKET_STEP) holding ``max_hits`` nodes."""
    buckets = check_buckets(buckets)
    if max_hits > buckets[-1]:
        buckets = (*buckets, BUCKET_STEP * math.ceil(max_hits / BUCKET_STEP))
    return buckets


def inference_node_buckets(train_buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The node buckets of a run's inference: its training buckets. Another node budget changes the order of
    the attention's sums (rounding), which the reconstruction chain's reweighting can amplify, so the
    predictions keep the buckets the run was validated with (then :func:`inference_buckets` extends them)."""
    return check_buckets(train_buckets)


def check_checkpoint(checkpoint: str) -> str:
    """``checkpoint`` if it is one of :data:`~model.run_folder.CHECKPOINTS`; ConfigError otherwise."""
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"unknown checkpoint {checkpoint!r} (known: {', '.join(CHECKPOINTS)})")
    return checkpoint


def _finished_run(run_dir: Path) -> tuple[dict[str, Any], int]:
    """``(config.json, epochs done)`` of a finished run; RunError otherwise."""
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    if not (run_dir / CONFIG_NAME).is_file():
        raise RunError(f"{run_dir} is not a training run (no {CONFIG_NAME})")
    config = read_run_config(run_dir)
    planned = int(config.get("train_config", {}).get("epochs", 0))
    done = latest_epoch(run_dir)
    if done == 0:
        raise RunError(f"run {run_dir} has no checkpoint: its training did not finish an epoch")
    if done < planned:
        raise RunError(
            f"run {run_dir} is incomplete ({done} of {planned} epochs); continue it with `muontrack train --resume`"
        )
    return config, done


def checkpoint_epoch(run_dir: str | Path, checkpoint: str = DEFAULT_CHECKPOINT) -> int:
    """The epoch whose parameters :func:`load_run` loads for ``checkpoint`` (``best``: the lowest validation
    sigma68's, ``best_checkpoint/``; ``last``: the last epoch's). RunError for a run that is missing, unfinished,
    or has no best checkpoint (no epoch with a finite validation sigma68, or trained before best checkpoints)."""
    run_dir = Path(run_dir)
    check_checkpoint(checkpoint)
    _, done = _finished_run(run_dir)
    if checkpoint == "last":
        return done
    best = best_checkpoint_epoch(run_dir, last=done)
    if best == 0:
        raise RunError(
            f"run {run_dir} has no best checkpoint (no epoch with a finite validation sigma68, or trained before best "
            "checkpoints were kept); evaluate its last epoch with --checkpoint last"
        )
    return best


def load_run(run_dir: str | Path, checkpoint: str = DEFAULT_CHECKPOINT) -> tuple[dict[str, Any], Any]:
    """``(config.json as a dict, GAT parameters)`` of a finished run: those of its best validation sigma68's
    checkpoint (``checkpoint="best"``, the default) or of its last epoch (``"last"``); :func:`checkpoint_epoch`
    says which epoch that is.

    ConfigError for an unknown ``checkpoint``; RunError when the folder is missing, is not a run, has not
    finished its epochs, has no such checkpoint, or the checkpoint is unreadable.
    """
    run_dir = Path(run_dir)
    check_checkpoint(checkpoint)
    config, _ = _finished_run(run_dir)
    epoch = checkpoint_epoch(run_dir, checkpoint)
    try:
        model_config = ModelConfig.from_dict(config["model_config"])
    except (KeyError, ConfigError) as err:
        raise RunError(f"run {run_dir} has an unreadable model config: {err}") from None
    try:
        params = restore_params(run_dir, abstract_params(model_config), epoch, checkpoint)
    except Exception as err:  # Orbax raises KeyError, ValueError, OSError, ... for a damaged checkpoint
        raise RunError(
            f"run {run_dir}: the {checkpoint} checkpoint (epoch {epoch}) is unreadable ({type(err).__name__}); "
            "train the run again"
        ) from None
    return config, params


def check_run(run_dir: str | Path, dataset: Dataset, checkpoint: str = DEFAULT_CHECKPOINT) -> dict[str, Any]:
    """The config.json of a run that :func:`predict_run` can evaluate on ``dataset`` with ``checkpoint``, checked
    without loading its parameters (cheap: callers check every run before predicting anything). RunError for a
    run that is missing, is not a run, is unfinished, has no such checkpoint, or was trained on another
    detector config; ConfigError for an unknown ``checkpoint``."""
    run_dir = Path(run_dir)
    config, _ = _finished_run(run_dir)
    checkpoint_epoch(run_dir, checkpoint)
    _check_same_config(config, dataset, run_dir)
    return config


def _check_same_config(config: dict[str, Any], dataset: Dataset, run_dir: Path) -> None:
    """A run applies to datasets of its detector and physics; the shard size does not matter."""
    trained_on = config.get("dataset", {})
    if "physics_hash" in trained_on:
        found, expected, what = trained_on["physics_hash"], dataset.config.physics_hash(), "physics hash"
    else:  # runs written before the physics hash was recorded
        found, expected, what = trained_on.get("config_hash"), dataset.config.config_hash(), "config hash"
    if found != expected:
        raise RunError(
            f"run {run_dir} was trained on another detector config ({what} {found}, "
            f"dataset {dataset.path} has {expected})"
        )


def forward_fn(
    model_config: ModelConfig, objective: str, geometry: Geometry, rows: tuple[tuple[str, Chain], ...] | None = None
):
    """Jitted ``(params, batch) -> (scores, [Reconstruction per row])`` of one model.

    ``rows``: (name, chain) pairs, by default the objective's ``reported_as``. One function per resolved
    ``rows``: the default and the same pairs spelt out share their compiled programs.
    """
    return _forward_fn(model_config, objective, geometry, tuple(rows or get_objective(objective).reported_as))


@functools.cache
def _forward_fn(model_config: ModelConfig, objective: str, geometry: Geometry, rows: tuple[tuple[str, Chain], ...]):
    model = gat(model_config)
    chosen = get_objective(objective)

    @jax.jit
    def forward(params, batch: Batch):
        logits = model.apply({"params": params}, batch.features, batch.mask)
        scores = jnp.where(batch.mask, jax.nn.sigmoid(logits), 0.0)
        weights = chosen.hit_weights(logits, batch, geometry)
        return scores, [reconstruct(weights, batch, geometry, chain) for _, chain in rows]

    return forward


#: the truth references, the truth labels (or shares) as hit weights through a chain: (name, chain, weights), the
#: weights a Batch field. ``truth`` is the paper's reference (weighted mean of the signal strips, Kasa fit): what
#: the paper's chain gives with perfect labels. ``truth_charge`` is the reference of a cluster-based fit: the charge
#: centroid of the signal strips, fitted with the robust chain's scattering-aware fit and its cluster-level steps
#: (no hit-level step: labels need none; the cluster-level steps take out the layers whose signal cluster another
#: particle's charge shifted), what the robust chain gives with perfect labels. ``truth_share`` is the same with the
#: truth shares of the strips' charge as weights (pipeline.batches.truth_share_expr), so each cluster is the
#: centroid of the muon's own charge: what the share models (model.objectives) give with perfect shares
TRUTH_REFERENCES: tuple[tuple[str, Chain, str], ...] = (
    ("truth", PAPER_CHAIN, "label"),
    ("truth_charge", replace(ROBUST_CHAIN, widths=()), "label"),
    ("truth_share", replace(ROBUST_CHAIN, widths=()), "share"),
)
if tuple(name for name, _, _ in TRUTH_REFERENCES) != get_model("truth").rows:  # pipeline.registry names them
    raise AssertionError(f"TRUTH_REFERENCES do not match pipeline.registry's truth rows {get_model('truth').rows}")


@functools.cache
def _truth_forward(geometry: Geometry, chain: Chain, weights: str):
    @jax.jit
    def forward(batch: Batch):
        return reconstruct(jnp.where(batch.mask, getattr(batch, weights), 0.0), batch, geometry, chain)

    return forward


def _list_column(rows: np.ndarray) -> pl.Series:
    """A ``[E, L]`` float32 array as a list<float32> column (one list of L values per row)."""
    return pl.Series(rows.astype(np.float32)).cast(pl.List(pl.Float32))


class _Tables:
    """Accumulates the rows of the three prediction tables for one model name."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.hits: list[dict[str, np.ndarray]] = []
        self.clusters: list[dict[str, np.ndarray]] = []
        self.tracks: list[dict[str, np.ndarray]] = []

    def add(self, batch: Batch, scores: np.ndarray, reco: Any) -> None:
        events = batch.event_mask
        nodes = batch.mask & events[:, None]
        n_layers = batch.x_true.shape[1]
        self.hits.append(
            {
                "event_id": np.broadcast_to(batch.event_id[:, None], nodes.shape)[nodes],
                "hit_id": batch.hit_id[nodes],
                "score": np.asarray(scores)[nodes],
                "weight": np.asarray(reco.hit_weight)[nodes],
            }
        )
        self.clusters.append(
            {
                "event_id": np.repeat(batch.event_id[events], n_layers),
                "layer": np.tile(np.arange(n_layers), int(events.sum())),
                "x_reco": np.asarray(reco.x_hat)[events].reshape(-1),
                "sigma": np.asarray(reco.sigma)[events].reshape(-1),
                "weight": np.asarray(reco.layer_weight)[events].reshape(-1),
                "x_true": batch.x_true[events].reshape(-1),
            }
        )
        self.tracks.append(
            {
                "event_id": batch.event_id[events],
                "pt_pred": np.asarray(reco.pt)[events],
                "q_pred": np.sign(np.asarray(reco.q)[events]),
                "q_over_pt_pred": np.asarray(reco.q_over_pt)[events],
                "radius": np.asarray(reco.radius)[events],
                "fit_status": np.asarray(reco.status)[events],
                "x_fit": fitted_crossings(
                    np.asarray(reco.x_fit)[events], np.asarray(reco.status)[events], np.asarray(reco.q_over_pt)[events]
                ),
            }
        )

    def frames(self) -> dict[str, pl.DataFrame]:
        out = {}
        for name, parts, schema, keys in (
            ("hits", self.hits, PRED_HITS_SCHEMA, ["event_id", "hit_id"]),
            ("clusters", self.clusters, PRED_CLUSTERS_SCHEMA, ["event_id", "layer"]),
            ("tracks", self.tracks, PRED_TRACKS_SCHEMA, ["event_id"]),
        ):
            dtypes = pl.from_arrow(schema.empty_table()).schema
            columns = {
                column: np.concatenate([part[column] for part in parts]) if parts else np.zeros(0)
                for column in dtypes
                if column != "model"
            }
            if "x_fit" in columns:
                x_fit = columns["x_fit"]
                columns["x_fit"] = _list_column(x_fit) if x_fit.ndim == 2 else pl.Series([], dtype=pl.List(pl.Float32))
            frame = pl.DataFrame(columns).with_columns(model=pl.lit(self.model))
            out[name] = frame.select([pl.col(column).cast(dtype) for column, dtype in dtypes.items()]).sort(keys)
        return out


def predict_run(
    dataset: Dataset | str | Path,
    run_dir: str | Path,
    split: str | None = "test",
    batch_size: int | None = None,
    rows: tuple[tuple[str, Chain], ...] | None = None,
    on_batch: Callable[[int], None] | None = None,
    max_hits: int | None = None,
    checkpoint: str = DEFAULT_CHECKPOINT,
) -> dict[str, pl.DataFrame]:
    """Prediction tables ``{"hits", "clusters", "tracks"}`` of a trained run on one split of ``dataset``, with the
    parameters of its ``checkpoint`` (``best``: the lowest validation sigma68's, the default; ``last``; see
    :func:`load_run`).

    ``model`` takes the names of the run objective's ``reported_as`` (one row set per reconstruction chain).
    Hit scores are sigmoid(logit); clustering and fit use the model's hit weights (sigmoid(logit) for the
    networks, the 0/1 window selection for assignment). ``batch_size`` defaults to INFERENCE_BATCH_SIZE.
    ``rows`` replaces the objective's ``(model name, chain)`` pairs (for studies of the reconstruction).
    ``on_batch(n_events)`` is called after each batch (a progress display). ``max_hits``: the largest event the
    node buckets must hold (default: the split's; a shard of a dataset passes the whole split's, so that its
    events get the buckets, and hence the predictions, of the whole split).
    RunError for a missing or unfinished run, or a run trained on another detector config.
    """
    dataset = _as_dataset(dataset)
    run_dir = Path(run_dir)
    config, params = load_run(run_dir, checkpoint)
    _check_same_config(config, dataset, run_dir)
    return predict_params(
        dataset,
        params,
        ModelConfig.from_dict(config["model_config"]),
        config["model"],
        split=split,
        batch_size=batch_size or INFERENCE_BATCH_SIZE,
        buckets=inference_node_buckets(tuple(config["train_config"]["node_buckets"])),
        rows=rows,
        on_batch=on_batch,
        max_hits=max_hits,
    )


def predict_params(
    dataset: Dataset,
    params: Any,
    model_config: ModelConfig,
    objective: str,
    *,
    split: str | None,
    batch_size: int,
    buckets: tuple[int, ...],
    rows: tuple[tuple[str, Chain], ...] | None = None,
    on_batch: Callable[[int], None] | None = None,
    max_hits: int | None = None,
) -> dict[str, pl.DataFrame]:
    """The prediction tables of GAT parameters ``params`` (:func:`predict_run` without a run folder; the
    benchmarks call it with fresh parameters). ``buckets``: the run's node buckets (:func:`inference_buckets`
    extends them to ``max_hits``, by default the split's largest event)."""
    geometry = Geometry.from_detector(dataset.config.detector)
    rows = rows or get_objective(objective).reported_as
    forward = forward_fn(model_config, objective, geometry, tuple(rows))
    if max_hits is None:
        _, max_hits = split_summary(dataset, split)
    tables = [_Tables(name) for name, _ in rows]

    def collect(batch: Batch, outputs: Any) -> None:
        scores, recos = jax.device_get(outputs)  # one transfer per batch
        for table, reco in zip(tables, recos, strict=True):
            table.add(batch, scores, reco)
        if on_batch is not None:
            on_batch(int(batch.event_mask.sum()))

    # one batch in flight: the forward of batch k runs (dispatch is asynchronous) while the host reads and packs
    # batch k + 1 and copies out the rows of batch k - 1
    pending: tuple[Batch, Any] | None = None
    for batch in iter_batches(dataset, split, batch_size, inference_buckets(buckets, max_hits)):
        outputs = forward(params, device_batch(batch))
        if pending is not None:
            collect(*pending)
        pending = (batch, outputs)
    if pending is not None:
        collect(*pending)
    return _stack([table.frames() for table in tables])


def _stack(frames: list[dict[str, pl.DataFrame]]) -> dict[str, pl.DataFrame]:
    return {name: pl.concat([f[name] for f in frames]) for name in ("hits", "clusters", "tracks")}


def predict_truth(
    dataset: Dataset | str | Path,
    split: str | None = "test",
    on_batch: Callable[[int], None] | None = None,
    max_hits: int | None = None,
) -> dict[str, pl.DataFrame]:
    """The truth references (:data:`TRUTH_REFERENCES`) on one split: ``truth`` and ``truth_charge`` (weights =
    is_signal through the paper's and the robust chain's fit) and ``truth_share`` (the truth shares), as the same
    three tables as :func:`predict_run`, stacked. ``on_batch(n_events)`` is called after each batch (a progress
    display); ``max_hits`` as for :func:`predict_run`."""
    dataset = _as_dataset(dataset)
    geometry = Geometry.from_detector(dataset.config.detector)
    if max_hits is None:
        _, max_hits = split_summary(dataset, split)
    # one shape: no network, so the padding costs little, and a second shape would cost a compilation
    buckets = (BUCKET_STEP * max(1, math.ceil(max_hits / BUCKET_STEP)),)
    tables = [_Tables(name) for name, _, _ in TRUTH_REFERENCES]
    for batch in iter_batches(dataset, split, TRUTH_BATCH_SIZE, buckets):
        device = device_batch(batch)
        for table, (_, chain, weights) in zip(tables, TRUTH_REFERENCES, strict=True):
            table.add(batch, getattr(batch, weights), _truth_forward(geometry, chain, weights)(device))
        if on_batch is not None:
            on_batch(int(batch.event_mask.sum()))
    return _stack([table.frames() for table in tables])
