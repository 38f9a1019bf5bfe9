"""The dataset file contract: writing shards atomically, the manifest, and reading a dataset back.

A dataset is a folder (docs/contracts.md, "Dataset folder")::

    DATASET/manifest.json               config, seed, code version, shard list with row counts and checksums
    DATASET/hits/part-NNNNN.parquet     one row per fired strip (HITS_SCHEMA)
    DATASET/events/part-NNNNN.parquet   one row per event, truth (EVENTS_SCHEMA)

Crash safety: every file is first written completely under ``DATASET/.staging/`` and then moved into place
with :func:`os.replace`, which is atomic on one filesystem, so ``hits/`` and ``events/`` only ever hold
complete shards (a half-written file there would break the ``hits/*.parquet`` globs of Polars and DuckDB).
``.staging/dataset.json`` records what is being written (config, seed, event count, code version) before
the first shard, so an interrupted run can be resumed with the same settings and refused with others. The
manifest is written last, also atomically; a folder without it is an incomplete dataset, which
:func:`open_dataset` refuses.

The config (canonical JSON) and the seed also go into every Parquet file's key-value metadata, so a single
shard copied elsewhere still says where it came from.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import replacing, write_json_atomic, write_text_atomic
from pipeline.cache import cache_root
from pipeline.config import SimConfig
from pipeline.contract import check_manifest, refuse_symlink
from pipeline.errors import ConfigError, DatasetError
from pipeline.schema import EVENTS_SCHEMA, HITS_SCHEMA

if TYPE_CHECKING:
    # imported where a dataset is read: writing one (`muontrack simulate`) never pays for Polars' import
    import polars as pl

FORMAT = "muontrack-dataset"
#: 2: hits gained ``charge_muon`` (the muon's own charge on the strip)
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
STAGING_DIR = ".staging"
STAGING_RECORD = "dataset.json"
TABLES = ("hits", "events")
SCHEMAS = {"hits": HITS_SCHEMA, "events": EVENTS_SCHEMA}

#: key-value metadata keys of every shard file
META_PREFIX = "muontrack."
META_CONFIG = META_PREFIX + "config"
META_SEED = META_PREFIX + "seed"

#: Parquet writer settings shared by every shard (and by benchmarks/simulation.py's plain-write reference).
#: Measured per column on a 20k-event shard (2.5 M hits, CPU seconds of one write): zstd level 1 (level 3 is
#: ~15 % slower for 2 % less; negative levels save ~15 % of the time for ~20 % more bytes); dictionaries only
#: where they pay (particle_id: half the bytes; on layer, y and is_signal plain + zstd is ~35 % cheaper for
#: about the same size; on the sorted event_id plain + zstd beats DELTA_BINARY_PACKED and a dictionary);
#: strip as DELTA_BINARY_PACKED and x as BYTE_STREAM_SPLIT (each ~30 % cheaper than plain); all together
#: 0.142 s instead of 0.176 s per shard for 9 % more bytes. Statistics only on event_id, the column readers
#: filter on; row groups of 512 Ki rows (256 Ki to 4 Mi write equally fast) keep a reader's memory per column
#: chunk small.
PARQUET_WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,
    "row_group_size": 512 * 1024,
    "use_dictionary": ["particle_id", "q"],
    "column_encoding": {"strip": "DELTA_BINARY_PACKED", "x": "BYTE_STREAM_SPLIT"},
    "write_statistics": ["event_id"],
}


def shard_file_name(shard_index: int) -> str:
    return f"part-{shard_index:05d}.parquet"


def shard_path(dataset_dir: str | Path, table: str, shard_index: int) -> Path:
    """Final location of one shard file, e.g. ``DATASET/hits/part-00003.parquet``."""
    return Path(dataset_dir) / table / shard_file_name(shard_index)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_failure(err: OSError, dataset_dir: Path) -> DatasetError:
    """The one-line error for a failed write into a dataset folder (the caller removes its partial file)."""
    # Arrow's write errors carry the errno only in their text ("[errno 28] No space left on device")
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err) or "quota exceeded" in str(err):
        return DatasetError(
            f"no space left on the device of {dataset_dir}: free some space and run the same command again "
            "(the shards already written are kept)"
        )
    return DatasetError(f"cannot write into {dataset_dir}: {err.strerror or err}")


def _write_json_atomically(data: Mapping[str, Any], target: Path, staging_dir: Path) -> None:
    """``data`` as ``target``, written under ``staging_dir`` and flushed to disk before the rename."""
    try:
        staging_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(target, data, fsync=True, staging_dir=staging_dir)
    except OSError as err:
        raise write_failure(err, target.parent) from None


# ---- writing ---------------------------------------------------------------------------------------------


def _column(values: Any, field: pa.Field, table: str, length: int | None) -> pa.Array:
    """A NumPy column as an Arrow array of the schema type (zero-copy when the dtype already matches)."""
    array = np.ascontiguousarray(values, dtype=field.type.to_pandas_dtype())
    if array.ndim != 1:
        raise ValueError(f"{table}.{field.name} must be 1-D, got shape {array.shape}")
    if length is not None and len(array) != length:
        raise ValueError(f"{table}.{field.name} has {len(array)} rows, expected {length}")
    return pa.array(array, type=field.type)


def _check_columns(columns: Mapping[str, Any], schema: pa.Schema, table: str) -> None:
    missing = [name for name in schema.names if name not in columns]
    unknown = sorted(set(columns) - set(schema.names))
    if missing or unknown:
        raise ValueError(f"{table} columns do not match the schema: missing {missing}, unknown {unknown}")


def hits_table(hits: Mapping[str, np.ndarray]) -> pa.Table:
    """Arrow table of HITS_SCHEMA from a dict of 1-D NumPy columns (one row per fired strip)."""
    _check_columns(hits, HITS_SCHEMA, "hits")
    n_rows = len(hits["event_id"])
    return pa.Table.from_arrays([_column(hits[f.name], f, "hits", n_rows) for f in HITS_SCHEMA], schema=HITS_SCHEMA)


def events_table(events: Mapping[str, np.ndarray]) -> pa.Table:
    """Arrow table of EVENTS_SCHEMA; ``x_true`` is a float32 array of shape ``(n_events, n_layers)`` [mm]."""
    _check_columns(events, EVENTS_SCHEMA, "events")
    n_rows = len(events["event_id"])
    arrays = []
    for field in EVENTS_SCHEMA:
        if field.name == "x_true":
            x_true = np.ascontiguousarray(events["x_true"], dtype=np.float32)
            if x_true.ndim != 2 or x_true.shape[0] != n_rows:
                raise ValueError(f"events.x_true must have shape (n_events={n_rows}, n_layers), got {x_true.shape}")
            n_layers = x_true.shape[1]
            # fixed-length lists as offsets over the flat values: no copy of the values
            offsets = pa.array(np.arange(0, (n_rows + 1) * n_layers, n_layers, dtype=np.int32))
            arrays.append(pa.ListArray.from_arrays(offsets, pa.array(x_true.reshape(-1))))
        else:
            arrays.append(_column(events[field.name], field, "events", n_rows))
    return pa.Table.from_arrays(arrays, schema=EVENTS_SCHEMA)


def shard_metadata(
    config: SimConfig,
    seed: int,
    table: str,
    shard_index: int,
    first_event_id: int,
    n_events: int,
    code_version: str | None = None,
) -> dict[str, str]:
    """The key-value metadata written into one shard file (all values are strings)."""
    metadata = {
        META_PREFIX + "format": FORMAT,
        META_PREFIX + "format_version": str(FORMAT_VERSION),
        META_PREFIX + "table": table,
        META_CONFIG: config.to_json(),
        META_SEED: str(seed),
        META_PREFIX + "shard_index": str(shard_index),
        META_PREFIX + "first_event_id": str(first_event_id),
        META_PREFIX + "n_events": str(n_events),
    }
    if code_version is not None:
        metadata[META_PREFIX + "code_version"] = code_version
    return metadata


def read_shard_metadata(path: str | Path) -> tuple[int, dict[str, str]]:
    """Row count and ``muontrack.*`` key-value metadata of a Parquet file, from its footer only."""
    metadata = pq.read_metadata(path)
    kv = {
        key.decode(): value.decode()
        for key, value in (metadata.metadata or {}).items()
        if key.startswith(META_PREFIX.encode())
    }
    return metadata.num_rows, kv


def _check_shard_contents(hits: pa.Table, events: pa.Table, first_event_id: int) -> None:
    """Cheap consistency checks of the generator's output (programming errors, not user errors)."""
    event_id = events.column("event_id").to_numpy()
    if not np.array_equal(event_id, first_event_id + np.arange(len(event_id))):
        raise ValueError(f"events.event_id must run from {first_event_id} in steps of 1")
    hit_event_id = hits.column("event_id").to_numpy()
    if len(hit_event_id) and (
        hit_event_id[0] < first_event_id
        or hit_event_id[-1] >= first_event_id + len(event_id)
        or np.any(hit_event_id[1:] < hit_event_id[:-1])
    ):
        raise ValueError("hits.event_id must be sorted and belong to the shard's events")
    n_hits = events.column("n_hits").to_numpy()
    if int(n_hits.sum()) != hits.num_rows:
        raise ValueError(f"events.n_hits sums to {int(n_hits.sum())} but there are {hits.num_rows} hits")


