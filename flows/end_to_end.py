"""Prefect flows: ``simulate``, ``train``, ``evaluate`` and ``end_to_end`` (simulate -> train -> evaluate).

Flows are thin: they decide what runs where and pass paths (and the opened dataset) between tasks; the work is
in the tasks' library functions, and the ``evaluate`` flow runs the sequence of ``muontrack evaluate``
(flows.commands.evaluate) with its tasks as the steps. Simulation shards, and the inference of ``evaluate`` shard by
shard, run on the flow's task runner: threads by default, or Dask through ``prefect-dask`` (a local cluster of
``workers`` processes, or an existing cluster at ``dask_address``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow

from analysis.report_folder import REPORT_NAME
from flows import commands, tasks
from flows.server import ensure_prefect_api
from pipeline.config import SimConfig
from pipeline.errors import ConfigError, MuontrackError
from pipeline.locks import exclusive_writer
from pipeline.registry import get_model
from simulation.shards import code_version as simulation_code_version


def _run_complete(path: Path) -> bool:
    from model.run_folder import CONFIG_NAME, METRICS_NAME

    return (Path(path) / CONFIG_NAME).is_file() and (Path(path) / METRICS_NAME).is_file()


def job_configs(job: commands.JobPreset, overrides: dict | None) -> tuple[SimConfig, dict | None, str]:
    """A job's dataset config, training overrides and training label (model.hyperparameters.preset_label: the preset's
    name, with a hash when ``overrides`` change its values) from the sections of a config file (``overrides``,
    pipeline.config.read_config_file): ``simulation`` over the job's dataset config, ``model`` and ``train``
    over its training preset. ConfigError (one line) for a bad section, key or value."""
    from model.hyperparameters import configure, preset_label

    overrides = overrides or {}
    sim_config = SimConfig.from_dict(
        overrides.get("simulation", {}), "simulation", base=SimConfig(shard_events=job.shard_events)
    )
    training = {name: section for name, section in overrides.items() if name != "simulation"} or None
    return sim_config, training, preset_label(job.train_preset, *configure(job.train_preset, training))


def check_dask_scheduler(dask_address: str, timeout: float = 10.0) -> None:
    """MuontrackError (one line) unless a Dask scheduler accepts connections at ``dask_address``.

    Checked before the flow starts: inside it, Prefect would log the connection failure's tracebacks first.
    """
    import socket

    from distributed.comm import get_address_host_port

    try:
        host, port = get_address_host_port(dask_address)
    except ValueError as err:
        raise ConfigError(f"--dask-address {dask_address!r} is not a Dask address (tcp://HOST:PORT): {err}") from None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise MuontrackError(f"cannot reach the Dask scheduler at {dask_address}: {err}") from None
    # something listens there: ask it who it is (a web server answers Dask's handshake with bytes that Dask
    # reads as a frame length of gigabytes: a MemoryError deep inside the task runner)
    if _identity_type(dask_address, timeout) != "Scheduler":
        raise MuontrackError(f"{dask_address} answers, but not as a Dask scheduler")


def _identity_type(dask_address: str, timeout: float) -> str | None:
    """The ``type`` a Dask server at ``dask_address`` gives for itself, None when it does not answer as one."""
    import asyncio

    from distributed.core import rpc

    async def identity() -> object:
        async with rpc(dask_address, timeout=timeout) as server:
            return await asyncio.wait_for(server.identity(), timeout)

    try:
        answer = asyncio.run(identity())
    except Exception:  # whatever a foreign server makes Dask's protocol raise, MemoryError included
        return None
    return answer.get("type") if isinstance(answer, dict) else None


def dask_task_runner(workers: int, dask_address: str | None):
    """A DaskTaskRunner on an existing cluster (``dask_address``) or a local one with ``workers`` processes."""
    from prefect_dask import DaskTaskRunner

    if dask_address:
        check_dask_scheduler(dask_address)
    # process-based Dask workers inherit PREFECT_API_URL and talk to one API instead of each starting a server
    ensure_prefect_api(export=True)
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


def _train_run_name() -> str:
    """train-MODEL-PRESET-DATASET, the dataset by its folder name."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"train-{p['model']}-{p['preset']}-{Path(p['data']).name}"


