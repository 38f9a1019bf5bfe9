"""The RUN folder of a training run: its config, its metrics table and its Orbax checkpoints.

RUN folder (docs/contracts.md, "Training run folder")
    ``config.json``: model, preset, ModelConfig, TrainConfig, dataset (path, config hash, seed, events),
    training seed, code version. ``checkpoints/``: Orbax, one step per finished epoch (step = epoch number),
    the last ``keep_checkpoints`` kept; items ``params``, ``opt_state`` and ``meta`` (epoch, global step).
    ``best_checkpoint/``: Orbax, the parameters of the epoch of the lowest validation sigma68 (:func:`best_epoch`;
    step = that epoch; items ``params`` and ``meta``: epoch, global step, val sigma68), beside the last ones.
    ``config.json``'s ``checkpoints`` section names both (:func:`checkpoints_record`) and the one evaluation
    loads by default (:data:`DEFAULT_CHECKPOINT`); ``muontrack evaluate --checkpoint {best,last}`` chooses.
    ``metrics.parquet`` (:data:`TRAIN_METRICS_SCHEMA`): one ``train`` and one ``val`` row per epoch; ``loss``,
    ``bce``, ``pt_loss`` are means over the epoch's events (batch means weighted by real events), ``step``
    the global step at the end of the epoch, ``seconds`` the wall time of that pass. Train rows also hold
    the epoch's means of ``grad_norm`` (the global L2 norm of the unclipped gradients) and of where the
    gradient reaching the logits comes from (model.steps.train_step: ``bce_grad``, ``solver_grad``,
    ``solver_grad_nonzero``), and ``learning_rate``, the rate of the epoch's last optimiser step; val rows
    hold ``sigma68``, the sigma68 of the relative q/pT residual through the objective's chain (null where no
    event has a finite fit). The ``assignment`` model adds ``hamming`` and ``selected_layers`` to both.
    Columns that do not apply to a row are null. model.train.train_run's ``on_epoch`` receives the same
    figures after each epoch (model.train.format_epoch makes them one line).

Reproducibility and resume
    A run folder holds one run, identified by everything in its config but the number of epochs and the paths
    (:func:`prepare_run_dir`); resuming from the epoch-``k`` checkpoint continues exactly as an uninterrupted
    run would (model.steps), also when ``--epochs`` grows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from model.hyperparameters import ModelConfig, TrainConfig
from model.objectives import get_objective
from model.steps import TrainState
from pipeline import provenance
from pipeline.atomic import write_atomic, write_json_atomic
from pipeline.dataset import Dataset
from pipeline.errors import RunError
from pipeline.schema import TRAIN_METRICS_SCHEMA

RUN_FORMAT = "muontrack-run"
RUN_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.parquet"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT_DIR = "best_checkpoint"
#: the checkpoints evaluation can load: the best validation sigma68's, or the last epoch's
CHECKPOINTS = ("best", "last")
DEFAULT_CHECKPOINT = "best"

# ---- config.json -----------------------------------------------------------------------------------------


#: the code that decides what a run trains and measures: the model package and the pipeline modules it takes
#: numbers from (batches, the config loader, the physical constants, the validation sigma68). The other pipeline
#: modules it imports name, check, lock or lay out files; a change there cannot change a trained weight
#: (tests/test_provenance.py keeps this list in step with model's imports)
TRAINING_SOURCES = ("model", "pipeline/batches.py", "pipeline/config.py", "pipeline/constants.py", "pipeline/stats.py")


def code_version() -> str:
    """Version of the training code (:data:`TRAINING_SOURCES`, pipeline.provenance), in RUN/config.json."""
    return provenance.code_version(*TRAINING_SOURCES)


def _config_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def run_config(
    model: str,
    preset: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    dataset: Dataset,
    seed: int,
) -> dict[str, Any]:
    """The content of RUN/config.json."""
    return {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "model": model,
        "preset": preset,
        "model_config": _config_dict(model_config),
        "train_config": _config_dict(train_config),
        "dataset": {
            "path": str(Path(dataset.path).resolve()),
            "config_hash": dataset.config.config_hash(),
            "physics_hash": dataset.config.physics_hash(),
            "seed": dataset.seed,
            "n_events": dataset.n_events,
        },
        "seed": seed,
        "reconstruction": _config_dict(get_objective(model).chain),
        "code_version": code_version(),
    }


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes two run configs the same run: everything but the number of epochs and the paths. The code
    version is part of it: checkpoints of other training code are never resumed or served as this code's."""
    train = {k: v for k, v in config.get("train_config", {}).items() if k != "epochs"}
    dataset = {k: v for k, v in config.get("dataset", {}).items() if k != "path"}
    return {
        "model": config.get("model"),
        "preset": config.get("preset"),
        "model_config": config.get("model_config"),
        "train_config": train,
        "dataset": dataset,
        "seed": config.get("seed"),
        "reconstruction": config.get("reconstruction"),
        "code_version": config.get("code_version"),
    }


