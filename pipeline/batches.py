"""Events as padded, masked arrays for JAX.

An event's nodes are its fired strips. Events are padded to one of a few fixed node budgets (buckets) so
``jit`` compiles a handful of shapes, not one per event. Shapes below: ``B`` events per batch, ``N`` the node
budget of the bucket, ``L`` the number of layers.

Splits
    Every event belongs to exactly one of ``train``/``val``/``test`` (80/10/10, :data:`SPLIT_FRACTIONS`),
    decided by a 32-bit integer hash of its ``event_id`` alone (:func:`event_hash`), so the split is the same
    for every reader, every number of shards and every run, and needs no stored list.

Node features (fixed normalisation, :func:`node_features`)
    The four features are scaled with constants of the detector config, not with statistics of the data,
    so a model's inputs mean the same thing on any dataset of that detector:

    - ``x``: relative to the event, ``asinh((x - median_x) / X_RELATIVE_SCALE) / X_RELATIVE_COMPRESSION`` where
      ``median_x`` is the median x of the event's fired strips. The muon leaves about half of an event's
      strips, so the median sits in its road; the asinh keeps millimetre differences near the road
      resolvable (1 mm -> 0.025) while hits half a metre away stay O(1), where an absolute
      ``x / half_width`` would squeeze the road into a band 0.001 wide that the small networks cannot
      resolve; the shift also makes the inputs translation invariant, as the physics is;
    - ``y``: the layer plane mapped linearly from [first layer, last layer] to [-1, 1];
    - ``charge``: ``charge / charge_mean`` (a strip's share of a mean cluster charge, mostly in [0, 1]);
    - ``layer``: the layer index mapped linearly from [0, L-1] to [-1, 1].

Buckets and truncation
    An event goes into the batch stream of the smallest bucket whose node budget holds all its hits. An event
    with more hits than the largest bucket keeps its ``N_max`` highest-charge hits (ties: lower ``hit_id``
    first), in ``hit_id`` order; :class:`BatchStats` counts how often that happens.

Streaming
    :func:`iter_batches` reads one shard at a time (one Polars query per shard and table) and holds at most
    one shard plus one pending batch per bucket, so a dataset larger than memory can be iterated. A batch
    never mixes buckets; the last, partial batch of each bucket is padded with events whose ``event_mask``
    is False.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import polars as pl

from pipeline.config import POINT_RESOLUTION, DetectorConfig, point_resolution
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.dataset import Dataset

#: share of the events in each split (by event_id hash)
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
SPLITS: tuple[str, ...] = tuple(SPLIT_FRACTIONS)
#: the node features, in the order of ``Batch.features[..., k]``
NODE_FEATURES: tuple[str, ...] = ("x", "y", "charge", "layer")

_HASH_MODULUS = 2**32
# multiplier of a well-tested 32-bit integer mixer; small enough that (x < 2^32) * multiplier < 2^63, so the
# same arithmetic runs overflow-free in int64 in both NumPy and Polars
_HASH_MULTIPLIER = 0x45D9F3B


class Batch(NamedTuple):
    """One padded batch (a pytree of arrays; NumPy on the host, JAX arrays on the device)."""

    features: np.ndarray  # float32 [B, N, 4]: normalised (x, y, charge, layer)
    x: np.ndarray  # float32 [B, N]: strip centre [mm]
    y: np.ndarray  # float32 [B, N]: layer plane [mm]
    layer: np.ndarray  # int32 [B, N]: layer index 0..L-1 (0 on padding)
    charge: np.ndarray  # float32 [B, N]
    mask: np.ndarray  # bool [B, N]: True on real hits, False on padding
    label: np.ndarray  # float32 [B, N]: 1 for signal (muon) hits, 0 for background and padding
    #: float32 [B, N]: the muon's share of the strip's charge, :func:`truth_share_expr` (0 on padding)
    share: np.ndarray
    hit_id: np.ndarray  # int32 [B, N]: hit_id of the node (-1 on padding)
    event_id: np.ndarray  # int64 [B]
    pt: np.ndarray  # float32 [B]: true pT [GeV]
    q: np.ndarray  # float32 [B]: true charge +-1
    x_true: np.ndarray  # float32 [B, L]: true crossing x per layer [mm], NaN where absent
    event_mask: np.ndarray  # bool [B]: True on real events, False on padding events of a last batch


class Geometry(NamedTuple):
    """What the reconstruction needs to know about the detector (static under jit)."""

    layer_y: tuple[float, ...]  # [mm], length L
    pitch: float  # [mm]
    b_field: float  # [T]
    #: material per layer [radiation lengths] (0: no multiple scattering), for the scattering-aware fit
    x_over_x0: float = 0.0
    #: the active width [mm]: a layer scatters a track only where it crosses inside
    x_min: float = -math.inf
    x_max: float = math.inf
    #: the clean-cluster charge-centroid resolution [mm] (pipeline.config.point_resolution), the point error of
    #: the scattering-aware fits; the default detector's unless given
    point_sigma: float = POINT_RESOLUTION["default"]

    @property
    def n_layers(self) -> int:
        return len(self.layer_y)

    @classmethod
    def from_detector(cls, detector: DetectorConfig) -> Geometry:
        return cls(
            layer_y=tuple(float(v) for v in detector.layer_y()),
            pitch=float(detector.pitch),
            b_field=float(detector.b_field),
            x_over_x0=float(detector.x_over_x0) if detector.multiple_scattering else 0.0,
            x_min=float(detector.x_min),
            x_max=float(detector.x_max),
            point_sigma=point_resolution(detector),
        )


# ---- splits ----------------------------------------------------------------------------------------------


def truth_share_expr(charge_muon: str = "charge_muon", charge: str = "charge") -> pl.Expr:
    """The muon's share of a strip's measured charge, ``charge_muon / charge`` clipped to [0, 1] (float32).

    The target of the share models (model.objectives). With electronic noise the measured charge may fall below
    the muon's own (a negative noise draw): such a strip is all the muon's, share 1. A fired strip's charge is
    above the threshold (> 0), so the ratio is finite.
    """
    return (pl.col(charge_muon) / pl.col(charge)).clip(0.0, 1.0).cast(pl.Float32)


def event_hash_expr(column: str = "event_id") -> pl.Expr:
    """Polars twin of :func:`event_hash`: an Int64 in [0, 2^32) per event id."""
    event_id = pl.col(column).cast(pl.Int64)
    h = (event_id % _HASH_MODULUS).xor((event_id // _HASH_MODULUS) % _HASH_MODULUS)
    h = ((h // 65536).xor(h) * _HASH_MULTIPLIER) % _HASH_MODULUS
    h = ((h // 65536).xor(h) * _HASH_MULTIPLIER) % _HASH_MODULUS
    return (h // 65536).xor(h)


def event_hash(event_id: np.ndarray) -> np.ndarray:
    """A well-mixed 32-bit hash of each event id, as int64 in [0, 2^32).

    The 64-bit id is folded to 32 bits (low xor high half), then mixed twice by xor-shift-multiply; every
    intermediate stays below 2^63, so NumPy and Polars (:func:`event_hash_expr`) agree bit for bit.
    """
    event_id = np.asarray(event_id, dtype=np.int64)
    h = (event_id % _HASH_MODULUS) ^ ((event_id // _HASH_MODULUS) % _HASH_MODULUS)
    h = (((h // 65536) ^ h) * _HASH_MULTIPLIER) % _HASH_MODULUS
    h = (((h // 65536) ^ h) * _HASH_MULTIPLIER) % _HASH_MODULUS
    return (h // 65536) ^ h


def _split_bounds(split: str) -> tuple[int, int]:
    """The split's half-open range of hash values [lo, hi)."""
    if split not in SPLIT_FRACTIONS:
        raise ConfigError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    edges = np.concatenate([[0.0], np.cumsum(list(SPLIT_FRACTIONS.values()))])
    bounds = np.round(edges * _HASH_MODULUS).astype(np.int64)
    bounds[-1] = _HASH_MODULUS
    position = SPLITS.index(split)
    return int(bounds[position]), int(bounds[position + 1])


