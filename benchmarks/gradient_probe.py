"""The gradient of L_pT through the robust chain, event by event: where e2e's training gradient explodes.

    python -m benchmarks.gradient_probe --data DATASET --run RUN [--batches 40]

With the hit weights of a trained run (sigmoid of its scores), on the first ``--batches`` training batches of the
cpu preset's shape, prints one ``key=value`` line per measurement:

    events=.. median=.. p99=.. max=.. above_1e3=.. above_1e6=..     |dL_pT/dw| per event (float32)
    worst_event batch=.. event=.. float32=.. float64=..             the worst event alone, in both precisions
    worst_hit layer=.. weight=.. gradient=.. layer_weight=..        its five largest components

Measured on the 8 x background dataset of the cpu scan with its baseline run (docs/scan.md, "The full scan"): median
0.011, 1 % above 10^3, max 6.7e5; the worst event 1.1e7 (float32) and 2.1e7 (float64), on hits of weight ~1e-7 of
layers the chain drops (final layer weights 1e-19 to 1e-50).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from model.hyperparameters import ModelConfig, get_preset
from model.inference import load_run
from model.losses import reconstructed_pt_loss
from model.steps import device_batch, gat
from model.tracker import ROBUST_CHAIN, reconstruct
from pipeline.batches import Geometry, iter_batches
from pipeline.dataset import open_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dataset folder")
    parser.add_argument("--run", required=True, help="a trained run (baseline or e2e) on that dataset's physics")
    parser.add_argument("--batches", type=int, default=40, help="training batches to probe")
    args = parser.parse_args()

    dataset = open_dataset(args.data)
    geometry = Geometry.from_detector(dataset.config.detector)
    config, params = load_run(args.run)
    network = gat(ModelConfig.from_dict(config["model_config"]))
    _, train_config = get_preset("cpu")

    def loss(weights, batch):
        return reconstructed_pt_loss(weights, batch, geometry, ROBUST_CHAIN)[0]

    @jax.jit
    def per_event(params, batch):
        weights = jnp.where(
            batch.mask, jax.nn.sigmoid(network.apply({"params": params}, batch.features, batch.mask)), 0
        )
        # L_pT is a mean over the batch: event e's term depends on its own weights only
        gradient = jax.grad(loss)(weights, batch)
        return jnp.sqrt(jnp.sum(gradient * gradient, axis=1)), weights

    found = []
    batches = iter_batches(dataset, "train", train_config.batch_size, train_config.node_buckets)
    for index, raw in zip(range(args.batches), batches, strict=False):
        batch = device_batch(raw)
        norms, weights = per_event(params, batch)
        for event in np.flatnonzero(np.asarray(batch.event_mask)):
            found.append((float(norms[event]), index, int(event), batch, np.asarray(weights)[event : event + 1]))
    norms = np.array([row[0] for row in found])
    print(
        f"events={norms.size} median={np.median(norms):.4g} p99={np.quantile(norms, 0.99):.4g} max={norms.max():.4g} "
        f"above_1e3={int((norms > 1e3).sum())} above_1e6={int((norms > 1e6).sum())}"
    )

    _, index, event, batch, weights = max(found, key=lambda row: row[0])
    one = jax.tree.map(lambda a: np.asarray(a)[event : event + 1], batch)
    g32 = np.asarray(jax.grad(loss)(weights, one))[0]
    with jax.enable_x64(True):
        one64 = jax.tree.map(lambda a: a.astype(np.float64) if a.dtype == np.float32 else a, one)
        g64 = np.asarray(jax.grad(loss)(weights.astype(np.float64), one64))[0]
        layer_weight = np.asarray(reconstruct(weights.astype(np.float64), one64, geometry, ROBUST_CHAIN).layer_weight)[
            0
        ]
    print(
        f"worst_event batch={index} event={event} float32={np.linalg.norm(g32):.4g} float64={np.linalg.norm(g64):.4g}"
    )
    layers = np.asarray(one.layer)[0]
    for hit in np.argsort(-np.abs(g32))[:5]:
        print(
            f"worst_hit layer={layers[hit]} weight={weights[0, hit]:.3g} gradient={g32[hit]:.4g} "
            f"layer_weight={layer_weight[layers[hit]]:.3g}"
        )


if __name__ == "__main__":
    main()