def warm_start_epochs(donor: Path, config: dict[str, Any]) -> tuple[int, str]:
    """How many of its first epochs the run of ``config`` takes from the run folder ``donor`` (model.train, "Warm
    start"), and why none when none: its lambda = 0 warm-up epochs (``lambda_warmup_epochs``, at most its
    ``epochs``) when ``donor`` holds a run of the model it starts from (pipeline.registry ModelSpec.warm_up_from)
    with the same model and train configs (but the epochs and the checkpoints kept), dataset, seed and training
    code, and keeps a checkpoint and the metrics of each of those epochs. Reads only."""
    from pipeline import registry

    spec = registry.get_model(config["model"])
    train = config["train_config"]
    wanted = min(int(train["lambda_warmup_epochs"]), int(train["epochs"]))
    if spec.warm_up_from is None or wanted < 1:
        return 0, f"{spec.name} has no warm-up epochs that another model's run repeats"
    try:
        theirs = read_run_config(donor)
    except RunError as err:
        return 0, str(err)
    if theirs.get("model") != spec.warm_up_from:
        return 0, f"{donor} holds a run of {theirs.get('model')}, not of {spec.warm_up_from}"
    mine, other = run_identity(config), run_identity(theirs)
    differing = []
    for key in ("model_config", "train_config", "dataset", "seed", "code_version"):
        if isinstance(mine[key], dict) and isinstance(other[key], dict):
            fields = sorted(set(mine[key]) | set(other[key]))
            differing += [
                f"{key}.{f}" for f in fields if f != "keep_checkpoints" and mine[key].get(f) != other[key].get(f)
            ]
        elif mine[key] != other[key]:
            differing.append(key)
    if differing:
        return 0, f"{donor} was trained with another {', '.join(differing)}"
    epochs = set(range(1, wanted + 1))
    with _quiet_absl(), checkpoint_manager(donor, writer=False) as manager:
        kept = {int(step) for step in manager.all_steps()}
    recorded = set(read_metrics(donor).filter(pl.col("split") == "train")["epoch"].to_list())
    missing = sorted(epochs - (kept & recorded))
    if missing:
        return 0, f"{donor} keeps no checkpoint or metrics of epoch {', '.join(map(str, missing))}"
    return wanted, ""


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """RUN/config.json, checked to be a muontrack run; RunError otherwise."""
    path = run_dir / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise RunError(f"{path} is not readable JSON: {run_dir} is not a muontrack run") from None
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise RunError(f"{run_dir} is not a muontrack run ({CONFIG_NAME} has another format)")
    for section in ("model_config", "train_config", "dataset"):
        if not isinstance(config.get(section), dict):
            raise RunError(f"{path} has no {section} section (found {config.get(section)!r}): a damaged run")
    return config


def write_run_config(run_dir: Path, config: dict[str, Any]) -> None:
    """RUN/config.json, atomically."""
    write_json_atomic(run_dir / CONFIG_NAME, config)


def prepare_run_dir(out: Path, config: dict[str, Any], resume: bool) -> int:
    """Check ``out`` against the run to start; return the number of epochs already done there.

    Never modifies anything: a folder holding another run, unrelated files, or a run that needs
    ``--resume`` is refused with a RunError.
    """
    if out.exists() and not out.is_dir():
        raise RunError(f"run folder {out} is a file")
    if not out.exists() or not any(out.iterdir()):
        return 0
    if not (out / CONFIG_NAME).is_file():
        raise RunError(f"run folder {out} is not empty and holds no muontrack run; choose another --out")
    existing = read_run_config(out)
    mine, theirs = run_identity(config), run_identity(existing)
    if mine != theirs:
        differing = [key for key in mine if mine[key] != theirs[key]]
        raise RunError(f"{out} holds another run (different {', '.join(differing)}); choose another --out")
    done = latest_epoch(out)
    planned = int(existing.get("train_config", {}).get("epochs", 0))
    if not resume:
        if done >= planned:
            raise RunError(
                f"{out} already holds a finished run ({done} epochs); pass --resume with more --epochs to "
                "train further, or choose another --out"
            )
        raise RunError(f"{out} holds an unfinished run ({done} of {planned} epochs); pass --resume to continue it")
    return done