def split_expr(split: str, column: str = "event_id") -> pl.Expr:
    """Boolean Polars expression: the event (row) belongs to ``split`` ("train", "val" or "test")."""
    lo, hi = _split_bounds(split)
    h = event_hash_expr(column)
    return (h >= lo) & (h < hi)


def split_mask(event_id: np.ndarray, split: str) -> np.ndarray:
    """NumPy twin of :func:`split_expr`: bool array, True where the event belongs to ``split``."""
    lo, hi = _split_bounds(split)
    h = event_hash(event_id)
    return (h >= lo) & (h < hi)


# ---- features --------------------------------------------------------------------------------------------


def feature_scaling(detector: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(offset, scale)``, float32 [4] each: ``feature = (value - offset) / scale`` for (x, y, charge, layer)."""
    layer_y = detector.layer_y()
    x_mid = 0.5 * (detector.x_max + detector.x_min)
    x_half = 0.5 * (detector.x_max - detector.x_min)
    y_mid = 0.5 * (layer_y[-1] + layer_y[0])
    y_half = max(0.5 * (layer_y[-1] - layer_y[0]), 1.0)  # one layer: any positive scale keeps y at 0
    layer_mid = 0.5 * (detector.n_layers - 1)
    layer_half = max(layer_mid, 1.0)
    offset = np.array([x_mid, y_mid, 0.0, layer_mid], dtype=np.float32)
    scale = np.array([x_half, y_half, detector.charge_mean, layer_half], dtype=np.float32)
    return offset, scale


#: [mm] scale of the event-relative x feature (about a cluster's width)
X_RELATIVE_SCALE = 10.0
#: divides the asinh so that a hit at the far edge of the detector stays O(1)
X_RELATIVE_COMPRESSION = 4.0


def node_features(
    x: np.ndarray,
    y: np.ndarray,
    charge: np.ndarray,
    layer: np.ndarray,
    detector: DetectorConfig,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Normalised node features, float32 ``[..., N, 4]`` from arrays ``[..., N]`` (x, y [mm], charge, layer).

    The last axis of the inputs is an event's nodes; ``mask`` (same shape, default all True) marks the real
    ones, over which the event's median x is taken.
    """
    offset, scale = feature_scaling(detector)
    x = np.asarray(x, np.float32)
    mask = np.ones(x.shape, bool) if mask is None else np.asarray(mask, bool)
    with warnings.catch_warnings():  # padding events are all-NaN slices: their median is replaced below
        warnings.simplefilter("ignore", RuntimeWarning)
        median_x = np.nanmedian(np.where(mask, x, np.nan), axis=-1, keepdims=True)
    median_x = np.nan_to_num(median_x, nan=0.0)
    x_relative = np.arcsinh((x - median_x) / X_RELATIVE_SCALE) / X_RELATIVE_COMPRESSION
    raw = np.stack(
        [np.zeros_like(x), np.asarray(y, np.float32), np.asarray(charge, np.float32), np.asarray(layer)],
        axis=-1,
    ).astype(np.float32)
    features = (raw - offset) / scale
    features[..., 0] = x_relative
    return features.astype(np.float32)


# ---- buckets ---------------------------------------------------------------------------------------------


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Node budgets sorted ascending, without duplicates; ConfigError if empty or not positive."""
    values = tuple(sorted({int(b) for b in buckets}))
    if not values or values[0] < 1:
        raise ConfigError(f"node buckets must be a non-empty list of positive sizes, got {list(buckets)}")
    return values


def bucket_index(n_hits: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """Index of the smallest bucket holding ``n_hits`` nodes; the largest bucket for bigger events.

    ``buckets`` must be sorted ascending (see :func:`check_buckets`).
    """
    index = np.searchsorted(np.asarray(buckets), np.asarray(n_hits), side="left")
    return np.minimum(index, len(buckets) - 1)


@dataclass
class BatchStats:
    """Counters filled while iterating (pass one to :func:`iter_batches`)."""

    n_shards: int = 0  #: shard files read
    n_events: int = 0  #: real events put into batches
    n_batches: int = 0
    n_truncated: int = 0  #: events with more hits than the largest bucket
    n_hits_dropped: int = 0  #: hits dropped from those events (their lowest-charge hits)

    @property
    def truncated_fraction(self) -> float:
        return self.n_truncated / self.n_events if self.n_events else 0.0


# ---- reading shards --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardEvents:
    """The events of one split in one shard, with their (possibly truncated) hits as flat arrays.

    Events are sorted by ``event_id``; hits by (event_id, hit_id). Event ``k``'s hits are rows
    ``start[k] : start[k] + count[k]`` of the hit arrays.
    """

    event_id: np.ndarray  # int64 [E]
    pt: np.ndarray  # float32 [E]
    q: np.ndarray  # float32 [E]
    x_true: np.ndarray  # float32 [E, L]
    start: np.ndarray  # int64 [E]
    count: np.ndarray  # int64 [E]: hits kept
    n_all: np.ndarray  # int64 [E]: hits before truncation
    hit_id: np.ndarray  # int32 [H]
    layer: np.ndarray  # int32 [H]
    x: np.ndarray  # float32 [H]
    y: np.ndarray  # float32 [H]
    charge: np.ndarray  # float32 [H]
    label: np.ndarray  # float32 [H]
    share: np.ndarray  # float32 [H]

    @property
    def n_events(self) -> int:
        return len(self.event_id)

    def subset(self, indices: np.ndarray) -> ShardEvents:
        """A compact copy holding only events ``indices`` (in that order), so the shard can be freed."""
        indices = np.asarray(indices, dtype=np.int64)
        count = self.count[indices]
        source = np.repeat(self.start[indices], count) + (
            np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        )
        return ShardEvents(
            event_id=self.event_id[indices],
            pt=self.pt[indices],
            q=self.q[indices],
            x_true=self.x_true[indices],
            start=np.cumsum(count) - count,
            count=count,
            n_all=self.n_all[indices],
            hit_id=self.hit_id[source],
            layer=self.layer[source],
            x=self.x[source],
            y=self.y[source],
            charge=self.charge[source],
            label=self.label[source],
            share=self.share[source],
        )


def read_shard(
    hits_path: str | Path, events_path: str | Path, split: str | None, max_nodes: int, n_layers: int
) -> ShardEvents:
    """Read the ``split`` events of one shard (all events when ``split`` is None) with one query per table.

    Events with more than ``max_nodes`` hits keep their ``max_nodes`` highest-charge hits.
    """
    events_query = pl.scan_parquet(events_path, hive_partitioning=False)
    hits_query = pl.scan_parquet(hits_path, hive_partitioning=False)
    if split is not None:
        events_query = events_query.filter(split_expr(split))
        hits_query = hits_query.filter(split_expr(split))
    events = events_query.select("event_id", "pt", "q", "x_true").sort("event_id").collect()
    hits = (
        hits_query.select("event_id", "hit_id", "layer", "x", "y", "charge", "is_signal", share=truth_share_expr())
        .sort("event_id", "hit_id")
        .with_columns(
            n_all=pl.len().over("event_id"),
            # ordinal rank over rows sorted by hit_id: ties in charge go to the lower hit_id
            charge_rank=pl.col("charge").rank("ordinal", descending=True).over("event_id"),
        )
        .filter(pl.col("charge_rank") <= max_nodes)
        .collect()
    )
    event_id = events["event_id"].to_numpy().astype(np.int64)
    hit_event_id = hits["event_id"].to_numpy()
    start = np.searchsorted(hit_event_id, event_id, side="left").astype(np.int64)
    stop = np.searchsorted(hit_event_id, event_id, side="right").astype(np.int64)
    count = stop - start
    n_all = np.zeros(len(event_id), np.int64)
    has_hits = count > 0
    n_all[has_hits] = hits["n_all"].to_numpy()[start[has_hits]]
    x_true = np.full((len(events), n_layers), np.nan, dtype=np.float32)
    if len(events):
        x_true_flat = events["x_true"].explode().to_numpy().astype(np.float32)
        x_true[:] = x_true_flat.reshape(len(events), -1)[:, :n_layers]
    return ShardEvents(
        event_id=event_id,
        pt=events["pt"].to_numpy().astype(np.float32),
        q=events["q"].to_numpy().astype(np.float32),
        x_true=x_true,
        start=start,
        count=count,
        n_all=n_all,
        hit_id=hits["hit_id"].to_numpy().astype(np.int32),
        layer=hits["layer"].to_numpy().astype(np.int32),
        x=hits["x"].to_numpy().astype(np.float32),
        y=hits["y"].to_numpy().astype(np.float32),
        charge=hits["charge"].to_numpy().astype(np.float32),
        label=hits["is_signal"].to_numpy().astype(np.float32),
        share=hits["share"].to_numpy().astype(np.float32),
    )


def shard_files(dataset: Dataset) -> list[tuple[Path, Path]]:
    """``(hits_file, events_file)`` of every shard of the dataset, in event order."""
    return list(zip(dataset.files("hits"), dataset.files("events"), strict=True))


# ---- packing ---------------------------------------------------------------------------------------------


def pack_batch(
    parts: Sequence[tuple[ShardEvents, np.ndarray]], batch_size: int, n_nodes: int, detector: DetectorConfig
) -> Batch:
    """Pad the events ``parts = [(shard, event_indices), ...]`` (in that order) into one Batch ``[B, N]``.

    Rows after the last event are padding events (``event_mask`` False, ``pt`` = 1 GeV, ``q`` = +1, so
    per-event divisions stay finite).
    """
    n_layers = detector.n_layers
    n_events = sum(len(indices) for _, indices in parts)
    if n_events > batch_size:
        raise ValueError(f"{n_events} events do not fit a batch of {batch_size}")
    shape = (batch_size, n_nodes)
    x = np.zeros(shape, np.float32)
    y = np.zeros(shape, np.float32)
    layer = np.zeros(shape, np.int32)
    charge = np.zeros(shape, np.float32)
    mask = np.zeros(shape, bool)
    label = np.zeros(shape, np.float32)
    share = np.zeros(shape, np.float32)
    hit_id = np.full(shape, -1, np.int32)
    event_id = np.full(batch_size, -1, np.int64)
    pt = np.ones(batch_size, np.float32)
    q = np.ones(batch_size, np.float32)
    x_true = np.full((batch_size, n_layers), np.nan, np.float32)
    event_mask = np.zeros(batch_size, bool)

    row0 = 0
    for shard, indices in parts:
        indices = np.asarray(indices, dtype=np.int64)
        k = len(indices)
        rows = slice(row0, row0 + k)
        event_id[rows] = shard.event_id[indices]
        pt[rows] = shard.pt[indices]
        q[rows] = shard.q[indices]
        x_true[rows] = shard.x_true[indices]
        event_mask[rows] = True
        counts = shard.count[indices]
        if counts.max(initial=0) > n_nodes:
            raise ValueError(f"an event with {counts.max()} hits does not fit {n_nodes} nodes")
        # flat (row, column) <- source-row index of every kept hit of these events
        row = np.repeat(np.arange(k), counts) + row0
        first = np.repeat(np.cumsum(counts) - counts, counts)
        column = np.arange(counts.sum()) - first
        source = np.repeat(shard.start[indices], counts) + column
        x[row, column] = shard.x[source]
        y[row, column] = shard.y[source]
        layer[row, column] = shard.layer[source]
        charge[row, column] = shard.charge[source]
        label[row, column] = shard.label[source]
        share[row, column] = shard.share[source]
        hit_id[row, column] = shard.hit_id[source]
        mask[row, column] = True
        row0 += k

    features = node_features(x, y, charge, layer, detector, mask) * mask[..., None]
    return Batch(
        features=features.astype(np.float32),
        x=x,
        y=y,
        layer=layer,
        charge=charge,
        mask=mask,
        label=label,
        share=share,
        hit_id=hit_id,
        event_id=event_id,
        pt=pt,
        q=q,
        x_true=x_true,
        event_mask=event_mask,
    )


# ---- iteration -------------------------------------------------------------------------------------------


def iter_batches(
    dataset: Dataset,
    split: str | None,
    batch_size: int,
    buckets: Sequence[int],
    *,
    shuffle_seed: int | None = None,
    max_events: int | None = None,
    stats: BatchStats | None = None,
) -> Iterator[Batch]:
    """Stream the events of ``split`` (all events when None) as padded batches, one shard at a time.

    - ``buckets``: node budgets; each event goes to the smallest that holds it (module docstring).
    - ``shuffle_seed``: None keeps event order (shards in order, events by id); an int shuffles the shard
      order and the events inside each shard with ``numpy.random.default_rng(shuffle_seed)``. Derive it from
      (training seed, epoch) to get a fresh but reproducible order each epoch.
    - ``max_events``: stop after this many events of the (possibly shuffled) stream; later shards are not
      read. Without shuffling that is the same first events every time.
    - ``stats``: a :class:`BatchStats` to fill (events, batches, shards read, truncations).

    A batch is yielded as soon as its bucket has ``batch_size`` events, so batches of different buckets
    interleave in stream order; each bucket's last, partial batch comes at the end, padded with events whose
    ``event_mask`` is False. Every event of the split appears in exactly one batch.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if max_events is not None and max_events < 1:
        raise ConfigError(f"max_events must be >= 1, got {max_events}")
    buckets = check_buckets(buckets)
    detector = dataset.config.detector
    stats = stats if stats is not None else BatchStats()
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    files = shard_files(dataset)
    shard_order = rng.permutation(len(files)) if rng is not None else np.arange(len(files))

    # per bucket: the events waiting for a full batch, as (shard, indices) parts in stream order
    pending: list[list[tuple[ShardEvents, list[int]]]] = [[] for _ in buckets]
    n_pending = [0] * len(buckets)
    remaining = max_events

    def emit(bucket: int) -> Batch:
        parts = [(shard, np.asarray(indices, dtype=np.int64)) for shard, indices in pending[bucket]]
        pending[bucket] = []
        n_pending[bucket] = 0
        stats.n_batches += 1
        return pack_batch(parts, batch_size, buckets[bucket], detector)

    for shard_position in shard_order:
        if remaining is not None and remaining <= 0:
            break
        hits_path, events_path = files[shard_position]
        shard = read_shard(hits_path, events_path, split, buckets[-1], detector.n_layers)
        stats.n_shards += 1
        order = rng.permutation(shard.n_events) if rng is not None else np.arange(shard.n_events)
        if remaining is not None:
            order = order[:remaining]
            remaining -= len(order)
        stats.n_events += len(order)
        stats.n_truncated += int((shard.n_all[order] > shard.count[order]).sum())
        stats.n_hits_dropped += int((shard.n_all[order] - shard.count[order]).sum())
        event_bucket = bucket_index(shard.count[order], buckets)
        for index, bucket in zip(order.tolist(), event_bucket.tolist(), strict=True):
            parts = pending[bucket]
            if parts and parts[-1][0] is shard:
                parts[-1][1].append(index)
            else:
                parts.append((shard, [index]))
            n_pending[bucket] += 1
            if n_pending[bucket] == batch_size:
                yield emit(bucket)
        # events still waiting keep a compact copy, not the whole shard: memory stays at one shard
        for parts in pending:
            if parts and parts[-1][0] is shard:
                parts[-1] = (shard.subset(np.asarray(parts[-1][1])), list(range(len(parts[-1][1]))))
        del shard
    for bucket in range(len(buckets)):
        if n_pending[bucket]:
            yield emit(bucket)


def split_summary(dataset: Dataset, split: str | None) -> tuple[int, int]:
    """``(n_events, max_hits)`` of a split from the events table (one query; no hits are read)."""
    query = dataset.events()
    if split is not None:
        query = query.filter(split_expr(split))
    row = query.select(pl.len().alias("n"), pl.col("n_hits").max().fill_null(0).alias("max_hits")).collect()
    return int(row["n"][0]), int(row["max_hits"][0])
