"""The simulation's rows stay exactly those of the reference implementation while its speed changes.

The digests below were taken from the rows written by the implementation before the performance work of
issue #13 (process-pool workers, fresh arrays per shard, the former Parquet encodings): a dataset of 3500
events, seed 7, shards of 1000 events, read back with Polars. Any change to the kernels, the buffers, the
worker threads or the writer must leave them unchanged. ``charge_muon`` (issue 24) came later: the older columns
keep their digest (the default detector has no electronic noise and no cross-talk, and draws nothing more), and
the new column has its own, taken when it was added.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.config import DETECTORS, BackgroundConfig, DetectorConfig, MuonConfig, SimConfig
from pipeline.dataset import PARQUET_WRITE_OPTIONS, open_dataset
from simulation.generate import ShardBuffers, generate_events
from simulation.shards import simulate_dataset

REFERENCE_CONFIG = SimConfig(shard_events=1000)
REFERENCE_EVENTS = 3500
REFERENCE_SEED = 7
REFERENCE_HITS = 431_299
REFERENCE_DIGESTS = {
    "hits": "dff251a0d2bbc1b18e740c1d8dbf997b",
    "events": "6522c90fc69838dc53f4e7f593d781ee",
    "charge_muon": "d295d257397cef66ba87defcc056994d",
}


def rows_digest(frame: pl.DataFrame) -> str:
    """SHA-256 (32 hex digits) of every column's values, bit for bit, in order (list columns flattened)."""
    digest = hashlib.sha256()
    for name in frame.columns:
        column = frame[name]
        if isinstance(column.dtype, pl.List | pl.Array):
            column = column.explode()
        values = np.ascontiguousarray(column.to_numpy())
        digest.update(name.encode())
        digest.update(str(values.dtype).encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:32]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_dataset_rows_are_those_of_the_reference_implementation(tmp_path: Path, workers: int) -> None:
    out = tmp_path / "dataset"
    simulate_dataset(out, n_events=REFERENCE_EVENTS, seed=REFERENCE_SEED, config=REFERENCE_CONFIG, workers=workers)
    dataset = open_dataset(out)
    assert dataset.n_hits == REFERENCE_HITS
    hits = dataset.hits().collect()
    assert rows_digest(hits.drop("charge_muon")) == REFERENCE_DIGESTS["hits"]
    assert rows_digest(hits.select("charge_muon")) == REFERENCE_DIGESTS["charge_muon"]
    assert rows_digest(dataset.events().collect()) == REFERENCE_DIGESTS["events"]


#: configs the reference dataset does not cover: electronic noise and cross-talk (the realistic detector), a
#: dense low-momentum background, wide constant-charge clusters without scattering, a gamma shape below 1
OTHER_CONFIGS = {
    "realistic": SimConfig(detector=DETECTORS["realistic"]),
    "busy": SimConfig(
        muon=MuonConfig(pt_min=0.5, pt_max=2.0),
        background=BackgroundConfig(
            noise_strips_per_layer=6.0, noise_clusters_per_layer=4.0, extra_tracks_per_event=8.0
        ),
    ),
    "wide_flat_unscattered": SimConfig(
        detector=DetectorConfig(charge_sigma_pitch=1.5, charge_rms=0.0, multiple_scattering=False, crosstalk=0.2)
    ),
    "small_shape_noisy": SimConfig(detector=DetectorConfig(charge_rms=1.5, electronic_noise=0.02, threshold=0.05)),
}
#: SHA-256 (32 hex digits) of every column of generate_events(config, 5, 1000, 600), hits then events, taken
#: from the implementation before the kernel work of issue #28 (reference counts, hits written by pass 2)
OTHER_DIGESTS = {
    "realistic": "8469525bbc5b5b4ab7cd9f0edce74d1c",
    "busy": "f2af80aa67005da13431058674313e39",
    "wide_flat_unscattered": "6cc54ff9887cc590dc7f2e53c1f08dd5",
    "small_shape_noisy": "98ed150a05c9fced919e16d03fa5da8d",
}


@pytest.mark.parametrize("name", sorted(OTHER_CONFIGS))
def test_rows_of_other_configs_are_those_of_the_reference_implementation(name: str) -> None:
    hits, events = generate_events(OTHER_CONFIGS[name], 5, 1000, 600)
    digest = hashlib.sha256()
    for columns in (hits, events):
        for key, values in columns.items():
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(values).tobytes())
    assert digest.hexdigest()[:32] == OTHER_DIGESTS[name]


def test_reused_buffers_give_the_same_rows_as_fresh_arrays() -> None:
    """Shards of different sizes, growing and shrinking, through one ShardBuffers: each call's columns equal
    those of a call with its own arrays (and a later call overwrites the views of an earlier one)."""
    config = SimConfig()
    buffers = ShardBuffers()
    for first, n in [(0, 300), (300, 700), (1000, 50), (1050, 0), (2000, 400)]:
        fresh_hits, fresh_events = generate_events(config, 11, first, n)
        hits, events = generate_events(config, 11, first, n, buffers=buffers)
        assert hits.keys() == fresh_hits.keys()
        assert events.keys() == fresh_events.keys()
        for name in fresh_hits:
            np.testing.assert_array_equal(hits[name], fresh_hits[name], strict=True)
        for name in fresh_events:
            np.testing.assert_array_equal(events[name], fresh_events[name], strict=True)
    # the columns of the last call are views of the buffers
    assert np.shares_memory(hits["charge"], buffers.take("charge", 1, np.dtype(np.float32)))


def test_each_thread_keeps_its_own_shard_buffers() -> None:
    """A Dask worker's task thread reuses its buffers from shard to shard; two threads never share them."""
    from concurrent.futures import ThreadPoolExecutor

    from simulation.shards import thread_buffers

    mine = thread_buffers()
    assert thread_buffers() is mine
    with ThreadPoolExecutor(max_workers=1) as pool:
        other = pool.submit(thread_buffers).result()
    assert isinstance(other, ShardBuffers)
    assert other is not mine


def test_shards_are_written_with_the_documented_encodings(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    simulate_dataset(out, n_events=300, seed=1, config=SimConfig())
    metadata = pq.read_metadata(out / "hits" / "part-00000.parquet")
    row_group = metadata.row_group(0)
    columns = {row_group.column(i).path_in_schema: row_group.column(i) for i in range(row_group.num_columns)}
    for name, encoding in PARQUET_WRITE_OPTIONS["column_encoding"].items():
        assert encoding in columns[name].encodings, name
    assert "RLE_DICTIONARY" in columns["particle_id"].encodings
    assert not any("DICTIONARY" in encoding for encoding in columns["layer"].encodings)
    assert all(column.compression == "ZSTD" for column in columns.values())
    assert columns["event_id"].statistics is not None
    assert columns["strip"].statistics is None


def test_a_failing_worker_thread_stops_the_run_with_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import simulation.generate

    real = simulation.generate.generate_events

    def failing(config, seed, first_event_id, n_events, **options):
        if first_event_id == 2000:
            raise RuntimeError("kernel failed on shard 2")
        return real(config, seed, first_event_id, n_events, **options)

    monkeypatch.setattr(simulation.generate, "generate_events", failing)
    with pytest.raises(RuntimeError, match="kernel failed on shard 2"):
        simulate_dataset(tmp_path / "dataset", n_events=REFERENCE_EVENTS, seed=1, config=REFERENCE_CONFIG, workers=2)
    assert not (tmp_path / "dataset" / "manifest.json").exists()
