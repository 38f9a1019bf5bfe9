"""Throughput and quality of the classical reconstruction (``classical``).

    python -m benchmarks.classical [--data DATASET] [--events N] [--split SPLIT] [--seed S]

Without ``--data`` it simulates N events (default 20 000, seed S) into a temporary folder first. It reads
the split's hits (``--split``: train, val, test or all; default all) once, keeps the first N events, warms
Numba up (compilation or the on-disk cache stay out of the timings) and prints one ``key=value`` line per
measurement:

    events=.. threads=1 reco_events_per_s=.. reco_s=.. read_s=..      the kernel on one thread
    events=.. threads=K reco_events_per_s=.. reco_s=.. read_s=..      on all of Numba's threads
    events=.. sigma68=.. efficiency=.. purity=.. failed=.. tail5=..   quality against the truth

- reco_s: best of three wall times of ``classical.track_events`` on the events (clusters, road search,
  annealing filter, Hyper fit); reco_events_per_s = events / reco_s.
- read_s: wall time of ``classical.read_split`` (one Polars query for the hits, one for the events).
- sigma68: 0.68 quantile of |r - median(r)| of r = ((q/pT)_reco - (q/pT)_true) / (q/pT)_true over the
  fits with status 0; tail5: share of those with |r| > 0.05; efficiency: share of the signal strips
  selected; purity: share of the selected strips that are signal; failed: share of fits with status > 0.

Run as a file (``python benchmarks/classical.py``), the script runs itself again as ``python -m
benchmarks.classical`` from the repository root: as a file its own folder would come first on sys.path and its
name would shadow the ``classical`` package.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _quality(dataset, split, n_events: int, reco) -> str:
    import numpy as np
    import polars as pl

    from pipeline.batches import split_expr

    keep = pl.lit(True) if split is None else split_expr(split)
    events = dataset.events().filter(keep).sort("event_id").head(n_events).select("event_id", "pt", "q").collect()
    last = events["event_id"][-1]
    signal = (
        dataset.hits()
        .filter(keep & (pl.col("event_id") <= last))
        .sort("event_id", "hit_id")
        .select("is_signal")
        .collect()["is_signal"]
        .to_numpy()
    )
    truth = events["q"].to_numpy() / events["pt"].to_numpy().astype(np.float64)
    ok = reco.status == 0
    r = ((reco.q_over_pt - truth) / truth)[ok]
    selected = reco.hit_weight > 0.5
    sigma68 = float(np.quantile(np.abs(r - np.median(r)), 0.68))
    return (
        f"events={n_events} sigma68={sigma68:.5f} efficiency={np.sum(selected & signal) / np.sum(signal):.4f} "
        f"purity={np.sum(selected & signal) / max(1, np.sum(selected)):.4f} failed={1.0 - ok.mean():.4f} "
        f"tail5={np.mean(np.abs(r) > 0.05):.4f}"
    )


def measure(data: Path | None, n_events: int, split: str | None, seed: int) -> list[str]:
    import numba

    from classical import read_split, track_events
    from pipeline.dataset import open_dataset

    with tempfile.TemporaryDirectory(prefix="muontrack-classical-") as tmp:
        if data is None:
            from pipeline.config import SimConfig
            from simulation.shards import simulate_dataset

            data = Path(tmp) / "dataset"
            simulate_dataset(data, n_events=n_events, seed=seed, config=SimConfig())
        dataset = open_dataset(data)
        detector = dataset.config.detector
        t0 = time.perf_counter()
        hits = read_split(dataset, split)
        read_s = time.perf_counter() - t0

        n = min(n_events, len(hits.event_id))
        stop = int(hits.event_start[n])
        arrays = (hits.event_start[: n + 1], hits.layer[:stop], hits.strip[:stop], hits.x[:stop], hits.charge[:stop])
        warm = min(n, 64)
        warm_stop = int(hits.event_start[warm])
        track_events(hits.event_start[: warm + 1], *(a[:warm_stop] for a in arrays[1:]), detector)  # compile / load

        lines = []
        all_threads = numba.config.NUMBA_NUM_THREADS
        for threads in sorted({1, all_threads}):
            numba.set_num_threads(threads)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                reco = track_events(*arrays, detector)
                best = min(best, time.perf_counter() - t0)
            lines.append(
                f"events={n} threads={threads} reco_events_per_s={n / best:.0f} reco_s={best:.4f} read_s={read_s:.4f}"
            )
        lines.append(_quality(dataset, split, n, reco))
        return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a dataset folder (default: simulate one)")
    parser.add_argument("--events", type=int, default=20_000, help="events to reconstruct (and to simulate)")
    parser.add_argument("--split", default="all", choices=["train", "val", "test", "all"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated dataset")
    args = parser.parse_args()
    if not __package__:  # run as a file: again as a module of the repository root (see the docstring)
        argv = ["--events", str(args.events), "--split", args.split, "--seed", str(args.seed)]
        argv += [] if args.data is None else ["--data", str(args.data.resolve())]
        raise SystemExit(subprocess.call([sys.executable, "-m", "benchmarks.classical", *argv], cwd=REPO_ROOT))
    for line in measure(args.data, args.events, None if args.split == "all" else args.split, args.seed):
        print(line, flush=True)


if __name__ == "__main__":
    main()
