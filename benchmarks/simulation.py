"""Throughput and memory of `simulate_dataset`, against a plain Parquet write of the same rows.

    python -m benchmarks.simulation [--events N] [--workers K] [--seed S]

For each worker count (1 then 2, or only K), one line:

    events=.. workers=.. sim_events_per_s=.. plain_write_s=.. sim_s=.. ratio=.. \\
        peak_rss_mb=.. worker_peak_rss_mb=.. sim_cpu_s=..    (one line)

- sim_s: wall time of ``simulate_dataset`` into a fresh temporary folder (generation, Parquet writing,
  checksums, atomic renames, manifest), Numba's JIT cache warmed beforehand.
- plain_write_s: wall time of ``pyarrow.parquet.write_table`` of the very same rows, read back into memory,
  with the same writer settings (``PARQUET_WRITE_OPTIONS``: zstd level, row groups, dictionaries).
- ratio = sim_s / plain_write_s.
- sim_cpu_s: CPU seconds of simulate_dataset, workers included (a figure that other load on the machine
  barely changes, unlike the wall times).
- peak_rss_mb: peak resident memory of the simulating process up to the end of ``simulate_dataset``
  (before the rows are read back); worker_peak_rss_mb: the largest of the worker processes (0 with one
  worker). Both stay bounded by one shard per process, whatever N.

Each worker count runs in its own fresh Python process, so peak memory and warm caches of one run do not
leak into the next.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its finished children (the pool's workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def measure(n_events: int, workers: int, seed: int) -> str:
    import pyarrow.parquet as pq

    from pipeline.config import SimConfig
    from pipeline.dataset import PARQUET_WRITE_OPTIONS
    from simulation.dataset import simulate_dataset
    from simulation.generate import generate_events

    config = SimConfig()
    generate_events(config, seed, 0, 16)  # JIT (or load the on-disk cache) outside the timing
    with tempfile.TemporaryDirectory(prefix="muontrack-bench-") as tmp:
        out = Path(tmp) / "dataset"
        start, start_cpu = time.perf_counter(), _cpu_s()
        simulate_dataset(out, n_events=n_events, seed=seed, config=config, workers=workers)
        sim_s = time.perf_counter() - start
        sim_cpu_s = _cpu_s() - start_cpu
        peak_rss_mb = _peak_rss_mb(resource.RUSAGE_SELF)
        worker_peak_rss_mb = _peak_rss_mb(resource.RUSAGE_CHILDREN) if workers > 1 else 0.0

        hits = pq.read_table(out / "hits")
        events = pq.read_table(out / "events")
        start = time.perf_counter()
        pq.write_table(hits, Path(tmp) / "plain-hits.parquet", **PARQUET_WRITE_OPTIONS)
        pq.write_table(events, Path(tmp) / "plain-events.parquet", **PARQUET_WRITE_OPTIONS)
        plain_write_s = time.perf_counter() - start
    return (
        f"events={n_events} workers={workers} sim_events_per_s={n_events / sim_s:.0f} "
        f"plain_write_s={plain_write_s:.3f} sim_s={sim_s:.3f} ratio={sim_s / plain_write_s:.2f} "
        f"peak_rss_mb={peak_rss_mb:.0f} worker_peak_rss_mb={worker_peak_rss_mb:.0f} sim_cpu_s={sim_cpu_s:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=None, help="only this worker count (default: 1 then 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        print(measure(args.events, args.workers or 1, args.seed), flush=True)
        return
    for workers in [args.workers] if args.workers else [1, 2]:
        command = [sys.executable, "-m", "benchmarks.simulation", "--in-process", "--events", str(args.events)]
        command += ["--workers", str(workers), "--seed", str(args.seed)]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
