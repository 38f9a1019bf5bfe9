"""Throughput and memory of the simulation, whole process and in process, against a plain Parquet write of the
same rows and, optionally, against the ACTS Fatras peer (benchmarks/peers/acts_fatras.py).

    python -m benchmarks.simulation [--events N ...] [--workers K] [--seed S] [--breakdown]
                                    [--acts-python PYTHON [--acts-args "..."]]

For each event count N (default 100000) and worker count (1 then 2, or only K), one line:

    events=.. workers=.. process_events_per_s=.. process_s=.. process_cpu_s=.. process_peak_rss_mb=.. \\
        sim_events_per_s=.. sim_s=.. sim_cpu_s=.. peak_rss_mb=.. plain_write_s=.. ratio=.. \\
        plain_write_1t_s=.. ratio_1t=..    (one line)

- process_s: wall time of the whole command ``python -m flows.cli simulate --events N --workers K --out D``
  (what `muontrack simulate` runs: interpreter start, imports, Numba's cache load, the shards, the manifest,
  exit), timed from outside; process_events_per_s = N / process_s; process_cpu_s its CPU seconds;
  process_peak_rss_mb its peak resident memory.
- sim_s: wall time of ``simulate_dataset`` into a fresh temporary folder in an already started process
  (generation, Parquet writing, checksums, atomic renames, manifest), Numba's kernels loaded beforehand;
  sim_events_per_s = N / sim_s; sim_cpu_s its CPU seconds (all threads); peak_rss_mb the peak resident memory
  of that process up to the end of ``simulate_dataset``. Both peaks stay flat in N (one or two shards per
  worker held at a time): compare ``--events 500000 5000000``.
- plain_write_s: wall time of ``pyarrow.parquet.write_table`` of the very same rows (read back into memory
  first), shard by shard into files of the same layout, with the same writer settings
  (``PARQUET_WRITE_OPTIONS``), on 2 threads; ratio = sim_s / plain_write_s. plain_write_1t_s and ratio_1t:
  the same on one thread (the reference of the figures before this version). The rows are held in memory
  for it, so above 1 000 000 events these four are ``nan``.

With ``--acts-python``, the ACTS Fatras peer runs in the same invocation, after each event count, as
``PYTHON benchmarks/peers/acts_fatras.py bench --events N --threads 2 --output none --repeat 1`` plus
``--acts-args`` (e.g. ``"--digi none"``), and one more line is printed:

    acts events=.. threads=2 acts_process_events_per_s=.. acts_process_s=.. acts_run_events_per_s=.. \\
        acts_import_s=.. ratio_vs_acts=..

ratio_vs_acts = process_events_per_s (muontrack, the last worker count) / acts_process_events_per_s: both
whole processes, timed from outside, on 2 threads; ACTS writes nothing (``--output none``), muontrack its
full dataset.

With ``--breakdown``, one more line per run tells where the in-process time goes (wall and CPU seconds summed
over the threads that did the work; the stages overlap across threads, so the wall times add up to more than
sim_s with several workers):

    breakdown events=.. workers=.. interpreter_s=.. imports_s=.. numba_load_s=.. kernels_s=.. arrow_s=.. \\
        parquet_s=.. parquet_cpu_s=.. fsync_s=.. sha256_s=.. rename_manifest_s=.. other_s=..

interpreter_s: ``python -c pass``; imports_s: importing the `simulate` command's modules; numba_load_s: the
first kernel call (Numba's on-disk cache load); kernels_s: ``generate_events`` (the Numba passes);
arrow_s: Arrow tables and their checks; parquet_s: ``pq.write_table`` (encode, compress, write to the page
cache); fsync_s, sha256_s: flushing and hashing the shard files; rename_manifest_s: the staging record,
manifest and renames; other_s: sim_s minus the wall time of the stages on the critical path's thread.

Each measurement runs in its own fresh Python process, so peak memory and warm caches of one run do not leak
into the next.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEER = Path(__file__).resolve().parent / "peers" / "acts_fatras.py"
#: the plain write holds the whole dataset in memory (~4.3 GB per million events): above this, nan
PLAIN_WRITE_MAX_EVENTS = 1_000_000


def _peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux


def _cpu_s() -> float:
    """User + system CPU seconds of this process (all threads) and its finished children."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _run_timed(command: list[str]) -> tuple[float, float, float]:
    """Run ``command``; return its wall seconds, CPU seconds and peak RSS [MB] (from its own rusage)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        # the progress bar and logs go to a file, shown only when the command fails
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            stderr.seek(0)
            sys.stderr.write(stderr.read().decode(errors="replace")[-4000:])
            raise SystemExit(f"failed ({process.returncode}): {shlex.join(command)}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def measure_process(n_events: int, workers: int, seed: int) -> str:
    """The whole `simulate` command in a subprocess, timed from outside."""
    with tempfile.TemporaryDirectory(prefix="muontrack-bench-") as tmp:
        command = [sys.executable, "-m", "flows.cli", "simulate", "--events", str(n_events)]
        command += ["--workers", str(workers), "--seed", str(seed), "--out", str(Path(tmp) / "dataset")]
        wall, cpu, rss = _run_timed(command)
    return (
        f"process_events_per_s={n_events / wall:.0f} process_s={wall:.3f} process_cpu_s={cpu:.2f} "
        f"process_peak_rss_mb={rss:.0f}"
    )


def _plain_write(dataset: Path, out: Path, threads: int) -> float:
    """Wall seconds to write the dataset's rows again, shard by shard, with the shards' writer settings."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from pipeline.dataset import PARQUET_WRITE_OPTIONS

    files = sorted(dataset.glob("hits/*.parquet")) + sorted(dataset.glob("events/*.parquet"))
    tables = [(f"{path.parent.name}-{path.name}", pq.read_table(path)) for path in files]
    out.mkdir()

    def write(item: tuple[str, object]) -> None:
        name, table = item
        pq.write_table(table, out / name, **PARQUET_WRITE_OPTIONS)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(write, tables))
    return time.perf_counter() - start


