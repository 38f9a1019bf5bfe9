"""Ablation of the reconstruction chain on the hit scores of trained runs: paper vs robust, charge, fit, K.

    python benchmarks/reconstruction_study.py --data DATASET --run RUN [--run RUN ...] [--split test]

For every run and every chain variant below, the run's network scores the split once and each chain turns
the scores into tracks (model.tracker). One line per (run, chain):

    run=.. model=.. chain=.. sigma68=.. sigma68_err=.. failed_fits=.. events=..

sigma68 of the relative q/pT residual over the successful fits (analysis.metrics), bootstrap error. The
widths are the annealing schedule [mm]; "charge" weights the cluster positions by the strip charge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from analysis import metrics
from classical import predict_classical
from model.inference import predict_run
from model.tracker import PAPER_CHAIN, ROBUST_CHAIN, Chain
from pipeline.dataset import open_dataset

SCHEDULE = ROBUST_CHAIN.widths
VARIANTS: dict[str, Chain] = {
    "paper": PAPER_CHAIN,
    "paper_hyper": Chain(fit="hyper"),
    "paper_charge": Chain(charge_weighted=True),
    "robust_kasa_nocharge": Chain(fit="kasa", widths=SCHEDULE),
    "robust_hyper_nocharge": Chain(fit="hyper", widths=SCHEDULE),
    "robust_kasa": Chain(fit="kasa", widths=SCHEDULE, charge_weighted=True),
    "robust": ROBUST_CHAIN,
    "robust_K3": Chain(fit="hyper", widths=(20.0, 5.0, 1.0), charge_weighted=True),
    "robust_K7": Chain(fit="hyper", widths=(20.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.5), charge_weighted=True),
    "robust_final_1mm": Chain(fit="hyper", widths=(20.0, 5.0, 2.0, 1.0), charge_weighted=True),
    "robust_cut2": Chain(fit="hyper", widths=SCHEDULE, cut=2.0, charge_weighted=True),
    "robust_cut4": Chain(fit="hyper", widths=SCHEDULE, cut=4.0, charge_weighted=True),
    "layers_3": Chain(fit="hyper", widths=SCHEDULE, charge_weighted=True, layer_widths=(0.3, 0.1, 0.03)),
    "layers_5": Chain(fit="hyper", widths=SCHEDULE, charge_weighted=True, layer_widths=(1.0, 0.3, 0.1, 0.05, 0.03)),
    "layers_3_wide": Chain(fit="hyper", widths=SCHEDULE, charge_weighted=True, layer_widths=(0.5, 0.2, 0.1)),
    "layers_5_hits1mm": Chain(
        fit="hyper", widths=(20.0, 5.0, 2.0, 1.0), charge_weighted=True, layer_widths=(1.0, 0.3, 0.1, 0.05, 0.03)
    ),
    "layers_6_narrow": Chain(
        fit="hyper", widths=SCHEDULE, charge_weighted=True, layer_widths=(1.0, 0.3, 0.1, 0.05, 0.03, 0.02)
    ),
    "layers_5_cut2": Chain(
        fit="hyper", widths=SCHEDULE, cut=2.5, charge_weighted=True, layer_widths=(1.0, 0.3, 0.1, 0.05, 0.03)
    ),
    "layers_4_soft": Chain(fit="hyper", widths=SCHEDULE, charge_weighted=True, layer_widths=(0.3, 0.1, 0.05, 0.05)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, action="append", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--chain", action="append", choices=sorted(VARIANTS), help="only these variants")
    parser.add_argument("--classical", action="store_true", help="also the classical reconstruction of the split")
    args = parser.parse_args()
    dataset = open_dataset(args.data)
    events = dataset.events().select("event_id", "pt", "q")
    names = args.chain or list(VARIANTS)
    if args.classical:
        tracks = predict_classical(dataset, split=args.split)["tracks"]
        _print_row("-", "classical", metrics.track_residual_table(tracks.lazy(), events))
    for run in args.run:
        tracks = predict_run(dataset, run, split=args.split, rows=tuple((name, VARIANTS[name]) for name in names))[
            "tracks"
        ]
        residuals = metrics.track_residual_table(tracks.lazy(), events)
        for name in names:
            _print_row(run.name, name, residuals.filter(pl.col("model") == name))


def _print_row(run: str, chain: str, rows: pl.DataFrame) -> None:
    ok = rows.filter(pl.col("fit_ok"))["residual"].to_numpy()
    sigma, err = metrics.bootstrap_sigma68(ok, n_boot=200, seed=0) if ok.size else (np.nan, np.nan)
    print(
        f"run={run} chain={chain} sigma68={sigma:.5f} sigma68_err={err:.5f} "
        f"failed_fits={1 - ok.size / max(rows.height, 1):.4f} events={rows.height}",
        flush=True,
    )


if __name__ == "__main__":
    main()
