"""Training: steps lower the loss, the objectives differ where they should, resume is exact, bad input is refused.

Uses the 'test' preset on a tiny simulated dataset (module-scoped, a few hundred events).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import polars as pl
import pytest
from numpy.testing import assert_allclose

import model.run_folder as run_folder_module
import model.train as train_module
from model.hyperparameters import get_preset
from model.inference import checkpoint_epoch, load_run, predict_run
from model.objectives import OBJECTIVES, Objective, get_objective, sigmoid_weights
from model.run_folder import read_metrics, read_run_config
from model.steps import create_train_state, device_batch, learning_rate_schedule, train_step
from model.tracker import Chain
from model.train import format_epoch, train_run
from pipeline.batches import Geometry, iter_batches
from pipeline.dataset import open_dataset
from pipeline.errors import ConfigError, DatasetError, RunError
from pipeline.schema import TRAIN_METRICS_SCHEMA
from pipeline.stats import finite_sigma68 as sigma68
from tests.helpers import run_muontrack, snapshot


@pytest.fixture(scope="module")
def dataset_dir(tiny_dataset) -> Path:
    """The session's tiny dataset (tests/conftest.py: 300 events, seed 11, shards of 150); read only."""
    return tiny_dataset


@pytest.fixture(scope="module")
def dataset(dataset_dir):
    from pipeline.dataset import open_dataset

    return open_dataset(dataset_dir)


@pytest.fixture(scope="module")
def first_batch(dataset):
    _, train_config = get_preset("test")
    return device_batch(next(iter_batches(dataset, "train", train_config.batch_size, train_config.node_buckets)))


def _state(dataset, batch, objective, learning_rate=None, estimator=None):
    model_config, train_config = get_preset("test")
    if learning_rate is not None:
        train_config = dataclasses.replace(train_config, learning_rate=learning_rate)
    if estimator is not None:
        train_config = dataclasses.replace(train_config, estimator=estimator)
    geometry = Geometry.from_detector(dataset.config.detector)
    return create_train_state(
        jax.random.key(0), model_config, train_config, batch, geometry=geometry, objective=objective
    )


# ---- steps -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("objective", "lam", "warmup_steps"), [("baseline", 0.0, 0), ("e2e_paper", 0.5, 40)])
def test_training_steps_lower_the_loss(dataset, first_batch, objective, lam, warmup_steps):
    state = _state(dataset, first_batch, objective, learning_rate=1e-2)
    # as in training, e2e first learns on the BCE alone: the fits of an untrained network are garbage
    # (|r| > 10), where L_pT is capped and passes no gradient (model.losses.FAILED_FIT_LOSS)
    for step in range(warmup_steps):
        state, _ = train_step(state, first_batch, jax.random.key(1000 + step), jnp.float32(0.0))
    losses = []
    for step in range(40):
        state, metrics = train_step(state, first_batch, jax.random.key(step), jnp.float32(lam))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    # fitting one batch: the BCE of the baseline drops by a few per cent, the e2e_paper loss (dominated by L_pT) by
    # far more. (e2e through the robust chain starts from a small L_pT after the warm-up and, at this learning
    # rate, oscillates on one batch: not asserted here)
    assert np.mean(losses[-5:]) < 0.96 * losses[0]
    assert int(state.step) == 40 + warmup_steps


ESTIMATOR_STEPS = ("blackbox", "perturbed", "identity")


def _assignment_steps(dataset, estimator: str) -> list[dict[str, float]]:
    """30 `assignment` train steps on one batch: the warm-up (Hamming and BCE), then the pT term as well; per step
    the BCE + Hamming, the loss, selected_layers, solver_grad_nonzero and solver_grad."""
    model_config, train_config = get_preset("test")
    train_config = dataclasses.replace(train_config, learning_rate=1e-2, estimator=estimator)
    batch = device_batch(next(iter_batches(dataset, "train", train_config.batch_size, train_config.node_buckets)))
    geometry = Geometry.from_detector(dataset.config.detector)
    state = create_train_state(
        jax.random.key(0), model_config, train_config, batch, geometry=geometry, objective="assignment"
    )
    steps = []
    for step in range(30):
        lam = jnp.float32(0.0 if step < 15 else 0.5)
        state, metrics = train_step(state, batch, jax.random.key(step), lam)
        metrics = {key: float(value) for key, value in metrics.items()}
        steps.append({"bce_hamming": metrics["bce"] + metrics["hamming"], **metrics})
    return steps


