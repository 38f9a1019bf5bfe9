"""``predict_classical``: the classical reconstruction of one split of a dataset, as the three prediction
tables of model/inference.py (PRED_HITS_SCHEMA, PRED_CLUSTERS_SCHEMA, PRED_TRACKS_SCHEMA; model "classical")."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

from classical.reco import ClassicalParams, ClassicalTracks, track_events
from pipeline.batches import split_expr
from pipeline.dataset import Dataset, open_dataset
from pipeline.schema import PRED_CLUSTERS_SCHEMA, PRED_HITS_SCHEMA, PRED_TRACKS_SCHEMA, fitted_crossings

MODEL_NAME = "classical"


class SplitHits(NamedTuple):
    """One split's hits as flat NumPy arrays sorted by (event_id, hit_id), and its events' truth."""

    event_id: np.ndarray  # int64 [E], sorted
    event_start: np.ndarray  # int64 [E + 1]: event e's hits are rows event_start[e] : event_start[e + 1]
    hit_id: np.ndarray  # int32 [H]
    layer: np.ndarray  # int16 [H]
    strip: np.ndarray  # int32 [H]
    x: np.ndarray  # float32 [H] [mm]
    charge: np.ndarray  # float32 [H]
    x_true: np.ndarray  # float32 [E, L] [mm], NaN where absent


def _as_dataset(dataset: Dataset | str | Path) -> Dataset:
    return dataset if isinstance(dataset, Dataset) else open_dataset(dataset)


def read_split(dataset: Dataset | str | Path, split: str | None = "test") -> SplitHits:
    """Read a split's hits and events (one Polars query each, filtered by ``split_expr``; ``None``: every
    event)."""
    dataset = _as_dataset(dataset)
    n_layers = dataset.config.detector.n_layers
    keep = pl.lit(True) if split is None else split_expr(split)
    hits = (
        dataset.hits()
        .filter(keep)
        .select("event_id", "hit_id", "layer", "strip", "x", "charge")
        .sort("event_id", "hit_id")
        .collect()
    )
    events = dataset.events().filter(keep).select("event_id", "x_true").sort("event_id").collect()
    event_id = events.get_column("event_id").to_numpy()
    x_true = events.get_column("x_true").explode().to_numpy().astype(np.float32)
    if x_true.shape[0] != event_id.shape[0] * n_layers:
        raise ValueError(f"events.x_true of {dataset.path} does not hold {n_layers} layers per event")
    hit_event = hits.get_column("event_id").to_numpy()
    event_start = np.searchsorted(hit_event, np.append(event_id, np.iinfo(np.int64).max), side="left")
    if event_start[-1] != hits.height or not np.array_equal(np.unique(hit_event), np.intersect1d(hit_event, event_id)):
        raise ValueError(f"hits of {dataset.path} belong to events missing from its events table")
    return SplitHits(
        event_id=event_id,
        event_start=event_start.astype(np.int64),
        hit_id=hits.get_column("hit_id").to_numpy(),
        layer=hits.get_column("layer").to_numpy(),
        strip=hits.get_column("strip").to_numpy(),
        x=hits.get_column("x").to_numpy(),
        charge=hits.get_column("charge").to_numpy(),
        x_true=x_true.reshape(event_id.shape[0], n_layers),
    )


def prediction_tables(split_hits: SplitHits, reco: ClassicalTracks, model: str = MODEL_NAME) -> dict[str, pl.DataFrame]:
    """The three prediction tables of one reconstruction, cast to the PRED_* schemas and sorted."""
    n_events, n_layers = split_hits.x_true.shape
    n_hits = np.diff(split_hits.event_start)
    columns = {
        "hits": {
            "event_id": np.repeat(split_hits.event_id, n_hits),
            "hit_id": split_hits.hit_id,
            "score": reco.hit_weight,
            "weight": reco.hit_weight,
        },
        "clusters": {
            "event_id": np.repeat(split_hits.event_id, n_layers),
            "layer": np.tile(np.arange(n_layers), n_events),
            "x_reco": reco.x_reco.reshape(-1),
            "sigma": reco.sigma.reshape(-1),
            "weight": reco.layer_weight.reshape(-1),
            "x_true": split_hits.x_true.reshape(-1),
        },
        "tracks": {
            "event_id": split_hits.event_id,
            "pt_pred": reco.pt,
            "q_pred": reco.q,
            "q_over_pt_pred": reco.q_over_pt,
            "radius": reco.radius,
            "fit_status": reco.status,
            "x_fit": pl.Series(fitted_crossings(reco.x_fit, reco.status, reco.q_over_pt)).cast(pl.List(pl.Float32)),
        },
    }
    out = {}
    for name, schema, keys in (
        ("hits", PRED_HITS_SCHEMA, ["event_id", "hit_id"]),
        ("clusters", PRED_CLUSTERS_SCHEMA, ["event_id", "layer"]),
        ("tracks", PRED_TRACKS_SCHEMA, ["event_id"]),
    ):
        dtypes = pl.from_arrow(schema.empty_table()).schema
        frame = pl.DataFrame(columns[name]).with_columns(model=pl.lit(model))
        out[name] = frame.select([pl.col(column).cast(dtype) for column, dtype in dtypes.items()]).sort(keys)
    return out


def predict_classical(
    dataset: Dataset | str | Path, split: str = "test", params: ClassicalParams | None = None
) -> dict[str, pl.DataFrame]:
    """The classical reconstruction of ``split`` as ``{"hits", "clusters", "tracks"}`` prediction tables
    (PRED_HITS_SCHEMA, PRED_CLUSTERS_SCHEMA, PRED_TRACKS_SCHEMA; model "classical"), rows sorted by event_id
    then hit_id / layer. Hits: score = weight = 1 on the strips of the kept clusters, else 0. Clusters: one
    row per event and layer (x_reco 0 and sigma pitch/sqrt(12) where no cluster is kept, weight 1/0); the
    layers that the final fit removed as outliers count as not kept. Tracks: one row per event with q/pT of
    the scattering-aware final fit, pT = 1/|q/pT|, q its sign, radius = pT / (0.3 B), the radius of the fitted
    circle [mm] (all 0 unless the fit is OK), the fit status (0 ok, 1 < 3 layers, 2 degenerate, 3
    non-finite) and x_fit, the final fit's smoothed crossing of every layer (all NaN unless the fit is OK)."""
    dataset = _as_dataset(dataset)
    split_hits = read_split(dataset, split)
    reco = track_events(
        split_hits.event_start,
        split_hits.layer,
        split_hits.strip,
        split_hits.x,
        split_hits.charge,
        dataset.config.detector,
        params,
    )
    return prediction_tables(split_hits, reco)
