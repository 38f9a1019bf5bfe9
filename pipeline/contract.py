"""The dataset contract checked on read: every column's values, the relations between the tables, the manifest.

The Parquet footers, sizes and SHA-256 checksums (:func:`pipeline.dataset.open_dataset`, :meth:`Dataset.verify`)
only prove that the files are those the manifest lists; a hostile or careless edit that re-signs the manifest
passes them. This module checks what the rows must be (docs/contracts.md, "Dataset folder"), with the bounds
read from the dataset's own config (its manifest), and refuses a dataset with one line naming the file, the
column and the first bad row (:class:`pipeline.errors.DatasetError`)::

    DATA/hits/part-00001.parquet: column layer has 40 at row 17, outside the detector's layers 0..15

Two parts, by cost:

- :func:`check_manifest` and :func:`refuse_symlink` on every open (microseconds): the seed is an integer, the
  shard entries are listed once each, in order, with contiguous event ranges from 0; no symbolic link among the
  manifest, the table folders and the shard files (a link may point out of the dataset).
- :func:`check_shard` reads a shard's rows (one ``scan_parquet(...).select(...).collect()`` per table, every
  check an aggregate of that one pass; a second pass only to find the first bad row of a failed check). Its cost
  is that of decoding every column once: on 1M events (``muontrack simulate --events 1000000 --seed 0``: 50
  shards, 123 M hits), on 2 cores shared with other work (load average ~7), 17.8 s for the whole dataset, against
  1.2 s for its SHA-256 checksums, 7.1 s for the finite x, y, charge pass it replaces, and 50-65 s for
  ``muontrack inspect``; on a 2.5 M-hit shard the checks add ~25 % to a plain read of its columns. Too slow for
  every open, so it runs inside :meth:`Dataset.verify`, on the shards whose files it re-reads for their checksums,
  and is cached with them: a shard is checked again when a file's state (size, times, inode), the dataset's
  config, the shard's entry or :data:`CONTRACT_VERSION` changes. Every command opens with verification (a cached
  open of that dataset: ~0.05 s), ``inspect --verify`` forces it; a writer's fresh dataset is checked on its
  first read.

A passing shard satisfies, with the bounds of its config:

- ``hits``: no nulls; ``event_id`` within the shard entry's events (so >= 0 and only of listed events); sorted
  by ``(event_id, hit_id)`` with ``hit_id`` running 0, 1, ... in each event (so the pair is unique: no
  duplicated hit); ``layer`` in ``0..n_layers-1``; ``strip`` in ``0..n_strips-1``; ``x`` finite, within the
  active width and the centre of its strip; ``y`` finite and its layer's plane; ``charge`` finite and >= 0;
  ``particle_id`` >= -1.
- ``events``: no nulls; ``event_id`` the shard entry's ids in order, each once (unique, >= 0); ``pt`` finite and
  within the generated ``[muon.pt_min, muon.pt_max]``; ``q`` +1 or -1; ``x0``, ``theta0`` finite; ``n_hits``
  the number of the event's rows in ``hits``; ``x_true`` one value per layer, each NaN (a layer the muon does not
  cross inside the active width: simulation/events.py) or within the active width.

Float bounds are compared after rounding to float32, as the values were stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import SimConfig
from pipeline.errors import DatasetError

if TYPE_CHECKING:
    import polars as pl

#: bump when the checks change: a file verified under an older contract is checked again
CONTRACT_VERSION = 2

#: dataset seeds (simulation.shards: a uint64)
MAX_SEED = 2**64 - 1

HITS_COLUMNS = ("event_id", "hit_id", "layer", "strip", "x", "y", "charge", "charge_muon", "is_signal", "particle_id")
EVENTS_COLUMNS = ("event_id", "pt", "q", "x0", "theta0", "n_hits", "x_true")

_NULL = "{file}: column {column} is null at row {row} ({count} null values; the dataset contract has none)"
_FINITE = "{file} holds {count} non-finite values of {column}, the first ({value}) at row {row}"


@dataclass(frozen=True)
class Check:
    """One rule of a table: ``bad`` is true on the rows that break it. The error is ``template`` formatted
    with ``file``, ``column``, ``row`` (the first bad row), ``count`` (bad rows), ``value`` (of ``value``, by
    default the column, at that row) and ``expected`` (of ``expected`` at that row)."""

    column: str
    bad: pl.Expr
    template: str
    value: pl.Expr | None = None
    expected: pl.Expr | None = None


def check_key(config_hash: str, shard: dict[str, Any]) -> str:
    """What a shard's check depends on besides its files (the dataset's config by its hash, the shard's event
    range, the checks' version): recorded with their verified state."""
    return f"{CONTRACT_VERSION}:{config_hash}:{shard['first_event_id']}:{shard['n_events']}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _f32(value: float) -> float:
    """``value`` rounded to float32, as a Python float (exact in both types)."""
    return float(np.float32(value))


