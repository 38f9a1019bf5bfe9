"""Seeds x gradient estimators of the `assignment` model (hard windows through a solver) against `e2e`.

    python -m benchmarks.assignment_study --data DATASET [--seeds 0 1 2] [--estimators blackbox identity perturbed]
        [--preset cpu] [--out assignment-study] [--no-report]

Kortus et al. (arXiv 2407.13420) found the predictions of solver-based tracking unstable between seeds. This
trains, on the train split of DATASET, `e2e` once per seed into OUT/runs/e2e-s{seed} and `assignment` once per
seed and gradient estimator (model.assignment) into OUT/runs/assignment-{estimator}-s{seed}. Finished runs are
kept (``resume``: only missing epochs are trained). A RunError (training diverged; or the run folder holds a
run of other code or settings, which is never resumed: choose a new OUT) is printed as ``error=..``, a result
left out of the means. Each run is evaluated on the test split through its chain (model.inference.predict_run).
One ``key=value`` line per run:

    model=.. estimator=.. seed=.. sigma68=.. sigma68_err=.. failed_fits=.. auc=.. seconds=..
    selected_layers=.. solver_grad_nonzero=.. grad_ratio=..

- sigma68 (analysis.statistics) of the relative q/pT residual over the successful fits, with its bootstrap error;
  failed_fits the share of test events whose fit failed; auc that of the raw hit scores.
- seconds: the training time recorded in RUN/metrics.parquet (all epochs, validation included).
- selected_layers, solver_grad_nonzero and grad_ratio = solver_grad / bce_grad: the last epoch's training
  diagnostics of RUN/metrics.parquet (the share of layers with hits given a window; the share of hits that
  receive a gradient from the solver / reconstruction chain; its mean size relative to the BCE gradient's).

Then one ``key=value`` line per (model, estimator) and a Markdown table of the same: the mean over seeds of
sigma68 and AUC with the standard error of the mean, sigma68 relative to e2e's mean, the failed-fit shares of
the seeds, the mean diagnostics, and the seed disagreement: for each pair of seeds the share of test hits
(all of them, matched on event_id and hit_id) that the two runs decide differently (decision: the hit's
weight in its chain's last fit > 0.5), averaged over the pairs, with the standard deviation of that average
over 200 bootstrap resamplings of the test events.

Last (unless ``--no-report``), the report of ``muontrack evaluate`` (flows.commands.evaluate_runs) for the first
seed in OUT/report-s{seed}: `e2e` and `assignment` with the preset's estimator (the report holds one run per
model name, so the other estimators' runs cannot join it), and the sigma68 of each of its rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from analysis import metrics, statistics
from flows.commands import evaluate_runs
from model.hyperparameters import ESTIMATORS, get_preset
from model.inference import predict_run
from model.run_folder import read_metrics
from model.train import train_run
from pipeline.cache import enable_compilation_cache
from pipeline.dataset import open_dataset
from pipeline.errors import RunError

N_BOOT = 200


@dataclass(frozen=True)
class Run:
    model: str
    estimator: str | None  # None for e2e (no solver)
    seed: int
    path: Path

    @property
    def group(self) -> tuple[str, str]:
        return self.model, self.estimator or "-"


def test_metrics(dataset, tables: dict[str, pl.DataFrame], model: str) -> dict[str, float]:
    """sigma68 (+ bootstrap error), failed-fit share and AUC of the scores on the test split (as e2e_study)."""
    events = dataset.events().select("event_id", "pt", "q")
    residuals = metrics.track_residual_table(tables["tracks"].filter(pl.col("model") == model).lazy(), events)
    ok = residuals.filter(pl.col("fit_ok"))["residual"].to_numpy()
    sigma, err = statistics.bootstrap_sigma68(ok, n_boot=N_BOOT, seed=0)
    labels = (
        dataset.hits()
        .select("event_id", "hit_id", "is_signal")
        .join(tables["hits"].filter(pl.col("model") == model).lazy(), on=["event_id", "hit_id"], how="inner")
        .collect()
    )
    return {
        "sigma68": sigma,
        "sigma68_err": err,
        "failed_fits": 1 - ok.size / max(residuals.height, 1),
        "auc": statistics.auc(labels["score"].to_numpy(), labels["is_signal"].to_numpy()),
    }


def diagnostics(run_dir: Path) -> dict[str, float]:
    """The last epoch's training diagnostics of RUN/metrics.parquet (NaN where null)."""
    train = read_metrics(run_dir).filter(pl.col("split") == "train").sort("epoch")
    last = train.row(-1, named=True) if train.height else {}

    def value(key: str) -> float:
        return math.nan if last.get(key) is None else float(last[key])

    bce = value("bce_grad")
    return {
        "selected_layers": value("selected_layers"),
        "solver_grad_nonzero": value("solver_grad_nonzero"),
        "grad_ratio": value("solver_grad") / bce if bce else math.nan,
    }


