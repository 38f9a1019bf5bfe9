"""Training: the resumable epoch loop that trains one model into a RUN folder (:func:`train_run`).

What a model computes is its objective (model.objectives), a step of training or validation is model.steps'
jitted functions, and what a run writes (config, metrics, checkpoints) is model.run_folder's. This module runs
the epochs: shuffled batches through :func:`~model.steps.train_step`, validation after every epoch
(:func:`evaluate`), one metrics row per split and a checkpoint per epoch, progress on the console. The steps run
data parallel over every local device (model.steps.DataParallel: each batch split along its events, the state
replicated); with one device exactly as the single-device code did.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl

from model.hyperparameters import TrainConfig, configure
from model.objectives import OPTIONAL_TERMS, get_objective
from model.run_folder import (
    best_checkpoint_manager,
    checkpoint_manager,
    checkpoints_record,
    prepare_run_dir,
    prune_best,
    read_metrics,
    restore_checkpoint,
    run_config,
    save_best,
    save_checkpoint,
    write_metrics,
    write_run_config,
)
from model.steps import (
    DataParallel,
    TrainState,
    create_train_state,
    enable_compilation_cache,
    epoch_shuffle_seed,
    eval_step,
    example_batch,
    learning_rate_schedule,
    step_key,
    train_step,
)
from pipeline.atomic import remove_temporaries
from pipeline.batches import BatchStats, Geometry, iter_batches, split_summary
from pipeline.dataset import Dataset, open_dataset
from pipeline.errors import ConfigError, RunError
from pipeline.locks import exclusive_writer
from pipeline.stats import finite_sigma68

#: the batch-mean metrics averaged over an epoch's events into its metrics row (those a model reports)
_EPOCH_MEANS = (
    "loss",
    "bce",
    "pt_loss",
    *OPTIONAL_TERMS,
    "grad_norm",
    "bce_grad",
    "solver_grad",
    "solver_grad_nonzero",
)


@dataclass
class _Sums:
    """Event-weighted running sums of batch-mean metrics (of those in :data:`_EPOCH_MEANS` a batch reports)."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    events: int = 0

    def add(self, metrics: dict[str, Any], n_events: int) -> None:
        for key in _EPOCH_MEANS:
            if key in metrics:
                self.sums[key] = self.sums.get(key, 0.0) + float(metrics[key]) * n_events
        self.events += n_events

    def means(self) -> dict[str, float]:
        n = max(self.events, 1)
        return {key: total / n for key, total in self.sums.items()}


#: ``train_run(on_message=...)`` gets a line of progress inside an epoch at least this often (seconds)
PROGRESS_SECONDS = 20.0

#: what ``train_run(on_message=...)`` and :func:`evaluate` are called with: one line of progress
MessageCallback = Callable[[str], None]