def _tolerance(*values: float) -> float:
    """A few float32 steps at the largest magnitude among ``values`` (stored float32 against a float64 bound)."""
    return 4.0 * float(np.spacing(np.float32(max(abs(v) for v in values))))


# ---- on every open ---------------------------------------------------------------------------------------


def refuse_symlink(path: Path) -> None:
    """DatasetError if ``path`` (a manifest, a table folder or a shard file of a dataset) is a symbolic link."""
    if path.is_symlink():
        raise DatasetError(
            f"{path} is a symbolic link: a dataset holds no links (one may point out of the dataset); "
            "copy the file or folder in instead"
        )


def check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest's seed and shard list (after :func:`pipeline.dataset.open_dataset`'s structural checks):
    an integer seed, each shard file listed once, entries in index order with contiguous event ranges from 0."""
    manifest_path = path / "manifest.json"
    seed = manifest["seed"]
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise DatasetError(f"{manifest_path}: seed is {json.dumps(seed)}, not an integer in [0, 2**64 - 1]")
    listed: dict[tuple[str, ...], int] = {}
    next_event_id = 0
    for position, shard in enumerate(manifest["shards"]):
        for table in ("hits", "events"):
            parts = Path(shard[table]["path"]).parts
            if parts in listed:
                raise DatasetError(
                    f"{manifest_path} lists {'/'.join(parts)} twice (shard entries {listed[parts]} and {position}): "
                    "its events would be read twice"
                )
            listed[parts] = position
        index, first, n_events = shard.get("index"), shard.get("first_event_id"), shard.get("n_events")
        if not (_is_int(index) and _is_int(first) and _is_int(n_events)) or n_events < 1:
            raise DatasetError(
                f"{manifest_path}: shard entry {position} has no integer index, first_event_id, n_events"
            )
        if index != position or first != next_event_id:
            raise DatasetError(
                f"{manifest_path}: shard entry {position} has index {index} and first_event_id {first}, expected "
                f"{position} and {next_event_id} (entries in order, event ids 0 .. n_events-1 without gaps)"
            )
        next_event_id += n_events


# ---- the rows of one shard -------------------------------------------------------------------------------


def _null_checks(columns: tuple[str, ...]) -> list[Check]:
    import polars as pl

    return [Check(column, pl.col(column).is_null(), _NULL) for column in columns]


def _finite(column: str) -> Check:
    import polars as pl

    return Check(column, ~pl.col(column).is_finite(), _FINITE)


def _outside(column: str, low: float, high: float, template: str) -> Check:
    import polars as pl

    return Check(column, (pl.col(column) < low) | (pl.col(column) > high), template)


def hits_checks(config: SimConfig, first_event_id: int, n_events: int) -> list[Check]:
    """The rules of one hits shard holding the events ``first_event_id .. first_event_id + n_events - 1``, in
    the order they are reported (nulls, values, then the relations between rows)."""
    import polars as pl

    detector = config.detector
    last_event_id = first_event_id + n_events - 1
    n_layers, n_strips = detector.n_layers, detector.n_strips
    x_min, x_max, pitch = detector.x_min, detector.x_max, detector.pitch
    x_tolerance = max(1e-3 * pitch, _tolerance(x_min, x_max))
    layer_y = np.asarray(detector.layer_y(), dtype=np.float32).astype(np.float64)
    y_tolerance = _tolerance(*layer_y)
    plane = pl.lit(pl.Series(layer_y)).gather(pl.col("layer").cast(pl.Int64).clip(0, n_layers - 1))
    centre = x_min + (pl.col("strip").cast(pl.Float64) + 0.5) * pitch

    event, hit = pl.col("event_id"), pl.col("hit_id")
    previous_event, previous_hit = event.shift(1), hit.shift(1)
    same_event = previous_event.is_not_null() & (event == previous_event)
    return [
        *_null_checks(HITS_COLUMNS),
        _finite("x"),
        _finite("y"),
        _finite("charge"),
        _finite("charge_muon"),
        _outside(
            "event_id",
            first_event_id,
            last_event_id,
            "{file}: column {column} has {value} at row {row}, not an event of this shard "
            f"({first_event_id}..{last_event_id}, as its events file and manifest entry list)",
        ),
        _outside(
            "layer",
            0,
            n_layers - 1,
            "{file}: column {column} has {value} at row {row}, outside the detector's "
            f"layers 0..{n_layers - 1}",
        ),
        _outside(
            "strip",
            0,
            n_strips - 1,
            "{file}: column {column} has {value} at row {row}, outside the detector's "
            f"strips 0..{n_strips - 1}",
        ),
        _outside(
            "x",
            x_min - x_tolerance,
            x_max + x_tolerance,
            "{file}: column {column} has {value} at row {row}, outside the detector's active width "
            f"[{x_min:g}, {x_max:g}] mm",
        ),
        Check(
            "x",
            (pl.col("x").cast(pl.Float64) - centre).abs() > x_tolerance,
            "{file}: column {column} has {value} at row {row}, not the centre of its strip ({expected:.7g} mm)",
            expected=centre,
        ),
        Check(
            "y",
            (pl.col("y").cast(pl.Float64) - plane).abs() > y_tolerance,
            "{file}: column {column} has {value} at row {row}, not the plane of its layer ({expected:.7g} mm)",
            expected=plane,
        ),
        Check("charge", pl.col("charge") < 0, "{file}: column {column} has {value} at row {row}, a negative charge"),
        Check(
            "charge_muon",
            pl.col("charge_muon") < 0,
            "{file}: column {column} has {value} at row {row}, a negative charge",
        ),
        Check(
            "particle_id",
            pl.col("particle_id") < -1,
            "{file}: column {column} has {value} at row {row} (0 the muon, -1 noise, k > 0 extra track k)",
        ),
        Check(
            "event_id",
            previous_event.is_not_null() & (event < previous_event),
            "{file}: column {column} has {value} at row {row}, after event {expected}: hits are sorted by event_id",
            expected=previous_event,
        ),
        Check(
            "hit_id",
            same_event & (hit == previous_hit),
            "{file}: column {column} has {value} at row {row} again, in the same event: a duplicated hit "
            "((event_id, hit_id) is unique)",
        ),
        Check(
            "hit_id",
            pl.when(same_event).then(hit != previous_hit + 1).otherwise(hit != 0),
            "{file}: column {column} has {value} at row {row}, expected {expected}: each event's hit ids run "
            "0, 1, 2, ... in order",
            expected=pl.when(same_event).then(previous_hit + 1).otherwise(0),
        ),
    ]


def events_checks(config: SimConfig, first_event_id: int) -> list[Check]:
    """The rules of one events shard whose first event is ``first_event_id`` (n_hits against the hits: in
    :func:`check_shard`)."""
    import polars as pl

    detector, muon = config.detector, config.muon
    n_layers = detector.n_layers
    pt_low, pt_high = _f32(muon.pt_min), _f32(muon.pt_max)
    x_low, x_high = _f32(detector.x_min), _f32(detector.x_max)
    element = pl.element()
    # Polars orders NaN above every number: NaN (a layer not crossed) is excluded from the range test
    bad_element = (
        element.is_null() | element.is_infinite() | (element.is_not_nan() & ((element < x_low) | (element > x_high)))
    )
    expected_id = pl.int_range(pl.len(), dtype=pl.Int64) + first_event_id
    return [
        *_null_checks(EVENTS_COLUMNS),
        _finite("pt"),
        _finite("x0"),
        _finite("theta0"),
        Check(
            "event_id",
            pl.col("event_id") != expected_id,
            "{file}: column {column} has {value} at row {row}, expected {expected}: the shard's events are its "
            "manifest entry's, each once, in order (a duplicated, missing, negative or unsorted event id)",
            expected=expected_id,
        ),
        _outside(
            "pt",
            pt_low,
            pt_high,
            "{file}: column {column} has {value} at row {row}, outside the generated range "
            f"[{muon.pt_min:g}, {muon.pt_max:g}] GeV of the dataset's config",
        ),
        Check("q", ~pl.col("q").is_in([-1, 1]), "{file}: column {column} has {value} at row {row}, not +1 or -1"),
        Check("n_hits", pl.col("n_hits") < 0, "{file}: column {column} has {value} at row {row}, a negative count"),
        Check(
            "x_true",
            pl.col("x_true").list.len() != n_layers,
            "{file}: column {column} has {value} values at row {row}, not one per layer ({expected})",
            value=pl.col("x_true").list.len(),
            expected=pl.lit(n_layers),
        ),
        Check(
            "x_true",
            pl.col("x_true").list.eval(bad_element).list.any(),
            "{file}: column {column} has {value} at row {row}: each value is NaN (not crossed) or within the "
            f"active width [{detector.x_min:g}, {detector.x_max:g}] mm",
            value=pl.col("x_true").list.eval(element.filter(bad_element)).list.first(),
        ),
    ]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.7g}"
    return str(value)


def _failure(frame: pl.LazyFrame, check: Check, count: int, path: Path) -> DatasetError:
    """The one-line error of ``check``, which ``count`` rows of ``frame`` (the file ``path``) break."""
    import polars as pl

    row, value, expected = (
        frame.with_row_index("_row")
        .with_columns(
            check.bad.alias("_bad"),
            (pl.col(check.column) if check.value is None else check.value).alias("_value"),
            (pl.lit(None) if check.expected is None else check.expected).alias("_expected"),
        )
        .filter(pl.col("_bad"))
        .select("_row", "_value", "_expected")
        .head(1)
        .collect()
        .row(0)
    )
    shown = {"value": _show(value), "expected": expected if isinstance(expected, float) else _show(expected)}
    return DatasetError(check.template.format(file=path, column=check.column, row=row, count=count, **shown))


def _run(frame: pl.LazyFrame, checks: list[Check], path: Path, extra: list[pl.Expr]) -> pl.DataFrame:
    """One pass over ``frame``: how many rows break each check (the first broken one raises) and ``extra``."""
    # the streaming engine reads and checks the row groups as they come: about twice as fast as the in-memory
    # one on a 2.5 M-hit shard (2 cores), with the same counts (shift and search_sorted keep the file's order)
    counts = frame.select(*(check.bad.sum().alias(f"_{i}") for i, check in enumerate(checks)), *extra).collect(
        engine="streaming"
    )
    for i, check in enumerate(checks):
        count = counts[f"_{i}"][0]
        if count:
            raise _failure(frame, check, count, path)
    return counts


def check_shard(dataset_dir: Path, shard: dict[str, Any], config: SimConfig) -> None:
    """Check the rows of one shard (its manifest entry ``shard``) against the contract; DatasetError at the
    first broken rule. One pass over each file."""
    import polars as pl

    first, n_events = int(shard["first_event_id"]), int(shard["n_events"])
    events_path = dataset_dir / shard["events"]["path"]
    hits_path = dataset_dir / shard["hits"]["path"]
    events = pl.scan_parquet(events_path, glob=False, hive_partitioning=False)
    n_hits = _run(events, events_checks(config, first), events_path, [pl.col("n_hits")])["n_hits"].to_numpy()

    # hits per event from the (sorted, checked) event ids: where each event's rows start
    starts = pl.Series(np.arange(first, first + n_events + 1, dtype=np.int64))
    hits = pl.scan_parquet(hits_path, glob=False, hive_partitioning=False)
    bounds = _run(
        hits,
        hits_checks(config, first, n_events),
        hits_path,
        [pl.col("event_id").search_sorted(pl.lit(starts)).alias("_start")],
    )
    found = np.diff(bounds["_start"].to_numpy())
    wrong = np.flatnonzero(found != n_hits)
    if len(wrong):
        row = int(wrong[0])
        raise DatasetError(
            f"{events_path}: column n_hits has {n_hits[row]} at row {row}, but {hits_path} holds {found[row]} hits "
            f"of event {first + row} ({len(wrong)} events disagree)"
        )