def training_seconds(run_dir: Path) -> float:
    return float(read_metrics(run_dir)["seconds"].sum())


def decisions(tables: dict[str, pl.DataFrame], model: str) -> pl.DataFrame:
    """(event_id, hit_id, decision) of every test hit: final hit weight > 0.5."""
    hits = tables["hits"].filter(pl.col("model") == model)
    return hits.select("event_id", "hit_id", decision=pl.col("weight") > 0.5)


def seed_disagreement(decided: list[pl.DataFrame], n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """Mean over pairs of runs of the share of hits decided differently, and its bootstrap error over events."""
    if len(decided) < 2:
        return math.nan, math.nan
    wide = decided[0].rename({"decision": "d0"})
    for index, frame in enumerate(decided[1:], start=1):
        wide = wide.join(frame.rename({"decision": f"d{index}"}), on=["event_id", "hit_id"], how="inner")
    if any(frame.height != wide.height for frame in decided):
        raise RuntimeError("the runs' test predictions hold different hits; are they of one dataset?")
    pairs = list(itertools.combinations(range(len(decided)), 2))
    per_event = (
        wide.group_by("event_id")
        .agg(pl.len().alias("n"), *[(pl.col(f"d{a}") != pl.col(f"d{b}")).sum().alias(f"p{a}_{b}") for a, b in pairs])
        .sort("event_id")
    )
    n = per_event["n"].to_numpy().astype(float)  # [E] hits per event
    differ = per_event.select([f"p{a}_{b}" for a, b in pairs]).to_numpy().astype(float)  # [E, pairs]
    value = float((differ.sum(axis=0) / n.sum()).mean())
    rng = np.random.default_rng(seed)
    # each replica resamples the events with replacement: counts[r, e] is how often event e was drawn
    counts = rng.multinomial(n.size, np.full(n.size, 1 / n.size), size=n_boot).astype(float)
    replicas = ((counts @ differ) / (counts @ n)[:, None]).mean(axis=1)
    return value, float(replicas.std(ddof=1))


def mean_sem(values: list[float], digits: int) -> str:
    array = np.asarray(values, dtype=float)
    if array.size == 0 or np.all(np.isnan(array)):
        return "—"
    if array.size == 1:
        return f"{array[0]:.{digits}f}"
    return f"{np.nanmean(array):.{digits}f} ± {np.nanstd(array, ddof=1) / np.sqrt(array.size):.{digits}f}"


def number(value: float, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def seed0_report(args: argparse.Namespace, runs: list[Run], done: set[Run]) -> None:
    """The `muontrack evaluate` report of the first seed: e2e and assignment with the preset's estimator."""
    seed = args.seeds[0]
    default = get_preset(args.preset)[1].estimator
    estimator = default if default in args.estimators else args.estimators[0]
    chosen = [r for r in runs if r.seed == seed and r in done and r.estimator in (None, estimator)]
    if not chosen:
        print(f"\nno report: no run of seed {seed} finished")
        return
    report = evaluate_runs(args.data, [r.path for r in chosen], args.out / f"report-s{seed}", overwrite=True)
    summary = json.loads((report.parent / "summary.json").read_text())
    print(f"\nreport (seed {seed}; assignment with the {estimator} estimator): {report}\n")
    print("| row | σ68(q/pT) | events with a fit |")
    print("|---|---|---|")
    for model, row in summary.items():
        sigma = f"{number(row['sigma68'], '.5f')} ± {number(row['sigma68_err'], '.5f')}"
        print(f"| {model} | {sigma} | {row['n_events']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("assignment-study"))
    parser.add_argument("--no-report", action="store_true", help="skip the seed-0 report")
    args = parser.parse_args()
    enable_compilation_cache()
    dataset = open_dataset(args.data)
    get_preset(args.preset)  # an unknown preset fails before any training

    runs = []
    for seed in args.seeds:
        runs.append(Run("e2e", None, seed, args.out / "runs" / f"e2e-s{seed}"))
        runs += [Run("assignment", e, seed, args.out / "runs" / f"assignment-{e}-s{seed}") for e in args.estimators]

    results: dict[Run, dict[str, float]] = {}
    decided: dict[Run, pl.DataFrame] = {}
    failed: dict[Run, str] = {}
    for run in runs:
        model, estimator = run.group
        head = f"model={model} estimator={estimator} seed={run.seed}"
        try:
            summary = train_run(
                args.data, run.model, run.path, preset=args.preset, seed=run.seed, resume=True, estimator=run.estimator
            )
        except RunError as err:
            failed[run] = str(err)
            print(f"{head} error={json.dumps(str(err))}", flush=True)
            continue
        print(f"{run.path}: {summary}", file=sys.stderr, flush=True)
        tables = predict_run(dataset, run.path, split="test")
        row = {
            **test_metrics(dataset, tables, run.model),
            "seconds": training_seconds(run.path),
            **diagnostics(run.path),
        }
        results[run] = row
        decided[run] = decisions(tables, run.model)
        print(f"{head} " + " ".join(f"{k}={v:.5g}" for k, v in row.items()), flush=True)

    groups = list(dict.fromkeys(run.group for run in runs))
    e2e_rows = [row for run, row in results.items() if run.model == "e2e"]
    e2e_sigma = float(np.mean([r["sigma68"] for r in e2e_rows])) if e2e_rows else math.nan
    lines, table = [], []
    for group in groups:
        members = [run for run in runs if run.group == group and run in results]
        rows = [results[run] for run in members]
        n_failed = sum(run.group == group for run in failed)
        seeds = f"{len(rows)}" + (f" ({n_failed} failed)" if n_failed else "")
        if not rows:
            table.append(f"| {group[0]} | {group[1]} | {seeds} |" + " — |" * 8)
            continue
        col = {key: [r[key] for r in rows] for key in rows[0]}
        sigma = float(np.mean(col["sigma68"]))
        ratio = sigma / e2e_sigma if e2e_sigma else math.nan
        sem = float(np.std(col["sigma68"], ddof=1) / np.sqrt(len(rows))) if len(rows) > 1 else math.nan
        disagree, disagree_err = seed_disagreement([decided[run] for run in members])
        means = {key: float(np.nanmean(col[key])) if not np.all(np.isnan(col[key])) else math.nan for key in col}
        lines.append(
            f"model={group[0]} estimator={group[1]} seeds={len(rows)} errors={n_failed} sigma68_mean={sigma:.5g} "
            f"sigma68_sem={sem:.5g} sigma68_vs_e2e={ratio:.5g} "
            f"failed_fits_max={max(col['failed_fits']):.5g} auc_mean={means['auc']:.5g} "
            f"disagreement={disagree:.5g} disagreement_err={disagree_err:.5g} "
            f"selected_layers={means['selected_layers']:.5g} solver_grad_nonzero={means['solver_grad_nonzero']:.5g} "
            f"grad_ratio={means['grad_ratio']:.5g}"
        )
        failed_fits = ", ".join(f"{100 * v:.2f}" for v in col["failed_fits"])
        cells = [
            group[0],
            group[1],
            seeds,
            mean_sem(col["sigma68"], 5),
            number(ratio, ".3f"),
            f"max {100 * max(col['failed_fits']):.2f} % ({failed_fits})",
            mean_sem(col["auc"], 4),
            f"{number(disagree, '.4f')} ± {number(disagree_err, '.4f')}" if len(rows) > 1 else "—",
            number(means["selected_layers"], ".3f"),
            number(means["solver_grad_nonzero"], ".3f"),
            number(means["grad_ratio"], ".3g"),
        ]
        table.append("| " + " | ".join(cells) + " |")

    print()
    print("\n".join(lines))
    print(
        "\n| model | estimator | seeds | σ68(q/pT) mean ± s.e.m. | σ68 / e2e | failed fits per seed | "
        "AUC mean ± s.e.m. | seed disagreement | selected layers | non-zero solver gradients | "
        "solver / BCE gradient |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))

    if not args.no_report:
        seed0_report(args, runs, set(results))


if __name__ == "__main__":
    main()