@pytest.fixture(scope="module")
def assignment_steps(dataset) -> dict[str, list[dict[str, float]]]:
    """:func:`_assignment_steps` per estimator (in this process: the XLA aborts that once sent them to a process
    of their own were the suite exhausting Linux's memory mappings, tests/conftest.py)."""
    return {estimator: _assignment_steps(dataset, estimator) for estimator in ESTIMATOR_STEPS}


@pytest.mark.slow
@pytest.mark.parametrize(
    "estimator",
    [
        pytest.param(
            "blackbox",
            # measured 2026-12-07 with today's resolved dependencies, identical at the previous revision (0bbc303)
            # and at this one: after the pT term switches on the loss goes 38.3, 25.6 (step 20), 30.1, 36.4, 42.6,
            # 36.4, 36.4, so the last three do not end below the first; not asserted until understood
            marks=pytest.mark.xfail(strict=False, reason="blackbox's loss with the pT term is noisy over 15 steps"),
        ),
        "perturbed",
        pytest.param(
            "identity",
            # measured, not wished away: with the pT term on, identity passes dL/dz through unbounded, the
            # solver's gradient outweighs the BCE's by 1e4-1e7 (docs/studies.md, the assignment study); the loss rises
            marks=pytest.mark.xfail(strict=True, reason="identity diverges once the pT term is on"),
        ),
    ],
)
def test_assignment_steps_lower_the_loss_without_shrinking_the_selection(assignment_steps, estimator):
    steps = assignment_steps[estimator]
    for metrics in steps:
        assert 0 < metrics["solver_grad_nonzero"] <= 1
        assert metrics["solver_grad"] > 0
    losses = np.array([(m["bce_hamming"], m["loss"]) for m in steps])
    selected = [m["selected_layers"] for m in steps]
    warmup, full = losses[:15], losses[15:]
    assert np.all(np.isfinite(losses))
    assert np.mean(warmup[-3:, 0]) < 0.97 * warmup[0, 0]
    # the share of layers that choose a window (not "no hit") does not shrink: no collapse towards nothing
    assert min(selected[-3:]) >= selected[0]
    assert np.mean(full[-3:, 1]) < full[0, 1]


@pytest.mark.slow
def test_gradient_split_is_exact_for_a_model_trained_on_the_bce_alone(dataset, first_batch):
    state = _state(dataset, first_batch, "baseline")
    _, metrics = train_step(state, first_batch, jax.random.key(0), jnp.float32(0.5))
    assert float(metrics["bce_grad"]) > 0
    # baseline's pT term sees stopped gradients: nothing but the BCE reaches the logits, not even rounding
    assert float(metrics["solver_grad"]) == 0.0
    assert float(metrics["solver_grad_nonzero"]) == 0.0
    assert "hamming" not in metrics
    assert "selected_layers" not in metrics
    # e2e's pT term reaches the logits through the chain once lambda > 0
    _, e2e = train_step(_state(dataset, first_batch, "e2e"), first_batch, jax.random.key(0), jnp.float32(0.5))
    assert float(e2e["solver_grad"]) > 0
    assert float(e2e["solver_grad_nonzero"]) > 0


