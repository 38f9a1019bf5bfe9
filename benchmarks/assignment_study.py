"""Seed and lambda study of the two end-to-end schemes: `e2e` (soft weights) vs `assignment` (hard windows).

Kortus et al. (arXiv 2407.13420) found blackbox interpolation strengths lambda of 25-75 useful and the
predictions unstable between seeds. This script measures the same for the muon problem: it trains `e2e`
and `assignment` (one run per blackbox lambda) with several seeds on one dataset and reports, per model,
the mean over seeds of sigma68(q/pT) (over successful fits) and of the AUC (with the standard error of
the mean), and the disagreement between seeds' per-hit decisions: the share of test hits on which two seeds
decide differently (weight > 0.5 for `e2e`, the hard selection for `assignment`), averaged over all pairs.

    python benchmarks/assignment_study.py [--events 20000] [--seeds 0 1 2] [--lambdas 25 75] [--preset cpu]

One `key=value` line per run and per model, then a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def decisions(dataset, run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Test-split per-hit (keys, score, decision) and per-event q/pT residuals of one run."""
    from model.config import ModelConfig
    from model.inference import forward_fn, inference_buckets, load_run
    from model.train import device_batch
    from pipeline.batches import Geometry, iter_batches, split_summary

    config, params = load_run(run_dir)
    geometry = Geometry.from_detector(dataset.config.detector)
    forward = forward_fn(ModelConfig.from_dict(config["model_config"]), config["model"], geometry)
    _, max_hits = split_summary(dataset, "test")
    buckets = inference_buckets(tuple(config["train_config"]["node_buckets"]), max_hits)
    keys, scores, decided, labels, residuals = [], [], [], [], []
    for batch in iter_batches(dataset, "test", 32, buckets):
        score, (reco, *_) = forward(params, device_batch(batch))
        weight = reco.hit_weight
        mask = batch.mask & batch.event_mask[:, None]
        keys.append(batch.event_id[:, None].repeat(batch.mask.shape[1], 1)[mask] * 4096 + batch.hit_id[mask])
        scores.append(np.asarray(score)[mask])
        decided.append(np.asarray(weight)[mask] > 0.5)
        labels.append(batch.label[mask] > 0.5)
        real = batch.event_mask
        residual = np.asarray(reco.q_over_pt)[real] * batch.pt[real] * batch.q[real] - 1
        # a failed fit (status != 0) is no measurement: NaN, counted as a failure below
        residuals.append(np.where(np.asarray(reco.status)[real] == 0, residual, np.nan))
    order = np.argsort(np.concatenate(keys))
    return (
        np.concatenate(scores)[order],
        np.concatenate(decided)[order],
        np.concatenate(labels)[order],
        np.concatenate(residuals),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[25.0, 75.0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("assignment-study"))
    args = parser.parse_args()

    from analysis.metrics import auc, sigma68
    from model.train import assignment_objective, register_objective, train_run
    from pipeline.config import SimConfig
    from pipeline.dataset import open_dataset
    from pipeline.errors import RunError
    from simulation.dataset import simulate_dataset

    data = args.out / "data"
    simulate_dataset(data, n_events=args.events, seed=12345, config=SimConfig(shard_events=5_000))
    dataset = open_dataset(data)
    models = {"e2e": "e2e"}
    for lam in args.lambdas:
        name = f"assignment-lam{lam:g}"
        register_objective(assignment_objective(name, interpolation=lam))
        models[name] = name

    results: dict[str, list[tuple[float, float, np.ndarray]]] = {}
    for label, objective in models.items():
        for seed in args.seeds:
            run = args.out / "runs" / f"{label}-s{seed}"
            t0 = time.perf_counter()
            if not (run / "metrics.parquet").is_file():
                try:
                    train_run(data, model=objective, out=run, preset=args.preset, seed=seed)
                except RunError as err:  # a diverged run is a result too: report it, go on
                    print(f"model={label} seed={seed} diverged=1 error={str(err)!r}", flush=True)
                    continue
            score, decided, truth, residual = decisions(dataset, run)
            failed = float(np.mean(~np.isfinite(residual)))
            s68 = sigma68(residual) if failed < 1 else float("nan")
            area = auc(score, truth)
            results.setdefault(label, []).append((s68, area, decided))
            print(
                f"model={label} seed={seed} sigma68={s68:.4f} auc={area:.4f} failed_fits={failed:.4f} "
                f"selected_fraction={decided.mean():.4f} seconds={time.perf_counter() - t0:.0f}",
                flush=True,
            )

    rows = []
    for label, runs in results.items():
        s68 = np.array([r[0] for r in runs])
        areas = np.array([r[1] for r in runs])
        pairs = [np.mean(a[2] != b[2]) for a, b in itertools.combinations(runs, 2)]
        n = len(runs)
        row = {
            "model": label,
            "seeds": n,
            "sigma68": s68.mean(),
            "sigma68_sem": s68.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan"),
            "auc": areas.mean(),
            "auc_sem": areas.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan"),
            "disagreement": float(np.mean(pairs)) if pairs else float("nan"),
            "disagreement_std": float(np.std(pairs, ddof=1)) if len(pairs) > 1 else float("nan"),
        }
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    print("\n| model | seeds | σ68(q/pT), mean ± s.e.m. | AUC, mean ± s.e.m. | seed disagreement of hit decisions |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['seeds']} | {r['sigma68']:.3f} ± {r['sigma68_sem']:.3f} | "
            f"{r['auc']:.4f} ± {r['auc_sem']:.4f} | "
            f"{100 * r['disagreement']:.2f} % ± {100 * r['disagreement_std']:.2f} % |"
        )


if __name__ == "__main__":
    main()