class _Compilations:
    """The step shapes this training has run, to announce the compilation before the first step of each.

    A jitted step compiles (or loads from the persistent cache) in the calling thread, before it is dispatched,
    the first time it sees a batch shape (one per node bucket): tens of seconds to minutes on a CPU for the
    chains, the longest silence of a run without these lines."""

    def __init__(self, model: str, note: Callable[[str], None]) -> None:
        self.model = model
        self.note = note
        self.seen: set[tuple[str, tuple[int, ...]]] = set()

    def run(self, what: str, batch: Any, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``, announced (and timed) when ``what`` has not run on ``batch``'s shape yet."""
        key = (what, tuple(batch.mask.shape))
        if key in self.seen:
            return step(*args)
        n_events, n_nodes = batch.mask.shape
        self.note(f"{self.model}: compiling the {what} for {n_nodes}-node events (batches of {n_events})")
        start = time.perf_counter()
        result = step(*args)
        self.seen.add(key)
        self.note(f"{self.model}: {what} for {n_nodes}-node events ready in {time.perf_counter() - start:.1f} s")
        return result


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("events  loss {task.fields[loss]:.4f}  {task.fields[rate]:.0f} events/s"),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def evaluate(
    state: TrainState,
    dataset: Dataset,
    split: str,
    train_config: TrainConfig,
    lam: float,
    max_events: int | None = None,
    parallel: DataParallel | None = None,
    compilations: _Compilations | None = None,
) -> tuple[dict[str, float], float]:
    """Mean loss terms over a split (its first ``max_events`` events) and the sigma68 of the q/pT residual.

    The batches run on ``parallel``'s devices (default: every local device, model.steps.DataParallel);
    ``compilations`` (train_run's) announces the compilation of the step for each new batch shape."""
    parallel = parallel if parallel is not None else DataParallel.over()
    state = parallel.state(state)
    outputs, truths = [], []
    for batch in iter_batches(
        dataset, split, train_config.batch_size, train_config.node_buckets, max_events=max_events
    ):
        args = (state, parallel.batch(batch), jnp.float32(lam))
        outputs.append(
            eval_step(*args) if compilations is None else compilations.run("validation step", batch, eval_step, *args)
        )
        truths.append((batch.q / batch.pt, batch.event_mask))
    sums = _Sums()
    residuals = []
    # one device -> host transfer for the whole split (the steps above only queue work)
    for metrics, (true, event_mask) in zip(jax.device_get(outputs), truths, strict=True):
        sums.add(metrics, int(event_mask.sum()))
        # the rows of the padding events added for the devices (DataParallel.batch) are dropped
        q_over_pt = np.asarray(metrics["q_over_pt"])[: len(true)]
        residuals.append(((q_over_pt - true) / true)[event_mask])
    return sums.means(), finite_sigma68(np.concatenate(residuals)) if residuals else math.nan


#: what ``train_run(on_epoch=...)`` is called with after every finished epoch (see :func:`_epoch_info`)
EpochCallback = Callable[[dict[str, Any]], None]


def format_epoch(info: dict[str, Any]) -> str:
    """One line of progress from an ``on_epoch`` dict: epoch, losses, val sigma68 (if any), lr, grad norm, time."""
    sigma = info.get("val_sigma68")
    return (
        f"{info['model']} epoch {info['epoch']}/{info['epochs']}: train loss {info['train_loss']:.4f}, "
        f"val loss {info['val_loss']:.4f}"
        + (f", val sigma68(q/pT) {sigma:.4f}" if sigma is not None else "")
        + f", lr {info['learning_rate']:.3g}, grad norm {info['grad_norm']:.3g}, {info['seconds']:.1f} s"
    )


def train_run(
    data: str | Path,
    model: str,
    out: str | Path,
    preset: str = "cpu",
    epochs: int | None = None,
    seed: int = 0,
    resume: bool = False,
    progress: bool = False,
    on_epoch: EpochCallback | None = None,
    estimator: str | None = None,
    overrides: dict | None = None,
    on_message: MessageCallback | None = None,
) -> str:
    """Train ``model`` (baseline, e2e, e2e_paper, assignment) on the train split of ``data`` into ``out``.

    Validates on the val split after every epoch, checkpoints every epoch and writes metrics.parquet.
    ``overrides`` (a config file's ``model`` and ``train`` sections, model.hyperparameters.configure) change the
    preset's values; ``epochs`` overrides the epochs, ``estimator`` the gradient estimator (the ``assignment``
    model's). With ``resume`` an interrupted (or finished, for more epochs) run of the same configuration continues
    from its newest checkpoint, giving the same result as an uninterrupted run. Returns a one-line summary.

    ``progress`` shows a progress bar and prints one line per epoch (:func:`format_epoch`). ``on_epoch``, if
    given, is called after each epoch's metrics and checkpoint are written with a dict of that epoch's
    figures (:func:`_epoch_info`: ``model``, ``epoch``, ``epochs``, ``step``, ``lambda``, ``learning_rate``,
    ``grad_norm``, ``train_loss``/``bce``/``pt_loss``, ``val_loss``/``bce``/``pt_loss``, ``val_sigma68``
    (None when null), ``train_seconds``, ``val_seconds``, ``seconds``). It only reads: training is the same
    with or without it. ``on_message``, if given, is called with lines of progress between the epochs (the
    Prefect job logs them): the devices, "compiling the train step for N-node events" before the first step
    of each batch shape and its time after it (also with ``progress``), and the events done at least every
    :data:`PROGRESS_SECONDS` inside an epoch.

    Raises ConfigError (unknown model or preset, epochs < 1), DatasetError (missing or incomplete dataset),
    RunError (``out`` holds something else, needs ``--resume``, or the loss became NaN).
    """
    with exclusive_writer(out):
        return _train_run_locked(
            data, model, Path(out), preset, epochs, seed, resume, progress, on_epoch, estimator, overrides, on_message
        )


def _train_run_locked(
    data: str | Path,
    model: str,
    out: Path,
    preset: str,
    epochs: int | None,
    seed: int,
    resume: bool,
    progress: bool,
    on_epoch: EpochCallback | None = None,
    estimator: str | None = None,
    overrides: dict | None = None,
    on_message: MessageCallback | None = None,
) -> str:
    objective = get_objective(model)
    model_config, train_config = configure(preset, overrides)
    if estimator is not None:
        train_config = dataclasses.replace(train_config, estimator=estimator)
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
        train_config = dataclasses.replace(train_config, epochs=epochs)
    dataset = open_dataset(data)
    out = Path(out)
    config = run_config(model, preset, model_config, train_config, dataset, seed)
    # a kill mid-write (of config.json, metrics.parquet) leaves a hidden temporary: not a foreign file
    remove_temporaries(out)
    done = prepare_run_dir(out, config, resume)
    if done >= train_config.epochs:
        return f"already trained: {done} epochs (asked for {train_config.epochs}); nothing to do"

    enable_compilation_cache()
    geometry = Geometry.from_detector(dataset.config.detector)
    n_train, _ = split_summary(dataset, "train")
    if n_train == 0:
        raise RunError(f"dataset {dataset.path} has no events in the train split")
    events_per_epoch = min(n_train, train_config.max_train_events or n_train)

    # every local device, the batches split along their events (one device: the single-device code path)
    parallel = DataParallel.over()
    rows = read_metrics(out).filter(pl.col("epoch") <= done).to_dicts()
    # the same identity; only epochs (and paths, code) may change. The devices are those of the newest session
    # (not part of the identity: a run may go on on other devices). A new run writes it first (a folder without
    # it is no run); a resumed one only once its checkpoint restored (a failed resume leaves the folder as it was)
    session_config = {**config, "devices": parallel.describe()}
    if not done:
        out.mkdir(parents=True, exist_ok=True)
        write_run_config(out, session_config)
    state = create_train_state(
        jax.random.key(seed),
        model_config,
        train_config,
        example_batch(1, min(train_config.node_buckets), geometry.n_layers),
        geometry=geometry,
        objective=model,
    )
    manager = checkpoint_manager(out, keep=train_config.keep_checkpoints)
    best_manager = best_checkpoint_manager(out)
    if done:
        state = restore_checkpoint(manager, state, done)
        record = checkpoints_record(read_metrics(out).filter(pl.col("epoch") <= done))
        _repair_best(manager, best_manager, state, record, done)
        write_run_config(out, {**session_config, "checkpoints": record})
    state = parallel.state(state)

    schedule = learning_rate_schedule(train_config)
    stats = BatchStats()
    start = time.perf_counter()
    val_means: dict[str, float] = {}
    val_sigma = math.nan
    with manager, best_manager, _progress(progress) as bar:
        task = bar.add_task(
            f"{model} epoch {done + 1}/{train_config.epochs}",
            total=events_per_epoch * (train_config.epochs - done),
            loss=math.nan,
            rate=0.0,
        )

        last_note = time.perf_counter()

        def note(message: str) -> None:
            nonlocal last_note
            last_note = time.perf_counter()
            if progress:
                bar.console.print(message, markup=False, highlight=False)
            if on_message is not None:
                on_message(message)

        compilations = _Compilations(model, note)
        note(_devices_line(model, parallel, train_config.batch_size))
        for epoch in range(done + 1, train_config.epochs + 1):
            lam = objective.lam(epoch, train_config)
            bar.update(task, description=f"{model} epoch {epoch}/{train_config.epochs}")
            first_step = int(state.step)
            step_metrics: list[dict[str, jax.Array]] = []
            step_events: list[int] = []
            shown, shown_step = math.nan, -1
            epoch_start = last_note = time.perf_counter()
            batches = iter_batches(
                dataset,
                "train",
                train_config.batch_size,
                train_config.node_buckets,
                shuffle_seed=epoch_shuffle_seed(seed, epoch),
                max_events=train_config.max_train_events,
                stats=stats,
            )
            for step_in_epoch, batch in enumerate(batches):
                state, metrics = compilations.run(
                    "train step",
                    batch,
                    train_step,
                    state,
                    parallel.batch(batch),
                    step_key(seed, epoch, step_in_epoch),
                    jnp.float32(lam),
                )
                # the metrics stay on the device (no sync per step); they come over once, after the epoch
                step_metrics.append(metrics)
                step_events.append(int(batch.event_mask.sum()))
                if progress:
                    # the bar shows the loss of the newest step that has finished; is_ready() never waits, so
                    # the display does not hold the queue of dispatched steps back
                    newest = shown_step
                    while newest + 1 < len(step_metrics) and step_metrics[newest + 1]["loss"].is_ready():
                        newest += 1
                    if newest > shown_step:
                        shown, shown_step = float(step_metrics[newest]["loss"]), newest
                    rate = sum(step_events) / max(time.perf_counter() - epoch_start, 1e-9)
                    bar.update(task, advance=step_events[-1], loss=shown, rate=rate)
                if on_message is not None and time.perf_counter() - last_note >= PROGRESS_SECONDS:
                    last_note = time.perf_counter()
                    on_message(
                        _epoch_progress(
                            model,
                            epoch,
                            train_config.epochs,
                            step_metrics,
                            step_events,
                            events_per_epoch,
                            last_note - epoch_start,
                        )
                    )
            sums = _Sums()
            for index, (metrics, n_events) in enumerate(zip(jax.device_get(step_metrics), step_events, strict=True)):
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise RunError(
                        f"training diverged: loss is {loss} at epoch {epoch}, step {first_step + index + 1} "
                        f"(lambda={lam}); lower the learning rate (the last good checkpoint is epoch {epoch - 1})"
                    )
                sums.add(metrics, n_events)
            train_seconds = time.perf_counter() - epoch_start
            step = int(state.step)
            # the rate of the epoch's last step (the schedule is read at the count before that step)
            learning_rate = float(schedule(step - 1))
            rows.append(
                _metrics_row(epoch, step, "train", sums.means(), lam, train_seconds, learning_rate=learning_rate)
            )

            val_start = time.perf_counter()
            val_means, val_sigma = evaluate(
                state, dataset, "val", train_config, lam, parallel=parallel, compilations=compilations
            )
            val_seconds = time.perf_counter() - val_start
            # null, not NaN, when no validation event has a finite fit
            val_sigma68 = val_sigma if math.isfinite(val_sigma) else None
            rows.append(_metrics_row(epoch, step, "val", val_means, lam, val_seconds, sigma68=val_sigma68))
            # metrics first, checkpoints second: a crash in between leaves rows that resume drops again. The best
            # checkpoint (lowest val sigma68 so far) is saved before the last one and the older best deleted only
            # after it: a kill at any point leaves the best of the epochs a resume keeps (_repair_best)
            write_metrics(out, rows)
            record = checkpoints_record(read_metrics(out))
            write_run_config(out, {**session_config, "checkpoints": record})
            best = record["best"]
            if best is not None and best["epoch"] == epoch:
                save_best(best_manager, state, epoch, best["val_sigma68"])
            save_checkpoint(manager, state, epoch)
            if best is not None:
                prune_best(best_manager, best["epoch"])

            info = _epoch_info(model, train_config.epochs, train_row=rows[-2], val_row=rows[-1])
            if progress:
                bar.console.print(format_epoch(info), markup=False, highlight=False)
            if on_epoch is not None:
                on_epoch(info)

    minutes = (time.perf_counter() - start) / 60
    truncated = f", {stats.n_truncated} of {stats.n_events} train events truncated" if stats.n_truncated else ""
    return (
        f"{train_config.epochs} epochs, val loss {val_means.get('loss', math.nan):.4f} "
        f"bce {val_means.get('bce', math.nan):.4f} pt_loss {val_means.get('pt_loss', math.nan):.4g} "
        f"sigma68(q/pT) {val_sigma:.4f}, {minutes:.1f} min{truncated}"
    )


def _epoch_progress(
    model: str,
    epoch: int,
    epochs: int,
    step_metrics: list[dict[str, jax.Array]],
    step_events: list[int],
    events_per_epoch: int,
    seconds: float,
) -> str:
    """A line inside an epoch: the events of its finished steps (is_ready() never waits), and those dispatched."""
    finished = 0
    while finished < len(step_metrics) and step_metrics[finished]["loss"].is_ready():
        finished += 1
    done = sum(step_events[:finished])
    queued = sum(step_events) - done
    return (
        f"{model} epoch {epoch}/{epochs}: {done}/{events_per_epoch} events trained"
        + (f" ({queued} more queued)" if queued else "")
        + f", {done / max(seconds, 1e-9):.0f} events/s, {seconds:.0f} s"
    )


def _repair_best(manager, best_manager, state: TrainState, record: dict[str, Any], done: int) -> None:
    """On resume from epoch ``done``: make ``best_checkpoint/`` hold the best of epochs 1..``done`` (``record``'s)
    and nothing else. A kill after an epoch's best save and before its last one leaves a newer step (deleted
    here: that epoch is trained again); a kill between the two saves of the best epoch leaves it unsaved (taken
    from its last checkpoint, ``state`` when it is epoch ``done``)."""
    best = record["best"]
    if best is None:
        prune_best(best_manager, -1)
        return
    epoch = best["epoch"]
    if epoch not in best_manager.all_steps():
        if epoch == done:
            save_best(best_manager, state, epoch, best["val_sigma68"])
        elif epoch in manager.all_steps():
            save_best(best_manager, restore_checkpoint(manager, state, epoch), epoch, best["val_sigma68"])
        else:  # neither kept: nothing to restore it from (a damaged folder); evaluate --checkpoint best refuses
            return
    prune_best(best_manager, epoch)


def _devices_line(model: str, parallel: DataParallel, batch_size: int) -> str:
    """The progress display's first line: the devices and how a batch is split over them."""
    devices = parallel.describe()
    line = f"{model}: training on {devices['count']} {devices['platform']} device"
    if devices["count"] == 1:
        return f"{line} ({devices['kind']})"
    padded = parallel.batch_size(batch_size)
    share = f"{batch_size} events" + (f" (padded to {padded})" if padded != batch_size else "")
    return f"{line}s ({devices['kind']}), each batch of {share} split {devices['count']} ways"


def _metrics_row(
    epoch: int,
    step: int,
    split: str,
    means: dict[str, float],
    lam: float,
    seconds: float,
    *,
    learning_rate: float | None = None,
    sigma68: float | None = None,
) -> dict[str, Any]:
    """One row of metrics.parquet; the means a model did not report are null."""
    return {
        "epoch": epoch,
        "step": step,
        "split": split,
        "lambda": lam,
        "seconds": seconds,
        "learning_rate": learning_rate,
        "sigma68": sigma68,
        **{key: means.get(key) for key in _EPOCH_MEANS},
    }


def _epoch_info(model: str, epochs: int, *, train_row: dict[str, Any], val_row: dict[str, Any]) -> dict[str, Any]:
    """The dict ``on_epoch`` receives: the figures of one epoch's two metrics rows (before float32), flat."""
    return {
        "model": model,
        "epoch": train_row["epoch"],
        "epochs": epochs,
        "step": train_row["step"],
        "lambda": train_row["lambda"],
        "learning_rate": train_row["learning_rate"],
        "grad_norm": train_row["grad_norm"],
        **{f"train_{key}": train_row[key] for key in ("loss", "bce", "pt_loss")},
        **{f"val_{key}": val_row[key] for key in ("loss", "bce", "pt_loss")},
        "val_sigma68": val_row["sigma68"],
        "train_seconds": train_row["seconds"],
        "val_seconds": val_row["seconds"],
        "seconds": train_row["seconds"] + val_row["seconds"],
    }