@pytest.mark.slow
def test_lambda_drives_e2e_but_not_baseline(dataset, first_batch):
    def params_after_one_step(objective, lam):
        state = _state(dataset, first_batch, objective, learning_rate=1e-2)
        state, metrics = train_step(state, first_batch, jax.random.key(0), jnp.float32(lam))
        return jax.tree.leaves(state.params), metrics

    base_0, base_metrics = params_after_one_step("baseline", 0.0)
    base_5, _ = params_after_one_step("baseline", 0.5)
    for a, b in zip(base_0, base_5, strict=True):
        np.testing.assert_array_equal(a, b)  # the baseline ignores lambda
    assert np.isfinite(float(base_metrics["pt_loss"]))  # but still reports L_pT

    e2e_0, e2e_metrics_0 = params_after_one_step("e2e", 0.0)
    e2e_5, e2e_metrics_5 = params_after_one_step("e2e", 0.5)
    assert any(not np.allclose(a, b) for a, b in zip(e2e_0, e2e_5, strict=True))  # L_pT has a gradient
    # with lambda = 0 the e2e objective is the baseline's: the same step
    for a, b in zip(e2e_0, base_0, strict=True):
        assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert_allclose(
        float(e2e_metrics_5["loss"]), float(e2e_metrics_5["bce"]) + 0.5 * float(e2e_metrics_5["pt_loss"]), rtol=1e-5
    )
    assert_allclose(float(e2e_metrics_0["loss"]), float(e2e_metrics_0["bce"]), rtol=1e-6)


@pytest.mark.slow
def test_train_step_reports_the_global_norm_of_the_gradients(dataset, first_batch):
    state = _state(dataset, first_batch, "e2e")
    key, lam = jax.random.key(3), jnp.float32(0.5)
    objective = get_objective("e2e")

    @jax.jit
    def gradients(params):
        def loss(params):
            logits = state.apply_fn({"params": params}, first_batch.features, first_batch.mask)
            return objective.loss_fn(logits, first_batch, state.geometry, lam, key)[0]

        return jax.grad(loss)(params)

    grads = gradients(state.params)
    after, metrics = train_step(state, first_batch, key, lam)
    assert float(metrics["grad_norm"]) > 0
    assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-5)
    # read only: the update is the optimiser's update of those gradients (clipped, Adam)
    updates, _ = state.tx.update(grads, state.opt_state, state.params)
    for a, b in zip(
        jax.tree.leaves(after.params), jax.tree.leaves(optax.apply_updates(state.params, updates)), strict=True
    ):
        assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_lambda_schedule():
    _, train_config = get_preset("test")
    warmup = train_config.lambda_warmup_epochs
    e2e, baseline = get_objective("e2e"), get_objective("baseline")
    assert [e2e.lam(epoch, train_config) for epoch in range(1, warmup + 3)] == [0.0] * warmup + [
        train_config.lambda_pt
    ] * 2
    assert all(baseline.lam(epoch, train_config) == 0.0 for epoch in range(1, warmup + 3))


def test_sigma68_matches_its_definition():
    rng = np.random.default_rng(0)
    residuals = rng.normal(0.3, 2.0, 200_001)
    # for a Gaussian, the central 68.27 % interval is +-1 sigma around the median
    assert abs(sigma68(residuals) - 2.0) < 0.03
    # median 1.5; sorted |r - m| = .5, .5, 1.5, 8.5; linear 0.68 quantile at position 0.68 * 3 = 2.04
    values = np.array([0.0, 1.0, 2.0, 10.0])
    assert sigma68(values) == pytest.approx(1.5 + 0.04 * 7.0)
    assert sigma68(np.append(values, [np.inf, np.nan])) == sigma68(values)  # failed fits are left out


