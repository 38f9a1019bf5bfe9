"""The dataset file contract (pipeline/dataset.py), sharded generation (simulation/shards.py), inspect."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from polars.testing import assert_frame_equal

import simulation.generate as generate_module
from pipeline.config import BackgroundConfig, MuonConfig, SimConfig
from pipeline.dataset import (
    MANIFEST_NAME,
    STAGING_DIR,
    STAGING_RECORD,
    Dataset,
    file_sha256,
    open_dataset,
    read_shard_metadata,
    write_shard_tables,
)
from pipeline.errors import ConfigError, DatasetError
from pipeline.inspect import summarize_dataset
from simulation.shards import finalize_dataset, plan_shards, prepare_dataset, simulate_dataset, simulate_shard
from tests.helpers import snapshot

# Written out from docs/contracts.md ("Dataset folder"), independently of pipeline/schema.py.
HITS_COLUMNS_DUCKDB = {
    "event_id": "BIGINT",
    "hit_id": "INTEGER",
    "layer": "SMALLINT",
    "strip": "INTEGER",
    "x": "FLOAT",
    "y": "FLOAT",
    "charge": "FLOAT",
    "charge_muon": "FLOAT",
    "is_signal": "BOOLEAN",
    "particle_id": "INTEGER",
}
EVENTS_COLUMNS_DUCKDB = {
    "event_id": "BIGINT",
    "pt": "FLOAT",
    "q": "TINYINT",
    "x0": "FLOAT",
    "theta0": "FLOAT",
    "n_hits": "INTEGER",
    "x_true": "FLOAT[]",
}
HITS_COLUMNS_POLARS = {
    "event_id": pl.Int64,
    "hit_id": pl.Int32,
    "layer": pl.Int16,
    "strip": pl.Int32,
    "x": pl.Float32,
    "y": pl.Float32,
    "charge": pl.Float32,
    "charge_muon": pl.Float32,
    "is_signal": pl.Boolean,
    "particle_id": pl.Int32,
}
EVENTS_COLUMNS_POLARS = {
    "event_id": pl.Int64,
    "pt": pl.Float32,
    "q": pl.Int8,
    "x0": pl.Float32,
    "theta0": pl.Float32,
    "n_hits": pl.Int32,
    "x_true": pl.List(pl.Float32),
}

#: small shards so that a few dozen events make several shards
SMALL = SimConfig(shard_events=8)
N_EVENTS = 30  # 4 shards: 8 + 8 + 8 + 6
SEED = 11


def _rows(dataset_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    dataset = open_dataset(dataset_dir)
    return dataset.hits().collect(), dataset.events().collect()


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete reference dataset written with one worker; tests that modify it work on a copy."""
    out = tmp_path_factory.mktemp("reference") / "dataset"
    simulate_dataset(out, n_events=N_EVENTS, seed=SEED, config=SMALL, workers=1)
    return out


