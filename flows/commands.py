"""The library functions the flows and the CLI call: each step of the pipeline as a plain function.

Prefect tasks (``flows.tasks``) wrap these one to one, so every step can be called, tested and reused
without Prefect. Each command has one path: :func:`evaluate` is the one sequence of an evaluation (``muontrack
evaluate`` runs it with plain steps, :func:`evaluate_runs`; the ``evaluate`` flow with its Prefect tasks as the
steps), and :func:`train` the one of a training (``muontrack train`` and the ``train-model`` task). The dataset is
opened once per command (:func:`pipeline.dataset.open_dataset` verifies it) and the opened
:class:`~pipeline.dataset.Dataset` passed on to every step.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from analysis.report_folder import PREDICTION_TABLES, PREDICTIONS_DIR, REPORT_NAME, SUMMARY_NAME, prediction_path
from pipeline import provenance
from pipeline.errors import ConfigError, DatasetError, MuontrackError, RunError
from pipeline.locks import exclusive_writer
from pipeline.registry import CPU_JOB_MODELS, TEST_JOB_MODELS, TRAINED_MODELS

if TYPE_CHECKING:
    from pipeline.dataset import Dataset

#: the checkpoint evaluation loads unless told (model.run_folder.DEFAULT_CHECKPOINT, without importing JAX here)
DEFAULT_CHECKPOINT = "best"

# TRAINED_MODELS (pipeline.registry): the models a job can train (each gives one or more rows of the `model`
# column: `baseline` gives `baseline` and `baseline_paper`); the truth references and `classical` need no training


@dataclass(frozen=True)
class JobPreset:
    """Size of the whole ``muontrack run`` job: dataset size, and the model/training preset."""

    events: int
    train_preset: str
    models: tuple[str, ...] = CPU_JOB_MODELS
    #: simulation shard size (smaller datasets get smaller shards so resume and workers have units)
    shard_events: int = 20_000


#: `muontrack run --preset P`: `test` for tests (seconds), `cpu` for this 2-core machine (~10 min), `paper` for a GPU
#: (the cpu job leaves out `assignment` to stay near ten minutes; `muontrack run --model ...` adds it back)
JOB_PRESETS: dict[str, JobPreset] = {
    "test": JobPreset(events=600, train_preset="test", models=TEST_JOB_MODELS, shard_events=300),
    "cpu": JobPreset(events=20_000, train_preset="cpu", shard_events=5_000),
    "paper": JobPreset(events=1_000_000, train_preset="paper", models=TRAINED_MODELS, shard_events=50_000),
}


def job_preset(name: str, models: Sequence[str] | None = None, events: int | None = None) -> JobPreset:
    """The job of a named preset; ``models`` (in any order, repeats ignored) replaces its list of models, and
    ``events`` (1 to simulation.shards.MAX_EVENTS) its dataset size. ConfigError (one line) for a bad value."""
    if name not in JOB_PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(JOB_PRESETS)})")
    job = JOB_PRESETS[name]
    if events is not None:
        from simulation.shards import MAX_EVENTS

        if isinstance(events, bool) or not isinstance(events, int) or not 1 <= events <= MAX_EVENTS:
            raise ConfigError(f"--events must be an integer from 1 to {MAX_EVENTS:,}, got {events!r}")
        job = replace(job, events=events)
    if not models:
        return job
    unknown = [model for model in models if model not in TRAINED_MODELS]
    if unknown:
        raise ConfigError(f"unknown model {unknown[0]!r} (known: {', '.join(TRAINED_MODELS)})")
    return replace(job, models=tuple(model for model in TRAINED_MODELS if model in models))


def run_folder_name(model: str, preset: str, data_key: str) -> str:
    """The folder of one trained model in ``muontrack run``: what its weights depend on, the training code's
    version included, so a code change trains into a new folder instead of serving the old checkpoints."""
    from model.run_folder import code_version as training_code_version

    return f"{model}-{preset}-{data_key}-c{training_code_version().rsplit('+', 1)[-1]}"


def code_version() -> str:
    """Version of all the project's code (pipeline.provenance): cache keys change when any source does."""
    return provenance.code_version("simulation", "pipeline", "model", "classical", "analysis", "flows")


def opened(data: Dataset | str | Path) -> Dataset:
    """``data`` itself when it is an opened :class:`~pipeline.dataset.Dataset`, else the dataset folder ``data``
    opened (and verified: :func:`pipeline.dataset.open_dataset`). Every step takes either, so that a command opens
    its dataset once and hands the opened one on."""
    from pipeline.dataset import Dataset, open_dataset

    return data if isinstance(data, Dataset) else open_dataset(data)