# ---- runs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_and_straight(dataset_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    resumed, straight = root / "resumed", root / "straight"
    train_run(dataset_dir, "e2e", resumed, preset="test", epochs=2, seed=4)
    first_part = read_metrics(resumed)
    summary = train_run(dataset_dir, "e2e", resumed, preset="test", epochs=3, seed=4, resume=True)
    train_run(dataset_dir, "e2e", straight, preset="test", epochs=3, seed=4)
    return resumed, straight, first_part, summary


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(resumed_and_straight):
    resumed, straight, first_part, summary = resumed_and_straight
    assert "3 epochs" in summary
    for checkpoint in ("last", "best"):
        config_resumed, params_resumed = load_run(resumed, checkpoint)
        _, params_straight = load_run(straight, checkpoint)
        assert config_resumed["train_config"]["epochs"] == 3
        for a, b in zip(jax.tree.leaves(params_resumed), jax.tree.leaves(params_straight), strict=True):
            assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # the best checkpoint: the same epoch, recorded alike in both config.json files
    assert checkpoint_epoch(resumed) == checkpoint_epoch(straight)
    records = [json.loads((run / "config.json").read_text())["checkpoints"] for run in (resumed, straight)]
    assert records[0] == records[1]
    assert records[0]["best"]["epoch"] == checkpoint_epoch(resumed)
    assert records[0]["last"]["epoch"] == 3

    metrics_resumed, metrics_straight = read_metrics(resumed), read_metrics(straight)
    assert metrics_resumed.schema == pl.from_arrow(TRAIN_METRICS_SCHEMA.empty_table()).schema
    assert metrics_resumed.height == 6  # a train and a val row per epoch
    assert metrics_resumed.drop("seconds").equals(metrics_straight.drop("seconds"))
    assert metrics_resumed.head(4).drop("seconds").equals(first_part.drop("seconds"))
    # the lambda schedule of the test preset (1 warm-up epoch) is in the rows, and steps grow
    assert metrics_resumed.filter(pl.col("split") == "train")["lambda"].to_list() == [0.0, 0.5, 0.5]
    assert metrics_resumed["step"].is_sorted()
    assert metrics_resumed["step"][0] > 0
    # checkpoints: one per epoch, only the newest keep_checkpoints (2 in the test preset) kept
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    config = json.loads((resumed / "config.json").read_text())
    assert config["model"] == "e2e"
    assert config["preset"] == "test"
    assert config["seed"] == 4
    assert config["dataset"]["n_events"] == 300
    assert len(config["dataset"]["config_hash"]) == 16


@pytest.mark.slow
def test_existing_runs_are_refused_and_left_untouched(resumed_and_straight, dataset_dir, tmp_path, monkeypatch):
    resumed, _, _, _ = resumed_and_straight
    before = snapshot(resumed, mtimes=False)
    with pytest.raises(RunError, match="finished run"):
        train_run(dataset_dir, "e2e", resumed, preset="test", epochs=3, seed=4)
    with pytest.raises(RunError, match="another run"):
        train_run(dataset_dir, "baseline", resumed, preset="test", epochs=3, seed=4, resume=True)
    with pytest.raises(RunError, match="another run"):
        train_run(dataset_dir, "e2e", resumed, preset="test", epochs=3, seed=5, resume=True)
    assert "nothing to do" in train_run(dataset_dir, "e2e", resumed, preset="test", epochs=3, seed=4, resume=True)
    # the same settings under other training code: never resumed, never served as this code's result
    with monkeypatch.context() as patch:
        patch.setattr(run_folder_module, "code_version", lambda: "0.1.0+edited")
        with pytest.raises(RunError, match=r"another run \(different code_version\)"):
            train_run(dataset_dir, "e2e", resumed, preset="test", epochs=3, seed=4, resume=True)
    assert snapshot(resumed, mtimes=False) == before

    # an unfinished run asks for --resume
    unfinished = tmp_path / "unfinished"
    shutil.copytree(resumed, unfinished)
    config = json.loads((unfinished / "config.json").read_text())
    config["train_config"]["epochs"] = 5
    (unfinished / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="--resume"):
        train_run(dataset_dir, "e2e", unfinished, preset="test", epochs=5, seed=4)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: (run / "metrics.parquet").write_bytes(b"PAR1 garbage"), "not a metrics table"),
        (lambda run: _edit_run_config(run, train_config=None), "no train_config section"),
        (lambda run: (run / "config.json").write_text("{not json"), "not readable JSON"),
    ],
    ids=["garbage-metrics", "null-train-config", "config-not-json"],
)
def test_a_damaged_run_is_refused_on_resume_and_left_as_it_was(
    tiny_baseline_run, dataset_dir, tmp_path, damage, message
):
    """Damage that once gave a traceback (after config.json had been rewritten): one RunError, nothing written."""
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_baseline_run, damaged)
    _edit_run_config(
        damaged, train_config={**json.loads((damaged / "config.json").read_text())["train_config"], "epochs": 5}
    )
    damage(damaged)
    before = snapshot(damaged)
    with pytest.raises(RunError, match=message):
        train_run(dataset_dir, "baseline", damaged, preset="test", epochs=5, seed=0, resume=True)
    assert snapshot(damaged) == before


