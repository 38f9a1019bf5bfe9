"""Splits, padding, bucketing, truncation and streaming of pipeline.batches on small hand-made datasets.

The datasets are written with pipeline.dataset's shard writer from random rows (no simulation), so every
expectation below is recomputed independently from the Parquet rows with Polars or plain Python loops.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import pipeline.batches as batches
from pipeline.batches import (
    SPLIT_FRACTIONS,
    BatchStats,
    Geometry,
    event_hash,
    iter_batches,
    split_expr,
    split_mask,
    split_summary,
)
from pipeline.config import SimConfig
from pipeline.dataset import open_dataset, write_manifest, write_shard_tables
from pipeline.errors import ConfigError

BUCKETS = (8, 16, 24)


def write_random_dataset(path, n_events: int, shard_events: int, seed: int = 0, max_hits: int = 30):
    """A dataset of random hits: 0..max_hits hits per event, some charges tied, ids 0..n_events-1."""
    config = SimConfig(shard_events=shard_events)
    detector = config.detector
    layer_y = detector.layer_y()
    rng = np.random.default_rng(seed)
    entries = []
    for shard_index, first in enumerate(range(0, n_events, shard_events)):
        n = min(shard_events, n_events - first)
        n_hits = rng.integers(0, max_hits + 1, size=n)
        event_id = np.repeat(np.arange(first, first + n), n_hits)
        hit_id = np.concatenate([np.arange(k) for k in n_hits]) if n_hits.sum() else np.zeros(0, int)
        layer = rng.integers(0, detector.n_layers, size=len(event_id))
        strip = rng.integers(0, detector.n_strips, size=len(event_id))
        # charges on a coarse grid so that ties occur inside events
        charge = rng.integers(1, 8, size=len(event_id)) / 8.0
        hits = {
            "event_id": event_id,
            "hit_id": hit_id,
            "layer": layer,
            "strip": strip,
            "x": detector.strip_center(strip),
            "y": layer_y[layer],
            "charge": charge,
            "charge_muon": charge * (rng.random(len(event_id)) < 0.5),
            "is_signal": rng.random(len(event_id)) < 0.5,
            "particle_id": np.zeros(len(event_id), int),
        }
        events = {
            "event_id": np.arange(first, first + n),
            "pt": rng.uniform(20, 50, n),
            "q": rng.choice([-1, 1], n),
            "x0": rng.normal(0, 100, n),
            "theta0": rng.normal(0, 0.05, n),
            "n_hits": n_hits,
            "x_true": rng.normal(0, 100, (n, detector.n_layers)),
        }
        entries.append(write_shard_tables(path, shard_index, first, hits, events, config, seed, code_version="test"))
    write_manifest(path, config, seed, entries, code_version="test")
    return open_dataset(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_random_dataset(tmp_path_factory.mktemp("batches") / "data", n_events=300, shard_events=80)


@pytest.fixture(scope="module")
def tables(dataset):
    hits = dataset.hits().collect()
    events = dataset.events().collect()
    return hits, events


def expected_features(x, y, charge, layer):
    """Normalisation of the default detector written out by hand: x relative to the event's median as
    asinh(dx / 10 mm) / 4, y in [0, 1575], 16 layers."""
    x_relative = np.arcsinh((x - np.median(x)) / 10.0) / 4.0
    return np.stack([x_relative, (y - 787.5) / 787.5, charge / 1.0, (layer - 7.5) / 7.5], axis=-1)


def all_batches(dataset, split=None, batch_size=7, **kwargs):
    return list(iter_batches(dataset, split, batch_size, BUCKETS, **kwargs))


# ---- splits ----------------------------------------------------------------------------------------------


def _hash32_reference(event_id: int) -> int:
    """Thomas Mueller's 32-bit integer hash (``x = ((x >> 16) ^ x) * 0x45d9f3b`` twice, then ``x ^= x >> 16``, in
    wrapping uint32 arithmetic, as its C code reads) of the id folded to 32 bits (low half xor high half), on
    Python integers: no int64 arithmetic that could overflow."""
    x = (event_id & 0xFFFFFFFF) ^ ((event_id >> 32) & 0xFFFFFFFF)
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


def _split_reference(event_ids, split: str) -> np.ndarray:
    """The documented split (docs/contracts.md, "Splits"): the splits take consecutive ranges of the 32-bit hash,
    train the first 80 %, val the next 10 %, test the last 10 %, each edge the cumulative fraction of 2^32
    rounded to an integer (exact rational arithmetic)."""
    from fractions import Fraction

    fractions = {"train": Fraction(8, 10), "val": Fraction(1, 10), "test": Fraction(1, 10)}
    assert set(fractions) == set(SPLIT_FRACTIONS)
    names = list(fractions)
    lo = round(sum((fractions[name] for name in names[: names.index(split)]), Fraction(0)) * 2**32)
    hi = round(sum((fractions[name] for name in names[: names.index(split) + 1]), Fraction(0)) * 2**32)
    return np.array([lo <= _hash32_reference(int(event_id)) < hi for event_id in event_ids])


#: ids with a high half: the fold to 32 bits matters
_LARGE_IDS = [2**32, 2**40 + 7, 2**62 + 11, 123_456_789_012, 2**63 - 1]


def test_split_is_the_documented_hash_split_and_covers_each_event_once():
    event_id = np.concatenate([np.arange(200_000), _LARGE_IDS]).astype(np.int64)
    masks = {split: split_mask(event_id, split) for split in SPLIT_FRACTIONS}
    assert_array_equal(sum(m.astype(int) for m in masks.values()), 1)
    for split, fraction in SPLIT_FRACTIONS.items():
        assert_array_equal(masks[split], _split_reference(event_id, split), err_msg=split)
        # binomial: 5 standard deviations
        tolerance = 5 * np.sqrt(fraction * (1 - fraction) / len(event_id))
        assert abs(masks[split].mean() - fraction) < tolerance
    # a hash, not a range: neighbouring ids are spread over splits
    assert 0.1 < np.mean(masks["train"][1:] != masks["train"][:-1]) < 0.5


def test_event_hash_in_numpy_and_polars_is_muellers_hash():
    event_id = np.concatenate([np.arange(5000), _LARGE_IDS]).astype(np.int64)
    expected = np.array([_hash32_reference(int(i)) for i in event_id], dtype=np.int64)
    assert_array_equal(event_hash(event_id), expected)
    frame = pl.DataFrame({"event_id": event_id})
    assert_array_equal(frame.select(batches.event_hash_expr()).to_series().to_numpy(), expected)
    for split in SPLIT_FRACTIONS:
        assert_array_equal(frame.select(split_expr(split)).to_series().to_numpy(), _split_reference(event_id, split))


def test_unknown_split_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown split"):
        split_expr("validation")


# ---- padding and bucketing -------------------------------------------------------------------------------


def test_padding_bucketing_and_features_match_parquet_rows(dataset, tables):
    hits, events = tables
    per_event = {key[0]: frame.sort("hit_id") for key, frame in hits.group_by("event_id") if key[0] is not None}
    events_by_id = {row["event_id"]: row for row in events.iter_rows(named=True)}
    seen = 0
    for batch in all_batches(dataset):
        n_nodes = batch.mask.shape[1]
        assert n_nodes in BUCKETS
        assert batch.features.shape == (7, n_nodes, 4)
        assert batch.x_true.shape == (7, 16)
        for row in range(7):
            if not batch.event_mask[row]:
                assert batch.event_id[row] == -1
                assert not batch.mask[row].any()
                assert np.all(batch.features[row] == 0)
                continue
            seen += 1
            event_id = int(batch.event_id[row])
            rows = per_event.get(event_id)
            n_all = 0 if rows is None else len(rows)
            # the smallest bucket that fits, or the largest one (then truncated)
            fitting = [b for b in BUCKETS if b >= n_all]
            assert n_nodes == (fitting[0] if fitting else BUCKETS[-1])
            n_kept = min(n_all, BUCKETS[-1])
            assert_array_equal(batch.mask[row], np.arange(n_nodes) < n_kept)
            assert np.all(batch.hit_id[row, n_kept:] == -1)
            assert np.all(batch.features[row, n_kept:] == 0)
            if n_all > BUCKETS[-1]:
                continue  # checked in the truncation test
            if n_all:
                assert_array_equal(batch.hit_id[row, :n_kept], rows["hit_id"].to_numpy())
                x, y = rows["x"].to_numpy(), rows["y"].to_numpy()
                charge, layer = rows["charge"].to_numpy(), rows["layer"].to_numpy()
                assert_allclose(batch.x[row, :n_kept], x)
                assert_allclose(batch.features[row, :n_kept], expected_features(x, y, charge, layer), atol=1e-6)
                assert_array_equal(batch.layer[row, :n_kept], layer)
                assert_array_equal(batch.label[row, :n_kept], rows["is_signal"].to_numpy().astype(np.float32))
            truth = events_by_id[event_id]
            assert_allclose(batch.pt[row], truth["pt"])
            assert batch.q[row] == truth["q"]
            assert_allclose(batch.x_true[row], truth["x_true"])
    assert seen == dataset.n_events


def test_events_above_the_largest_bucket_keep_their_highest_charge_hits(dataset, tables):
    hits, _ = tables
    max_nodes = BUCKETS[-1]
    stats = BatchStats()
    kept_by_event = {}
    for batch in iter_batches(dataset, None, 7, BUCKETS, stats=stats):
        for row in np.flatnonzero(batch.event_mask):
            kept_by_event[int(batch.event_id[row])] = batch.hit_id[row][batch.mask[row]]
    n_truncated = 0
    n_dropped = 0
    for (event_id,), rows in hits.group_by("event_id"):
        if len(rows) <= max_nodes:
            continue
        n_truncated += 1
        n_dropped += len(rows) - max_nodes
        # independent reference: Python's stable sort by (-charge, hit_id), keep the first max_nodes
        pairs = sorted(
            zip(rows["charge"].to_list(), rows["hit_id"].to_list(), strict=True), key=lambda p: (-p[0], p[1])
        )
        expected = sorted(hit for _, hit in pairs[:max_nodes])
        assert_array_equal(kept_by_event[event_id], expected)
    assert n_truncated > 0, "the fixture should hold events above the largest bucket"
    assert stats.n_truncated == n_truncated
    assert stats.n_hits_dropped == n_dropped
    assert stats.n_events == 300


# ---- epochs and streaming --------------------------------------------------------------------------------


def test_one_epoch_covers_each_event_of_the_split_exactly_once(dataset, tables):
    _, events = tables
    event_id = events["event_id"].to_numpy()
    for split in SPLIT_FRACTIONS:
        expected = np.sort(event_id[split_mask(event_id, split)])
        for shuffle_seed in (None, 3):
            got = np.concatenate(
                [b.event_id[b.event_mask] for b in all_batches(dataset, split, shuffle_seed=shuffle_seed)]
            )
            assert_array_equal(np.sort(got), expected)  # sorted equal and same length: each exactly once
        assert split_summary(dataset, split)[0] == len(expected)


def _shuffled_stream(events: pl.DataFrame, split: str, seed: int, shard_events: int) -> np.ndarray:
    """The documented shuffled order (iter_batches' ``shuffle_seed``): the shards in the order of
    ``default_rng(seed).permutation(n_shards)``, and each shard's events of the split (by id) in the order of the
    same generator's next ``permutation`` of their count; the shards of the fixture hold ``shard_events`` ids each."""
    rng = np.random.default_rng(seed)
    event_id = np.sort(events["event_id"].to_numpy())
    shards = [event_id[first : first + shard_events] for first in range(0, event_id.size, shard_events)]
    stream = []
    for shard in rng.permutation(len(shards)):
        ids = shards[shard][_split_reference(shards[shard], split)]
        stream.append(ids[rng.permutation(ids.size)])
    return np.concatenate(stream)


def test_shuffle_order_is_the_documented_one(dataset, tables):
    """Each bucket's batches hold the events of the documented shuffled stream that go to that bucket (the
    smallest that fits the event's hits, the largest for a larger event), in stream order."""
    hits, events = tables
    counts = dict(hits.group_by("event_id").len().iter_rows())

    def bucket_of(event_id: int) -> int:
        return next(b for b in BUCKETS if b >= min(counts.get(event_id, 0), BUCKETS[-1]))

    streams = {}
    for seed in (5, 6):
        stream = [int(e) for e in _shuffled_stream(events, "train", seed, shard_events=80)]
        assert stream != sorted(stream)  # the fixture's shards are shuffled, not kept in id order
        got = {bucket: [] for bucket in BUCKETS}
        for batch in all_batches(dataset, "train", shuffle_seed=seed):
            got[batch.mask.shape[1]] += batch.event_id[batch.event_mask].tolist()
        for bucket in BUCKETS:
            assert got[bucket] == [e for e in stream if bucket_of(e) == bucket], (seed, bucket)
        streams[seed] = got
    assert streams[5] != streams[6]


def test_streaming_reads_one_shard_at_a_time(dataset, monkeypatch):
    reads = []
    original = batches.read_shard

    def spy(hits_path, events_path, *args, **kwargs):
        reads.append(hits_path.name)
        return original(hits_path, events_path, *args, **kwargs)

    monkeypatch.setattr(batches, "read_shard", spy)
    assert dataset.n_shards == 4
    stream = iter_batches(dataset, None, 4, BUCKETS)
    next(stream)
    assert reads == ["part-00000.parquet"]  # nothing read ahead
    list(stream)
    assert reads == [f"part-{i:05d}.parquet" for i in range(4)]

    reads.clear()
    stats = BatchStats()
    taken = all_batches(dataset, None, max_events=50, stats=stats)
    assert len(reads) == 1  # 50 events fit in the first shard of 80: later shards are never opened
    assert sum(int(b.event_mask.sum()) for b in taken) == 50 == stats.n_events


def test_geometry_from_detector(dataset):
    geometry = Geometry.from_detector(dataset.config.detector)
    assert geometry.n_layers == 16
    assert geometry.layer_y[:2] == (0.0, 25.0)
    assert geometry.layer_y[8] == 750.0
    assert geometry.pitch == 0.5
    assert geometry.b_field == 1.0


def test_bad_arguments_are_config_errors(dataset):
    with pytest.raises(ConfigError, match="batch size"):
        next(iter_batches(dataset, "train", 0, BUCKETS))
    with pytest.raises(ConfigError, match="node buckets"):
        next(iter_batches(dataset, "train", 4, ()))
