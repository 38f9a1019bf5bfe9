"""The dataset contract checked on read (pipeline/contract.py): each hostile edit of issue 22 (item 7), made to a
copy of a real dataset whose manifest is then re-signed (sizes, row counts, checksums, totals recomputed, as a
hostile user would), is refused with one line naming the file and the column."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.config import SimConfig
from pipeline.dataset import MANIFEST_NAME, file_sha256, open_dataset
from pipeline.errors import DatasetError
from tests.helpers import assert_one_line_error, run_muontrack

#: 3 shards of 10 events (event ids 0..29); the edits go to shard 1 (events 10..19) unless said otherwise
CONFIG = SimConfig(shard_events=10)
N_EVENTS = 30
SEED = 5


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified-file records of this module's datasets (and of its `muontrack` processes) kept in tmp_path."""
    monkeypatch.setenv("MUONTRACK_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulation.shards import simulate_dataset

    out = tmp_path_factory.mktemp("contract") / "data"
    simulate_dataset(out, n_events=N_EVENTS, seed=SEED, config=CONFIG, workers=1)
    return out


@pytest.fixture
def data(reference: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(reference, copy)
    return copy


# ---- hostile edits -----------------------------------------------------------------------------------------


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_NAME).read_text())


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def _resign(folder: Path) -> None:
    """The manifest made to agree with the files as they are now: sizes, rows, SHA-256, totals."""
    manifest = _manifest(folder)
    for shard in manifest["shards"]:
        for table in ("hits", "events"):
            path = folder / shard[table]["path"]
            shard[table].update(
                rows=pq.read_metadata(path).num_rows, bytes=path.stat().st_size, sha256=file_sha256(path)
            )
    manifest["n_events"] = sum(shard["events"]["rows"] for shard in manifest["shards"])
    manifest["n_hits"] = sum(shard["hits"]["rows"] for shard in manifest["shards"])
    _write_manifest(folder, manifest)


def _edit_table(table: str, edit: Callable[[pa.Table], pa.Table], shard: int = 1) -> Callable[[Path], None]:
    """A damage: ``edit`` applied to one shard file, then the manifest re-signed."""

    def damage(folder: Path) -> None:
        path = folder / table / f"part-{shard:05d}.parquet"
        pq.write_table(edit(pq.read_table(path)), path)
        _resign(folder)

    return damage


def _set(table: str, column: str, row: int, value: Any, shard: int = 1) -> Callable[[Path], None]:
    """A damage: ``column`` of ``table`` set to ``value`` (None: null) at ``row``."""

    def edit(frame: pa.Table) -> pa.Table:
        values = frame.column(column).to_pylist()
        values[row] = value
        index = frame.schema.get_field_index(column)
        return frame.set_column(index, column, pa.array(values, frame.schema.field(column).type))

    return _edit_table(table, edit, shard)


def _set_x_true(row: int, values: list[float]) -> Callable[[Path], None]:
    return _set("events", "x_true", row, values)


def _x_true(folder: Path, row: int, shard: int = 1) -> list[float]:
    return pq.read_table(folder / "events" / f"part-{shard:05d}.parquet").column("x_true")[row].as_py()


def _duplicate_row(row: int) -> Callable[[pa.Table], pa.Table]:
    return lambda frame: pa.concat_tables([frame.slice(0, row + 1), frame.slice(row, 1), frame.slice(row + 1)])


def _orphan_last_event(frame: pa.Table) -> pa.Table:
    """The hits of the shard's last event moved to an event id no events file lists."""
    event_id = frame.column("event_id").to_numpy().copy()
    event_id[event_id == event_id[-1]] = 10 * N_EVENTS
    return frame.set_column(0, "event_id", pa.array(event_id, pa.int64()))


def _list_twice(folder: Path) -> None:
    manifest = _manifest(folder)
    manifest["shards"].append(dict(manifest["shards"][0]))
    _write_manifest(folder, manifest)
    _resign(folder)