@pytest.fixture
def dataset_copy(dataset_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    return copy


# ---- readers ---------------------------------------------------------------------------------------------


def test_files_are_readable_by_pyarrow_polars_and_duckdb(dataset_dir: Path) -> None:
    manifest = json.loads((dataset_dir / MANIFEST_NAME).read_text())

    for table, columns in (("hits", HITS_COLUMNS_POLARS), ("events", EVENTS_COLUMNS_POLARS)):
        frame = pl.read_parquet(dataset_dir / table / "*.parquet")
        assert dict(frame.schema) == columns
        arrow = pq.read_table(dataset_dir / table)
        assert arrow.column_names == list(columns)
        assert arrow.num_rows == frame.height == manifest[f"n_{table}"]

    for table, columns in (("hits", HITS_COLUMNS_DUCKDB), ("events", EVENTS_COLUMNS_DUCKDB)):
        described = duckdb.sql(f"describe select * from '{dataset_dir}/{table}/*.parquet'").fetchall()
        assert {row[0]: row[1] for row in described} == columns
        assert [row[0] for row in described] == list(columns)

    (n_hits,) = duckdb.sql(f"select count(*) from '{dataset_dir}/hits/*.parquet'").fetchall()[0]
    (sum_n_hits, n_events, first, last) = duckdb.sql(
        f"select sum(n_hits), count(*), min(event_id), max(event_id) from '{dataset_dir}/events/*.parquet'"
    ).fetchall()[0]
    assert n_hits == sum_n_hits == manifest["n_hits"]
    assert (n_events, first, last) == (N_EVENTS, 0, N_EVENTS - 1)
    (n_layers,) = duckdb.sql(f"select distinct len(x_true) from '{dataset_dir}/events/*.parquet'").fetchall()[0]
    assert n_layers == SMALL.detector.n_layers


def test_hits_are_sorted_and_consistent_with_events(dataset_dir: Path) -> None:
    hits, events = _rows(dataset_dir)
    event_id = hits["event_id"].to_numpy()
    hit_id = hits["hit_id"].to_numpy()
    order = np.lexsort((hit_id, event_id))
    assert_array_equal(order, np.arange(len(order)))
    # hit_id runs 0..n_hits-1 inside each event
    per_event = hits.group_by("event_id").agg(pl.len().alias("n"), pl.col("hit_id").max().alias("last"))
    joined = events.join(per_event, on="event_id", how="left").fill_null(0)
    assert_array_equal(joined["n"].to_numpy(), joined["n_hits"].to_numpy())
    assert (joined.filter(pl.col("n") > 0)["last"] + 1 == joined.filter(pl.col("n") > 0)["n"]).all()


def test_key_value_metadata_holds_config_and_seed(dataset_dir: Path) -> None:
    for path in sorted(dataset_dir.glob("*/part-*.parquet")):
        kv = pq.read_metadata(path).metadata
        assert SimConfig.from_dict(json.loads(kv[b"muontrack.config"])) == SMALL
        assert int(kv[b"muontrack.seed"]) == SEED
    # the same metadata through DuckDB
    rows = duckdb.sql(
        f"select decode(value) from parquet_kv_metadata('{dataset_dir}/hits/*.parquet') "
        "where decode(key) = 'muontrack.seed'"
    ).fetchall()
    assert [int(row[0]) for row in rows] == [SEED] * len(plan_shards(N_EVENTS, SMALL))


def test_manifest_lists_every_shard_with_counts_and_checksums(dataset_dir: Path) -> None:
    manifest = json.loads((dataset_dir / MANIFEST_NAME).read_text())
    assert manifest["format"] == "muontrack-dataset"
    assert manifest["format_version"] == 2
    assert SimConfig.from_dict(manifest["config"]) == SMALL
    assert manifest["config_hash"] == SMALL.config_hash()
    assert manifest["seed"] == SEED
    assert re.fullmatch(r"\d+\.\d+\.\d+.*\+[0-9a-f]{12}", manifest["code_version"])
    assert manifest["n_events"] == N_EVENTS
    assert [shard["n_events"] for shard in manifest["shards"]] == [8, 8, 8, 6]
    assert [shard["first_event_id"] for shard in manifest["shards"]] == [0, 8, 16, 24]
    for shard in manifest["shards"]:
        for table in ("hits", "events"):
            path = dataset_dir / shard[table]["path"]
            assert path.name == f"part-{shard['index']:05d}.parquet"
            assert shard[table]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert shard[table]["rows"] == pq.read_metadata(path).num_rows
    assert sum(shard["hits"]["rows"] for shard in manifest["shards"]) == manifest["n_hits"]
    # nothing but the contract's files is left behind
    assert sorted(p.name for p in dataset_dir.iterdir()) == ["events", "hits", MANIFEST_NAME]


def test_dataset_object(dataset_dir: Path) -> None:
    dataset = open_dataset(dataset_dir)
    assert isinstance(dataset, Dataset)
    assert dataset.path == dataset_dir
    assert dataset.config == SMALL
    assert (dataset.seed, dataset.n_events) == (SEED, N_EVENTS)
    assert dataset.events().select(pl.len()).collect().item() == N_EVENTS
    assert dataset.verify(force=True) == 2 * len(plan_shards(N_EVENTS, SMALL))
    assert dataset.verify() == 0  # verified in this state already: nothing read again


# ---- determinism -----------------------------------------------------------------------------------------


def test_same_rows_with_one_and_two_workers(dataset_dir: Path, tmp_path: Path) -> None:
    simulate_dataset(tmp_path / "two", n_events=N_EVENTS, seed=SEED, config=SMALL, workers=2)
    hits_1, events_1 = _rows(dataset_dir)
    hits_2, events_2 = _rows(tmp_path / "two")
    assert_frame_equal(hits_1, hits_2)
    assert_frame_equal(events_1, events_2)


def test_different_seeds_give_different_rows(dataset_dir: Path, tmp_path: Path) -> None:
    simulate_dataset(tmp_path / "other", n_events=N_EVENTS, seed=SEED + 1, config=SMALL)
    _, events_a = _rows(dataset_dir)
    _, events_b = _rows(tmp_path / "other")
    assert not np.array_equal(events_a["pt"].to_numpy(), events_b["pt"].to_numpy())
    assert not np.array_equal(events_a["x0"].to_numpy(), events_b["x0"].to_numpy())


# ---- interruption and resume -----------------------------------------------------------------------------


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, out: Path, first_event_id: int) -> None:
    """Make simulate_dataset die (like Ctrl-C) when it starts generating ``first_event_id``, leaving a
    half-written file in the staging folder as a killed writer would."""
    real_generate = generate_module.generate_events

    def dying(config, seed, first, n_events, **options):
        if first >= first_event_id:
            (out / STAGING_DIR / "hits-part-00002.parquet").write_bytes(b"PAR1\0\0")
            raise KeyboardInterrupt
        return real_generate(config, seed, first, n_events, **options)

    monkeypatch.setattr(generate_module, "generate_events", dying)


