"""Where the blackbox perturbation moves the `assignment` model's selection (the "why" of its collapse).

Trains (or reuses) a BCE-only network (`baseline` for a few epochs: the same network as the assignment
model's warm-up), then, on validation batches, solves the per-layer window problem at the logits w and at
w - lambda * dL/dy (Vlastelica et al.'s perturbed weights, dL/dy the gradient of lambda_pt * L_pT at the
hard selection y) and counts which strips the perturbation drops and adds:

    python benchmarks/blackbox_probe.py --data DATASET [--run RUN] [--epochs 4] [--lambdas 2 25 50] [--batches 8]

One line per lambda: lambda_bb=.. selected=.. perturbed_selected=.. dropped=.. dropped_signal=.. added=..
added_beyond_5mm=.. mean_abs_dl_dy=..
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# This script's own folder comes first on sys.path; keep it from shadowing project packages.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, default=Path("blackbox-probe-run"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[2.0, 25.0, 50.0])
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()

    import jax
    import numpy as np

    from model.assignment import solve_windows
    from model.config import ModelConfig
    from model.fit import STATUS_OK
    from model.inference import load_run
    from model.losses import pt_loss
    from model.tracker import reconstruct
    from model.train import device_batch, gat, train_run
    from pipeline.batches import Geometry, iter_batches
    from pipeline.dataset import open_dataset

    if not (args.run / "metrics.parquet").is_file():
        train_run(args.data, "baseline", args.run, preset="cpu", epochs=args.epochs, seed=0)
    dataset = open_dataset(args.data)
    geometry = Geometry.from_detector(dataset.config.detector)
    config, params = load_run(args.run)
    apply = gat(ModelConfig.from_dict(config["model_config"])).apply
    lambda_pt = config["train_config"]["lambda_pt"]
    n_layers, half_width = geometry.n_layers, 2 * geometry.pitch  # the assignment model's default window
    solve = jax.vmap(solve_windows, in_axes=(0, 0, 0, 0, None, None))
    totals = {lam: np.zeros(7) for lam in args.lambdas}
    buckets = tuple(config["train_config"]["node_buckets"])
    for index, batch in enumerate(iter_batches(dataset, "val", 32, buckets)):
        if index >= args.batches:
            break
        device = device_batch(batch)
        logits = apply({"params": params}, device.features, device.mask)
        y = solve(logits, device.x, device.layer, device.mask, n_layers, half_width)

        def loss_of(selection, device=device):
            reco = reconstruct(selection, device, geometry)
            return lambda_pt * pt_loss(reco.q_over_pt, device.q, device.pt, device.event_mask, reco.status == STATUS_OK)

        grad = jax.grad(loss_of)(y)
        layer = np.clip(batch.layer, 0, n_layers - 1)
        distance = np.abs(batch.x - np.take_along_axis(np.nan_to_num(batch.x_true), layer, axis=1))
        selected, real = np.asarray(y) > 0.5, batch.mask
        for lam in args.lambdas:
            perturbed = np.asarray(
                solve(logits - lam * grad, device.x, device.layer, device.mask, n_layers, half_width)
            )
            perturbed = perturbed > 0.5
            dropped, added = selected & ~perturbed & real, ~selected & perturbed & real
            totals[lam] += [
                (selected & real).sum(),
                (perturbed & real).sum(),
                dropped.sum(),
                (dropped & (batch.label > 0)).sum(),
                added.sum(),
                (added & (distance > 5.0)).sum(),
                np.abs(np.asarray(grad))[real].mean() / args.batches,
            ]
    for lam, t in totals.items():
        print(
            f"lambda_bb={lam:g} selected={t[0]:.0f} perturbed_selected={t[1]:.0f} dropped={t[2]:.0f} "
            f"dropped_signal={t[3]:.0f} added={t[4]:.0f} added_beyond_5mm={t[5]:.0f} mean_abs_dl_dy={t[6]:.3g}",
            flush=True,
        )


if __name__ == "__main__":
    main()