# ---- metrics.parquet -------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> pl.DataFrame:
    """RUN/metrics.parquet (empty frame of TRAIN_METRICS_SCHEMA when absent)."""
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return pl.from_arrow(TRAIN_METRICS_SCHEMA.empty_table())
    try:
        return pl.from_arrow(pq.read_table(path, schema=TRAIN_METRICS_SCHEMA))
    except (OSError, ValueError, pa.ArrowException) as err:
        raise RunError(f"{path} is not a metrics table of a muontrack run: {str(err).splitlines()[0]}") from None


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """RUN/metrics.parquet from its rows (dicts of TRAIN_METRICS_SCHEMA's columns), atomically."""
    table = pa.Table.from_pylist(rows, schema=TRAIN_METRICS_SCHEMA)
    write_atomic(run_dir / METRICS_NAME, lambda p: pq.write_table(table, p, compression="zstd"))


def best_epoch(metrics: pl.DataFrame) -> int | None:
    """The epoch of the lowest validation sigma68 in metrics.parquet's rows (the earliest of equal ones); None
    when no val row has a finite sigma68. The epoch of ``best_checkpoint/``."""
    val = metrics.filter(
        (pl.col("split") == "val") & pl.col("sigma68").is_not_null() & pl.col("sigma68").is_finite()
    ).sort("sigma68", "epoch")
    return int(val["epoch"][0]) if val.height else None


def checkpoints_record(metrics: pl.DataFrame) -> dict[str, Any]:
    """config.json's ``checkpoints`` section from the run's metrics rows: the ``best`` and the ``last`` epoch with
    their validation sigma68 (None where null), and ``evaluation_default``, the one evaluation loads unless told."""
    val = {int(row["epoch"]): row["sigma68"] for row in metrics.filter(pl.col("split") == "val").iter_rows(named=True)}
    last = max(val) if val else None
    best = best_epoch(metrics)

    def entry(epoch: int | None) -> dict[str, Any] | None:
        if epoch is None:
            return None
        sigma = val.get(epoch)
        return {"epoch": epoch, "val_sigma68": float(sigma) if sigma is not None else None}

    return {
        "best": entry(best),
        "last": entry(last),
        "evaluation_default": DEFAULT_CHECKPOINT,
        "best_dir": BEST_CHECKPOINT_DIR,
        "last_dir": CHECKPOINT_DIR,
    }


# ---- checkpoints -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Orbax logs routine warnings through absl; a CLI user should not see them."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def checkpoint_manager(
    run_dir: Path, keep: int | None = None, *, writer: bool = True, preserve: tuple[int, ...] = ()
) -> ocp.CheckpointManager:
    """The run's Orbax manager: the newest ``keep`` checkpoints (all with None) and those of the epochs in
    ``preserve`` (a warm-up other runs start from: model.train, "Warm start"). Only the writer, which holds the
    run's lock (pipeline.locks), creates the folder and deletes unfinished (``*.orbax-checkpoint-tmp``) checkpoints;
    a reader (``writer=False``: evaluate, the resume check) opens it read-only, since such a folder may be the
    checkpoint a running ``train`` is saving."""
    policy = None
    if keep is not None and preserve:
        managers = ocp.checkpoint_managers
        policy = managers.AnyPreservationPolicy([managers.LatestN(keep), managers.CustomSteps(preserve)])
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if policy is not None else keep,
        preservation_policy=policy,
        create=writer,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=writer,
        read_only=not writer,
    )
    with _quiet_absl():
        return ocp.CheckpointManager((run_dir / CHECKPOINT_DIR).resolve(), options=options)


def best_checkpoint_manager(run_dir: Path, *, writer: bool = True) -> ocp.CheckpointManager:
    """The Orbax manager of ``best_checkpoint/``. It keeps every step: the training loop deletes the older ones
    itself (:func:`prune_best`) once the epoch's last checkpoint is saved, so that a kill in between never leaves
    the folder without the best of the epochs a resume keeps."""
    options = ocp.CheckpointManagerOptions(
        create=writer,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=writer,
        read_only=not writer,
    )
    with _quiet_absl():
        return ocp.CheckpointManager((run_dir / BEST_CHECKPOINT_DIR).resolve(), options=options)


def best_checkpoint_epoch(run_dir: Path, last: int | None = None) -> int:
    """The epoch of the best checkpoint: the newest complete step of ``best_checkpoint/`` not after ``last``
    (default: :func:`latest_epoch`), 0 when there is none. A newer step belongs to an epoch whose last checkpoint
    was never saved (a kill in between): not part of the run."""
    if not (run_dir / BEST_CHECKPOINT_DIR).is_dir():
        return 0
    last = latest_epoch(run_dir) if last is None else last
    with _quiet_absl(), best_checkpoint_manager(run_dir, writer=False) as manager:
        steps = [int(step) for step in manager.all_steps() if int(step) <= last]
    return max(steps, default=0)