def _simulate_until(monkeypatch: pytest.MonkeyPatch, out: Path, first_event_id: int) -> None:
    """simulate_dataset of the reference request into ``out``, killed at ``first_event_id``."""
    with monkeypatch.context() as patch:
        _interrupt_at(patch, out, first_event_id=first_event_id)
        with pytest.raises(KeyboardInterrupt):
            simulate_dataset(out, n_events=N_EVENTS, seed=SEED, config=SMALL)


def _count_generated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first event ids of the shards generated from now on (the list fills as they are drawn)."""
    generated: list[int] = []
    real_generate = generate_module.generate_events

    def counting(config, seed, first_event_id, n_events, **options):
        generated.append(first_event_id)
        return real_generate(config, seed, first_event_id, n_events, **options)

    monkeypatch.setattr(generate_module, "generate_events", counting)
    return generated


def test_interrupted_run_is_invisible_refused_and_resumed(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "interrupted"
    _simulate_until(monkeypatch, out, first_event_id=16)

    # only complete shards are visible, and no manifest
    assert not (out / MANIFEST_NAME).exists()
    assert sorted(p.name for p in (out / "hits").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert sorted(p.name for p in (out / "events").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert pl.read_parquet(out / "hits" / "*.parquet")["event_id"].max() < 16
    assert (out / STAGING_DIR / STAGING_RECORD).is_file()
    assert (out / STAGING_DIR / "hits-part-00002.parquet").is_file()
    with pytest.raises(DatasetError, match=r"incomplete dataset .*muontrack simulate"):
        open_dataset(out)
    with pytest.raises(DatasetError, match="incomplete dataset"):
        summarize_dataset(out)
    # as if killed between moving shard 1's hits and its events into place
    (out / "events" / "part-00001.parquet").unlink()

    # resuming generates only the missing shards and keeps the complete one byte for byte
    kept = snapshot(out / "hits")["part-00000.parquet"]
    generated = _count_generated(monkeypatch)
    manifest = simulate_dataset(out, n_events=N_EVENTS, seed=SEED, config=SMALL)
    assert sorted(generated) == [8, 16, 24]
    assert snapshot(out / "hits")["part-00000.parquet"] == kept
    assert manifest["n_events"] == N_EVENTS
    assert not (out / STAGING_DIR).exists()

    hits_resumed, events_resumed = _rows(out)
    hits_reference, events_reference = _rows(dataset_dir)
    assert_frame_equal(hits_resumed, hits_reference)
    assert_frame_equal(events_resumed, events_reference)


def test_a_write_that_fails_midway_leaves_no_visible_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up while shard 1's hits are being written: hits/ must not show a partial file."""
    real_write_table = pq.write_table

    def failing(table, where, **options):
        if "part-00001" in str(where):
            real_write_table(table.slice(0, table.num_rows // 2), where, **options)
            Path(where).write_bytes(Path(where).read_bytes()[:-100])  # cut the footer off
            raise OSError(28, "No space left on device")
        return real_write_table(table, where, **options)

    monkeypatch.setattr(pq, "write_table", failing)
    out = tmp_path / "dataset"
    with pytest.raises(DatasetError, match=r"^no space left on the device of .*run the same command again"):
        simulate_dataset(out, n_events=N_EVENTS, seed=SEED, config=SMALL)
    assert sorted(p.name for p in (out / "hits").iterdir()) == ["part-00000.parquet"]
    # the failed writer removed its partial file; only the request's record stays for the resume
    assert [p.name for p in (out / STAGING_DIR).iterdir()] == [STAGING_RECORD]
    assert pl.scan_parquet(out / "hits" / "*.parquet").select(pl.len()).collect().item() > 0
    assert duckdb.sql(f"select count(*) from '{out}/hits/*.parquet'").fetchall()[0][0] > 0
    monkeypatch.undo()
    simulate_dataset(out, n_events=N_EVENTS, seed=SEED, config=SMALL)
    assert open_dataset(out).verify(force=True) == 8


def test_a_dataset_whose_manifest_was_deleted_is_resumed(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "orphan"
    shutil.copytree(dataset_dir, out)
    (out / MANIFEST_NAME).unlink()
    with pytest.raises(DatasetError, match=r"incomplete dataset .*muontrack simulate"):
        open_dataset(out)
    before = snapshot(out)
    # shards of another request are not adopted
    with pytest.raises(DatasetError, match="shards of another config or seed"):
        simulate_dataset(out, n_events=N_EVENTS, seed=SEED + 1, config=SMALL)
    with pytest.raises(DatasetError, match="shards of another event count"):
        simulate_dataset(out, n_events=N_EVENTS - 8, seed=SEED, config=SMALL)
    assert snapshot(out) == before
    # the same request adopts every shard as it is: nothing is drawn again
    monkeypatch.setattr(generate_module, "generate_events", lambda *_: pytest.fail("a shard was drawn again"))
    manifest = simulate_dataset(out, n_events=N_EVENTS, seed=SEED, config=SMALL)
    assert manifest["shards"] == open_dataset(dataset_dir).manifest["shards"]
    assert {k: v for k, v in snapshot(out).items() if k != MANIFEST_NAME} == {
        k: v for k, v in before.items() if k != MANIFEST_NAME
    }


def test_an_interrupted_dataset_is_resumed_by_changed_simulation_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import simulation.shards as simulation_shards

    out = tmp_path / "interrupted"
    _simulate_until(monkeypatch, out, first_event_id=16)
    new_code = "0.1.0+000000000000"
    monkeypatch.setattr(simulation_shards, "code_version", lambda: new_code)
    generated = _count_generated(monkeypatch)
    manifest = simulate_dataset(out, n_events=N_EVENTS, seed=SEED, config=SMALL)
    # every shard is drawn by the new code, the two of the old code included
    assert sorted(generated) == [0, 8, 16, 24]
    assert manifest["code_version"] == new_code
    for path in (out / "hits").iterdir():
        assert read_shard_metadata(path)[1]["muontrack.code_version"] == new_code


def test_the_event_count_is_bounded(tmp_path: Path) -> None:
    from simulation.shards import MAX_EVENTS

    with pytest.raises(ConfigError, match="at most 1,000,000,000 events"):
        simulate_dataset(tmp_path / "huge", n_events=MAX_EVENTS + 1, seed=0, config=SMALL)
    assert not (tmp_path / "huge").exists()


def test_interrupted_run_refuses_other_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, out, first_event_id=8)
        with pytest.raises(KeyboardInterrupt):
            simulate_dataset(out, n_events=N_EVENTS, seed=SEED, config=SMALL)
    before = snapshot(out)
    with pytest.raises(DatasetError, match="interrupted dataset with another seed"):
        simulate_dataset(out, n_events=N_EVENTS, seed=SEED + 1, config=SMALL)
    with pytest.raises(DatasetError, match="interrupted dataset with another event count"):
        simulate_dataset(out, n_events=N_EVENTS + 1, seed=SEED, config=SMALL)
    other_config = SimConfig(shard_events=8, muon=MuonConfig(pt_min=10.0))
    with pytest.raises(DatasetError, match="interrupted dataset with another config"):
        simulate_dataset(out, n_events=N_EVENTS, seed=SEED, config=other_config)
    assert snapshot(out) == before


def test_simulate_shard_skips_a_shard_that_is_already_written(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "dataset"
    first = simulate_shard(out, SMALL, SEED, 1, 8, 8)
    before = snapshot(out / "hits")
    monkeypatch.setattr(generate_module, "generate_events", lambda *_: pytest.fail("shard regenerated"))
    assert simulate_shard(out, SMALL, SEED, 1, 8, 8) == first
    assert snapshot(out / "hits") == before
    # another seed is not "the same shard": it is regenerated
    monkeypatch.undo()
    other = simulate_shard(out, SMALL, SEED + 1, 1, 8, 8)
    assert other["hits"]["sha256"] != first["hits"]["sha256"]


# ---- refusing bad datasets and bad requests ----------------------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a data page: the footer and the size stay valid
    path.write_bytes(bytes(data))


def test_open_dataset_refuses_a_corrupted_file_also_after_a_verified_open(dataset_copy: Path) -> None:
    open_dataset(dataset_copy)  # verified, and recorded as such
    path = dataset_copy / "hits" / "part-00001.parquet"
    stat = path.stat()
    _flip_a_byte(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    with pytest.raises(DatasetError, match=r"checksum mismatch in .*part-00001") as caught:
        open_dataset(dataset_copy)
    assert "\n" not in str(caught.value)
    assert open_dataset(dataset_copy, verify=False).n_events == N_EVENTS  # structure alone is fine


def test_open_dataset_refuses_non_finite_hits_by_name(dataset_copy: Path) -> None:
    path = dataset_copy / "hits" / "part-00002.parquet"
    table = pq.read_table(path)
    x = table.column("x").to_numpy().copy()
    x[[3, 7]] = [np.nan, np.inf]
    pq.write_table(table.set_column(table.schema.get_field_index("x"), "x", pa.array(x, pa.float32())), path)

    def fix_entry(manifest):
        manifest["shards"][2]["hits"].update(bytes=path.stat().st_size, sha256=file_sha256(path))

    _edit_manifest(dataset_copy, fix_entry)  # checksums that match: only the values are wrong
    with pytest.raises(DatasetError, match=r"part-00002\.parquet holds 2 non-finite values of x"):
        open_dataset(dataset_copy)


@pytest.mark.parametrize(
    "listed", ["../outside/part-00000.parquet", "/tmp/part-00000.parquet", "events/part-00000.parquet"]
)
def test_open_dataset_refuses_manifest_paths_outside_its_table(dataset_copy: Path, listed: str) -> None:
    _edit_manifest(dataset_copy, lambda m: m["shards"][0]["hits"].update(path=listed))
    with pytest.raises(DatasetError, match="which is not a hits shard of the dataset folder"):
        open_dataset(dataset_copy)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: (shutil.rmtree(d), d.write_text("x")), "is a file"),
        (lambda d: (d / MANIFEST_NAME).unlink(), "incomplete dataset"),
        (lambda d: (d / MANIFEST_NAME).write_text('{"format": "something-else"}'), "not a muontrack dataset"),
        (lambda d: (d / MANIFEST_NAME).write_text("{not json"), "not readable JSON"),
        (lambda d: (d / "events" / "part-00002.parquet").unlink(), "missing shard file events/part-00002"),
        (lambda d: shutil.copy(d / "hits" / "part-00000.parquet", d / "hits" / "part-00009.parquet"), "does not list"),
        (lambda d: (d / "hits" / "part-00003.parquet").write_bytes(b"garbage"), "another size"),
    ],
)
def test_open_dataset_refuses(dataset_copy: Path, damage, message: str) -> None:
    damage(dataset_copy)
    with pytest.raises(DatasetError, match=message) as caught:
        open_dataset(dataset_copy)
    assert "\n" not in str(caught.value)


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    edit(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_open_dataset_refuses_row_counts_that_disagree(dataset_copy: Path) -> None:
    _edit_manifest(dataset_copy, lambda m: m["shards"][1]["hits"].update(rows=m["shards"][1]["hits"]["rows"] + 1))
    with pytest.raises(DatasetError, match=r"part-00001\.parquet has .* rows, its manifest says"):
        open_dataset(dataset_copy)


def test_open_dataset_refuses_a_shard_with_another_schema(dataset_copy: Path) -> None:
    path = dataset_copy / "events" / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(1, "pt", table.column("pt").cast("float64")), path)

    def fix_size(manifest):
        manifest["shards"][0]["events"]["bytes"] = path.stat().st_size

    _edit_manifest(dataset_copy, fix_size)
    with pytest.raises(DatasetError, match="does not have the events schema"):
        open_dataset(dataset_copy)


def test_complete_dataset_is_returned_untouched_for_the_same_request(dataset_copy: Path) -> None:
    before = snapshot(dataset_copy)
    manifest = simulate_dataset(dataset_copy, n_events=N_EVENTS, seed=SEED, config=SMALL, workers=2)
    assert manifest == json.loads((dataset_copy / MANIFEST_NAME).read_text())
    assert snapshot(dataset_copy) == before


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"seed": SEED + 1}, "already holds a dataset with another seed"),
        ({"n_events": N_EVENTS + 5}, "already holds a dataset with another event count"),
        ({"config": SimConfig(shard_events=8, background=BackgroundConfig(extra_tracks_per_event=0.0))}, "config"),
    ],
)
def test_complete_dataset_refuses_another_request(dataset_copy: Path, request_: dict, message: str) -> None:
    before = snapshot(dataset_copy)
    arguments = {"n_events": N_EVENTS, "seed": SEED, "config": SMALL} | request_
    with pytest.raises(DatasetError, match=f"{message}.*choose another --out"):
        simulate_dataset(dataset_copy, **arguments)
    assert snapshot(dataset_copy) == before