def write_shard_tables(
    dataset_dir: str | Path,
    shard_index: int,
    first_event_id: int,
    hits: Mapping[str, np.ndarray],
    events: Mapping[str, np.ndarray],
    config: SimConfig,
    seed: int,
    *,
    code_version: str | None = None,
) -> dict[str, Any]:
    """Write one shard's hits and events and return its manifest entry.

    ``hits``: 1-D columns of HITS_SCHEMA, sorted by (event_id, hit_id). ``events``: 1-D columns of
    EVENTS_SCHEMA with ``x_true`` of shape ``(n_events, n_layers)``, event ids ``first_event_id, ...``.
    Both files are written completely under ``.staging/`` and then renamed into ``hits/`` and ``events/``;
    an existing shard of the same index is replaced atomically.

    Returns ``{"index", "first_event_id", "n_events", "hits": {"path", "rows", "bytes", "sha256"},
    "events": {...}}`` with paths relative to ``dataset_dir``.
    """
    dataset_dir = Path(dataset_dir)
    tables = {"hits": hits_table(hits), "events": events_table(events)}
    _check_shard_contents(tables["hits"], tables["events"], first_event_id)
    n_events = tables["events"].num_rows
    staging_dir = dataset_dir / STAGING_DIR

    entry: dict[str, Any] = {"index": shard_index, "first_event_id": first_event_id, "n_events": n_events}
    targets = [shard_path(dataset_dir, table_name, shard_index) for table_name in tables]
    try:
        staging_dir.mkdir(parents=True, exist_ok=True)
        # written under .staging/ (names of this writer's own), flushed to disk, then renamed into place; the
        # staged files are removed when anything fails (pipeline.atomic.replacing)
        with replacing(targets, fsync=True, staging_dir=staging_dir) as staged:
            for (table_name, table), staged_path in zip(tables.items(), staged, strict=True):
                metadata = shard_metadata(config, seed, table_name, shard_index, first_event_id, n_events, code_version)
                sorting = [pq.SortingColumn(0), pq.SortingColumn(1)] if table_name == "hits" else [pq.SortingColumn(0)]
                pq.write_table(
                    table.replace_schema_metadata(metadata),
                    staged_path,
                    sorting_columns=sorting,
                    **PARQUET_WRITE_OPTIONS,
                )
                entry[table_name] = {
                    "path": f"{table_name}/{shard_file_name(shard_index)}",
                    "rows": table.num_rows,
                    "bytes": staged_path.stat().st_size,
                    "sha256": file_sha256(staged_path),
                }
            for target in targets:
                target.parent.mkdir(exist_ok=True)
    except OSError as err:
        raise write_failure(err, dataset_dir) from None
    return entry