def _edit_manifest(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        manifest = _manifest(folder)
        edit(manifest)
        _write_manifest(folder, manifest)

    return damage


def _link_out(name: str) -> Callable[[Path], None]:
    """A damage: ``name`` (a shard file or a table folder) moved out of the dataset, a symbolic link left in its
    place: the bytes read are the same, so the checksums pass."""

    def damage(folder: Path) -> None:
        inside = folder / name
        outside = folder.parent / "elsewhere" / inside.name
        outside.parent.mkdir()
        inside.rename(outside)
        inside.symlink_to(outside)

    return damage


def _x_true_damage(kind: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        values = _x_true(folder, 3)
        if kind == "truncated":
            values = values[:-1]
        else:
            values[5] = float("inf")
        _set_x_true(3, values)(folder)

    return damage


# (damage, fragments of the one-line error: the file, the column and the row)
HOSTILE: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "pt NaN": (
        _set("events", "pt", 3, float("nan")),
        ("events/part-00001.parquet", "non-finite values of pt", "row 3"),
    ),
    "pt +inf": (_set("events", "pt", 3, float("inf")), ("events/part-00001.parquet", "non-finite values of pt")),
    "pt outside the generated range": (
        _set("events", "pt", 3, 1000.0),
        ("events/part-00001.parquet", "column pt has 1000 at row 3", "[20, 50] GeV"),
    ),
    "q = 0": (_set("events", "q", 3, 0), ("events/part-00001.parquet", "column q has 0 at row 3")),
    "x0 infinite": (_set("events", "x0", 3, float("-inf")), ("events/part-00001.parquet", "values of x0")),
    "theta0 NaN": (_set("events", "theta0", 3, float("nan")), ("events/part-00001.parquet", "values of theta0")),
    "null x": (_set("hits", "x", 17, None), ("hits/part-00001.parquet", "column x is null at row 17")),
    "null pt": (_set("events", "pt", 4, None), ("events/part-00001.parquet", "column pt is null at row 4")),
    "shard listed twice": (_list_twice, (MANIFEST_NAME, "hits/part-00000.parquet twice")),
    "layer 40": (
        _set("hits", "layer", 17, 40),
        ("hits/part-00001.parquet", "column layer has 40 at row 17", "layers 0..15"),
    ),
    "negative charge": (
        _set("hits", "charge", 17, -0.5),
        ("hits/part-00001.parquet", "column charge has -0.5 at row 17"),
    ),
    "y = 1e9": (_set("hits", "y", 17, 1e9), ("hits/part-00001.parquet", "column y has 1e+09 at row 17")),
    "x outside the active width": (
        _set("hits", "x", 17, 600.0),
        ("hits/part-00001.parquet", "column x has 600 at row 17", "active width"),
    ),
    "strip 10**8": (
        _set("hits", "strip", 17, 10**8),
        ("hits/part-00001.parquet", "column strip has 100000000 at row 17", "strips 0..1999"),
    ),
    "particle_id -5": (_set("hits", "particle_id", 17, -5), ("hits/part-00001.parquet", "column particle_id has -5")),
    "orphan hits": (
        _edit_table("hits", _orphan_last_event),
        ("hits/part-00001.parquet", "column event_id has 300", "not an event of this shard"),
    ),
    "negative event_id": (
        _set("events", "event_id", 0, -1, shard=0),
        ("events/part-00000.parquet", "column event_id has -1 at row 0"),
    ),
    "duplicated hit": (
        _edit_table("hits", _duplicate_row(17)),
        ("hits/part-00001.parquet", "column hit_id", "at row 18 again", "duplicated hit"),
    ),
    "unsorted hits": (
        _edit_table("hits", lambda frame: frame.take(np.arange(frame.num_rows)[::-1])),
        ("hits/part-00001.parquet", "column event_id", "at row"),
    ),
    "duplicate event_id": (
        _set("events", "event_id", 5, 14),
        ("events/part-00001.parquet", "column event_id has 14 at row 5, expected 15"),
    ),
    "n_hits off by one": (
        _edit_table(
            "events",
            lambda frame: frame.set_column(5, "n_hits", pc.add(frame.column("n_hits"), pa.scalar(1, pa.int32()))),
        ),
        ("events/part-00001.parquet", "column n_hits", "at row 0", "hits/part-00001.parquet holds"),
    ),
    "manifest seed 'abc'": (
        _edit_manifest(lambda manifest: manifest.update(seed="abc")),
        (MANIFEST_NAME, 'seed is "abc"'),
    ),
    "truncated x_true": (
        _x_true_damage("truncated"),
        ("events/part-00001.parquet", "column x_true has 15 values at row 3", "one per layer (16)"),
    ),
    "x_true infinite": (_x_true_damage("infinite"), ("events/part-00001.parquet", "column x_true has inf at row 3")),
    "shard file a symlink out of the dataset": (
        _link_out("hits/part-00001.parquet"),
        ("hits/part-00001.parquet is a symbolic link",),
    ),
    "hits/ a symlink out of the dataset": (_link_out("hits"), ("/hits is a symbolic link",)),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_edit_is_refused_with_one_line(data: Path, case: str) -> None:
    damage, fragments = HOSTILE[case]
    damage(data)
    with pytest.raises(DatasetError) as caught:
        open_dataset(data)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_valid_dataset_passes(data: Path) -> None:
    # NaN in x_true is the contract's "not crossed inside the active width" (simulation/events.py)
    values = _x_true(data, 3)
    values[15] = float("nan")
    _set_x_true(3, values)(data)
    dataset = open_dataset(data)
    assert dataset.verify(force=True) == 2 * dataset.n_shards
    assert (dataset.n_events, dataset.seed) == (N_EVENTS, SEED)


def test_the_cheap_checks_run_without_verification(data: Path) -> None:
    _edit_manifest(lambda manifest: manifest.update(seed="abc"))(data)
    with pytest.raises(DatasetError, match="seed is"):
        open_dataset(data, verify=False)


def test_a_verified_dataset_is_checked_again_under_another_config(data: Path) -> None:
    open_dataset(data)  # verified, and recorded as such
    # the same files under a narrower pT range in the manifest: the recorded verification does not carry over
    _edit_manifest(lambda manifest: manifest["config"]["muon"].update(pt_max=20.5))(data)
    with pytest.raises(DatasetError, match=r"events/part-00000\.parquet: column pt has .* \[20, 20\.5\] GeV"):
        open_dataset(data)


@pytest.mark.parametrize("case", ["layer 40", "pt NaN", "manifest seed 'abc'"])
def test_inspect_refuses_a_hostile_edit_with_one_line(data: Path, tmp_path: Path, case: str) -> None:
    damage, fragments = HOSTILE[case]
    damage(data)
    result = run_muontrack("inspect", data, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert result.returncode == 1
