"""Does end-to-end training beat the factorised baseline in the robust chain? Seeds and lambda, as measured.

    python -m benchmarks.e2e_study --data DATASET [--seeds 0 1 2] [--lambdas 0.5 2] [--preset cpu] [--out DIR]

Trains `baseline` (BCE only) and `e2e` (BCE + lambda * L_pT through model.tracker.ROBUST_CHAIN) with every
seed, and `e2e` once per extra lambda (first seed only), all on the train split of DATASET, and evaluates
each on the test split through the robust chain. One ``key=value`` line per run:

    model=.. lambda=.. seed=.. sigma68=.. sigma68_err=.. auc=.. auc_weight=.. failed_fits=.. seconds=..

then a Markdown table per (model, lambda): the mean over seeds with its standard error, and the paired
difference e2e - baseline per seed (same seed, same warm-up: the two runs share their first epochs exactly,
so the difference measures what the pT term changed). sigma68 (analysis.statistics) of the relative q/pT
residual over the successful fits with a bootstrap error; auc of the raw scores, auc_weight of the chain's
final hit weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import polars as pl

from analysis import metrics, statistics
from model.hyperparameters import PRESETS
from model.inference import predict_run
from model.train import train_run
from pipeline.cache import enable_compilation_cache
from pipeline.dataset import open_dataset


def evaluate(dataset, run: Path, model: str) -> dict[str, float]:
    """sigma68 (+ bootstrap error), failed-fit share, AUC of scores and of final weights on the test split."""
    tables = predict_run(dataset, run, split="test")
    events = dataset.events().select("event_id", "pt", "q")
    residuals = metrics.track_residual_table(tables["tracks"].filter(pl.col("model") == model).lazy(), events)
    ok = residuals.filter(pl.col("fit_ok"))["residual"].to_numpy()
    sigma, err = statistics.bootstrap_sigma68(ok, n_boot=200, seed=0)
    labels = (
        dataset.hits()
        .select("event_id", "hit_id", "is_signal")
        .join(tables["hits"].filter(pl.col("model") == model).lazy(), on=["event_id", "hit_id"], how="inner")
        .collect()
    )
    truth = labels["is_signal"].to_numpy()
    return {
        "sigma68": sigma,
        "sigma68_err": err,
        "failed_fits": 1 - ok.size / max(residuals.height, 1),
        "auc": statistics.auc(labels["score"].to_numpy(), truth),
        "auc_weight": statistics.auc(labels["weight"].to_numpy(), truth),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[], help="extra e2e lambdas (first seed)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("e2e-study"))
    args = parser.parse_args()
    enable_compilation_cache()
    dataset = open_dataset(args.data)
    model_config, train_config = PRESETS[args.preset]

    plan = [("baseline", train_config.lambda_pt, seed) for seed in args.seeds]
    plan += [("e2e", train_config.lambda_pt, seed) for seed in args.seeds]
    plan += [("e2e", lam, args.seeds[0]) for lam in args.lambdas if lam != train_config.lambda_pt]
    results: dict[tuple[str, float, int], dict[str, float]] = {}
    for model, lam, seed in plan:
        preset = args.preset
        if lam != train_config.lambda_pt:
            preset = f"{args.preset}-lambda{lam:g}"
            PRESETS[preset] = (model_config, dataclasses.replace(train_config, lambda_pt=lam))
        run = args.out / "runs" / f"{model}-{preset}-s{seed}"
        t0 = time.perf_counter()
        train_run(args.data, model=model, out=run, preset=preset, seed=seed)
        row = {**evaluate(dataset, run, model), "seconds": time.perf_counter() - t0}
        results[(model, lam, seed)] = row
        print(
            f"model={model} lambda={lam:g} seed={seed} " + " ".join(f"{k}={v:.5f}" for k, v in row.items()),
            flush=True,
        )

    print("\n| model | λ | seeds | σ68(q/pT), mean ± s.e.m. | AUC (score) | AUC (weight) | failed fits |")
    print("|---|---|---|---|---|---|---|")
    for model, lam in dict.fromkeys((m, lam) for m, lam, _ in plan):
        rows = [r for (m, la, _), r in results.items() if (m, la) == (model, lam)]
        cells = []
        for key, digits in (("sigma68", 5), ("auc", 4), ("auc_weight", 4)):
            values = np.array([r[key] for r in rows])
            if values.size > 1:
                sem = values.std(ddof=1) / np.sqrt(values.size)
                cells.append(f"{values.mean():.{digits}f} ± {sem:.{digits}f}")
            else:
                cells.append(f"{values[0]:.{digits}f}")
        failed = ", ".join(f"{100 * r['failed_fits']:.2f} %" for r in rows)
        print(f"| {model} | {lam:g} | {len(rows)} | {' | '.join(cells)} | {failed} |")

    lam0 = train_config.lambda_pt
    paired = [
        (seed, results[("e2e", lam0, seed)], results[("baseline", lam0, seed)])
        for seed in args.seeds
        if ("e2e", lam0, seed) in results and ("baseline", lam0, seed) in results
    ]
    if paired:
        print("\n| seed | σ68 e2e − baseline | in units of the bootstrap error | AUC e2e − baseline |")
        print("|---|---|---|---|")
        for seed, e2e, base in paired:
            diff = e2e["sigma68"] - base["sigma68"]
            err = float(np.hypot(e2e["sigma68_err"], base["sigma68_err"]))
            print(f"| {seed} | {diff:+.5f} | {diff / err:+.1f} | {e2e['auc'] - base['auc']:+.4f} |")


if __name__ == "__main__":
    main()