def test_simulate_refuses_bad_arguments_and_foreign_outputs(tmp_path: Path) -> None:
    for arguments in ({"n_events": 0}, {"n_events": -3}, {"seed": -1}, {"workers": 0}, {"n_events": 2.5}):
        full = {"n_events": 4, "seed": 0, "config": SMALL} | arguments
        with pytest.raises(ConfigError):
            simulate_dataset(tmp_path / "never", **full)
    assert not (tmp_path / "never").exists()

    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    with pytest.raises(DatasetError, match="is a file"):
        simulate_dataset(a_file, n_events=4, seed=0, config=SMALL)
    assert a_file.read_text() == "keep me"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="non-empty folder that holds no muontrack dataset"):
        simulate_dataset(foreign, n_events=4, seed=0, config=SMALL)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


# ---- building blocks -------------------------------------------------------------------------------------


def test_plan_shards_covers_every_event_once() -> None:
    for n_events, shard_events in ((1, 5), (5, 5), (6, 5), (100, 7), (20_000, 20_000)):
        plan = plan_shards(n_events, SimConfig(shard_events=shard_events))
        assert [index for index, _, _ in plan] == list(range(len(plan)))
        ids = np.concatenate([np.arange(first, first + n) for _, first, n in plan])
        assert_array_equal(ids, np.arange(n_events))
        assert all(1 <= n <= shard_events for _, _, n in plan)


