"""The `paper` preset trained and evaluated on a GPU in a sized job: what ``benchmarks/gpu.sh`` runs after its install.

    bash benchmarks/gpu.sh [--preset paper|test] [--out DIR] [--no-install] [--python PY] [--allow-cpu]
                           [--events N] [--train-events N] [--epochs E] [--model M ...] [--config FILE]
                           [--budget SECONDS]

The shell script checks its options, finds a GPU (``nvidia-smi``), creates ``OUT/venv`` and installs the
project with its ``cuda`` extra there (not with ``--no-install``, nor for ``--preset test`` on a machine without
an NVIDIA GPU), points every cache and home folder of the job under ``OUT`` and then runs this module in that
environment: ``python -m benchmarks.gpu --preset P --out OUT [job options]``.

The job is ``muontrack run --preset P --json`` in ``OUT/job`` (emptied first, so every run trains afresh), sized
to fit a time budget: the paper job simulates 10⁶ events and trains six models for 50 epochs, far beyond ten
minutes. :data:`SIZES` holds the default sizes (``--events`` and the ``simulation`` and ``train`` sections of
``OUT/job-config.json``), over which ``--config FILE``'s sections and then ``--events``, ``--train-events`` and
``--epochs`` apply. The network is the paper's (H = 512, Table 1); the sized paper job keeps every model of the
paper job, trains each on ``max_train_events`` events per epoch for two epochs (one at λ = 0, one with the pT
loss) and pads events to two node buckets, 160 and 256 (the default detector's events: 93 % have at most 160
hits, none over 235 of 20 000, so none is cut; two shapes are two compilations of each step instead of four).
Its σ68 are those of a short training, not the paper's. ``--budget`` (default 600 s; 0: none) stops the job
with Ctrl-C's signal when it runs longer, and says so in one line.

It prints one ``key=value`` line per figure as it becomes known (all of them also in ``OUT/figures.txt``), and
the report's summary table after the job; ``--preset paper`` refuses in one line, exit 1, a device other than a
GPU unless ``--allow-cpu``:

- ``preset platform device_kind devices``: the device JAX sees, printed before the job.
- ``events max_train_events epochs models node_buckets budget_s jax_cache``: what runs
  (``jax_cache``: ``cold`` when ``OUT/cache/jax`` was empty before the job, else ``warm``).
- ``wall_s``: the whole ``muontrack run`` process (Prefect server, simulation, training, evaluation, report).
- ``train_s train_events train_events_per_s``: every run's trained epochs (``metrics.parquet``'s train rows:
  compilations included; not the warm-up epochs e2e and e2e_paper take from baseline's run);
  ``train_steady_events_per_s``: the same over the epochs after the first (``nan`` with one epoch).
- ``eval_events eval_events_per_s``: the trained networks' predictions of the test split (the evaluate step's
  ``predict MODEL, ...: N events, T s`` lines: reading, packing, compilations, forward, clustering, fit, tables);
  ``classical_events_per_s``: the classical reconstruction's, alike.
- ``sigma68_ROW``: σ68(q/pT) of each row of the summary (``summary.json``), the ``limit`` row first.
- ``gpu_peak_mem_mib gpu_idle_mem_mib`` (only where ``nvidia-smi`` runs): the largest memory use of one GPU
  sampled every 0.5 s during the job, and before it. JAX's preallocation is turned off for the job
  (``XLA_PYTHON_CLIENT_PREALLOCATE=false``), so this is what the job used.
- ``report``: the report's ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: the sized job of each preset: dataset events and the config sections over the preset's values
SIZES: dict[str, dict[str, Any]] = {
    "paper": {
        "events": 20_000,
        # eight shards: the simulation's tasks run side by side
        "simulation": {"shard_events": 2_500},
        "train": {"epochs": 2, "lambda_warmup_epochs": 1, "max_train_events": 4_096, "node_buckets": [160, 256]},
    },
    "test": {"events": 600, "simulation": {}, "train": {}},
}
#: seconds the job may run before it is stopped (0: no limit)
DEFAULT_BUDGET_S = 600
#: after the budget, SIGINT (muontrack's Ctrl-C: its Prefect server stops with it), then this long, then SIGKILL
STOP_GRACE_S = 60
#: a finished prediction of the evaluate step (flows.commands._PredictionProgress): rows, events, seconds
PREDICT_LINE = re.compile(r"predict (?P<rows>[a-z0-9_, ]+): (?P<events>\d+) events, (?P<seconds>[0-9.]+) s\b")
#: log lines of the job worth echoing while it runs: a finished epoch, a finished prediction, the report
PROGRESS_LINE = re.compile(
    r" - (.*(?: epoch \d+/\d+: train loss |predict [a-z0-9_, ]+: \d+ events, |report written).*)$"
)


class GpuJobError(Exception):
    """A one-line failure of the sized job (printed as ``error: ...``)."""


def job_config(
    preset: str,
    config_file: Path | None = None,
    events: int | None = None,
    train_events: int | None = None,
    epochs: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """``(events, config sections)`` of the sized job: :data:`SIZES`, then the file's sections, then the options."""
    size = SIZES[preset]
    sections: dict[str, Any] = {name: dict(size[name]) for name in ("simulation", "train") if size[name]}
    if config_file is not None:
        from pipeline.config import merged_sections, read_config_file

        sections = merged_sections(sections, read_config_file(config_file))
    train = dict(sections.get("train", {}))
    if train_events is not None:
        train["max_train_events"] = train_events
    if epochs is not None:
        train["epochs"] = epochs
    if train:
        sections["train"] = train
    return (events if events is not None else size["events"]), sections