def _edit_run_config(run: Path, **changes) -> None:
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | changes))


def test_training_and_inference_leave_the_jax_compilation_cache_alone(dataset_dir, tmp_path):
    """JAX's persistent compilation cache is global configuration: the entry points turn it on
    (pipeline.cache.enable_compilation_cache), never train_run or predict_run."""
    configured = jax.config.jax_compilation_cache_dir  # tests/conftest.py's
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        run = tmp_path / "run"
        train_run(dataset_dir, "baseline", run, preset="test", epochs=1, overrides={"train": {"max_train_events": 16}})
        predict_run(dataset_dir, run)
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", configured)


def test_bad_inputs_raise_the_right_errors(dataset_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DatasetError):
        train_run(tmp_path / "missing", "e2e", out, preset="test")
    incomplete = tmp_path / "incomplete"
    (incomplete / "hits").mkdir(parents=True)
    with pytest.raises(DatasetError, match="incomplete"):
        train_run(incomplete, "e2e", out, preset="test")
    with pytest.raises(ConfigError, match="unknown model"):
        train_run(dataset_dir, "transformer", out, preset="test")
    with pytest.raises(ConfigError, match="unknown preset"):
        train_run(dataset_dir, "e2e", out, preset="huge")
    with pytest.raises(ConfigError, match="epochs"):
        train_run(dataset_dir, "e2e", out, preset="test", epochs=0)
    assert not out.exists()

    # a folder of someone else's files
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="holds no muontrack run"):
        train_run(dataset_dir, "e2e", foreign, preset="test", resume=True)
    assert snapshot(foreign, mtimes=False) == {"notes.txt": hashlib.sha256(b"keep me").hexdigest()}
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunError, match="is a file"):
        train_run(dataset_dir, "e2e", a_file, preset="test")


def test_a_nan_loss_stops_training_with_a_run_error(dataset_dir, tmp_path, monkeypatch):
    def nan_loss(logits, _batch, _geometry, _lam, _key):
        loss = jnp.mean(logits) * jnp.nan
        return loss, {"bce": loss, "pt_loss": loss, "q_over_pt": jnp.zeros(logits.shape[0])}

    nan_objective = Objective(
        "nan_test", nan_loss, sigmoid_weights, uses_lambda=True, reported_as=(("nan_test", Chain()),)
    )
    monkeypatch.setitem(OBJECTIVES, "nan_test", nan_objective)
    with pytest.raises(RunError, match="loss is nan at epoch 1"):
        train_run(dataset_dir, "nan_test", tmp_path / "nan", preset="test", epochs=1)


