"""Training: the resumable epoch loop that trains one model into a RUN folder (:func:`train_run`).

What a model computes is its objective (model.objectives), a step of training or validation is model.steps'
jitted functions, and what a run writes (config, metrics, checkpoints) is model.run_folder's. This module runs
the epochs: shuffled batches through :func:`~model.steps.train_step`, validation after every epoch
(:func:`evaluate`), one metrics row per split and a checkpoint per epoch, progress on the console. The steps run
data parallel over every local device (model.steps.DataParallel: each batch split along its events, the state
replicated); with one device exactly as the single-device code did.

A training is a :class:`TrainRequest` (:func:`train`; :func:`train_run` takes its fields as arguments), carried out
in four parts: the configs resolved (:func:`resolve_configs`), the run opened or resumed (:func:`_open_run`), then
per epoch the train steps (:func:`_train_epoch`), the validation (:func:`_validate`) and the epoch's files written
(:func:`_record_epoch`). Nothing here touches JAX's global configuration: the persistent compilation cache is
turned on by the entry points (pipeline.cache.enable_compilation_cache).

Warm start: with lambda = 0 the pT term passes exactly no gradient (its per-event gradient is finite, capped, times
0), so e2e's and e2e_paper's warm-up epochs compute baseline's BCE steps from the same seed, batches and keys: the
same weights and optimiser state, bit for bit (tests/test_warm_start.py). Given the run folder of such a baseline
(``TrainRequest.warm_start``, pipeline.registry ModelSpec.warm_up_from), those epochs are taken from its
checkpoints instead of trained again, when its model and train configs (but the epochs and checkpoints kept),
dataset, seed and training code are this run's (model.run_folder.warm_start_epochs); otherwise the run trains them
itself and says why. Each taken epoch is then validated and recorded as a trained one (:func:`_warm_start_epoch`):
its val row and checkpoints are what training it would give; its train row is baseline's, with baseline's
``pt_loss`` monitor where the chains are the same and null where they are not. config.json records
``warm_start``; a baseline run keeps its warm-up's checkpoints beyond ``keep_checkpoints``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl

from model.hyperparameters import ModelConfig, TrainConfig, configure
from model.objectives import OPTIONAL_TERMS, Objective, get_objective
from model.run_folder import (
    best_checkpoint_manager,
    checkpoint_manager,
    checkpoints_record,
    prepare_run_dir,
    prune_best,
    read_metrics,
    read_run_config,
    restore_checkpoint,
    run_config,
    save_best,
    save_checkpoint,
    warm_start_epochs,
    write_metrics,
    write_run_config,
)
from model.steps import (
    DataParallel,
    TrainState,
    create_train_state,
    epoch_shuffle_seed,
    eval_step,
    example_batch,
    learning_rate_schedule,
    step_key,
    train_step,
)
from pipeline import registry
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


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    """What to train: ``model`` on the train split of the dataset ``data`` into the run folder ``out``
    (:func:`train`; :func:`train_run` takes the same as arguments).

    ``preset`` names the model and train configs (model.hyperparameters.PRESETS), ``overrides`` (a config file's
    ``model`` and ``train`` sections, model.hyperparameters.configure) changes their values, ``epochs`` the number of
    epochs and ``estimator`` the gradient estimator (the ``assignment`` model's); :func:`resolve_configs` applies
    them.
    ``seed`` fixes everything random (model.steps). With ``resume`` an interrupted (or finished, for more epochs)
    run of the same configuration continues from its newest checkpoint. ``warm_start``: the run folder of the
    model whose warm-up epochs this one repeats (pipeline.registry ModelSpec.warm_up_from; module docstring, "Warm
    start"): those epochs are taken from it when its configs match, and trained here when they do not.
    """

    data: Path
    model: str
    out: Path
    preset: str = "cpu"
    epochs: int | None = None
    seed: int = 0
    resume: bool = False
    estimator: str | None = None
    overrides: Mapping[str, Any] | None = None
    warm_start: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if self.warm_start is not None:
            object.__setattr__(self, "warm_start", Path(self.warm_start))


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
    warm_start: str | Path | None = None,
) -> str:
    """Train ``model`` (baseline, e2e, e2e_paper, assignment, ...) on the train split of ``data`` into ``out``:
    :func:`train` of the :class:`TrainRequest` of these arguments.

    Validates on the val split after every epoch, checkpoints every epoch and writes metrics.parquet.
    ``overrides`` (a config file's ``model`` and ``train`` sections, model.hyperparameters.configure) change the
    preset's values; ``epochs`` overrides the epochs, ``estimator`` the gradient estimator (the ``assignment``
    model's). With ``resume`` an interrupted (or finished, for more epochs) run of the same configuration continues
    from its newest checkpoint, giving the same result as an uninterrupted run. ``warm_start``: the run folder of
    the model whose warm-up epochs this one repeats (:class:`TrainRequest`). Returns a one-line summary.

    ``progress`` shows a progress bar and prints one line per epoch (:func:`format_epoch`). ``on_epoch``, if
    given, is called after each epoch's metrics and checkpoint are written with a dict of that epoch's
    figures (:func:`_epoch_info`: ``model``, ``epoch``, ``epochs``, ``step``, ``lambda``, ``learning_rate``,
    ``grad_norm``, ``train_loss``/``bce``/``pt_loss``, ``val_loss``/``bce``/``pt_loss``, ``val_sigma68``
    (None when null), ``train_seconds``, ``val_seconds``, ``seconds``). It only reads: training is the same
    with or without it. ``on_message``, if given, is called with lines of progress between the epochs (the
    Prefect job logs them): the devices, "compiling the train step for N-node events" before the first step
    of each batch shape and its time after it (also with ``progress``), and the events done at least every
    :data:`PROGRESS_SECONDS` inside an epoch.

    JAX's persistent compilation cache is the caller's to turn on (pipeline.cache.enable_compilation_cache; the
    ``muontrack`` command does): training leaves JAX's global configuration alone.

    Raises ConfigError (unknown model or preset, epochs < 1), DatasetError (missing or incomplete dataset),
    RunError (``out`` holds something else, needs ``--resume``, or the loss became NaN).
    """
    request = TrainRequest(
        data=Path(data),
        model=model,
        out=Path(out),
        preset=preset,
        epochs=epochs,
        seed=seed,
        resume=resume,
        estimator=estimator,
        overrides=overrides,
        warm_start=warm_start,
    )
    return train(request, progress=progress, on_epoch=on_epoch, on_message=on_message)


def train(
    request: TrainRequest,
    *,
    progress: bool = False,
    on_epoch: EpochCallback | None = None,
    on_message: MessageCallback | None = None,
) -> str:
    """Carry out ``request`` (:func:`train_run` describes what it does, ``progress``, ``on_epoch`` and
    ``on_message``): holds the run folder's lock, resolves the configs (:func:`resolve_configs`), opens or resumes
    the run (:func:`_open_run`), then trains (:func:`_train_epoch`), validates (:func:`_validate`) and records
    (:func:`_record_epoch`) one epoch after the other. Returns a one-line summary."""
    with exclusive_writer(request.out):
        objective = get_objective(request.model)
        model_config, train_config = resolve_configs(request)
        dataset = open_dataset(request.data)
        config = run_config(request.model, request.preset, model_config, train_config, dataset, request.seed)
        done = _prepare_folder(request.out, config, request.resume)
        if done >= train_config.epochs:
            return f"already trained: {done} epochs (asked for {train_config.epochs}); nothing to do"
        warm_epochs, why_not = (0, "") if request.warm_start is None else warm_start_epochs(request.warm_start, config)
        run = _open_run(request, dataset, config, model_config, train_config, done, warm_epochs)
        return _train_epochs(run, objective, progress, on_epoch, on_message, why_not)


def resolve_configs(request: TrainRequest) -> tuple[ModelConfig, TrainConfig]:
    """The model and train configs ``request`` trains with: its preset's, with its ``overrides``, ``estimator``
    and ``epochs`` applied in that order; ConfigError for an unknown preset, a bad override or ``epochs`` < 1."""
    model_config, train_config = configure(request.preset, request.overrides)
    if request.estimator is not None:
        train_config = dataclasses.replace(train_config, estimator=request.estimator)
    epochs = request.epochs
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
        train_config = dataclasses.replace(train_config, epochs=epochs)
    return model_config, train_config


def _prepare_folder(out: Path, config: dict[str, Any], resume: bool) -> int:
    """The epochs already done in the run folder ``out`` for the run of ``config`` (0: a new run), after removing
    the hidden temporaries a kill mid-write (of config.json, metrics.parquet) leaves; RunError when ``out`` holds
    something else or a run that needs ``resume`` (model.run_folder.prepare_run_dir)."""
    remove_temporaries(out)
    return prepare_run_dir(out, config, resume)


@dataclass
class _Run:
    """An opened run: what its epochs read and write (:func:`_open_run`)."""

    request: TrainRequest
    dataset: Dataset
    model_config: ModelConfig
    train_config: TrainConfig
    #: epochs already done (0: a new run)
    done: int
    #: the state after epoch ``done``, placed on ``parallel``'s devices
    state: TrainState
    parallel: DataParallel
    #: the metrics rows of epochs 1 .. ``done``; each epoch appends its two
    rows: list[dict[str, Any]]
    #: config.json's content but its ``checkpoints`` section (rewritten after every epoch)
    session_config: dict[str, Any]
    manager: Any
    best_manager: Any
    events_per_epoch: int
    #: epochs 1 .. this taken from ``request.warm_start``'s run instead of trained (those after ``done``)
    warm_epochs: int = 0

    @property
    def out(self) -> Path:
        return self.request.out

    @property
    def epochs(self) -> int:
        return self.train_config.epochs


def _open_run(
    request: TrainRequest,
    dataset: Dataset,
    config: dict[str, Any],
    model_config: ModelConfig,
    train_config: TrainConfig,
    done: int,
    warm_epochs: int = 0,
) -> _Run:
    """Open the run folder ``request.out`` (checked by :func:`_prepare_folder`, ``done`` epochs in it): a new run
    writes its config.json and starts from a fresh state; a resumed one restores the epoch-``done`` checkpoint,
    repairs ``best_checkpoint/`` (:func:`_repair_best`) and then rewrites its config.json. RunError when the
    dataset has no train events. ``warm_epochs``: the first epochs taken from ``request.warm_start``'s run
    (recorded in config.json's ``warm_start``); a run other models start from keeps its warm-up's checkpoints."""
    out = request.out
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
    if warm_epochs > done:
        session_config["warm_start"] = {"run": str(request.warm_start.resolve()), "epochs": warm_epochs}
    elif done and "warm_start" in (previous := read_run_config(out)):
        # a resumed run keeps the record of the epochs it took
        session_config["warm_start"] = previous["warm_start"]
    if not done:
        out.mkdir(parents=True, exist_ok=True)
        write_run_config(out, session_config)
    state = create_train_state(
        jax.random.key(request.seed),
        model_config,
        train_config,
        example_batch(1, min(train_config.node_buckets), geometry.n_layers),
        geometry=geometry,
        objective=request.model,
    )
    warm_up = range(1, train_config.lambda_warmup_epochs + 1) if request.model in registry.WARM_UP_DONORS else ()
    manager = checkpoint_manager(out, keep=train_config.keep_checkpoints, preserve=tuple(warm_up))
    best_manager = best_checkpoint_manager(out)
    if done:
        state = restore_checkpoint(manager, state, done)
        record = checkpoints_record(read_metrics(out).filter(pl.col("epoch") <= done))
        _repair_best(manager, best_manager, state, record, done)
        write_run_config(out, {**session_config, "checkpoints": record})
    return _Run(
        request=request,
        dataset=dataset,
        model_config=model_config,
        train_config=train_config,
        done=done,
        state=parallel.state(state),
        parallel=parallel,
        rows=rows,
        session_config=session_config,
        manager=manager,
        best_manager=best_manager,
        events_per_epoch=events_per_epoch,
        warm_epochs=warm_epochs,
    )


class _Display:
    """The progress bar (with ``progress``) and the lines of progress (``on_message``) of one training."""

    def __init__(self, bar: Any, model: str, progress: bool, on_message: MessageCallback | None) -> None:
        self.bar = bar
        self.model = model
        self.progress = progress
        self.on_message = on_message
        self.task: Any = None
        #: when the newest line of progress was given (a line of events follows PROGRESS_SECONDS after it)
        self.last_note = time.perf_counter()

    def note(self, message: str) -> None:
        """A line of progress: on the console (with ``progress``) and to ``on_message``."""
        self.last_note = time.perf_counter()
        if self.progress:
            self.bar.console.print(message, markup=False, highlight=False)
        if self.on_message is not None:
            self.on_message(message)

    def print(self, line: str) -> None:
        """A line on the console with ``progress`` (the epoch lines)."""
        if self.progress:
            self.bar.console.print(line, markup=False, highlight=False)


def _train_epochs(
    run: _Run,
    objective: Objective,
    progress: bool,
    on_epoch: EpochCallback | None,
    on_message: MessageCallback | None,
    why_not_warm: str = "",
) -> str:
    """Epochs ``run.done + 1`` .. ``run.epochs``: each trained (or taken from the warm start's run), validated and
    recorded; the one-line summary. ``why_not_warm``: why a requested warm start was refused (a line of progress)."""
    model, epochs = run.request.model, run.epochs
    stats = BatchStats()
    start = time.perf_counter()
    val_means: dict[str, float] = {}
    val_sigma = math.nan
    state = run.state
    with run.manager, run.best_manager, _progress(progress) as bar:
        display = _Display(bar, model, progress, on_message)
        display.task = bar.add_task(
            f"{model} epoch {run.done + 1}/{epochs}",
            total=run.events_per_epoch * (epochs - run.done),
            loss=math.nan,
            rate=0.0,
        )
        compilations = _Compilations(model, display.note)
        display.note(_devices_line(model, run.parallel, run.train_config.batch_size))
        if why_not_warm and run.done < epochs:
            display.note(f"{model}: training its own warm-up: {why_not_warm}")
        for epoch in range(run.done + 1, epochs + 1):
            lam = objective.lam(epoch, run.train_config)
            bar.update(display.task, description=f"{model} epoch {epoch}/{epochs}")
            if epoch <= run.warm_epochs:
                state, train_row = _warm_start_epoch(run, state, epoch, objective, display)
            else:
                state, train_row = _train_epoch(run, state, epoch, lam, display, compilations, stats)
            val_row, val_means, val_sigma = _validate(run, state, epoch, lam, compilations)
            run.rows += [train_row, val_row]
            _record_epoch(run, state, epoch)
            info = _epoch_info(model, epochs, train_row=train_row, val_row=val_row)
            display.print(format_epoch(info))
            if on_epoch is not None:
                on_epoch(info)

    minutes = (time.perf_counter() - start) / 60
    truncated = f", {stats.n_truncated} of {stats.n_events} train events truncated" if stats.n_truncated else ""
    return (
        f"{epochs} epochs, val loss {val_means.get('loss', math.nan):.4f} "
        f"bce {val_means.get('bce', math.nan):.4f} pt_loss {val_means.get('pt_loss', math.nan):.4g} "
        f"sigma68(q/pT) {val_sigma:.4f}, {minutes:.1f} min{truncated}"
    )


def _train_epoch(
    run: _Run,
    state: TrainState,
    epoch: int,
    lam: float,
    display: _Display,
    compilations: _Compilations,
    stats: BatchStats,
) -> tuple[TrainState, dict[str, Any]]:
    """One epoch of train steps over the epoch's shuffled batches: the state after it and its ``train`` metrics
    row. RunError when a step's loss is not finite."""
    request, train_config = run.request, run.train_config
    model, seed = request.model, request.seed
    first_step = int(state.step)
    step_metrics: list[dict[str, jax.Array]] = []
    step_events: list[int] = []
    shown, shown_step = math.nan, -1
    epoch_start = display.last_note = time.perf_counter()
    batches = iter_batches(
        run.dataset,
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
            run.parallel.batch(batch),
            step_key(seed, epoch, step_in_epoch),
            jnp.float32(lam),
        )
        # the metrics stay on the device (no sync per step); they come over once, after the epoch
        step_metrics.append(metrics)
        step_events.append(int(batch.event_mask.sum()))
        if display.progress:
            # the bar shows the loss of the newest step that has finished; is_ready() never waits, so
            # the display does not hold the queue of dispatched steps back
            newest = shown_step
            while newest + 1 < len(step_metrics) and step_metrics[newest + 1]["loss"].is_ready():
                newest += 1
            if newest > shown_step:
                shown, shown_step = float(step_metrics[newest]["loss"]), newest
            rate = sum(step_events) / max(time.perf_counter() - epoch_start, 1e-9)
            display.bar.update(display.task, advance=step_events[-1], loss=shown, rate=rate)
        if display.on_message is not None and time.perf_counter() - display.last_note >= PROGRESS_SECONDS:
            display.last_note = time.perf_counter()
            display.on_message(
                _epoch_progress(
                    model,
                    epoch,
                    run.epochs,
                    step_metrics,
                    step_events,
                    run.events_per_epoch,
                    display.last_note - epoch_start,
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
    learning_rate = float(learning_rate_schedule(train_config)(step - 1))
    return state, _metrics_row(epoch, step, "train", sums.means(), lam, train_seconds, learning_rate=learning_rate)


def _warm_start_epoch(
    run: _Run, state: TrainState, epoch: int, objective: Objective, display: _Display
) -> tuple[TrainState, dict[str, Any]]:
    """Epoch ``epoch`` taken from the warm start's run instead of trained (module docstring, "Warm start"): the
    state of its checkpoint and its ``train`` metrics row, whose ``pt_loss`` (a monitor, computed outside the
    gradient there) is kept where that run's chain is this model's and null where it is another chain's;
    ``seconds`` is the time taken here."""
    start = time.perf_counter()
    donor = run.request.warm_start
    with checkpoint_manager(donor, writer=False) as manager:
        state = run.parallel.state(restore_checkpoint(manager, state, epoch))
    # the model warm_start_epochs found in that run
    donor_model = registry.get_model(run.request.model).warm_up_from
    row = read_metrics(donor).filter((pl.col("epoch") == epoch) & (pl.col("split") == "train")).to_dicts()[0]
    if get_objective(donor_model).chain != objective.chain:
        row["pt_loss"] = None
    row["seconds"] = time.perf_counter() - start
    display.note(f"{run.request.model} epoch {epoch}/{run.epochs}: taken from {donor_model}'s run {donor}")
    display.bar.update(display.task, advance=run.events_per_epoch)
    return state, row


def _validate(
    run: _Run, state: TrainState, epoch: int, lam: float, compilations: _Compilations
) -> tuple[dict[str, Any], dict[str, float], float]:
    """Validation after epoch ``epoch`` (:func:`evaluate` on the val split): its ``val`` metrics row, the mean loss
    terms and the sigma68 of the q/pT residual (NaN when no event has a finite fit; null in the row)."""
    val_start = time.perf_counter()
    val_means, val_sigma = evaluate(
        state, run.dataset, "val", run.train_config, lam, parallel=run.parallel, compilations=compilations
    )
    val_seconds = time.perf_counter() - val_start
    # null, not NaN, when no validation event has a finite fit
    val_sigma68 = val_sigma if math.isfinite(val_sigma) else None
    row = _metrics_row(epoch, int(state.step), "val", val_means, lam, val_seconds, sigma68=val_sigma68)
    return row, val_means, val_sigma


def _record_epoch(run: _Run, state: TrainState, epoch: int) -> None:
    """Write epoch ``epoch``: metrics.parquet (``run.rows``), config.json's ``checkpoints`` section, the best
    checkpoint when this epoch is the best, the last checkpoint, then the older best deleted.

    Metrics first, checkpoints second: a crash in between leaves rows that resume drops again. The best checkpoint
    (lowest val sigma68 so far) is saved before the last one and the older best deleted only after it: a kill at any
    point leaves the best of the epochs a resume keeps (:func:`_repair_best`)."""
    write_metrics(run.out, run.rows)
    record = checkpoints_record(read_metrics(run.out))
    write_run_config(run.out, {**run.session_config, "checkpoints": record})
    best = record["best"]
    if best is not None and best["epoch"] == epoch:
        save_best(run.best_manager, state, epoch, best["val_sigma68"])
    save_checkpoint(run.manager, state, epoch)
    if best is not None:
        prune_best(run.best_manager, best["epoch"])


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
