"""The share models (#25): the truth share in the batches, positions from shares, the objectives, the gradient
through the robust chain, and the merged-cluster and share-residual tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose

from analysis import metrics as m
from model.objectives import get_objective
from model.tracker import ROBUST_CHAIN, Chain, reconstruct, reconstruct_event
from pipeline.batches import Geometry, iter_batches
from pipeline.dataset import open_dataset

BUCKETS = (128, 256)


def _dataset_hits(dataset_path) -> dict[str, np.ndarray]:
    """Every hit column of the dataset, read with pyarrow (not through the code under test)."""
    table = pq.read_table(sorted((dataset_path / "hits").glob("*.parquet")))
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _batches(dataset_path, split="test"):
    return list(iter_batches(open_dataset(dataset_path), split, 16, BUCKETS))


def test_batch_share_is_the_muons_share_of_the_strip_charge(tiny_dataset):
    hits = _dataset_hits(tiny_dataset)
    expected = np.clip(hits["charge_muon"] / hits["charge"], 0, 1)
    index = {(int(e), int(h)): k for k, (e, h) in enumerate(zip(hits["event_id"], hits["hit_id"], strict=True))}
    seen = 0
    for batch in _batches(tiny_dataset, split=None):
        rows, columns = np.nonzero(batch.mask)
        keys = [index[int(batch.event_id[r]), int(batch.hit_id[r, c])] for r, c in zip(rows, columns, strict=True)]
        assert_allclose(batch.share[rows, columns], expected[keys], rtol=1e-6)
        assert np.all(batch.share[~batch.mask] == 0)
        seen += len(keys)
    assert seen == len(expected)
    # the tiny dataset has merged strips (the test would pass with shares = labels otherwise)
    assert np.sum((expected > 0.1) & (expected < 0.9)) > 20


def test_truth_shares_give_the_centroid_of_the_muons_own_charge(tiny_dataset):
    """Positions from shares: with s = the truth share, Σ s·q·x / Σ s·q is the centroid of the muon's own charge."""
    hits = _dataset_hits(tiny_dataset)
    config = open_dataset(tiny_dataset).config
    geometry = Geometry.from_detector(config.detector)
    chain = Chain(fit="hyper", charge_weighted=True)  # the robust chain's clustering, before any step
    compared = 0
    for batch in _batches(tiny_dataset):
        reco = reconstruct(jnp.asarray(batch.share), batch, geometry, chain)
        x_hat = np.asarray(reco.x_hat)
        for row, event_id in enumerate(batch.event_id):
            if not batch.event_mask[row]:
                continue
            of_event = hits["event_id"] == event_id
            for layer in range(config.detector.n_layers):
                on_layer = of_event & (hits["layer"] == layer)
                muon_charge = hits["charge_muon"][on_layer].astype(np.float64)
                if muon_charge.sum() <= 0:
                    continue
                centroid = np.sum(muon_charge * hits["x"][on_layer]) / muon_charge.sum()
                assert x_hat[row, layer] == pytest.approx(centroid, abs=2e-3)
                compared += 1
    assert compared > 100


def test_zero_one_shares_reproduce_the_label_models(tiny_dataset):
    """With shares of 0/1 equal to the labels, the share models are the label models: same loss, same q/pT."""
    geometry = Geometry.from_detector(open_dataset(tiny_dataset).config.detector)
    batch = _batches(tiny_dataset)[0]
    batch = batch._replace(share=batch.label.copy())
    logits = jnp.asarray(np.random.default_rng(0).normal(size=batch.mask.shape), jnp.float32)
    for share_model, label_model in (("share_e2e", "e2e"), ("share_baseline", "baseline")):
        share_loss, share_aux = get_objective(share_model).loss_fn(logits, batch, geometry, 0.5, jax.random.key(0))
        label_loss, label_aux = get_objective(label_model).loss_fn(logits, batch, geometry, 0.5, jax.random.key(0))
        assert float(share_loss) == float(label_loss)
        assert np.array_equal(np.asarray(share_aux["q_over_pt"]), np.asarray(label_aux["q_over_pt"]))
    # ... and with the true shares the target, hence the loss, differs (the test can fail)
    true_batch = _batches(tiny_dataset)[0]
    share_loss, _ = get_objective("share_baseline").loss_fn(logits, true_batch, geometry, 0.0, jax.random.key(0))
    label_loss, _ = get_objective("baseline").loss_fn(logits, true_batch, geometry, 0.0, jax.random.key(0))
    assert float(share_loss) != float(label_loss)


