"""Small, named, typed Prefect tasks, one per library function.

Caching: a task's cache key is built from its inputs and :func:`flows.commands.code_version` (the package
version and a hash of the sources), never from the flow-run id, so a second ``muontrack run`` with the same
configuration reuses the dataset and the trained models. A key alone cannot know that somebody deleted the
output since, so each flow calls a task with ``refresh_cache=True`` when its output is not on disk.
Retries are for the I/O tasks only (shard writing, prediction writing); training is not retried.

The evaluation's tasks take the dataset the flow opened (a :class:`pipeline.dataset.Dataset`, sent with the task to
a Dask worker) and the report context the flow computed, never the dataset's path to open again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext

from analysis.report_folder import PREDICTIONS_DIR, REPORT_NAME, RESOLUTION_NAME
from flows import commands

if TYPE_CHECKING:
    from pipeline.dataset import Dataset


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    payload = json.dumps(
        {"task": context.task.name, "code": commands.code_version(), "inputs": parameters}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run; this module's logger when called without one (``.fn``)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@task(name="simulate-shard", cache_key_fn=_cache_key, persist_result=True, retries=2, retry_delay_seconds=2)
def simulate_shard(
    out: str, config_json: str, seed: int, shard_index: int, first_event_id: int, n_events: int, numba_threads: int = 0
) -> dict:
    """Generate and write one shard (skipped if already on disk); returns its manifest entry. Logs its start and
    a line at least every flows.logs.HEARTBEAT_SECONDS (the first shard compiles the Numba kernels)."""
    from flows.logs import Heartbeat
    from pipeline.config import SimConfig
    from simulation import shards

    if numba_threads > 0:
        import numba

        numba.set_num_threads(min(numba_threads, numba.config.NUMBA_NUM_THREADS))
    config = SimConfig.from_dict(json.loads(config_json))
    what = f"simulating shard {shard_index}: {n_events} events from event {first_event_id}"
    with Heartbeat(_run_logger().info, what):
        # a worker's threads run shard after shard: each reuses its arrays (simulation.shards.thread_buffers)
        return shards.simulate_shard(
            Path(out), config, seed, shard_index, first_event_id, n_events, buffers=shards.thread_buffers()
        )


@task(name="finalize-dataset", cache_key_fn=_cache_key, persist_result=True, retries=2, retry_delay_seconds=2)
def finalize_dataset(out: str, config_json: str, seed: int, shard_entries: list[dict]) -> dict:
    """Write the manifest last: the dataset becomes complete and readable."""
    from pipeline.config import SimConfig
    from simulation import shards

    return shards.finalize_dataset(Path(out), SimConfig.from_dict(json.loads(config_json)), seed, shard_entries)


@task(name="train-model", cache_key_fn=_cache_key, persist_result=True)
def train_model(
    data: str,
    model: str,
    out: str,
    preset: str,
    seed: int,
    dataset_hash: str,  # noqa: ARG001 (keys the cache)
    overrides: dict | None = None,
    warm_start: str | None = None,
) -> str:
    """Train one model into ``out`` (returned); ``dataset_hash`` (config hash + seed + events) keys the cache,
    with the other inputs (``overrides``: a config file's model and train sections; ``warm_start``: the run whose
    warm-up epochs this model repeats; model.train.train_run).

    Logs one line per finished epoch (losses, val sigma68, seconds) to the task run's log and redraws
    RUN/training_curves.png (flows.commands.write_training_curves); between them, the compilation of each step shape
    and the events done (model.train.train_run's ``on_message``), and a line at least every
    flows.logs.HEARTBEAT_SECONDS while one step blocks (flows.logs.Heartbeat).
    """
    from flows.logs import Heartbeat
    from model.train import format_epoch

    logger = _run_logger()
    with Heartbeat(logger.info, f"{model}: training into {out}") as heartbeat:
        commands.train(
            Path(data),
            model,
            out,
            preset=preset,
            seed=seed,
            resume=Path(out).exists(),
            on_epoch=lambda info: heartbeat.beat(format_epoch(info)),
            overrides=overrides,
            on_message=heartbeat.beat,
            warm_start=warm_start,
        )
    return out


def _predict_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The predict task's key: its inputs but the staging folder, which is new in every evaluation, and the dataset
    by its folder and :func:`flows.commands.dataset_key` (config hash, seed, events)."""
    keyed = {name: value for name, value in parameters.items() if name not in ("staging", "dataset")}
    dataset = parameters["dataset"]
    keyed |= {"data": str(dataset.path), "dataset_hash": commands.dataset_key(dataset.manifest)}
    return _cache_key(context, keyed)


@task(name="predict", cache_key_fn=_predict_cache_key, persist_result=True, retries=1, retry_delay_seconds=2)
def predict(
    dataset: Dataset,
    runs: list[str],
    out: str,
    run_keys: list[str],  # noqa: ARG001 (keys the cache)
    staging: str | None = None,
    checkpoint: str = commands.DEFAULT_CHECKPOINT,
) -> str:
    """Inference on the test split of the opened ``dataset`` for the truth references and every run (its
    ``checkpoint``: best or last); writes the predictions/ of the report ``out``, into its staging folder ``staging``
    when given (see flows.end_to_end.evaluate_flow). Logs each model started and done, the events done in between,
    and a line at least every flows.logs.HEARTBEAT_SECONDS (flows.logs.Heartbeat: through a compilation too)."""
    from flows.logs import Heartbeat

    with Heartbeat(_run_logger().info, f"predicting the test split with {len(runs)} runs") as heartbeat:
        commands.predict_all(
            dataset, [Path(r) for r in runs], Path(staging or out), checkpoint=checkpoint, on_message=heartbeat.beat
        )
    return str(Path(out) / PREDICTIONS_DIR)


@task(name="predict-shard", cache_policy=NONE, persist_result=False, retries=1, retry_delay_seconds=2)
def predict_shard(
    dataset: Dataset, runs: list[str], shard_index: int, max_hits: int, checkpoint: str = commands.DEFAULT_CHECKPOINT
) -> list[dict]:
    """Inference on the test events of one shard of the opened ``dataset`` for the truth references, classical and
    every run (flows.commands.predict_shard): its prediction tables, one ``{"hits", "clusters", "tracks"}`` dict per
    source, returned to the flow, which concatenates the shards. Never cached: the flow writes a new report."""
    return commands.predict_shard(dataset, [Path(r) for r in runs], shard_index, max_hits, checkpoint)


@task(name="write-report", cache_policy=NONE)
def write_report(evaluation: commands.Evaluation) -> dict:
    """Metrics, tables, figures (the runs' training curves included), report.md and the catalog of ``evaluation``
    from its predictions (cheap, never cached), written into its staging folder (flows.commands
    .write_evaluation_report: the opened dataset, the context the flow computed). Logs its start and end, and a
    line at least every flows.logs.HEARTBEAT_SECONDS in between (flows.logs.Heartbeat)."""
    import time

    from flows.logs import Heartbeat

    start = time.perf_counter()
    what = f"writing the report {evaluation.out} (metrics, figures, report.md, catalog)"
    with Heartbeat(_run_logger().info, what) as beat:
        summary = commands.write_evaluation_report(evaluation)
        beat.beat(f"report written in {time.perf_counter() - start:.1f} s")
    return summary


@task(name="publish-artifacts")
def publish_artifacts(summary: dict, out: str) -> None:
    """The summary and resolution tables as Prefect table and markdown artifacts."""
    import polars as pl
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = [{"model": model, **{k: v for k, v in values.items()}} for model, values in summary.items()]
    create_table_artifact(key="muontrack-summary", table=rows, description=f"Summary of {out}")
    resolution = Path(out) / RESOLUTION_NAME
    if resolution.is_file():
        create_table_artifact(
            key="muontrack-resolution",
            table=pl.read_csv(resolution).to_dicts(),
            description="sigma68 of the q/pT residual in 5 GeV bins of true pT",
        )
    report = Path(out) / REPORT_NAME
    if report.is_file():
        create_markdown_artifact(key="muontrack-report", markdown=report.read_text(), description=str(report))