def test_write_shard_tables_round_trips_columns_and_x_true(tmp_path: Path) -> None:
    events = {
        "event_id": np.array([5, 6], dtype=np.int64),
        "pt": np.array([20.5, 30.25], dtype=np.float32),
        "q": np.array([1, -1], dtype=np.int8),
        "x0": np.array([1.0, -2.0], dtype=np.float32),
        "theta0": np.array([0.01, -0.02], dtype=np.float32),
        "n_hits": np.array([2, 1], dtype=np.int32),
        "x_true": np.array([[1.0, 2.0, np.nan], [4.0, 5.0, 6.0]], dtype=np.float32),
    }
    hits = {
        "event_id": np.array([5, 5, 6], dtype=np.int64),
        "hit_id": np.array([0, 1, 0], dtype=np.int32),
        "layer": np.array([0, 2, 1], dtype=np.int16),
        "strip": np.array([10, 11, 12], dtype=np.int32),
        "x": np.array([0.1, 0.2, 0.3], dtype=np.float32),
        "y": np.array([0.0, 50.0, 25.0], dtype=np.float32),
        "charge": np.array([0.5, 0.25, 1.0], dtype=np.float32),
        "charge_muon": np.array([0.5, 0.0, 0.0], dtype=np.float32),
        "is_signal": np.array([True, False, True]),
        "particle_id": np.array([0, -1, 3], dtype=np.int32),
    }
    entry = write_shard_tables(tmp_path, 2, 5, hits, events, SMALL, 7)
    assert entry["index"] == 2
    assert entry["first_event_id"] == 5
    assert entry["n_events"] == 2
    assert entry["hits"]["path"] == "hits/part-00002.parquet"
    assert entry["hits"]["rows"] == 3
    assert list((tmp_path / STAGING_DIR).iterdir()) == []

    read_events = pq.read_table(tmp_path / "events" / "part-00002.parquet")
    assert_allclose(np.array(read_events.column("x_true").to_pylist(), dtype=np.float32), events["x_true"])
    for name, values in events.items():
        if name != "x_true":
            assert_array_equal(read_events.column(name).to_numpy(), values)
    read_hits = pq.read_table(tmp_path / "hits" / "part-00002.parquet")
    for name, values in hits.items():
        assert_array_equal(read_hits.column(name).to_numpy(), values)

    # a shard whose n_hits do not add up is a programming error, caught before anything is written
    broken = events | {"n_hits": np.array([1, 1], dtype=np.int32)}
    with pytest.raises(ValueError, match="n_hits"):
        write_shard_tables(tmp_path, 3, 5, hits, broken, SMALL, 7)
    assert not (tmp_path / "hits" / "part-00003.parquet").exists()