def test_share_objectives_train_against_the_share():
    """The BCE of the share models is minimal where sigmoid(logit) equals the truth share."""
    from model.losses import bce_loss

    share = jnp.asarray([[0.0, 0.3, 0.7, 1.0]])
    mask = jnp.ones_like(share, bool)
    gradient = jax.grad(bce_loss)(jnp.log(share / (1 - share) + 1e-30).clip(-30, 30), share, mask)
    assert_allclose(np.asarray(gradient), 0, atol=1e-6)


@pytest.mark.slow
def test_q_over_pt_gradient_in_the_share_logits_matches_finite_differences(tiny_dataset):
    geometry = Geometry.from_detector(open_dataset(tiny_dataset).config.detector)
    batch = _batches(tiny_dataset)[0]
    rng = np.random.default_rng(3)
    row = int(np.argmax(np.sum((batch.share > 0.1) & (batch.share < 0.9), axis=1)))  # the event with most merging
    share = np.clip(batch.share[row], 0.02, 0.98)
    logits0 = np.log(share / (1 - share)) + rng.normal(0, 0.3, share.shape)
    mask = batch.mask[row]
    x, layer, charge = batch.x[row], batch.layer[row], batch.features[row, :, 2]
    with jax.enable_x64(True):

        def q_over_pt(logits):
            weights = jnp.where(jnp.asarray(mask), jax.nn.sigmoid(logits), 0.0)
            return reconstruct_event(
                weights,
                jnp.asarray(x, jnp.float64),
                jnp.asarray(layer, jnp.int32),
                jnp.asarray(charge, jnp.float64),
                geometry,
                ROBUST_CHAIN,
            )[3].q_over_pt

        logits = jnp.asarray(logits0, jnp.float64)
        grad = np.asarray(jax.grad(q_over_pt)(logits))
        assert np.any(grad[mask] != 0)
        for direction in rng.normal(size=(3, logits.size)) * mask:
            h = 1e-5
            numeric = (q_over_pt(logits + h * direction) - q_over_pt(logits - h * direction)) / (2 * h)
            assert_allclose(grad @ direction, float(numeric), rtol=1e-4, atol=1e-9)


def _sigma68(values: np.ndarray) -> float:
    return float(np.quantile(np.abs(values - np.median(values)), 0.68))