def existing_shard_entry(
    dataset_dir: str | Path,
    config: SimConfig,
    seed: int,
    shard_index: int,
    first_event_id: int,
    n_events: int,
    code_version: str | None = None,
) -> dict[str, Any] | None:
    """The manifest entry of a shard that is already on disk with exactly this identity, else None.

    Both files must exist, be readable Parquet and carry the expected key-value metadata (config, seed,
    shard index, event range and, when given, code version). Checksums are recomputed from the files.
    """
    entry: dict[str, Any] = {"index": shard_index, "first_event_id": first_event_id, "n_events": n_events}
    for table_name in TABLES:
        path = shard_path(dataset_dir, table_name, shard_index)
        if not path.is_file():
            return None
        try:
            rows, kv = read_shard_metadata(path)
        except (OSError, pa.ArrowException):
            return None
        expected = shard_metadata(config, seed, table_name, shard_index, first_event_id, n_events, code_version)
        if any(kv.get(key) != value for key, value in expected.items()):
            return None
        if table_name == "events" and rows != n_events:
            return None
        entry[table_name] = {
            "path": f"{table_name}/{shard_file_name(shard_index)}",
            "rows": rows,
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        }
    return entry


def write_staging_record(
    dataset_dir: str | Path, config: SimConfig, seed: int, n_events: int, code_version: str
) -> dict[str, Any]:
    """Write ``.staging/dataset.json`` (what an interrupted run was asked for), atomically."""
    staging_dir = Path(dataset_dir) / STAGING_DIR
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "seed": seed,
        "n_events": n_events,
        "code_version": code_version,
    }
    _write_json_atomically(record, staging_dir / STAGING_RECORD, staging_dir)
    return record


