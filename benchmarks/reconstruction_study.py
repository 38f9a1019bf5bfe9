"""Ablation of the reconstruction chain on the hit scores of trained runs: paper vs robust, charge, fit, K.

    python -m benchmarks.reconstruction_study --data DATASET [--run RUN ...] [--split test] [--classical] [--references]

For every run and every chain variant below, the run's network scores the split once and each chain turns
the scores into tracks (model.tracker). One line per (run, chain):

    run=.. chain=.. sigma68=.. sigma68_err=.. failed_fits=.. events=..

sigma68 of the relative q/pT residual over the successful fits (analysis.statistics), bootstrap error. The
widths are the annealing schedule [mm]; "charge" weights the cluster positions by the strip charge.

``--classical`` adds the classical reconstruction of the split (run=-); ``--references`` adds, for every
chain, the hit weights that need no network (run=labels: the truth labels, the best scores a classifier could
give; run=ones: every strip at weight 1, no classifier at all). Together they bound what the network's scores
can change in a chain. ``--run`` may then be left out.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import polars as pl

from analysis import metrics, statistics
from classical import predict_classical
from model.inference import BUCKET_STEP, predict_run
from model.steps import device_batch
from model.tracker import PAPER_CHAIN, ROBUST_CHAIN, ROBUST_CIRCLE_CHAIN, Chain, reconstruct
from pipeline.batches import Geometry, iter_batches, split_summary
from pipeline.cache import enable_compilation_cache
from pipeline.dataset import open_dataset

#: the circle-fit variants ablate the robust chain as it was before the scattering-aware fit
#: (ROBUST_CIRCLE_CHAIN: layer widths in mm); the scatter_* ones ablate ROBUST_CHAIN (layer widths in pulls)
VARIANTS: dict[str, Chain] = {
    "paper": PAPER_CHAIN,
    "paper_hyper": Chain(fit="hyper"),
    "paper_charge": Chain(charge_weighted=True),
    "robust": ROBUST_CHAIN,
    "robust_circle": ROBUST_CIRCLE_CHAIN,
    "robust_kasa": replace(ROBUST_CIRCLE_CHAIN, fit="kasa"),
    "robust_nocharge": replace(ROBUST_CIRCLE_CHAIN, charge_weighted=False),
    "robust_kasa_nocharge": replace(ROBUST_CIRCLE_CHAIN, fit="kasa", charge_weighted=False),
    "hits_only": replace(ROBUST_CIRCLE_CHAIN, layer_widths=()),
    "hits_only_cut3": replace(ROBUST_CIRCLE_CHAIN, layer_widths=(), cut=3.0),
    "hits_K3": replace(ROBUST_CIRCLE_CHAIN, widths=(20.0, 5.0, 1.0)),
    "hits_end_1mm": replace(ROBUST_CIRCLE_CHAIN, widths=(20.0, 5.0, 2.0, 1.0)),
    "clusters_K3": replace(ROBUST_CIRCLE_CHAIN, layer_widths=(0.3, 0.1, 0.03)),
    "clusters_end_50um": replace(ROBUST_CIRCLE_CHAIN, layer_widths=(1.0, 0.3, 0.1, 0.07, 0.05)),
    "clusters_end_20um": replace(ROBUST_CIRCLE_CHAIN, layer_widths=(1.0, 0.3, 0.1, 0.05, 0.03, 0.02)),
    "cut2": replace(ROBUST_CIRCLE_CHAIN, cut=2.0),
    "cut3": replace(ROBUST_CIRCLE_CHAIN, cut=3.0),
    "scatter_no_layer_steps": replace(ROBUST_CHAIN, layer_widths=()),
    "scatter_K3": replace(ROBUST_CHAIN, layer_widths=(10.0, 4.0, 2.0)),
    "scatter_end_3": replace(ROBUST_CHAIN, layer_widths=(30.0, 10.0, 5.0, 3.0)),
    "scatter_end_1.5": replace(ROBUST_CHAIN, layer_widths=(30.0, 10.0, 5.0, 3.0, 2.0, 1.5)),
    # the hit-level steps of ROBUST_CHAIN: do they trim clean clusters (issue 25's clean-cluster σ68)?
    "scatter_hits_end_1mm": replace(ROBUST_CHAIN, widths=(20.0, 5.0, 2.0, 1.0)),
    "scatter_hits_end_2mm": replace(ROBUST_CHAIN, widths=(20.0, 5.0, 2.0)),
    "scatter_no_hit_steps": replace(ROBUST_CHAIN, widths=()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, action="append", default=[])
    parser.add_argument("--split", default="test")
    parser.add_argument("--chain", action="append", choices=sorted(VARIANTS), help="only these variants")
    parser.add_argument("--classical", action="store_true", help="also the classical reconstruction of the split")
    parser.add_argument("--references", action="store_true", help="also truth-label and unit hit weights")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="the runs' checkpoint")
    args = parser.parse_args()
    enable_compilation_cache()
    dataset = open_dataset(args.data)
    events = dataset.events().select("event_id", "pt", "q")
    names = args.chain or list(VARIANTS)
    if args.classical:
        tracks = predict_classical(dataset, split=args.split)["tracks"]
        _print_row("-", "classical", metrics.track_residual_table(tracks.lazy(), events))
    if args.references:
        for weights, rows in reference_residuals(dataset, args.split, names).items():
            for name in names:
                _print_row(weights, name, rows.filter(pl.col("chain") == name))
    for run in args.run:
        tracks = predict_run(
            dataset,
            run,
            split=args.split,
            checkpoint=args.checkpoint,
            rows=tuple((name, VARIANTS[name]) for name in names),
        )["tracks"]
        residuals = metrics.track_residual_table(tracks.lazy(), events)
        for name in names:
            _print_row(run.name, name, residuals.filter(pl.col("model") == name))


def reference_residuals(dataset, split: str, names: list[str]) -> dict[str, pl.DataFrame]:
    """{"labels" | "ones": DataFrame(chain, fit_ok, residual)} of the no-network hit weights through each chain."""
    geometry = Geometry.from_detector(dataset.config.detector)
    _, max_hits = split_summary(dataset, split)
    buckets = (BUCKET_STEP * max(1, math.ceil(max_hits / BUCKET_STEP)),)
    reconstruct_jit = jax.jit(reconstruct, static_argnums=(2, 3))
    parts: dict[str, list[pl.DataFrame]] = {"labels": [], "ones": []}
    for batch in iter_batches(dataset, split, 64, buckets):
        real = batch.event_mask
        for weights_name, weights in (("labels", batch.label), ("ones", batch.mask.astype(np.float32))):
            for name in names:
                reco = reconstruct_jit(weights, device_batch(batch), geometry, VARIANTS[name])
                fit_ok = np.asarray(reco.status)[real] == 0
                residual = np.asarray(reco.q_over_pt)[real] * batch.pt[real] * batch.q[real] - 1
                parts[weights_name].append(
                    pl.DataFrame({"chain": name, "fit_ok": fit_ok, "residual": np.where(fit_ok, residual, np.nan)})
                )
    return {key: pl.concat(frames) for key, frames in parts.items()}


def _print_row(run: str, chain: str, rows: pl.DataFrame) -> None:
    ok = rows.filter(pl.col("fit_ok"))["residual"].to_numpy()
    sigma, err = statistics.bootstrap_sigma68(ok, n_boot=200, seed=0) if ok.size else (np.nan, np.nan)
    print(
        f"run={run} chain={chain} sigma68={sigma:.5f} sigma68_err={err:.5f} "
        f"failed_fits={1 - ok.size / max(rows.height, 1):.4f} events={rows.height}",
        flush=True,
    )


if __name__ == "__main__":
    main()