def _muontrack(*arguments: str | Path) -> None:
    result = run_muontrack(*arguments, timeout=600)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_assignment_run_records_its_estimator_diagnostics_and_predicts_one_window_per_layer(dataset_dir, tmp_path):
    # through the CLI, as a user trains and evaluates it
    from model.assignment import HALF_WIDTH_PITCH

    run, report = tmp_path / "assignment", tmp_path / "report"
    _muontrack(
        "train",
        "--data",
        dataset_dir,
        "--model",
        "assignment",
        "--out",
        run,
        "--preset",
        "test",
        "--epochs",
        "2",
        "--estimator",
        "perturbed",
    )
    assert read_run_config(run)["train_config"]["estimator"] == "perturbed"
    metrics = read_metrics(run)
    train = metrics.filter(pl.col("split") == "train")
    assert train["lambda"].to_list() == [0.0, 0.5]
    # the collapse diagnostics, per epoch: the share of layers that chose a window, and the solver's gradients
    selected = metrics["selected_layers"].to_numpy()
    assert selected.size == 4
    assert np.all((selected > 0.5) & (selected <= 1))
    assert metrics["hamming"].null_count() == 0
    for column in ("solver_grad", "solver_grad_nonzero", "bce_grad"):
        assert train[column].null_count() == 0
        assert (train[column] > 0).all()
    _muontrack("evaluate", "--data", dataset_dir, "--run", run, "--out", report)
    predicted = pl.read_parquet(report / "predictions" / "hits.parquet").filter(pl.col("model") == "assignment")
    # the hits that carry weight on a layer all lie in one window (|x - x_c| <= 2 pitches of its centre)
    pitch = open_dataset(dataset_dir).config.detector.pitch
    hits = open_dataset(dataset_dir).hits().select("event_id", "hit_id", "layer", "x").collect()
    spans = (
        hits.join(predicted, on=["event_id", "hit_id"])
        .filter(pl.col("weight") > 0)
        .group_by("event_id", "layer")
        .agg(span=pl.col("x").max() - pl.col("x").min())
    )
    assert spans.height > 0
    assert spans["span"].max() <= 2 * HALF_WIDTH_PITCH * pitch + 1e-4


# ---- per-epoch diagnostics and progress -------------------------------------------------------------------


@pytest.fixture(scope="module")
def diagnosed_runs(dataset_dir, tmp_path_factory):
    """Two 2-epoch e2e runs of one seed under a decaying learning rate: one reporting to an ``on_epoch``
    callback, one with the CLI's progress display (and no callback)."""
    model_config, train_config = get_preset("test")
    train_config = dataclasses.replace(train_config, lr_half_life_steps=10)
    root = tmp_path_factory.mktemp("diagnosed")
    calls: list[dict] = []
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "configure", lambda _name, _overrides=None: (model_config, train_config))
        train_run(dataset_dir, "e2e", root / "callback", preset="test", epochs=2, seed=7, on_epoch=calls.append)
        with contextlib.redirect_stdout(printed):
            train_run(dataset_dir, "e2e", root / "progress", preset="test", epochs=2, seed=7, progress=True)
    return {
        "train_config": train_config,
        "callback": root / "callback",
        "progress": root / "progress",
        "calls": calls,
        "printed": printed.getvalue(),
    }


@pytest.mark.slow
def test_metrics_hold_grad_norm_learning_rate_and_val_sigma68_per_epoch(diagnosed_runs):
    metrics = read_metrics(diagnosed_runs["callback"])
    assert metrics.schema == pl.from_arrow(TRAIN_METRICS_SCHEMA.empty_table()).schema
    for column in ("grad_norm", "learning_rate", "sigma68"):
        assert metrics.schema[column] == pl.Float32
    train = metrics.filter(pl.col("split") == "train").sort("epoch")
    val = metrics.filter(pl.col("split") == "val").sort("epoch")
    assert train["epoch"].to_list() == val["epoch"].to_list() == [1, 2]
    # one value per epoch: the training figures on train rows, sigma68 on val rows, null elsewhere
    assert train["grad_norm"].null_count() == train["learning_rate"].null_count() == val["sigma68"].null_count() == 0
    assert val["grad_norm"].null_count() == val["learning_rate"].null_count() == train["sigma68"].null_count() == 2

    grad_norm = train["grad_norm"].to_numpy()
    assert np.all(np.isfinite(grad_norm))
    assert np.all(grad_norm > 0)
    # the optimiser's own schedule at the count of each epoch's last step; it decays from epoch to epoch
    schedule = learning_rate_schedule(diagnosed_runs["train_config"])
    expected = [np.float32(schedule(step - 1)) for step in train["step"].to_list()]
    assert train["learning_rate"].to_list() == expected
    assert expected[1] < expected[0] < diagnosed_runs["train_config"].learning_rate
    sigma = val["sigma68"].to_numpy()
    assert np.all(np.isfinite(sigma))
    assert np.all(sigma > 0)