def save_best(manager: ocp.CheckpointManager, state: TrainState, epoch: int, sigma68: float | None) -> None:
    """Save epoch ``epoch``'s parameters as the best checkpoint (replacing an unfinished save of that epoch);
    RunError (one line) when the disk is full."""
    directory = Path(manager.directory)
    directory.mkdir(parents=True, exist_ok=True)
    _check_free_space(directory, state, epoch)
    with _quiet_absl():
        if epoch in manager.all_steps():
            manager.delete(epoch)
        try:
            manager.save(
                epoch,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    meta=ocp.args.JsonSave({"epoch": epoch, "step": int(state.step), "val_sigma68": sigma68}),
                ),
            )
            manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as err:
            if "No space left on device" in str(err) or getattr(err, "errno", None) == errno.ENOSPC:
                raise RunError(
                    f"no space left on device while saving the best checkpoint (epoch {epoch}) in {directory}; "
                    "free some and continue with --resume"
                ) from None
            raise


def prune_best(manager: ocp.CheckpointManager, keep: int) -> None:
    """Delete the steps of ``best_checkpoint/`` other than ``keep``: older bests once a newer one is part of the
    run, newer ones that a resume from before them drops (their epoch is trained again)."""
    with _quiet_absl():
        for step in manager.all_steps():
            if int(step) != keep:
                manager.delete(step)


def latest_epoch(run_dir: Path) -> int:
    """The epoch of the newest complete checkpoint, 0 when there is none."""
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        return 0
    with _quiet_absl(), checkpoint_manager(run_dir, writer=False) as manager:
        step = manager.latest_step()
    return int(step) if step is not None else 0


def _on_first_device(tree: Any) -> Any:
    """``tree``'s shapes and dtypes, placed on this process's first device: the target of a restore.

    A checkpoint records the devices it was saved from (a GPU, a mesh of several); without a target
    placement Orbax refuses to restore it on other devices ("Topology mismatch"), e.g. a GPU run on a laptop.
    """
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), tree)


#: free space a checkpoint save asks for beyond its arrays: Orbax's metadata, manifests and OCDBT nodes
_CHECKPOINT_OVERHEAD_BYTES = 2**20


def _check_free_space(directory: Path, state: TrainState, epoch: int) -> None:
    """RunError before saving when the disk cannot take the checkpoint: a save that runs out of space mid-way
    fails inside Orbax's threads, which print tracebacks of their own before the error reaches us."""
    arrays = sum(leaf.nbytes for leaf in jax.tree.leaves((state.params, state.opt_state)) if hasattr(leaf, "nbytes"))
    needed = 2 * arrays + _CHECKPOINT_OVERHEAD_BYTES
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise RunError(
            f"no space left for the checkpoint of epoch {epoch} in {directory} ({free / 2**20:.3g} MiB free, about "
            f"{needed / 2**20:.3g} MiB needed); free some and continue with --resume"
        )


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, epoch: int) -> None:
    """Save epoch ``epoch``'s state; RunError (one line) when the disk is or becomes full."""
    directory = Path(manager.directory)
    directory.mkdir(parents=True, exist_ok=True)
    _check_free_space(directory, state, epoch)
    try:
        _save(manager, state, epoch)
    except (OSError, ValueError, RuntimeError) as err:
        if "No space left on device" in str(err) or getattr(err, "errno", None) == errno.ENOSPC:
            raise RunError(
                f"no space left on device while saving the checkpoint of epoch {epoch} in {directory}; free some "
                "and continue with --resume"
            ) from None
        raise


def _save(manager: ocp.CheckpointManager, state: TrainState, epoch: int) -> None:
    with _quiet_absl():
        manager.save(
            epoch,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave({"epoch": epoch, "step": int(state.step)}),
            ),
        )
        manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState, epoch: int) -> TrainState:
    """``state`` with parameters, optimiser state and step of the epoch-``epoch`` checkpoint."""
    with _quiet_absl():
        restored = manager.restore(
            epoch,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_on_first_device(state.params)),
                opt_state=ocp.args.StandardRestore(_on_first_device(state.opt_state)),
                meta=ocp.args.JsonRestore(),
            ),
        )
    return state.replace(
        params=restored["params"], opt_state=restored["opt_state"], step=jnp.asarray(restored["meta"]["step"])
    )


def restore_params(run_dir: Path, abstract_params: Any, epoch: int, checkpoint: str = "last") -> Any:
    """Only the parameters of one checkpoint (for inference): of ``checkpoints/`` (``last``: any epoch still
    kept there) or of ``best_checkpoint/`` (``best``)."""
    opener = best_checkpoint_manager if checkpoint == "best" else checkpoint_manager
    with _quiet_absl(), opener(run_dir, writer=False) as manager:
        target = ocp.args.StandardRestore(_on_first_device(abstract_params))
        restored = manager.restore(epoch, args=ocp.args.Composite(params=target))
    return restored["params"]