def test_shards_mapped_in_any_order_then_finalized_give_the_same_dataset(dataset_dir: Path, tmp_path: Path) -> None:
    """The route a Prefect/Dask flow takes: prepare, map simulate_shard over the plan, finalize."""
    out = tmp_path / "dataset"
    assert prepare_dataset(out, N_EVENTS, SEED, SMALL) is None
    assert (out / STAGING_DIR / STAGING_RECORD).is_file()
    entries = [simulate_shard(out, SMALL, SEED, *shard) for shard in reversed(plan_shards(N_EVENTS, SMALL))]
    assert not (out / MANIFEST_NAME).exists()
    manifest = finalize_dataset(out, SMALL, SEED, entries)
    assert [shard["index"] for shard in manifest["shards"]] == [0, 1, 2, 3]
    assert not (out / STAGING_DIR).exists()
    assert_frame_equal(_rows(out)[0], _rows(dataset_dir)[0])
    assert_frame_equal(_rows(out)[1], _rows(dataset_dir)[1])
    assert prepare_dataset(out, N_EVENTS, SEED, SMALL) == manifest


# ---- inspect ---------------------------------------------------------------------------------------------


def _value(summary: str, label: str) -> str:
    match = re.search(rf"^\s*{re.escape(label)}\s+(.+?)\s*$", summary, flags=re.MULTILINE)
    assert match is not None, f"{label!r} not in summary:\n{summary}"
    return match.group(1)