def device(python: str) -> dict[str, Any]:
    """The devices JAX sees in a process of their own (this one keeps no GPU context while the job runs)."""
    probe = (
        "import json, jax; d = jax.devices(); "
        "print(json.dumps({'platform': d[0].platform, 'device_kind': d[0].device_kind, 'devices': len(d)}))"
    )
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise GpuJobError(f"JAX did not start in {python}: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class GpuMemory:
    """Memory used on each GPU, sampled every 0.5 s by ``nvidia-smi`` while the job runs (None without it)."""

    def __init__(self) -> None:
        self.smi = shutil.which("nvidia-smi")
        self.idle = self._once() if self.smi else None
        self.peak: dict[str, int] = {}
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def _query(self) -> list[str]:
        return [str(self.smi), "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]

    def _once(self) -> int | None:
        result = subprocess.run(self._query(), capture_output=True, text=True, check=False)
        values = [self._parse(line) for line in result.stdout.splitlines()] if result.returncode == 0 else []
        return max((value for _, value in filter(None, values)), default=None)

    @staticmethod
    def _parse(line: str) -> tuple[str, int] | None:
        index, _, used = line.partition(",")
        return (index.strip(), int(used)) if used.strip().isdigit() else None

    def start(self) -> None:
        if not self.smi:
            return
        self._process = subprocess.Popen(
            [*self._query(), "-lms", "500"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        for line in self._process.stdout:
            sample = self._parse(line)
            if sample is not None:
                self.peak[sample[0]] = max(self.peak.get(sample[0], 0), sample[1])

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)


def run_job(command: list[str], out: Path, budget_s: float) -> tuple[float, int]:
    """Run ``command`` (``muontrack run ... --json``): stdout to ``OUT/job.json``, stderr to ``OUT/job.log``,
    with the finished epochs and predictions echoed on stderr. ``(wall seconds, exit status)``; GpuJobError
    when it ran past ``budget_s`` (> 0) and was stopped."""
    log_path = out / "job.log"
    with open(out / "job.json", "w") as stdout, open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True)

        def forward() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                log.write(line)
                log.flush()
                match = PROGRESS_LINE.search(line.rstrip("\n"))
                if match:
                    print(f"  {match.group(1)}", file=sys.stderr, flush=True)

        reader = threading.Thread(target=forward, daemon=True)
        reader.start()
        try:
            process.wait(timeout=budget_s if budget_s > 0 else None)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            reader.join(timeout=10)
            raise GpuJobError(
                f"the job ran past the budget of {budget_s:g} s and was stopped; size it down (--events, "
                f"--train-events, --epochs, --model) or raise --budget; log: {log_path}"
            ) from None
        wall = time.perf_counter() - start
        reader.join(timeout=10)
    return wall, process.returncode


def _last_error(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1].removeprefix("error:").strip()


def training_figures(runs: list[Path]) -> dict[str, float]:
    """Events and seconds of every run's trained epochs (metrics.parquet's train rows, but the epochs a warm start
    took), all and after the first."""
    import polars as pl

    from pipeline.batches import split_summary
    from pipeline.dataset import open_dataset

    totals = {"train_s": 0.0, "train_events": 0.0, "steady_s": 0.0, "steady_events": 0.0}
    n_train: dict[str, int] = {}
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        data = config["dataset"]["path"]
        if data not in n_train:
            n_train[data] = split_summary(open_dataset(data), "train")[0]
        cap = config["train_config"].get("max_train_events") or n_train[data]
        per_epoch = min(n_train[data], cap)
        # the epochs a warm start took from baseline's run were not trained here (model.train, "Warm start")
        taken = (config.get("warm_start") or {}).get("epochs", 0)
        rows = pl.read_parquet(run / "metrics.parquet").filter(pl.col("split") == "train", pl.col("epoch") > taken)
        rows = rows.sort("epoch")
        seconds = rows["seconds"].to_list()
        totals["train_s"] += sum(seconds)
        totals["train_events"] += per_epoch * len(seconds)
        totals["steady_s"] += sum(seconds[1:])
        totals["steady_events"] += per_epoch * len(seconds[1:])
    return totals


def prediction_figures(log_text: str) -> dict[str, float]:
    """Events and seconds of the evaluate step's predictions, from its ``predict ...: N events, T s`` lines."""
    from pipeline.registry import REFERENCE_ROWS

    totals = {"eval_events": 0.0, "eval_s": 0.0, "classical_events": 0.0, "classical_s": 0.0}
    for match in PREDICT_LINE.finditer(log_text):
        rows = [row.strip() for row in match["rows"].split(",")]
        if rows[0] == "classical":
            kind = "classical"
        elif rows[0] in REFERENCE_ROWS:
            continue
        else:
            kind = "eval"
        totals[f"{kind}_events"] += int(match["events"])
        totals[f"{kind}_s"] += float(match["seconds"])
    return totals


def _rate(events: float, seconds: float) -> float:
    return events / seconds if seconds > 0 else math.nan


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value).replace(" ", "_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(SIZES), default="paper")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--allow-cpu", action="store_true")
    parser.add_argument("--events", type=int)
    parser.add_argument("--train-events", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--config", type=Path)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S)
    args = parser.parse_args(argv)
    from pipeline.errors import MuontrackError

    try:
        return _main(args)
    except GpuJobError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except MuontrackError as err:  # a bad config file, say: one line and muontrack's exit status
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


class Figures:
    """The ``key=value`` lines: each printed once, when known, and all of them kept for ``OUT/figures.txt``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, **values: Any) -> None:
        for key, value in values.items():
            line = f"{key}={_format(value)}"
            self.lines.append(line)
            print(line, flush=True)


def _main(args: argparse.Namespace) -> int:
    from analysis.render import format_summary_table
    from flows.commands import job_preset
    from flows.end_to_end import job_configs
    from model.hyperparameters import configure

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    figures = Figures()
    seen = device(python)
    figures.add(preset=args.preset, **seen)
    if args.preset == "paper" and seen["platform"] != "gpu" and not args.allow_cpu:
        raise GpuJobError(f"JAX sees no GPU (platform {seen['platform']}); --preset paper needs one, or --allow-cpu")

    events, sections = job_config(args.preset, args.config, args.events, args.train_events, args.epochs)
    job = job_preset(args.preset, args.model or None, events)
    job_configs(job, sections)  # a one-line error for a bad section, key or value, before the job
    _, train_config = configure(args.preset, {k: v for k, v in sections.items() if k != "simulation"} or None)
    config_path = out / "job-config.json"
    config_path.write_text(json.dumps(sections, indent=2) + "\n")
    jax_cache = out / "cache" / "jax"
    figures.add(
        events=events,
        max_train_events=train_config.max_train_events or "all",
        epochs=train_config.epochs,
        models=",".join(job.models),
        node_buckets=",".join(map(str, train_config.node_buckets)),
        budget_s=args.budget,
        jax_cache="warm" if jax_cache.is_dir() and any(jax_cache.iterdir()) else "cold",
    )

    job_dir = out / "job"
    if job_dir.exists():
        shutil.rmtree(job_dir)
    command = [python, "-m", "flows.cli", "run", "--preset", args.preset, "--out", str(job_dir), "--json"]
    command += ["--config", str(config_path), "--events", str(events)]
    for model in args.model:
        command += ["--model", model]
    memory = GpuMemory()
    memory.start()
    try:
        wall, status = run_job(command, out, args.budget)
    finally:
        memory.stop()
    log_path = out / "job.log"
    if status != 0:
        raise GpuJobError(f"muontrack run failed (exit {status}): {_last_error(log_path)}; log: {log_path}")

    result = json.loads((out / "job.json").read_text())
    summary: dict[str, dict[str, Any]] = result["summary"]
    print(format_summary_table(summary), flush=True)
    training = training_figures(sorted(path for path in (job_dir / "runs").iterdir() if path.is_dir()))
    prediction = prediction_figures(log_path.read_text(errors="replace"))
    figures.add(
        wall_s=wall,
        train_s=training["train_s"],
        train_events=int(training["train_events"]),
        train_events_per_s=_rate(training["train_events"], training["train_s"]),
        train_steady_events_per_s=_rate(training["steady_events"], training["steady_s"]),
        eval_events=int(prediction["eval_events"]),
        eval_events_per_s=_rate(prediction["eval_events"], prediction["eval_s"]),
        classical_events_per_s=_rate(prediction["classical_events"], prediction["classical_s"]),
    )
    figures.add(
        **{
            f"sigma68_{row}": math.nan if metrics.get("sigma68") is None else float(metrics["sigma68"])
            for row, metrics in summary.items()
        }
    )
    if memory.smi:
        figures.add(
            gpu_peak_mem_mib=max(memory.peak.values(), default=math.nan),
            gpu_idle_mem_mib=math.nan if memory.idle is None else memory.idle,
        )
    figures.add(report=result["report"])
    (out / "figures.txt").write_text("\n".join(figures.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