def read_staging_record(dataset_dir: str | Path) -> dict[str, Any] | None:
    """The ``.staging/dataset.json`` of an interrupted run, or None when there is none."""
    path = Path(dataset_dir) / STAGING_DIR / STAGING_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        raise DatasetError(f"{path} is unreadable; remove {Path(dataset_dir)} or choose another --out") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a muontrack staging record; choose another --out")
    return record


def write_manifest(
    dataset_dir: str | Path,
    config: SimConfig,
    seed: int,
    shard_entries: list[dict[str, Any]],
    code_version: str,
) -> dict[str, Any]:
    """Write ``manifest.json`` atomically (the last step of a dataset) and return it.

    ``shard_entries`` must cover event ids 0..n_events-1 without gaps (any order; they are sorted).
    """
    dataset_dir = Path(dataset_dir)
    shards = sorted(shard_entries, key=lambda entry: entry["index"])
    next_event_id = 0
    for position, entry in enumerate(shards):
        if entry["index"] != position or entry["first_event_id"] != next_event_id:
            raise ValueError(f"shard entries leave a gap or overlap at shard {position}")
        next_event_id += entry["n_events"]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "seed": seed,
        "code_version": code_version,
        "n_events": next_event_id,
        "n_hits": sum(entry["hits"]["rows"] for entry in shards),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "shards": shards,
    }
    _write_json_atomically(manifest, dataset_dir / MANIFEST_NAME, dataset_dir / STAGING_DIR)
    # return what a reader gets back (JSON lists, not tuples), so both compare equal
    return json.loads(json.dumps(manifest))