class _Stages:
    """Wall and CPU seconds spent in wrapped functions, summed over threads (for --breakdown)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, module: object, name: str, stage: str) -> None:
        function = getattr(module, name)

        def timed(*args, **kwargs):
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
                with self.lock:
                    self.wall[stage] = self.wall.get(stage, 0.0) + wall
                    self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu

        setattr(module, name, timed)


def measure(n_events: int, workers: int, seed: int, breakdown: bool) -> list[str]:
    start_imports = time.perf_counter()
    import pyarrow.parquet as pq

    import flows.cli  # noqa: F401  (the command's own imports)
    import pipeline.atomic
    import pipeline.dataset
    import simulation.generate
    import simulation.shards
    from pipeline.config import SimConfig

    imports_s = time.perf_counter() - start_imports
    config = SimConfig()
    start = time.perf_counter()
    simulation.generate.generate_events(config, seed, 0, 16)  # Numba's cache load, outside the timing
    numba_load_s = time.perf_counter() - start
    stages = _Stages()
    if breakdown:
        stages.wrap(simulation.generate, "generate_events", "kernels")
        stages.wrap(pipeline.dataset, "hits_table", "arrow")
        stages.wrap(pipeline.dataset, "events_table", "arrow")
        stages.wrap(pipeline.dataset, "_check_shard_contents", "arrow")
        stages.wrap(pq, "write_table", "parquet")
        stages.wrap(pipeline.atomic, "fsync_file", "fsync")
        stages.wrap(pipeline.dataset, "file_sha256", "sha256")
        stages.wrap(simulation.shards, "finalize_dataset", "rename_manifest")
        stages.wrap(simulation.shards, "_start_staging", "rename_manifest")
        stages.wrap(os, "replace", "rename_manifest")
    with tempfile.TemporaryDirectory(prefix="muontrack-bench-") as tmp:
        out = Path(tmp) / "dataset"
        start, start_cpu = time.perf_counter(), _cpu_s()
        simulation.shards.simulate_dataset(out, n_events=n_events, seed=seed, config=config, workers=workers)
        sim_s = time.perf_counter() - start
        sim_cpu_s = _cpu_s() - start_cpu
        peak_rss_mb = _peak_rss_mb(resource.RUSAGE_SELF)
        wall, cpu = dict(stages.wall), dict(stages.cpu)
        plain_write_s = plain_write_1t_s = math.nan
        if n_events <= PLAIN_WRITE_MAX_EVENTS:
            plain_write_s = _plain_write(out, Path(tmp) / "plain2", threads=2)
            plain_write_1t_s = _plain_write(out, Path(tmp) / "plain1", threads=1)
    lines = [
        f"sim_events_per_s={n_events / sim_s:.0f} sim_s={sim_s:.3f} sim_cpu_s={sim_cpu_s:.2f} "
        f"peak_rss_mb={peak_rss_mb:.0f} plain_write_s={plain_write_s:.3f} ratio={sim_s / plain_write_s:.2f} "
        f"plain_write_1t_s={plain_write_1t_s:.3f} ratio_1t={sim_s / plain_write_1t_s:.2f}"
    ]
    if breakdown:
        stage_names = ("kernels", "arrow", "parquet", "fsync", "sha256", "rename_manifest")
        # the stages of one thread's share of the work (sums over `workers` threads, divided back)
        critical = sum(wall.get(name, 0.0) for name in stage_names) / max(1, workers)
        lines.append(
            f"imports_s={imports_s:.3f} numba_load_s={numba_load_s:.3f} "
            f"kernels_s={wall.get('kernels', 0):.3f} "
            f"arrow_s={wall.get('arrow', 0):.3f} parquet_s={wall.get('parquet', 0):.3f} "
            f"parquet_cpu_s={cpu.get('parquet', 0):.3f} fsync_s={wall.get('fsync', 0):.3f} "
            f"sha256_s={wall.get('sha256', 0):.3f} rename_manifest_s={wall.get('rename_manifest', 0):.3f} "
            f"other_s={max(0.0, sim_s - critical):.3f}"
        )
    return lines


def measure_acts(python: str, n_events: int, extra: str) -> dict[str, float]:
    """The ACTS Fatras peer (benchmarks/peers/acts_fatras.py) on 2 threads without output, one repeat."""
    with tempfile.TemporaryDirectory(prefix="muontrack-bench-acts-") as tmp:
        results = Path(tmp) / "acts.json"
        command = [python, str(PEER), "bench", "--events", str(n_events), "--threads", "2", "--output", "none"]
        command += ["--repeat", "1", "--quiet-wait", "0", "--outdir", tmp, "--json", str(results)]
        command += shlex.split(extra)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        (summary,) = json.loads(results.read_text())
    return {
        "acts_process_events_per_s": summary["ev_per_s_process"],
        "acts_process_s": summary["median"]["wall_process"],
        "acts_run_events_per_s": summary["ev_per_s_run"],
        "acts_import_s": summary["median"]["t_import"],
    }


def _interpreter_s() -> float:
    """Wall seconds of ``python -c pass`` (the interpreter's own start and exit), best of 3."""
    return min(_run_timed([sys.executable, "-c", "pass"])[0] for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[100_000], help="one or more event counts")
    parser.add_argument("--workers", type=int, default=None, help="only this worker count (default: 1 then 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true", help="also print where the in-process time goes")
    parser.add_argument("--acts-python", default=None, help="Python of a venv with pyacts: also run the ACTS peer")
    parser.add_argument("--acts-args", default="", help='extra arguments of the ACTS peer, e.g. "--digi none"')
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        for line in measure(args.events[0], args.workers or 1, args.seed, args.breakdown):
            print(line, flush=True)
        return
    interpreter_s = _interpreter_s() if args.breakdown else 0.0
    for n_events in args.events:
        process_events_per_s = 0.0
        for workers in [args.workers] if args.workers else [1, 2]:
            whole = measure_process(n_events, workers, args.seed)
            process_events_per_s = float(whole.split()[0].split("=")[1])
            command = [sys.executable, "-m", "benchmarks.simulation", "--in-process", "--events", str(n_events)]
            command += ["--workers", str(workers), "--seed", str(args.seed)]
            command += ["--breakdown"] if args.breakdown else []
            lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
            print(f"events={n_events} workers={workers} {whole} {lines[0]}", flush=True)
            if args.breakdown:
                print(
                    f"breakdown events={n_events} workers={workers} interpreter_s={interpreter_s:.3f} {lines[1]}",
                    flush=True,
                )
        if args.acts_python:
            acts = measure_acts(args.acts_python, n_events, args.acts_args)
            print(
                f"acts events={n_events} threads=2 "
                f"acts_process_events_per_s={acts['acts_process_events_per_s']:.0f} "
                f"acts_process_s={acts['acts_process_s']:.3f} "
                f"acts_run_events_per_s={acts['acts_run_events_per_s']:.0f} acts_import_s={acts['acts_import_s']:.3f} "
                f"ratio_vs_acts={process_events_per_s / acts['acts_process_events_per_s']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