def dataset_key(manifest: dict[str, Any]) -> str:
    """What a task's cache key takes of a dataset (its manifest, :attr:`Dataset.manifest` or
    :func:`pipeline.dataset.read_manifest`): config hash, seed and number of events."""
    return f"{manifest['config_hash']}-{manifest['seed']}-{manifest['n_events']}"


def _check_report_out(out: Path, context: dict[str, Any] | None = None, overwrite: bool = False) -> None:
    """Refuse a report folder ``out`` that is a file or a non-empty folder holding no muontrack report; with a
    ``context`` (report_context), also one holding the report of another evaluation (another dataset or set of
    runs, as recorded in its summary.parquet) unless ``overwrite``. The same runs on the same data: a refresh."""
    from analysis.catalog import context_identity, recorded_identity

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MuontrackError(f"report path {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / SUMMARY_NAME).exists() and not (out / PREDICTIONS_DIR).is_dir():
        raise MuontrackError(f"report folder {out} is not empty and holds no muontrack report; choose another --out")
    if context is None or overwrite:
        return
    recorded = recorded_identity(out)
    if recorded == context_identity(context):
        return
    if recorded is None:
        what = "whose dataset and runs are not recorded (no readable summary.parquet)"
    else:
        what = f"of other runs ({recorded.describe()})"
    raise MuontrackError(f"report folder {out} holds a report {what}; pass --overwrite to replace it")


#: predict_all's ``on_message`` gets a line per model started and done, and one at least this often (seconds)
#: between them (model.train.PROGRESS_SECONDS, without importing JAX here)
PROGRESS_SECONDS = 20.0


class _PredictionProgress:
    """Progress of predict_all on stderr: a transient rich bar over each model's test events on a terminal, and
    one line per model when it is done ("predict baseline, baseline_paper: 2062 events, 3.1 s"). ``on_message``
    (the Prefect task's log): those lines, a line when a model starts, and the events done at least every
    :data:`PROGRESS_SECONDS`."""

    def __init__(self, enabled: bool, n_events: int, on_message: Callable[[str], None] | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.enabled = enabled
        self.n_events = n_events
        self.on_message = on_message
        console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("events"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not (enabled and console.is_terminal),
        )

    def __enter__(self) -> _PredictionProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.__exit__(*exc_info)

    def run(self, label: str, predict: Callable[[Callable[[int], None]], dict[str, pl.DataFrame]]):
        """``predict(on_batch)``, with a bar advanced by ``on_batch(n_events)``; the line names its model rows."""
        task = self.bar.add_task(f"predict {label}", total=self.n_events)
        start = last = time.perf_counter()
        done = 0
        if self.on_message is not None:
            self.on_message(f"predict {label}: {self.n_events} test events")

        def on_batch(n: int) -> None:
            nonlocal done, last
            self.bar.advance(task, n)
            done += n
            if self.on_message is not None and time.perf_counter() - last >= PROGRESS_SECONDS:
                last = time.perf_counter()
                self.on_message(f"predict {label}: {done}/{self.n_events} events, {last - start:.0f} s")

        tables = predict(on_batch)
        self.bar.remove_task(task)
        models = ", ".join(tables["tracks"]["model"].unique(maintain_order=True).to_list())
        line = f"predict {models}: {self.n_events} events, {time.perf_counter() - start:.1f} s"
        if self.enabled:
            self.bar.console.print(line, highlight=False)
        if self.on_message is not None:
            self.on_message(line)
        return tables


def _check_predictable(dataset: Dataset, runs: list[Path], checkpoint: str = DEFAULT_CHECKPOINT) -> tuple[int, int]:
    """``(test events, the largest test event's hits)``; DatasetError for a dataset without test events,
    RunError for a run that cannot be evaluated with ``checkpoint`` on it (model.inference.check_run: missing, not
    a run, unfinished, no such checkpoint, another detector) and for two runs of one model. Checked before any
    prediction, so that a wrong ``--run`` fails at once instead of after the truth references' inference."""
    from model.inference import check_run
    from model.objectives import get_objective
    from pipeline.batches import SPLIT_FRACTIONS, split_summary

    n_test, max_hits = split_summary(dataset, "test")
    if n_test == 0:
        raise DatasetError(
            f"dataset {dataset.path} has no events in the test split ({dataset.n_events} events, of which about "
            f"{SPLIT_FRACTIONS['test']:.0%} are test events): simulate more events"
        )
    seen: set[str] = set()
    for run in runs:
        config = check_run(Path(run), dataset, checkpoint)
        try:
            rows = {name for name, _ in get_objective(config.get("model")).reported_as}
        except MuontrackError:  # a model this code does not know: predict_run says so
            continue
        if rows & seen:
            raise RunError(f"two runs are both model {sorted(rows & seen)[0]!r}; evaluate one run per model")
        seen |= rows
    return n_test, max_hits


def _check_one_run_per_model(tables: list[dict[str, pl.DataFrame]]) -> None:
    """RunError when two prediction sources give rows of the same model (two runs of one model)."""
    seen: set[str] = set()
    for predictions in tables:
        model_names = set(predictions["tracks"]["model"].unique().to_list())
        duplicated = model_names & seen
        if duplicated:
            raise RunError(f"two runs are both model {sorted(duplicated)[0]!r}; evaluate one run per model")
        seen |= model_names


def _write_predictions(tables: list[dict[str, pl.DataFrame]], out: Path) -> Path:
    from analysis.catalog import write_parquet_atomic

    pred_dir = out / PREDICTIONS_DIR
    pred_dir.mkdir(parents=True, exist_ok=True)
    for table in PREDICTION_TABLES:
        write_parquet_atomic(pl.concat([t[table] for t in tables], how="vertical"), prediction_path(out, table))
    return pred_dir


def predict_all(
    data: Dataset | Path,
    runs: list[Path],
    out: Path,
    progress: bool = False,
    checkpoint: str = DEFAULT_CHECKPOINT,
    on_message: Callable[[str], None] | None = None,
) -> Path:
    """Write ``out/predictions/{hits,clusters,tracks}.parquet``: truth references, ``classical``, every run (with
    the parameters of its ``checkpoint``: ``best`` validation sigma68 or ``last`` epoch, model.inference.load_run).
    ``data``: the opened dataset, or its folder (then opened here, :func:`opened`).

    ``progress``: a progress display on stderr (a bar per model on a terminal, one line per model done).
    ``on_message``: lines of progress (each model started and done, the events done at least every
    :data:`PROGRESS_SECONDS`), for a log.
    """
    from classical import predict_classical
    from model.inference import predict_run, predict_truth

    dataset = opened(data)
    _check_report_out(out)
    n_test, _ = _check_predictable(dataset, runs, checkpoint)
    with _PredictionProgress(progress, n_test, on_message) as display:
        tables = [
            display.run("truth references", lambda step: predict_truth(dataset, split="test", on_batch=step)),
            display.run("classical", lambda _step: predict_classical(dataset, split="test")),
        ]
        for run in runs:
            predictions = display.run(
                Path(run).name,
                lambda step, run=run: predict_run(
                    dataset, Path(run), split="test", on_batch=step, checkpoint=checkpoint
                ),
            )
            _check_one_run_per_model([*tables, predictions])
            tables.append(predictions)
    return _write_predictions(tables, out)


def shard_view(dataset: Dataset, shard_index: int) -> Dataset:
    """The dataset restricted to one of its shards (a :class:`pipeline.dataset.Dataset` whose manifest lists
    that shard alone): its files, events and hits are the shard's."""
    from pipeline.dataset import Dataset

    entry = dataset.manifest["shards"][shard_index]
    manifest = {
        **dataset.manifest,
        "shards": [entry],
        "n_events": int(entry["n_events"]),
        "n_hits": int(entry["hits"]["rows"]),
    }
    return Dataset(path=dataset.path, manifest=manifest, config=dataset.config)


def predict_shard(
    data: Dataset | Path, runs: list[Path], shard_index: int, max_hits: int, checkpoint: str = DEFAULT_CHECKPOINT
) -> list[dict[str, pl.DataFrame]]:
    """The prediction tables of the test events of one shard of ``data``, one dict per source in the order of
    :func:`predict_all` (truth references, classical, each run). ``max_hits``: the largest test event of the
    whole dataset, so that every shard packs its events into the node buckets of the whole split and gives
    the rows :func:`predict_all` gives for them. ``checkpoint``: as for :func:`predict_all`. ``data``: the
    dataset opened by :func:`plan_prediction_shards`'s caller (a Dask worker gets it with the task), or its folder
    (then opened without verifying it again)."""
    from classical import predict_classical
    from model.inference import predict_run, predict_truth
    from pipeline.dataset import Dataset, open_dataset

    shard = shard_view(data if isinstance(data, Dataset) else open_dataset(data, verify=False), shard_index)
    return [
        predict_truth(shard, split="test", max_hits=max_hits),
        predict_classical(shard, split="test"),
        *(predict_run(shard, Path(run), split="test", max_hits=max_hits, checkpoint=checkpoint) for run in runs),
    ]


def plan_prediction_shards(
    data: Dataset | Path, runs: list[Path], out: Path, checkpoint: str = DEFAULT_CHECKPOINT
) -> tuple[int, int]:
    """Check ``data`` (opened, or its folder), ``runs`` (with ``checkpoint``) and the report folder ``out`` as
    :func:`predict_all` does; ``(number of shards, the largest test event's hits)`` for :func:`predict_shard`."""
    dataset = opened(data)
    _check_report_out(out)
    _, max_hits = _check_predictable(dataset, runs, checkpoint)
    return dataset.n_shards, max_hits


def _by_model(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """One source's table from its shards' (in shard order): the rows of each model together, the models in
    the order the source gives them (a source with two rows, such as the truth references, stacks them)."""
    frame = pl.concat(parts, how="vertical")
    models = frame["model"].unique(maintain_order=True).to_list()
    return pl.concat([frame.filter(pl.col("model") == model) for model in models]) if models else frame


def combine_shards(shards: list[list[dict[str, pl.DataFrame]]], out: Path) -> Path:
    """Write the predictions of :func:`predict_shard`'s results (in shard order) as :func:`predict_all` does:
    each source's tables concatenated over the shards (rows sorted by event_id, shards being in event order),
    the sources in their order."""
    if not shards:
        raise DatasetError("the dataset has no shards")
    tables = [
        {name: _by_model([shard[k][name] for shard in shards]) for name in PREDICTION_TABLES}
        for k in range(len(shards[0]))
    ]
    _check_one_run_per_model(tables)
    return _write_predictions(tables, out)


def report_context(data: Dataset | Path, runs: list[Path], checkpoint: str = DEFAULT_CHECKPOINT) -> dict[str, Any]:
    """What the report says was run: dataset, code, the dataset's detector config (``detector``: the report's
    limit row is computed from it, analysis.results.context_detector), each run's configuration (with the model rows
    it gives, ``reported_as``, the training code version it recorded, and the checkpoint evaluated:
    :func:`checkpoint_context`) and the environment (versions, device). ``data``: the opened dataset, or its
    folder."""
    from analysis.catalog import environment
    from model.run_folder import CONFIG_NAME, METRICS_NAME

    dataset = opened(data)
    context: dict[str, Any] = {
        "dataset": str(Path(dataset.path).resolve()),
        "dataset_events": dataset.n_events,
        "dataset_seed": dataset.seed,
        "dataset_config_hash": dataset.manifest.get("config_hash"),
        "code_version": code_version(),
        "detector": asdict(dataset.config.detector),
        "runs": [],
    }
    for run in runs:
        config_path = Path(run) / CONFIG_NAME
        run_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        metrics_path = Path(run) / METRICS_NAME
        seconds = None
        if metrics_path.is_file():
            seconds = float(pl.read_parquet(metrics_path).filter(pl.col("split") == "train")["seconds"].sum())
        context["runs"].append(
            {
                "run": str(Path(run).resolve()),
                "model": run_config.get("model"),
                "reported_as": _reported_as(run_config.get("model")),
                "preset": run_config.get("preset"),
                "epochs": (run_config.get("train_config") or {}).get("epochs"),
                "seed": run_config.get("seed"),
                "training_seconds": seconds,
                "code_version": run_config.get("code_version"),
                **checkpoint_context(Path(run), checkpoint),
            }
        )
    context["environment"] = environment()
    return context


def checkpoint_context(run: Path, checkpoint: str = DEFAULT_CHECKPOINT) -> dict[str, Any]:
    """Which checkpoint of ``run`` an evaluation with ``checkpoint`` loads (the report's run table): ``checkpoint``
    (best or last), its ``checkpoint_epoch`` and ``checkpoint_val_sigma68`` (metrics.parquet's), the run's
    ``best_epoch`` and ``last_epoch``. None where the run cannot say (no run, unfinished, no best checkpoint):
    the prediction step refuses such a run with its own message."""
    from model.inference import checkpoint_epoch
    from model.run_folder import best_epoch, read_metrics

    found: dict[str, Any] = {
        "checkpoint": checkpoint,
        "checkpoint_epoch": None,
        "checkpoint_val_sigma68": None,
        "best_epoch": None,
        "last_epoch": None,
    }
    try:
        metrics = read_metrics(run)
        found["checkpoint_epoch"] = checkpoint_epoch(run, checkpoint)
        found["last_epoch"] = checkpoint_epoch(run, "last")
    except MuontrackError:
        return found
    found["best_epoch"] = best_epoch(metrics)
    sigma = metrics.filter((pl.col("split") == "val") & (pl.col("epoch") == found["checkpoint_epoch"]))["sigma68"]
    found["checkpoint_val_sigma68"] = float(sigma[0]) if sigma.len() and sigma[0] is not None else None
    return found


#: RUN/training_curves.png (and .pdf beside it): the run's training curves, redrawn after every epoch
TRAINING_CURVES_NAME = "training_curves.png"


def training_metrics(runs: Sequence[Path]) -> dict[str, pl.DataFrame]:
    """Each run's metrics table (RUN/metrics.parquet, model.run_folder.read_metrics) by its resolved path, as the
    report's context names the runs; runs without a readable table are left out."""
    from model.run_folder import read_metrics

    tables = {}
    for run in runs:
        try:
            tables[str(Path(run).resolve())] = read_metrics(Path(run))
        except MuontrackError:
            continue
    return tables


def write_training_curves(run: Path) -> Path:
    """Draw RUN/training_curves.png (and a PDF beside it, each written atomically) from RUN/metrics.parquet, the
    best validation sigma68's and the last epoch marked; returns its path. ``muontrack train`` and the ``run``
    flow call it after every epoch (model.train.train_run's ``on_epoch``): the model package never imports
    analysis, so the figure is drawn here from the table the run folder holds."""
    from analysis.training import plot_training_curves, training_curves
    from model.run_folder import best_epoch, read_metrics, read_run_config

    run = Path(run)
    metrics = read_metrics(run)
    config = read_run_config(run)
    last = int(metrics["epoch"].max()) if metrics.height else None
    curves = training_curves(metrics, {"best": best_epoch(metrics), "last": last})
    title = f"{config.get('model')} ({config.get('preset')} preset, seed {config.get('seed')}): {run.name}"
    return plot_training_curves(curves, title, run / TRAINING_CURVES_NAME)


def _reported_as(model: str | None) -> list[str]:
    """The prediction rows (`model` column) a run of ``model`` gives (``baseline``: baseline, baseline_paper)."""
    from model.objectives import get_objective

    if model is None:
        return []
    try:
        return [name for name, _ in get_objective(model).reported_as]
    except MuontrackError:  # unknown model: its predictions, if any, carry its own name
        return [model]


def prepare_report_out(out: Path, context: dict[str, Any], overwrite: bool) -> None:
    """With ``out``'s lock held: clean up what a killed writer left beside ``out`` (analysis.report_folder
    .recover_report_dir), then check that ``out`` may take the report of ``context`` (:func:`_check_report_out`)."""
    from analysis.report_folder import recover_report_dir

    recover_report_dir(out)
    _check_report_out(out, context, overwrite)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def stage_previous_predictions(out: Path, staging: Path, context: dict[str, Any]) -> bool:
    """Link the predictions of the report in ``out`` into the staging folder ``staging`` when that report is of
    the same evaluation as ``context`` (same dataset and runs, as recorded in its summary.parquet); whether it did.

    ``muontrack run``'s predict task is cached by Prefect and writes nothing on a cache hit: the staged report then
    keeps these predictions. A prediction written afterwards replaces its link (a new file), never the original.
    """
    from analysis.catalog import context_identity, recorded_identity

    files = [prediction_path(Path(out), name) for name in PREDICTION_TABLES]
    if not all(path.is_file() for path in files) or recorded_identity(Path(out)) != context_identity(context):
        return False
    target = Path(staging) / PREDICTIONS_DIR
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        _link_or_copy(path, target / path.name)
    return True


@dataclass(frozen=True)
class Evaluation:
    """One evaluation under way, as :func:`evaluate` hands it to its steps: the opened ``dataset``, the ``runs``,
    the report folder ``out`` (published at the end), the ``staging`` folder the steps write into, the report's
    ``context`` (:func:`report_context`) and the ``checkpoint`` evaluated."""

    dataset: Dataset
    runs: tuple[Path, ...]
    out: Path
    staging: Path
    context: dict[str, Any]
    checkpoint: str


#: a step of :func:`evaluate`: writes the predictions of an evaluation into its staging folder
PredictStep = Callable[[Evaluation], object]
#: a step of :func:`evaluate`: writes the report of an evaluation into its staging folder; returns the summary
ReportStep = Callable[[Evaluation], dict]


def write_evaluation_report(evaluation: Evaluation) -> dict:
    """Metrics, tables, figures (the runs' training curves included), report.md and the catalog of
    ``evaluation`` (analysis.report.write_report) from the predictions in its staging folder; returns the summary."""
    from analysis.report import write_report

    dataset = evaluation.dataset
    return write_report(
        evaluation.staging,
        dataset.hits(),
        dataset.events(),
        evaluation.context,
        published_as=evaluation.out,
        training=training_metrics(evaluation.runs),
    )


def evaluate(
    data: Dataset | Path,
    runs: Sequence[Path],
    out: Path,
    predict: PredictStep,
    report: ReportStep = write_evaluation_report,
    overwrite: bool = False,
    checkpoint: str = DEFAULT_CHECKPOINT,
) -> dict:
    """The one sequence of an evaluation, whoever runs its steps (:func:`evaluate_runs` in this process, the
    ``evaluate`` flow as Prefect tasks): check ``checkpoint``, take the lock of the report folder ``out``, open
    ``data`` (once: every step gets the opened dataset), compute the report's context, refuse an ``out`` holding
    another evaluation's report unless ``overwrite`` (:func:`prepare_report_out`), then in a staging folder that
    replaces ``out`` at the end (analysis.report_folder.staged_report: a kill leaves the previous report) run
    ``predict`` and ``report``. Returns the summary ``report`` returns."""
    from analysis.report_folder import staged_report
    from model.inference import check_checkpoint

    out = Path(out)
    check_checkpoint(checkpoint)
    with exclusive_writer(out):
        dataset = opened(data)
        runs = tuple(Path(run) for run in runs)
        context = report_context(dataset, list(runs), checkpoint)
        prepare_report_out(out, context, overwrite)
        with staged_report(out) as staging:
            evaluation = Evaluation(dataset, runs, out, staging, context, checkpoint)
            predict(evaluation)
            return report(evaluation)


def evaluate_runs(
    data: Dataset | Path,
    runs: list[Path],
    out: Path,
    progress: bool = False,
    overwrite: bool = False,
    checkpoint: str = DEFAULT_CHECKPOINT,
) -> Path:
    """Inference of every run on the test split, the truth references, and the report in ``out``.

    ``checkpoint``: which parameters of each run are evaluated, ``best`` (the lowest validation sigma68's, the
    default) or ``last`` (model.inference.load_run); the report says which, with the runs' training curves.

    The predictions and the report are written into a staging folder that replaces ``out`` at the end
    (analysis.report_folder.staged_report): a kill leaves the previous report. A folder holding the report of another
    dataset or set of runs is refused unless ``overwrite``; the same runs on the same data refresh it.
    ``progress``: a progress display on stderr. Returns the path of report.md. :func:`evaluate` with
    :func:`predict_all` and :func:`write_evaluation_report` as its steps, in this process.
    """

    def predict(evaluation: Evaluation) -> None:
        predict_all(
            evaluation.dataset, list(evaluation.runs), evaluation.staging, progress=progress, checkpoint=checkpoint
        )

    def report(evaluation: Evaluation) -> dict:
        start = time.perf_counter()
        summary = write_evaluation_report(evaluation)
        if progress:
            print(f"write report (metrics, figures, catalog): {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return summary

    evaluate(data, runs, out, predict, report, overwrite=overwrite, checkpoint=checkpoint)
    return Path(out) / REPORT_NAME


def train(
    data: str | Path,
    model: str,
    out: str | Path,
    on_epoch: Callable[[dict], None] | None = None,
    **options: Any,
) -> str:
    """Train ``model`` on ``data`` into the run folder ``out`` (model.train.train_run, ``options`` its other
    parameters) and redraw RUN/training_curves.png after every epoch (:func:`write_training_curves`), after
    ``on_epoch``: the one path of ``muontrack train`` and of the ``train`` flow's task. Returns train_run's summary."""
    from model.train import train_run
    from pipeline.memory import release_compiled_programs

    def after_epoch(info: dict) -> None:
        if on_epoch is not None:
            on_epoch(info)
        write_training_curves(Path(out))

    try:
        return train_run(data, model=model, out=Path(out), on_epoch=after_epoch, **options)
    finally:
        # the next model of a job compiles programs of its own; the evaluation loads its programs from the cache
        release_compiled_programs()