@pytest.mark.slow
def test_on_epoch_is_called_once_per_epoch_with_its_figures(diagnosed_runs):
    calls = diagnosed_runs["calls"]
    assert [info["epoch"] for info in calls] == [1, 2]
    metrics = read_metrics(diagnosed_runs["callback"])
    for info in calls:
        rows = metrics.filter(pl.col("epoch") == info["epoch"])
        train = rows.filter(pl.col("split") == "train").row(0, named=True)
        val = rows.filter(pl.col("split") == "val").row(0, named=True)
        assert info["model"] == "e2e"
        assert info["epochs"] == 2
        assert info["step"] == train["step"]
        for key, value in [
            ("train_loss", train["loss"]),
            ("train_bce", train["bce"]),
            ("train_pt_loss", train["pt_loss"]),
            ("val_loss", val["loss"]),
            ("val_bce", val["bce"]),
            ("val_pt_loss", val["pt_loss"]),
            ("val_sigma68", val["sigma68"]),
            ("grad_norm", train["grad_norm"]),
            ("learning_rate", train["learning_rate"]),
            ("lambda", train["lambda"]),
            ("train_seconds", train["seconds"]),
            ("val_seconds", val["seconds"]),
        ]:
            assert_allclose(info[key], value, rtol=1e-6, err_msg=key)
        assert info["seconds"] == pytest.approx(info["train_seconds"] + info["val_seconds"])
        line = format_epoch(info)
        assert line.startswith(f"e2e epoch {info['epoch']}/2: train loss {info['train_loss']:.4f}")
        assert f"val sigma68(q/pT) {info['val_sigma68']:.4f}" in line
        assert line.endswith(" s")


@pytest.mark.slow
def test_progress_prints_one_line_per_epoch_and_the_weights_do_not_depend_on_reporting(diagnosed_runs):
    printed = [line for line in diagnosed_runs["printed"].splitlines() if ": train loss " in line]
    assert [line.split(":")[0] for line in printed] == ["e2e epoch 1/2", "e2e epoch 2/2"]
    # the callback and the display only read: the same seed gives bit-identical weights and the same figures
    _, with_callback = load_run(diagnosed_runs["callback"])
    _, with_progress = load_run(diagnosed_runs["progress"])
    for a, b in zip(jax.tree.leaves(with_callback), jax.tree.leaves(with_progress), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (
        read_metrics(diagnosed_runs["callback"])
        .drop("seconds")
        .equals(read_metrics(diagnosed_runs["progress"]).drop("seconds"))
    )


def test_val_sigma68_is_null_when_no_fit_succeeds(dataset_dir, tmp_path, monkeypatch):
    def no_fit_loss(logits, batch, _geometry, _lam, _key):
        bce = jnp.mean(jnp.where(batch.mask, logits, 0.0) ** 2)
        return bce, {"bce": bce, "pt_loss": bce, "q_over_pt": jnp.full(logits.shape[0], jnp.nan)}

    objective = Objective(
        "no_fit_test", no_fit_loss, sigmoid_weights, uses_lambda=False, reported_as=(("no_fit_test", Chain()),)
    )
    monkeypatch.setitem(OBJECTIVES, "no_fit_test", objective)
    calls: list[dict] = []
    train_run(dataset_dir, "no_fit_test", tmp_path / "run", preset="test", epochs=1, on_epoch=calls.append)
    val = read_metrics(tmp_path / "run").filter(pl.col("split") == "val")
    assert val["sigma68"].to_list() == [None]
    assert len(calls) == 1
    assert calls[0]["val_sigma68"] is None
    assert "sigma68" not in format_epoch(calls[0])
