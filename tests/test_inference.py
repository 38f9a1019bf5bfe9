"""Prediction tables: schemas, one row per test hit / event / layer, the truth references against plain
Polars group-bys of the Parquet rows, padding independence, and refusal of foreign or unfinished runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from polars.testing import assert_frame_equal

from model.inference import inference_buckets, load_run, predict_run, predict_truth
from pipeline.batches import split_expr
from pipeline.config import BackgroundConfig, SimConfig
from pipeline.dataset import open_dataset
from pipeline.errors import RunError
from pipeline.schema import PRED_CLUSTERS_SCHEMA, PRED_HITS_SCHEMA, PRED_TRACKS_SCHEMA
from simulation.shards import simulate_dataset
from tests.conftest import TINY_EVENTS, TINY_SEED

SCHEMAS = {"hits": PRED_HITS_SCHEMA, "clusters": PRED_CLUSTERS_SCHEMA, "tracks": PRED_TRACKS_SCHEMA}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inference")


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return open_dataset(tiny_dataset)


@pytest.fixture(scope="module")
def run_dir(tiny_baseline_run) -> Path:
    return tiny_baseline_run


@pytest.fixture(scope="module")
def predictions(dataset, run_dir):
    return predict_run(dataset, run_dir, split="test")


@pytest.fixture(scope="module")
def truth(dataset):
    return predict_truth(dataset, split="test")


@pytest.fixture(scope="module")
def test_hits(dataset) -> pl.DataFrame:
    return dataset.hits().filter(split_expr("test")).collect()


@pytest.fixture(scope="module")
def test_events(dataset) -> pl.DataFrame:
    return dataset.events().filter(split_expr("test")).sort("event_id").collect()


def test_tables_have_the_documented_columns_and_types(predictions, truth):
    for tables in (predictions, truth):
        assert set(tables) == {"hits", "clusters", "tracks"}
        for name, schema in SCHEMAS.items():
            assert tables[name].schema == pl.from_arrow(schema.empty_table()).schema, name
    # one network, two reconstruction chains
    assert sorted(predictions["tracks"]["model"].unique().to_list()) == ["baseline", "baseline_paper"]
    assert sorted(truth["tracks"]["model"].unique().to_list()) == ["truth", "truth_charge", "truth_share"]


def test_truth_share_rows_score_the_muons_share_of_each_strip(truth, test_hits):
    """The truth_share reference's hit scores are charge_muon / charge of the dataset's hits, clipped to [0, 1]."""
    scores = truth["hits"].filter(pl.col("model") == "truth_share").sort("event_id", "hit_id")
    hits = test_hits.sort("event_id", "hit_id")
    assert scores["hit_id"].to_list() == hits["hit_id"].to_list()
    expected = np.clip(hits["charge_muon"].to_numpy() / hits["charge"].to_numpy(), 0, 1)
    np.testing.assert_allclose(scores["score"].to_numpy(), expected, rtol=1e-6)
    assert np.any((expected > 0.1) & (expected < 0.9))


def test_one_row_per_test_hit_event_and_layer(predictions, truth, test_hits, test_events):
    n_layers = 16
    expected_hits = test_hits.select("event_id", "hit_id").sort("event_id", "hit_id")
    assert test_events.height > 10
    for model, tables in [
        ("baseline", predictions),
        ("baseline_paper", predictions),
        ("truth", truth),
        ("truth_charge", truth),
    ]:
        hits = tables["hits"].filter(pl.col("model") == model)
        assert hits.select("event_id", "hit_id").equals(expected_hits), model
        tracks = tables["tracks"].filter(pl.col("model") == model)
        assert_array_equal(tracks["event_id"].to_numpy(), test_events["event_id"].to_numpy())
        clusters = tables["clusters"].filter(pl.col("model") == model)
        assert clusters.height == n_layers * test_events.height
        assert_array_equal(clusters["layer"].to_numpy(), np.tile(np.arange(n_layers), test_events.height))
        # x_true is the event's truth, layer by layer
        assert_allclose(clusters["x_true"].to_numpy(), np.stack(test_events["x_true"].to_list()).reshape(-1))
    scores = predictions["hits"]["score"].to_numpy()
    assert np.all((scores >= 0) & (scores <= 1))
    assert scores.std() > 0
    assert set(predictions["tracks"]["q_pred"].unique().to_list()) <= {-1, 1}


def test_truth_clusters_are_the_mean_of_the_signal_strips(truth, test_hits):
    signal = test_hits.filter(pl.col("is_signal"))
    reference = signal.group_by("event_id", "layer").agg(
        mean_x=pl.col("x").cast(pl.Float64).mean(),
        n_strips=pl.len(),
        centroid=(pl.col("x").cast(pl.Float64) * pl.col("charge")).sum() / pl.col("charge").sum(),
        charge=pl.col("charge").sum(),
    )
    clusters = truth["clusters"].pivot(
        on="model", index=["event_id", "layer"], values=["x_reco", "weight"], aggregate_function="first"
    )
    joined = reference.join(clusters, on=["event_id", "layer"], how="inner")
    assert joined.height == reference.height > 100
    assert_allclose(joined["x_reco_truth"].to_numpy(), joined["mean_x"].to_numpy(), atol=2e-3)
    assert_allclose(joined["weight_truth"].to_numpy(), joined["n_strips"].to_numpy(), rtol=1e-6)
    assert_allclose(joined["x_reco_truth_charge"].to_numpy(), joined["centroid"].to_numpy(), atol=2e-3)
    # truth_charge's layers keep their strips' count times their pull gate (the robust chain's cluster-level
    # steps: at most sigmoid(cut^2 / 2) for a zero pull, about 0 for a layer whose cluster another particle moved)
    kept_share = joined["weight_truth_charge"].to_numpy() / joined["n_strips"].to_numpy()
    assert np.all(kept_share <= 1 / (1 + np.exp(-0.5 * 2.5**2)) + 1e-5)
    assert np.mean(kept_share > 0.5) > 0.9
    # the truth scores are the labels
    hits = truth["hits"].filter(pl.col("model") == "truth").join(test_hits, on=["event_id", "hit_id"])
    assert_array_equal(hits["score"].to_numpy(), hits["is_signal"].to_numpy().astype(np.float32))
    # and the truth fit recovers the muon's charge for nearly every event
    tracks = truth["tracks"].filter(pl.col("model") == "truth")
    assert (tracks["fit_status"] == 0).mean() > 0.9


def test_predictions_do_not_depend_on_the_node_budget(dataset, run_dir, predictions, tmp_path):
    """The same run with tiny buckets: inference extends them to fit every event, and the scores agree."""
    small = tmp_path / "small"
    shutil.copytree(run_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["train_config"]["node_buckets"] = [64]
    config["train_config"]["batch_size"] = 3
    (small / "config.json").write_text(json.dumps(config))
    again = predict_run(dataset, small, split="test")
    for name in ("hits", "tracks"):
        assert again[name].height == predictions[name].height
    assert_allclose(again["hits"]["score"].to_numpy(), predictions["hits"]["score"].to_numpy(), atol=1e-5)
    assert_allclose(
        again["tracks"]["q_over_pt_pred"].to_numpy(), predictions["tracks"]["q_over_pt_pred"].to_numpy(), rtol=1e-3
    )
    assert inference_buckets((64,), 130) == (64, 192)
    assert inference_buckets((128, 256), 200) == (128, 256)


def test_a_run_of_another_config_is_refused(root, run_dir):
    other = root / "other"
    config = SimConfig(background=BackgroundConfig(noise_strips_per_layer=2.0), shard_events=50)
    simulate_dataset(other, n_events=50, seed=21, config=config)
    with pytest.raises(RunError, match="trained on another detector config"):
        predict_run(other, run_dir)


def test_missing_or_unfinished_runs_are_refused(run_dir, tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="not a training run"):
        load_run(tmp_path / "empty")
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    shutil.copy(run_dir / "config.json", no_checkpoint / "config.json")
    with pytest.raises(RunError, match="no checkpoint"):
        load_run(no_checkpoint)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    config = json.loads((unfinished / "config.json").read_text())
    config["train_config"]["epochs"] = 4
    (unfinished / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="incomplete"):
        load_run(unfinished)
    # each checkpoint is read only when chosen: a damaged one is refused with its name and epoch
    for folder, choice in (("checkpoints", "last"), ("best_checkpoint", "best")):
        damaged = tmp_path / f"damaged-{choice}"
        shutil.copytree(run_dir, damaged)
        for item in (damaged / folder).rglob("*"):
            if item.is_file():
                item.unlink()
        with pytest.raises(RunError, match=rf"the {choice} checkpoint \(epoch 1\) is unreadable"):
            load_run(damaged, choice)
    config, params = load_run(run_dir)
    assert config["model"] == "baseline"
    assert params


def test_a_run_applies_to_the_same_physics_cut_into_other_shards(root, run_dir, dataset):
    resharded = root / "resharded"
    simulate_dataset(resharded, n_events=TINY_EVENTS, seed=TINY_SEED, config=SimConfig(shard_events=100))
    assert open_dataset(resharded).config.config_hash() != dataset.config.config_hash()
    tracks = predict_run(resharded, run_dir, split="test")["tracks"]
    assert_frame_equal(tracks, predict_run(dataset, run_dir, split="test")["tracks"])