# ---- reading ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A complete, checked dataset folder. Build it with :func:`open_dataset`."""

    path: Path
    manifest: dict[str, Any]
    config: SimConfig

    @property
    def seed(self) -> int:
        return int(self.manifest["seed"])

    @property
    def n_events(self) -> int:
        return int(self.manifest["n_events"])

    @property
    def n_hits(self) -> int:
        return int(self.manifest["n_hits"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def files(self, table: str) -> list[Path]:
        """The shard files of ``table`` ("hits" or "events") in event order."""
        return [self.path / shard[table]["path"] for shard in self.manifest["shards"]]

    def hits(self) -> pl.LazyFrame:
        """All hits (HITS_SCHEMA), sorted by (event_id, hit_id)."""
        import polars as pl

        return pl.scan_parquet(self.files("hits"), glob=False, hive_partitioning=False)

    def events(self) -> pl.LazyFrame:
        """All events (EVENTS_SCHEMA), sorted by event_id."""
        import polars as pl

        return pl.scan_parquet(self.files("events"), glob=False, hive_partitioning=False)

    def verify(self, force: bool = False) -> int:
        """Check every shard file's SHA-256 against the manifest, and each shard's rows against the dataset
        contract (:func:`pipeline.contract.check_shard`: nulls, finite values, ranges from the dataset's config,
        unique and sorted ids, hits only of the shard's events, ``n_hits``).

        A file already verified in the same state (size, modification and change times, inode), under the same
        config, shard entry and contract version, is not read again unless ``force``; any write to a file
        changes its change time, so a flipped byte is always caught. A shard is checked again when either of
        its files is. The states are recorded outside the dataset (:func:`verified_record_path`), which is never
        written by a reader; the record is best effort. Raises DatasetError at the first bad file; returns the
        number of files whose checksum was read.
        """
        from pipeline.contract import check_key, check_shard

        record_path = verified_record_path(self.path)
        record = {} if force else _read_verified_record(record_path)
        fresh: dict[str, Any] = {}
        read = 0
        config_hash = self.config.config_hash()
        for shard in self.manifest["shards"]:
            key = check_key(config_hash, shard)
            states = {
                table: [_file_stamp(self.path / shard[table]["path"]), shard[table]["sha256"], key] for table in TABLES
            }
            stale = [table for table in TABLES if record.get(shard[table]["path"]) != states[table]]
            for table in stale:
                path = self.path / shard[table]["path"]
                if file_sha256(path) != shard[table]["sha256"]:
                    raise DatasetError(f"checksum mismatch in {path}: the file changed after it was written")
                read += 1
            if stale:
                check_shard(self.path, shard, self.config)
            fresh.update({shard[table]["path"]: states[table] for table in TABLES})
        if fresh != record:
            _write_verified_record(record_path, fresh)
        return read


def _file_stamp(path: Path) -> list[int]:
    """What changes when a file's bytes do: size, mtime, ctime (which no utime call can set back), inode."""
    info = path.stat()
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def verified_record_path(dataset_dir: Path) -> Path:
    """Where the verified file states of a dataset are kept: ``$MUONTRACK_CACHE`` (default
    ``$XDG_CACHE_HOME/muontrack`` or ``~/.cache/muontrack``) ``/verified/<hash of the dataset's path>.json``."""
    key = hashlib.sha256(str(Path(dataset_dir).resolve()).encode()).hexdigest()[:24]
    return cache_root() / "verified" / f"{key}.json"


def _read_verified_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_verified_record(path: Path, record: dict[str, Any]) -> None:
    """Atomically, under a name of this process's own (two readers may verify at once); best effort."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record))
    except OSError:
        pass


def _types(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    return [(field.name, field.type) for field in schema]


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        raise DatasetError(f"{manifest_path} is not readable JSON: not a muontrack dataset") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a muontrack dataset (manifest format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(
            f"{path} has dataset format version {version!r}; this muontrack reads {FORMAT_VERSION} "
            "(simulate it again into a new folder)"
        )
    required = ("config", "seed", "n_events", "n_hits", "shards")
    missing = [key for key in required if key not in manifest]
    if missing or not isinstance(manifest["shards"], list) or not manifest["shards"]:
        raise DatasetError(f"{manifest_path} is malformed (missing or empty: {', '.join(missing) or 'shards'})")
    return manifest


def _resume_hint(path: Path) -> str:
    """How to finish an incomplete dataset: the same `simulate` command, with its settings where known."""
    try:
        record = read_staging_record(path)
    except DatasetError:
        record = None
    if record is None:
        return "run the `muontrack simulate` command that wrote it again to resume it"
    config = "" if record.get("config_hash") == SimConfig().config_hash() else " --config <its config>"
    return (
        f"run `muontrack simulate --events {record.get('n_events')} --seed {record.get('seed')}{config} "
        f"--out {path}` again to resume it"
    )


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the complete dataset folder ``path``, checked for its format and keys only: no shard file is
    looked at (:func:`open_dataset` checks them). What a cache key of the dataset needs (config hash, seed, events)
    without opening it. DatasetError (one line, as open_dataset's) for a missing, incomplete or foreign folder."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if not path.is_dir():
        raise DatasetError(f"{path} is a file, not a dataset folder")
    for name in (MANIFEST_NAME, *TABLES):
        refuse_symlink(path / name)
    if not (path / MANIFEST_NAME).is_file():
        if (path / STAGING_DIR).is_dir() or (path / "hits").is_dir():
            raise DatasetError(f"incomplete dataset {path} (no {MANIFEST_NAME}): {_resume_hint(path)}")
        raise DatasetError(f"{path} is not a muontrack dataset (no {MANIFEST_NAME})")
    return _read_manifest(path)


def open_dataset(path: str | Path, verify: bool = True) -> Dataset:
    """Open a complete dataset folder, checking it against its manifest.

    Checks (each failure is a one-line DatasetError): the folder exists and has a manifest of this format,
    every listed shard file lies in the dataset's ``hits/`` or ``events/`` and exists with the listed size,
    its footer's row count and column types match the manifest and the schemas, the totals add up, and no
    unlisted ``part-*.parquet`` file sits in ``hits/`` or ``events/`` (it would be read by a glob over the
    folder); the manifest's seed is an integer and its shard entries are listed once each, in order, with
    contiguous event ranges; no symbolic link among the manifest, the table folders and the shard files
    (:mod:`pipeline.contract`). With ``verify`` (the default) also :meth:`Dataset.verify`: the checksums and the
    rows' contract (values, ranges, ids, counts), of files not verified before in their present state.
    """
    path = Path(path)
    manifest = read_manifest(path)
    try:
        config = SimConfig.from_dict(manifest["config"])
    except ConfigError as err:
        raise DatasetError(f"{path / MANIFEST_NAME} holds an invalid config: {err}") from None

    totals = {"hits": 0, "events": 0}
    try:
        for shard in manifest["shards"]:
            for table in TABLES:
                file_entry = shard[table]
                parts = Path(file_entry["path"]).parts
                if len(parts) != 2 or parts[0] != table or not parts[1].startswith("part-"):
                    raise DatasetError(
                        f"{path / MANIFEST_NAME} lists {file_entry['path']!r}, which is not a {table} shard of "
                        "the dataset folder"
                    )
                file_path = path / file_entry["path"]
                refuse_symlink(file_path)
                if not file_path.is_file():
                    raise DatasetError(f"dataset {path} is missing shard file {file_entry['path']}")
                if file_path.stat().st_size != file_entry["bytes"]:
                    raise DatasetError(f"shard file {file_path} has another size than its manifest entry")
                try:
                    metadata = pq.read_metadata(file_path)
                except (OSError, pa.ArrowException):
                    raise DatasetError(f"shard file {file_path} is not readable Parquet") from None
                if metadata.num_rows != file_entry["rows"]:
                    raise DatasetError(
                        f"shard file {file_path} has {metadata.num_rows} rows, its manifest says {file_entry['rows']}"
                    )
                if _types(metadata.schema.to_arrow_schema()) != _types(SCHEMAS[table]):
                    raise DatasetError(f"shard file {file_path} does not have the {table} schema")
                totals[table] += metadata.num_rows
            if shard["events"]["rows"] != shard["n_events"]:
                raise DatasetError(f"shard {shard['index']} of {path} lists {shard['n_events']} events inconsistently")
        check_manifest(path, manifest)
    except (KeyError, TypeError, AttributeError):
        raise DatasetError(f"{path / MANIFEST_NAME} has a malformed shard list") from None
    if totals["events"] != manifest["n_events"] or totals["hits"] != manifest["n_hits"]:
        raise DatasetError(f"the shards of {path} do not add up to the manifest's n_events / n_hits")
    for table in TABLES:
        listed = {Path(shard[table]["path"]).name for shard in manifest["shards"]}
        stray = sorted(p.name for p in (path / table).glob("*.parquet") if p.name not in listed)
        if stray:
            raise DatasetError(f"{path / table} holds {stray[0]}, which the manifest does not list")
    dataset = Dataset(path=path, manifest=manifest, config=config)
    if verify:
        dataset.verify()
    return dataset