def test_share_residual_and_merged_cluster_tables_against_numpy():
    rng = np.random.default_rng(5)
    n = 400
    event_id = np.repeat(np.arange(40), 10)
    hit_id = np.tile(np.arange(10), 40)
    layer = np.tile(np.repeat(np.arange(5), 2), 40)
    charge = rng.uniform(0.2, 1.0, n)
    share = np.where(rng.uniform(size=n) < 0.3, rng.uniform(0, 1, n), rng.choice([0.0, 1.0], n))
    dataset_hits = pl.LazyFrame(
        {
            "event_id": event_id,
            "hit_id": hit_id.astype(np.int32),
            "layer": layer.astype(np.int16),
            "charge": charge.astype(np.float32),
            "charge_muon": (share * charge).astype(np.float32),
        }
    )
    score = np.clip(share + rng.normal(0, 0.1, n), 0, 1)
    pred_hits = pl.LazyFrame(
        {
            "event_id": np.concatenate([event_id, event_id]),
            "hit_id": np.concatenate([hit_id, hit_id]).astype(np.int32),
            "model": ["share_e2e"] * n + ["truth"] * n,
            "score": np.concatenate([score, share]).astype(np.float32),
        }
    )
    table = m.share_residual_table(pred_hits, dataset_hits)
    assert table["model"].unique().to_list() == ["share_e2e"]  # no truth rows
    true_share = np.clip(share.astype(np.float32) * charge.astype(np.float32) / charge.astype(np.float32), 0, 1)
    residual = score.astype(np.float32).astype(np.float64) - true_share.astype(np.float32)
    classes = np.where(true_share <= 0.1, "other", np.where(true_share < 0.9, "merged", "muon"))
    assert table["share_class"].to_list() == ["other", "merged", "muon"]
    for row in table.iter_rows(named=True):
        chosen = classes == row["share_class"]
        assert row["n_hits"] == chosen.sum()
        assert row["bias"] == pytest.approx(np.median(residual[chosen]), abs=1e-6)
        assert row["sigma68"] == pytest.approx(_sigma68(residual[chosen]), abs=1e-6)

    # merged layers: a strip of the muon's with 0.1 < s < 0.9
    merged_layer = {
        (e, ell)
        for e, ell, s, c in zip(event_id, layer, true_share, share * charge, strict=True)
        if c > 0 and 0.1 < s < 0.9
    }
    n_clusters = 200
    clusters = pl.DataFrame(
        {
            "model": ["share_e2e"] * n_clusters,
            "event_id": np.repeat(np.arange(40), 5),
            "layer": np.tile(np.arange(5), 40).astype(np.int16),
            "x_reco": rng.normal(0, 0.01, n_clusters).astype(np.float32),
            "weight": rng.uniform(0, 2, n_clusters).astype(np.float32),
            "x_true": np.where(np.arange(n_clusters) % 13 == 0, np.nan, 0.0).astype(np.float32),
        }
    )
    merged = m.merged_cluster_table(clusters.lazy(), dataset_hits).row(0, named=True)
    is_merged = np.array([(e, ell) in merged_layer for e, ell in clusters.select("event_id", "layer").rows()])
    crossed = np.isfinite(clusters["x_true"].to_numpy())
    used = crossed & (clusters["weight"].to_numpy() >= 0.5)
    residuals = clusters["x_reco"].to_numpy().astype(np.float64)
    assert 0 < (is_merged & used).sum() < used.sum()
    assert merged["n_merged_layers"] == (is_merged & crossed).sum()
    assert merged["n_merged_clusters"] == (is_merged & used).sum()
    assert merged["n_clean_clusters"] == (~is_merged & used).sum()
    assert merged["cluster_sigma68_merged"] == pytest.approx(_sigma68(residuals[is_merged & used]), abs=1e-9)
    assert merged["cluster_sigma68_clean"] == pytest.approx(_sigma68(residuals[~is_merged & used]), abs=1e-9)


@pytest.mark.slow
def test_a_share_run_trains_and_evaluates(tiny_dataset, tmp_path):
    from model.inference import predict_run
    from model.train import train_run

    run = tmp_path / "run"
    train_run(tiny_dataset, "share_e2e", run, preset="test", epochs=1, seed=0)
    frames = predict_run(tiny_dataset, run, split="test")
    assert set(frames["tracks"]["model"].unique()) == {"share_e2e"}
    scores = frames["hits"]["score"].to_numpy()
    assert np.isfinite(scores).all()
    assert np.all((scores >= 0) & (scores <= 1))


def test_share_models_are_registered_but_not_in_the_quick_jobs():
    from pipeline.registry import CPU_JOB_MODELS, REPORT_ROWS, TEST_JOB_MODELS, TRAINED_MODELS

    for name in ("share_baseline", "share_e2e"):
        assert name in TRAINED_MODELS
        assert name in REPORT_ROWS
        assert name not in CPU_JOB_MODELS
        assert name not in TEST_JOB_MODELS
        assert get_objective(name).share_target
        assert get_objective(name).chain == ROBUST_CHAIN
    assert get_objective("share_e2e").uses_lambda
    assert not get_objective("share_baseline").uses_lambda