def _evaluate_run_name() -> str:
    """evaluate-REPORT-Nruns, the report by its folder name."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"evaluate-{Path(p['out']).name}-{len(p['runs'])}runs"


@flow(name="simulate", flow_run_name="simulate-{events}-seed{seed}", log_prints=True)
def simulate_flow(out: str, events: int, seed: int = 0, config_json: str | None = None, workers: int = 1) -> dict:
    """Simulate ``events`` events into the dataset folder ``out``, one task per shard."""
    from simulation.shards import plan_shards, prepare_dataset

    config = SimConfig.from_dict(json.loads(config_json)) if config_json else SimConfig()
    config_json = config.to_json()
    with exclusive_writer(out):
        complete = prepare_dataset(Path(out), events, seed, config)
        if complete is not None:
            # nothing to draw: no task runs, so no later code change rewrites the manifest of a finished dataset
            return complete
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        # refreshed: a cached entry would name a shard that may have been deleted since
        futures = [
            tasks.simulate_shard.with_options(refresh_cache=True).submit(
                out, config_json, seed, index, first, n, numba_threads=threads
            )
            for index, first, n in plan_shards(events, config)
        ]
        entries = [future.result() for future in futures]
        return tasks.finalize_dataset.with_options(refresh_cache=True)(out, config_json, seed, entries)


def simulate_on_dask(
    out: str,
    events: int,
    seed: int = 0,
    config_json: str | None = None,
    workers: int = 2,
    dask_address: str | None = None,
) -> dict:
    """The ``simulate`` flow with its shards on Dask (a local cluster, or the cluster at ``dask_address``)."""
    from flows.logs import quiet_user_errors

    quiet_user_errors()
    runner = dask_task_runner(workers, dask_address)
    return simulate_flow.with_options(task_runner=runner)(out, events, seed, config_json, workers)


@flow(name="train", flow_run_name=_train_run_name, log_prints=True)
def train_flow(
    data: str,
    model: str,
    out: str,
    preset: str = "cpu",
    seed: int = 0,
    overrides: dict | None = None,
    warm_start: str | None = None,
) -> str:
    """Train one model on a dataset; ``overrides``: the model and train sections of a config file; ``warm_start``:
    the run folder of the model whose warm-up epochs this one repeats (model.train, "Warm start"). The flow reads
    the dataset's manifest for the task's cache key (pipeline.dataset.read_manifest); the training opens the
    dataset (model.train.train_run)."""
    from pipeline.dataset import read_manifest

    dataset_hash = commands.dataset_key(read_manifest(data))
    refresh = not _run_complete(Path(out))
    return tasks.train_model.with_options(refresh_cache=refresh)(
        data, model, out, preset, seed, dataset_hash, overrides, warm_start
    )


@flow(name="evaluate", flow_run_name=_evaluate_run_name, log_prints=True)
def evaluate_flow(
    data: str,
    runs: list[str],
    out: str,
    overwrite: bool = True,
    by_shard: bool = False,
    checkpoint: str = commands.DEFAULT_CHECKPOINT,
) -> dict:
    """Predict with every run on the test split, then build the report and publish it as artifacts: the sequence of
    ``muontrack evaluate`` (flows.commands.evaluate: the dataset opened once, and passed to the tasks), with the
    ``predict`` (or ``predict-shard``) and ``write-report`` tasks as its steps.

    ``by_shard``: one prediction task per dataset shard on the flow's task runner (Dask in
    :func:`evaluate_on_dask`), never cached; the flow concatenates their tables in shard order into the same
    predictions as the single predict task (flows.commands.combine_shards).

    The predictions and the report are written into a staging folder that replaces ``out`` at the end
    (analysis.report_folder.staged_report), so a kill leaves the previous report. The predict task is cached and
    writes nothing on a cache hit: the predictions of the report already in ``out`` are linked into the staging
    folder first when that report is of these runs on this dataset, and the task is forced to run otherwise.
    ``overwrite``: replace a report of other runs (``muontrack run`` owns its report folders, whose names carry
    the dataset key); False refuses it as ``muontrack evaluate`` does without ``--overwrite``. ``checkpoint``: each
    run's parameters evaluated, ``best`` (lowest validation sigma68, the default) or ``last``; the previous report's
    predictions are reused only with the default (the catalog does not record the checkpoint).
    """
    summary = commands.evaluate(
        Path(data),
        [Path(r) for r in runs],
        Path(out),
        predict=_predict_by_shard if by_shard else _predict_cached,
        report=tasks.write_report,
        overwrite=overwrite,
        checkpoint=checkpoint,
    )
    tasks.publish_artifacts(summary, out)
    return summary


def _predict_cached(evaluation: commands.Evaluation) -> None:
    """The ``predict`` task of the evaluate flow, cached: on a cache hit it writes nothing, so the predictions of
    the report already in ``out`` are linked into the staging folder first when that report is of these runs on
    this dataset (with the default checkpoint), and the task is forced to run otherwise."""
    from model.run_folder import CONFIG_NAME

    runs = [str(run) for run in evaluation.runs]
    run_keys = [(run / CONFIG_NAME).read_text() if (run / CONFIG_NAME).is_file() else "" for run in evaluation.runs]
    reused = evaluation.checkpoint == commands.DEFAULT_CHECKPOINT and commands.stage_previous_predictions(
        evaluation.out, evaluation.staging, evaluation.context
    )
    tasks.predict.with_options(refresh_cache=not reused)(
        evaluation.dataset,
        runs,
        str(evaluation.out),
        run_keys,
        staging=str(evaluation.staging),
        checkpoint=evaluation.checkpoint,
    )


def _predict_by_shard(evaluation: commands.Evaluation) -> None:
    """One ``predict-shard`` task per dataset shard on the flow's task runner, never cached, each given the opened
    dataset; their tables concatenated in shard order (flows.commands.combine_shards)."""
    runs = [str(run) for run in evaluation.runs]
    n_shards, max_hits = commands.plan_prediction_shards(
        evaluation.dataset, list(evaluation.runs), evaluation.staging, evaluation.checkpoint
    )
    futures = [
        tasks.predict_shard.submit(evaluation.dataset, runs, index, max_hits, evaluation.checkpoint)
        for index in range(n_shards)
    ]
    commands.combine_shards([future.result() for future in futures], evaluation.staging)


def evaluate_on_dask(
    data: str,
    runs: list[str],
    out: str,
    overwrite: bool = False,
    workers: int = 2,
    dask_address: str | None = None,
    checkpoint: str = commands.DEFAULT_CHECKPOINT,
) -> dict:
    """The ``evaluate`` flow with one prediction task per dataset shard on Dask (a local cluster of ``workers``
    processes, or the cluster at ``dask_address``); the metrics and the report are computed here, from the
    concatenated predictions, as in-process. Returns the summary."""
    from flows.logs import quiet_user_errors

    quiet_user_errors()
    runner = dask_task_runner(workers, dask_address)
    return evaluate_flow.with_options(task_runner=runner)(
        data, runs, out, overwrite, by_shard=True, checkpoint=checkpoint
    )


@flow(name="end-to-end", flow_run_name="end-to-end-{preset}-seed{seed}", log_prints=True)
def end_to_end(
    out: str,
    preset: str = "cpu",
    seed: int = 0,
    models: list[str] | None = None,
    overrides: dict | None = None,
    events: int | None = None,
) -> dict[str, Any]:
    """simulate -> train the preset's models (or ``models``) -> evaluate -> report, all under ``out``;
    ``overrides``: the sections of a config file (simulation, model, train) applied over the preset's values;
    ``events``: the dataset's size instead of the preset's (another dataset folder, so other runs and report)."""
    job = commands.job_preset(preset, models, events)
    config, training, label = job_configs(job, overrides)
    root = Path(out)
    # Folder names carry what their content depends on, so a changed config or seed writes beside the
    # old results (and recomputes only what depends on the change) instead of clashing with them.
    # the simulation code's version too: changed generator code draws a new dataset beside the old one (and so
    # trains new runs), never rewrites the old one in place
    data_key = f"{config.config_hash()}-n{job.events}-s{seed}-c{simulation_code_version().rsplit('+', 1)[-1]}"
    data = str(root / "data" / data_key)
    simulate_flow(data, job.events, seed, config.to_json())
    folders = {model: str(root / "runs" / commands.run_folder_name(model, label, data_key)) for model in job.models}
    runs = []
    for model in job.models:
        # a model whose warm-up repeats another's starts from that run when the job trained it first
        donor = get_model(model).warm_up_from
        warm_start = folders[donor] if donor in folders and job.models.index(donor) < job.models.index(model) else None
        runs.append(train_flow(data, model, folders[model], job.train_preset, seed, training, warm_start))
    report = root / "reports" / f"{label}-{data_key}"
    summary = evaluate_flow(data, runs, str(report))
    return {"report": str(report / REPORT_NAME), "summary": summary}


def run_end_to_end(
    preset: str,
    out: Path,
    models: list[str] | None = None,
    echo: bool = True,
    overrides: dict | None = None,
    events: int | None = None,
) -> dict[str, Any]:
    """The ``muontrack run`` entry point: run the flow, print (with ``echo``) the summary table and where the
    report is, and return ``{"report": path of report.md, "summary": summary.json's content}``. ``overrides``:
    the sections of a config file (pipeline.config.read_config_file) applied over the preset's values;
    ``events``: the dataset's size instead of the preset's."""
    from analysis.render import format_summary_table
    from flows.logs import quiet_user_errors

    # a one-line error for an unknown preset or model or a bad config file, before Prefect starts
    job_configs(commands.job_preset(preset, models, events), overrides)
    quiet_user_errors()
    out = Path(out)
    if out.exists() and not out.is_dir():
        from pipeline.errors import MuontrackError

        raise MuontrackError(f"--out {out} is a file, not a folder")
    with exclusive_writer(out):
        ensure_prefect_api(export=False)
        result = end_to_end(str(out), preset=preset, models=models, overrides=overrides, events=events)
    if echo:
        print(format_summary_table(result["summary"]))
        print(f"report: {result['report']}")
    return result
