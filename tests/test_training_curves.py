"""Training you can see (#26 item 6): the training-curves figure's data against metrics.parquet, the best-validation
checkpoint beside the last (its epoch recomputed from metrics.parquet, kept exact through a killed and resumed run),
evaluation choosing between them, and the report saying which it used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import model.train as train_module
from analysis.training import LOSS_COLUMNS, training_curves
from flows import cli, commands
from model.hyperparameters import get_preset
from model.inference import checkpoint_epoch, load_run
from model.run_folder import (
    BEST_CHECKPOINT_DIR,
    CHECKPOINTS,
    DEFAULT_CHECKPOINT,
    best_epoch,
    read_metrics,
    restore_params,
)
from model.steps import abstract_params
from model.train import train_run
from pipeline.errors import ConfigError, RunError
from pipeline.schema import TRAIN_METRICS_SCHEMA
from tests.helpers import assert_one_line_error, run_muontrack, snapshot


def _metrics(rows: list[dict]) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=TRAIN_METRICS_SCHEMA))


def _synthetic_metrics(sigmas: list[float | None], hamming: bool = False) -> pl.DataFrame:
    """metrics.parquet rows of len(sigmas) epochs: distinct values per column, split and epoch."""
    rows = []
    for epoch, sigma in enumerate(sigmas, start=1):
        for split in ("train", "val"):
            base = epoch + (0.5 if split == "val" else 0.0)
            rows.append(
                {
                    "epoch": epoch,
                    "step": 10 * epoch,
                    "split": split,
                    "loss": 1.0 / base,
                    "bce": 0.7 / base,
                    "pt_loss": 3.0 / base,
                    "lambda": 0.5,
                    "seconds": 1.0,
                    "grad_norm": 2.0 / epoch if split == "train" else None,
                    "learning_rate": 1e-3 * 0.5**epoch if split == "train" else None,
                    "sigma68": sigma if split == "val" else None,
                    "hamming": 0.1 * base if hamming else None,
                }
            )
    # stored order is not epoch order after a resume of an older table: shuffle it
    return _metrics(rows).sample(fraction=1.0, shuffle=True, seed=3)


def _column(metrics: pl.DataFrame, column: str, split: str) -> tuple[list[int], list[float]]:
    rows = metrics.filter((pl.col("split") == split) & pl.col(column).is_not_null()).sort("epoch")
    return rows["epoch"].to_list(), rows[column].cast(pl.Float64).to_list()


@pytest.mark.parametrize("hamming", [False, True])
def test_training_curves_data_equal_the_metrics_columns(hamming):
    metrics = _synthetic_metrics([0.02, 0.011, None, 0.015], hamming=hamming)
    curves = training_curves(metrics, {"best": 2, "last": 4, "evaluated": None})
    assert curves.marks == {"best": 2, "last": 4}
    drawn = {(series.column, series.split): series for series in curves.losses}
    expected = [(c, s) for c in LOSS_COLUMNS for s in ("train", "val") if c != "hamming" or hamming]
    assert list(drawn) == expected
    for (column, split), series in drawn.items():
        assert (series.epoch.tolist(), series.value.tolist()) == _column(metrics, column, split)
    for series, column, split in (
        (curves.sigma68, "sigma68", "val"),
        (curves.learning_rate, "learning_rate", "train"),
        (curves.grad_norm, "grad_norm", "train"),
    ):
        assert (series.column, series.split) == (column, split)
        assert (series.epoch.tolist(), series.value.tolist()) == _column(metrics, column, split)
    # the null sigma68 of epoch 3 is left out, not drawn as 0
    assert curves.sigma68.epoch.tolist() == [1, 2, 4]


def test_best_epoch_is_the_lowest_finite_val_sigma68_the_earliest_of_ties():
    assert best_epoch(_synthetic_metrics([0.02, 0.011, None, 0.015])) == 2
    assert best_epoch(_synthetic_metrics([0.03, 0.01, 0.02, 0.01])) == 2
    assert best_epoch(_synthetic_metrics([float("nan"), 0.5])) == 2
    assert best_epoch(_synthetic_metrics([None, None])) is None
    assert best_epoch(_metrics([])) is None


def test_the_command_line_offers_the_run_folders_checkpoints():
    assert tuple(choice.value for choice in cli.Checkpoint) == CHECKPOINTS
    assert commands.DEFAULT_CHECKPOINT == DEFAULT_CHECKPOINT == "best"


# ---- runs --------------------------------------------------------------------------------------------------


def _worse_on(epochs: set[int]):
    """model.train.evaluate with the returned sigma68 made 10x larger on the ``epochs``-th calls (one per epoch):
    the training itself is unchanged, only which epoch is the best."""
    real = train_module.evaluate
    calls = {"n": 0}

    def evaluate(*args, **kwargs):
        means, sigma = real(*args, **kwargs)
        calls["n"] += 1
        return means, sigma * 10.0 if calls["n"] in epochs else sigma

    return evaluate


def _leaves(params) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


@pytest.fixture(scope="module")
def best_first_run(tiny_dataset, tmp_path_factory) -> Path:
    """A 2-epoch baseline run whose second epoch validates worse: best epoch 1, last epoch 2."""
    out = tmp_path_factory.mktemp("best-first") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "evaluate", _worse_on({2}))
        train_run(tiny_dataset, "baseline", out, preset="test", epochs=2, seed=3)
    return out


@pytest.mark.slow
def test_the_best_checkpoint_is_the_epoch_of_the_lowest_val_sigma68(best_first_run):
    run = best_first_run
    metrics = pl.read_parquet(run / "metrics.parquet")
    val = metrics.filter(pl.col("split") == "val")
    lowest = int(val.sort("sigma68")["epoch"][0])
    assert lowest == 1  # the fixture made epoch 2 worse
    assert checkpoint_epoch(run) == checkpoint_epoch(run, "best") == lowest
    assert checkpoint_epoch(run, "last") == 2
    assert sorted(p.name for p in (run / BEST_CHECKPOINT_DIR).iterdir() if p.name.isdigit()) == [str(lowest)]
    record = json.loads((run / "config.json").read_text())["checkpoints"]
    assert record["evaluation_default"] == "best"
    assert record["best"]["epoch"] == lowest
    assert record["best"]["val_sigma68"] == pytest.approx(float(val.filter(pl.col("epoch") == lowest)["sigma68"][0]))
    assert record["last"]["epoch"] == 2

    # best and last load different parameters: the best those of epoch 1's checkpoint, the last epoch 2's
    config, best = load_run(run)
    _, last = load_run(run, "last")
    epoch_1 = restore_params(run, abstract_params(get_preset("test")[0]), 1)
    for a, b in zip(_leaves(best), _leaves(epoch_1), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(best), _leaves(last), strict=True))
    assert config["model"] == "baseline"

    # what the report's run table says of each choice
    for choice, epoch in (("best", 1), ("last", 2)):
        context = commands.checkpoint_context(run, choice)
        assert context["checkpoint"] == choice
        assert context["checkpoint_epoch"] == epoch
        assert (context["best_epoch"], context["last_epoch"]) == (1, 2)
        assert context["checkpoint_val_sigma68"] == pytest.approx(
            float(val.filter(pl.col("epoch") == epoch)["sigma68"][0])
        )


@pytest.mark.slow
def test_a_run_killed_between_its_best_and_last_checkpoint_resumes_to_the_same_best(tiny_dataset, tmp_path):
    """A kill after the best checkpoint of epoch 2 and before its last one: the resume trains epoch 2 again and
    ends with the best checkpoint an uninterrupted run has (bit for bit)."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    real_save = train_module.save_checkpoint

    def save_then_die(manager, state, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        real_save(manager, state, epoch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "evaluate", _worse_on({1}))  # epoch 2 is the best
        patch.setattr(train_module, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_run(tiny_dataset, "baseline", killed, preset="test", epochs=2, seed=3)
    assert sorted(p.name for p in (killed / BEST_CHECKPOINT_DIR).iterdir() if p.name.isdigit()) == ["1", "2"]
    with pytest.MonkeyPatch.context() as patch:
        # the resumed run validates epoch 2 only (its first call), left as it is; epoch 1's row is kept
        patch.setattr(train_module, "evaluate", _worse_on(set()))
        train_run(tiny_dataset, "baseline", killed, preset="test", epochs=2, seed=3, resume=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "evaluate", _worse_on({1}))
        train_run(tiny_dataset, "baseline", straight, preset="test", epochs=2, seed=3)
    assert checkpoint_epoch(killed) == checkpoint_epoch(straight) == 2
    assert sorted(p.name for p in (killed / BEST_CHECKPOINT_DIR).iterdir() if p.name.isdigit()) == ["2"]
    for a, b in zip(_leaves(load_run(killed)[1]), _leaves(load_run(straight)[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert read_metrics(killed).drop("seconds").equals(read_metrics(straight).drop("seconds"))


@pytest.mark.slow
def test_training_curves_are_drawn_into_the_run_folder(tiny_baseline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_baseline_run, run)
    path = commands.write_training_curves(run)
    assert path == run / "training_curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "training_curves.pdf").read_bytes()[:5] == b"%PDF-"
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_a_run_without_a_best_checkpoint_and_an_unknown_choice_are_refused(tiny_baseline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_baseline_run, run)
    with pytest.raises(ConfigError, match="unknown checkpoint 'first'"):
        load_run(run, "first")
    shutil.rmtree(run / BEST_CHECKPOINT_DIR)
    with pytest.raises(RunError, match=r"no best checkpoint.*--checkpoint last"):
        load_run(run)
    assert load_run(run, "last")[1]
    before = snapshot(run)
    result = run_muontrack(
        "evaluate", "--data", tmp_path / "nothing", "--run", run, "--out", tmp_path / "r", "--checkpoint", "first"
    )
    assert_one_line_error(result, "--checkpoint")
    assert result.returncode == 2
    assert snapshot(run) == before
    assert not (tmp_path / "r").exists()