def _mean_signal_cluster_size(hits: pl.DataFrame) -> float:
    """Slow reference: loop over (event, layer), count runs of consecutive signal strips."""
    signal = hits.filter(pl.col("is_signal"))
    n_strips = n_clusters = 0
    for (_, _), group in signal.group_by(["event_id", "layer"]):
        strips = np.sort(group["strip"].to_numpy())
        n_strips += len(strips)
        n_clusters += 1 + int(np.count_nonzero(np.diff(strips) != 1))
    return n_strips / n_clusters


def test_summarize_dataset_reports_independently_computed_figures(dataset_dir: Path) -> None:
    summary = summarize_dataset(dataset_dir)
    hits = pq.read_table(dataset_dir / "hits").to_pydict()
    events = pq.read_table(dataset_dir / "events").to_pydict()
    hits_frame = pl.DataFrame(hits)
    is_signal = np.array(hits["is_signal"])
    particle_id = np.array(hits["particle_id"])
    n_hits = np.array(events["n_hits"])

    assert _value(summary, "events") == f"{N_EVENTS:,}"
    assert _value(summary, "hits") == f"{len(is_signal):,}"
    assert _value(summary, "shards") == "4"
    assert _value(summary, "seed") == str(SEED)
    assert _value(summary, "config hash") == SMALL.config_hash()
    assert _value(summary, "hits per event (min / max)") == f"{n_hits.min()} / {n_hits.max()}"
    assert_allclose(float(_value(summary, "hits per event (mean)")), n_hits.mean(), rtol=1e-3)
    assert_allclose(float(_value(summary, "signal fraction")), is_signal.mean(), rtol=1e-3)
    assert_allclose(float(_value(summary, "background hits per event")), (~is_signal).sum() / N_EVENTS, rtol=1e-3)
    assert _value(summary, "noise hits (particle_id = -1)") == f"{np.count_nonzero(particle_id == -1):,}"
    assert _value(summary, "extra-track hits (particle_id > 0)") == f"{np.count_nonzero(particle_id > 0):,}"
    q = np.array(events["q"])
    assert _value(summary, "charge +1 / -1") == f"{np.count_nonzero(q > 0)} / {np.count_nonzero(q < 0)}"
    pt = np.array(events["pt"])
    assert _value(summary, "muon pT [GeV] (min / max)") == f"{pt.min():.2f} / {pt.max():.2f}"
    assert_allclose(
        float(_value(summary, "mean cluster size [strips]")), _mean_signal_cluster_size(hits_frame), rtol=1e-3
    )
    assert "Traceback" not in summary
    assert "[" in _value(summary, "muon pT range [GeV]")


def test_dataset_files_leave_no_temporary_files_in_globbed_folders(dataset_dir: Path) -> None:
    for table in ("hits", "events"):
        names = os.listdir(dataset_dir / table)
        assert all(re.fullmatch(r"part-\d{5}\.parquet", name) for name in names)
