"""Sharded, resumable, optionally parallel generation of a dataset folder.

The unit of work is one shard: :func:`simulate_shard` generates events ``first_event_id ..
first_event_id + n_events - 1`` and writes them with :func:`pipeline.dataset.write_shard_tables`. It depends
only on its arguments (config, seed, shard range), so shards can run in any order, in any process, and a
Prefect or Dask task can map over :func:`plan_shards`. Memory is bounded by the shard size, never by the
event count: one shard (and one set of reused buffers) per worker thread, two (one generated, one being
written) with ``workers=1``.

``workers > 1`` runs on threads of the calling process, not on worker processes: the Numba kernels
(``nogil``), Parquet encoding, hashing and fsync release the GIL, and a worker process would pay its own
interpreter start, imports and Numba cache load (~0.7 CPU s measured) for nothing.

Same config + seed => the same rows whatever the number of workers, because the shard plan depends only on
``config.shard_events`` and the generator draws each event from (seed, event_id).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shutil
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import provenance
from pipeline.config import SimConfig
from pipeline.contract import MAX_SEED  # the generator seeds each event from a 64-bit mix of (seed, event_id)
from pipeline.dataset import (
    MANIFEST_NAME,
    META_CONFIG,
    META_PREFIX,
    META_SEED,
    STAGING_DIR,
    STAGING_RECORD,
    TABLES,
    existing_shard_entry,
    open_dataset,
    read_shard_metadata,
    read_staging_record,
    write_manifest,
    write_shard_tables,
    write_staging_record,
)
from pipeline.errors import ConfigError, DatasetError
from pipeline.locks import exclusive_writer

if TYPE_CHECKING:
    from simulation.generate import ShardBuffers

#: the most events one dataset may hold: about 0.8 TB of Parquet with the default detector, and a manifest of
#: 50 000 shards at the default shard size (memory stays bounded by the shards in flight whatever the count)
MAX_EVENTS = 10**9


@functools.cache
def code_version() -> str:
    """Version of the simulation code (pipeline.provenance), recorded in the manifest and every shard, so rows
    can be traced to the code that drew them and an interrupted dataset is not resumed by different code.
    It covers pipeline/jit.py too: the simulation's jit options and its shared Numba helpers live there; and
    pipeline/constants.py: the muon mass and the Highland constants it scatters with."""
    return provenance.code_version("simulation", "pipeline/jit.py", "pipeline/constants.py")


def plan_shards(n_events: int, config: SimConfig) -> list[tuple[int, int, int]]:
    """``(shard_index, first_event_id, n_events)`` for every shard; shards hold ``config.shard_events``."""
    size = config.shard_events
    return [(index, first, min(size, n_events - first)) for index, first in enumerate(range(0, n_events, size))]


def simulate_shard(
    dataset_dir: str | Path,
    config: SimConfig,
    seed: int,
    shard_index: int,
    first_event_id: int,
    n_events: int,
    *,
    buffers: ShardBuffers | None = None,
) -> dict[str, Any]:
    """Generate and write one shard; return its manifest entry.

    If both of the shard's files already exist with matching metadata (config, seed, event range, code
    version), nothing is generated and their entry is returned: that is how a dataset resumes. ``buffers``
    (:class:`simulation.generate.ShardBuffers`): arrays to reuse from the caller's previous shard.
    """
    existing = existing_shard_entry(
        dataset_dir, config, seed, shard_index, first_event_id, n_events, code_version=code_version()
    )
    if existing is not None:
        return existing
    # imported here so that argument checks and `muontrack inspect` never pay for Numba's start-up
    from simulation.generate import generate_events

    hits, events = generate_events(config, seed, first_event_id, n_events, buffers=buffers)
    return write_shard_tables(
        dataset_dir, shard_index, first_event_id, hits, events, config, seed, code_version=code_version()
    )


_THREAD_LOCAL = threading.local()


def thread_buffers() -> ShardBuffers:
    """The calling thread's :class:`simulation.generate.ShardBuffers`, made on its first call: for callers that
    run shard after shard on long-lived threads they do not own (the task threads of a Dask worker), so that
    each shard reuses the arrays of the thread's previous shard instead of touching fresh memory (the first
    touch of a shard's columns costs about as much CPU as simulating it). Held as long as the thread lives."""
    from simulation.generate import ShardBuffers

    buffers = getattr(_THREAD_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _THREAD_LOCAL.buffers = ShardBuffers()
    return buffers


def finalize_dataset(
    dataset_dir: str | Path, config: SimConfig, seed: int, shard_entries: list[dict[str, Any]]
) -> dict[str, Any]:
    """Write the manifest (last, atomically) and remove ``.staging/``; return the manifest."""
    dataset_dir = Path(dataset_dir)
    record = read_staging_record(dataset_dir)
    n_events = sum(entry["n_events"] for entry in shard_entries)
    if record is not None and record["n_events"] != n_events:
        raise ValueError(f"shard entries hold {n_events} events, the staging record {record['n_events']}")
    manifest = write_manifest(dataset_dir, config, seed, shard_entries, code_version())
    shutil.rmtree(dataset_dir / STAGING_DIR, ignore_errors=True)
    return manifest


# ---- the whole dataset -----------------------------------------------------------------------------------


def _check_arguments(n_events: Any, seed: Any, workers: Any) -> None:
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not is_int(n_events) or n_events < 1:
        raise ConfigError(f"the number of events must be a positive integer, got {n_events!r}")
    if n_events > MAX_EVENTS:
        raise ConfigError(f"at most {MAX_EVENTS:,} events per dataset, got {n_events:,}; write several datasets")
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"the seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    if not is_int(workers) or workers < 1:
        raise ConfigError(f"the number of workers must be a positive integer, got {workers!r}")


#: bytes of one row of the hits columns (simulation.generate.HIT_DTYPES), for the memory check
_HIT_ROW_BYTES = 39


def _check_sizes(config: SimConfig) -> None:
    """ConfigError, before any work, for a config whose events cannot be held: more hits per event than the int32
    ``hit_id`` and ``n_hits`` columns count, or a shard whose hit buffers exceed the machine's memory.

    The hits of an event are bounded as the generator bounds them (simulation.events._deposit_bound), here at the
    expected background counts: every crossing with a full charge window plus the noise strips and the strips
    that fire on their electronic noise alone."""
    from simulation.digitisation import charge_half_window
    from simulation.generate import noise_tail_probability

    detector, background = config.detector, config.background
    window = 2 * charge_half_window(detector.charge_sigma, detector.pitch) + 1
    crossings = detector.n_layers * (1 + background.noise_clusters_per_layer) + background.extra_tracks_per_event * min(
        background.extra_track_layers_max, detector.n_layers
    )
    single_strips = background.noise_strips_per_layer + detector.n_strips * noise_tail_probability(detector)
    per_event = crossings * window + single_strips * detector.n_layers
    if per_event >= 2**31:
        raise ConfigError(
            f"this background makes about {per_event:.3g} strip deposits per event; hit ids are int32 (at most "
            "2**31 - 1): lower background.extra_tracks_per_event or the noise rates"
        )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shard_bytes = per_event * config.shard_events * _HIT_ROW_BYTES
    if shard_bytes > memory:
        raise ConfigError(
            f"a shard of {config.shard_events} events needs about {shard_bytes / 2**30:.3g} GiB of hit buffers, more "
            f"than this machine's {memory / 2**30:.3g} GiB: lower shard_events or the background"
        )


def _differences(found: dict[str, Any], config: SimConfig, seed: int, n_events: int) -> list[str]:
    """What differs between a dataset (manifest or staging record) and the request, as short phrases."""
    differences = []
    if found.get("config_hash") != config.config_hash():
        differences.append(f"config (hash {found.get('config_hash')}, asked {config.config_hash()})")
    if found.get("seed") != seed:
        differences.append(f"seed ({found.get('seed')}, asked {seed})")
    if found.get("n_events") != n_events:
        differences.append(f"event count ({found.get('n_events')}, asked {n_events})")
    return differences


def _prepare_output(out: Path, config: SimConfig, seed: int, n_events: int) -> dict[str, Any] | None:
    """Decide what to do with ``out`` before writing anything.

    Returns the manifest of a complete dataset that already matches the request (nothing to do), or None
    when ``out`` is free or holds a resumable run of the same request. Everything else is a DatasetError,
    raised before any file is touched.
    """
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file, not a dataset folder")
    if (out / MANIFEST_NAME).exists():
        dataset = open_dataset(out)
        differences = _differences(dataset.manifest, config, seed, n_events)
        if differences:
            raise DatasetError(
                f"{out} already holds a dataset with another {'; '.join(differences)}; choose another --out"
            )
        # a run killed between writing the manifest and removing .staging leaves it behind
        shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
        return dataset.manifest
    record = read_staging_record(out) if out.is_dir() else None
    if record is not None:
        differences = _differences(record, config, seed, n_events)
        if differences:
            raise DatasetError(
                f"{out} holds an interrupted dataset with another {'; '.join(differences)}; "
                "resume it with its own settings or choose another --out"
            )
        # Interrupted under other simulation code: resumed all the same, since the shards carry the code
        # version that drew them and those of other code are drawn again (_start_staging updates the record).
        return None
    if out.is_dir():
        shards = _orphan_shards(out)
        if shards:
            _check_orphan_shards(out, shards, config, seed, n_events)
            return None
    if out.is_dir() and any(child.name != STAGING_DIR for child in out.iterdir()):
        raise DatasetError(f"--out {out} is a non-empty folder that holds no muontrack dataset; choose another --out")
    return None


def _orphan_shards(out: Path) -> list[Path]:
    """The shard files of a dataset folder that lost its manifest and staging record (deleted by hand)."""
    return sorted(path for table in TABLES for path in (out / table).glob("part-*.parquet"))


def _check_orphan_shards(out: Path, shards: list[Path], config: SimConfig, seed: int, n_events: int) -> None:
    """A folder of shards without a manifest is resumable when every shard was drawn for this request: each
    shard's metadata names its config, seed and event range. Shards of other code are drawn again."""
    foreign = set(os.listdir(out)) - {*TABLES, STAGING_DIR}
    if foreign:
        raise DatasetError(f"--out {out} holds {sorted(foreign)[0]} beside its shards; choose another --out")
    plan = {index: (first, n) for index, first, n in plan_shards(n_events, config)}
    for path in shards:
        try:
            _, metadata = read_shard_metadata(path)
        except (OSError, ValueError):
            # unreadable (cut short by a crash): it is drawn again
            continue
        if metadata.get(META_CONFIG) != config.to_json() or metadata.get(META_SEED) != str(seed):
            raise DatasetError(
                f"{out} holds shards of another config or seed ({path.relative_to(out)}) and no manifest; "
                "choose another --out"
            )
        index = int(metadata.get(META_PREFIX + "shard_index", -1))
        first = int(metadata.get(META_PREFIX + "first_event_id", -1))
        count = int(metadata.get(META_PREFIX + "n_events", -1))
        if index not in plan or (plan[index][0] != first) or (index < len(plan) - 1 and plan[index][1] != count):
            raise DatasetError(
                f"{out} holds shards of another event count ({path.relative_to(out)} has events {first} to "
                f"{first + count - 1}) and no manifest; run with the dataset's own --events or choose another --out"
            )


def _start_staging(out: Path, config: SimConfig, seed: int, n_events: int) -> None:
    """Create ``out`` and ``.staging/``, drop leftovers of a killed writer, record the request."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(f"cannot create --out {out}: {err.strerror or err}") from None
    staging = out / STAGING_DIR
    if staging.is_symlink():  # its leftovers are deleted below: never those of a link's target
        raise DatasetError(f"{staging} is a symbolic link; remove it")
    staging.mkdir(exist_ok=True)
    for leftover in staging.iterdir():
        if leftover.name == STAGING_RECORD:
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    record = read_staging_record(out)
    if record is None or record.get("code_version") != code_version():
        write_staging_record(out, config, seed, n_events, code_version())


def prepare_dataset(out: str | Path, n_events: int, seed: int, config: SimConfig) -> dict[str, Any] | None:
    """Check ``out`` against the request and get it ready for :func:`simulate_shard` calls.

    Returns the manifest when ``out`` already holds this complete dataset (nothing to do). Otherwise
    creates ``out/.staging/`` with its ``dataset.json`` record (kept when resuming) and returns None; the
    caller then runs :func:`simulate_shard` over :func:`plan_shards` (in any order, anywhere) and
    :func:`finalize_dataset`. Refusals (DatasetError, ConfigError) happen before any file is touched.
    """
    _check_arguments(n_events, seed, 1)
    _check_sizes(config)
    out = Path(out)
    existing = _prepare_output(out, config, seed, n_events)
    if existing is None:
        _start_staging(out, config, seed, n_events)
    return existing


def _run_shards_in_process(
    out: Path, config: SimConfig, seed: int, plan: list[tuple[int, int, int]], on_done: Any
) -> list[dict[str, Any]]:
    """Simulate shard k+1 (Numba's threads on every core) while a background thread writes shard k (the same
    work as simulate_shard).

    Numba's kernels, Parquet encoding and hashing all release the GIL, so generating and writing overlap;
    at most two shards are held in memory, in two sets of buffers used in turn.
    """
    from simulation.generate import ShardBuffers, generate_events

    entries: list[dict[str, Any]] = []
    buffer_sets = (ShardBuffers(), ShardBuffers())
    generated = 0
    with ThreadPoolExecutor(max_workers=1) as writer:
        writing: Future | None = None
        for shard_index, first_event_id, n_events in plan:
            existing = existing_shard_entry(
                out, config, seed, shard_index, first_event_id, n_events, code_version=code_version()
            )
            if existing is not None:
                entries.append(existing)
                on_done(n_events)
                continue
            # the writer is at most one shard behind, and never on the buffers of the shard generated now: the
            # sets alternate by shard generated, not by plan position (shards already written are skipped)
            hits, events = generate_events(config, seed, first_event_id, n_events, buffers=buffer_sets[generated % 2])
            generated += 1
            if writing is not None:
                entries.append(writing.result())
                on_done(entries[-1]["n_events"])
            writing = writer.submit(
                write_shard_tables,
                out,
                shard_index,
                first_event_id,
                hits,
                events,
                config,
                seed,
                code_version=code_version(),
            )
            del hits, events
        if writing is not None:
            entries.append(writing.result())
            on_done(entries[-1]["n_events"])
    return entries


@functools.cache
def _threading_layer() -> str:
    """Numba's threading layer, chosen by a first kernel call (a one-event run)."""
    import numba

    from simulation.generate import generate_events

    generate_events(SimConfig(), 0, 0, 1)
    return numba.threading_layer()


class _ShardWorkers:
    """What the threads of :func:`_run_shards_in_threads` run: one shard at a time, with per-thread buffers."""

    def __init__(self, out: Path, config: SimConfig, seed: int, numba_threads: int, serialise: bool) -> None:
        self.out, self.config, self.seed = out, config, seed
        self.numba_threads = numba_threads
        # Numba's workqueue layer (where OpenMP and TBB are missing) must not launch kernels from two threads:
        # there the shards run one at a time (a fallback; OpenMP and TBB are thread-safe)
        self.shard_lock = threading.Lock() if serialise else contextlib.nullcontext()
        self.local = threading.local()

    def run(self, shard_index: int, first_event_id: int, n_events: int) -> dict[str, Any]:
        from simulation.generate import ShardBuffers

        if not hasattr(self.local, "buffers"):
            import numba

            # thread-local in Numba: each worker's kernels use its share of the cores
            numba.set_num_threads(max(1, min(self.numba_threads, numba.config.NUMBA_NUM_THREADS)))
            self.local.buffers = ShardBuffers()
        with self.shard_lock:
            return simulate_shard(
                self.out, self.config, self.seed, shard_index, first_event_id, n_events, buffers=self.local.buffers
            )


def _run_shards_in_threads(
    out: Path, config: SimConfig, seed: int, plan: list[tuple[int, int, int]], workers: int, on_done: Any
) -> list[dict[str, Any]]:
    """Run the shards on ``workers`` threads of this process, each generating then writing whole shards with
    ``cpu_count // workers`` Numba threads: the kernels (``nogil``), Parquet encoding, hashing and fsync all
    release the GIL, so the threads use the cores like processes would, without a worker process's start-up
    (interpreter, imports, Numba's cache load: ~0.7 CPU s each, measured). A few shards are queued per
    thread, not the whole plan, and each thread reuses one set of buffers: memory is flat in the event count.
    """
    serialise = _threading_layer() == "workqueue"
    shard_workers = _ShardWorkers(out, config, seed, max(1, (os.cpu_count() or 1) // workers), serialise)
    entries: list[dict[str, Any]] = []
    shards = iter(plan)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="muontrack-shard")
    try:
        pending: set[Future] = {
            pool.submit(shard_workers.run, *shard) for shard in itertools.islice(shards, 2 * workers)
        }
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                entry = future.result()  # re-raises a worker's exception here
                entries.append(entry)
                on_done(entry["n_events"])
                for shard in itertools.islice(shards, 1):
                    pending.add(pool.submit(shard_workers.run, *shard))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return entries


def _run_shards(
    out: Path,
    config: SimConfig,
    seed: int,
    plan: list[tuple[int, int, int]],
    workers: int,
    on_done: Any,
) -> list[dict[str, Any]]:
    """Run every shard of ``plan``; call ``on_done(n_events)`` after each; return the entries."""
    if workers == 1 or len(plan) == 1:
        return _run_shards_in_process(out, config, seed, plan, on_done)
    return _run_shards_in_threads(out, config, seed, plan, min(workers, len(plan)), on_done)


def simulate_dataset(
    out: str | Path,
    n_events: int,
    seed: int,
    config: SimConfig,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Simulate ``n_events`` events into the dataset folder ``out`` and return its manifest.

    - ``out`` free (missing or empty): written from scratch.
    - ``out`` a complete dataset of the same config, seed and event count: returned as is, nothing rewritten.
    - ``out`` an interrupted run of the same request: resumed, keeping the shards already written.
    - anything else (a file, another dataset, a foreign non-empty folder): DatasetError, nothing touched.

    ``workers > 1`` runs shards on that many threads of this process, each with ``cpu_count // workers``
    Numba threads (the kernels release the GIL). ``progress`` shows a rich progress bar over events on stderr.
    """
    _check_arguments(n_events, seed, workers)
    out = Path(out)
    with exclusive_writer(out):
        return _simulate_locked(out, n_events, seed, config, workers, progress)


def _simulate_locked(
    out: Path, n_events: int, seed: int, config: SimConfig, workers: int, progress: bool
) -> dict[str, Any]:
    existing = prepare_dataset(out, n_events, seed, config)
    if existing is not None:
        return existing
    plan = plan_shards(n_events, config)
    if not progress:
        entries = _run_shards(out, config, seed, plan, workers, on_done=lambda _done: None)
    else:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("simulate"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("events"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
            task = bar.add_task("simulate", total=n_events)
            entries = _run_shards(out, config, seed, plan, workers, on_done=lambda n: bar.advance(task, n))
    return finalize_dataset(out, config, seed, entries)
