"""The library functions the flows and the CLI call: each step of the pipeline as a plain function.

Prefect tasks (``flows.tasks``) wrap these one to one, so every step can be called, tested and reused
without Prefect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import provenance
from pipeline.errors import DatasetError, MuontrackError, RunError
from pipeline.locks import exclusive_writer

#: the models a job can train (each gives one or more rows of the `model` column: `baseline` gives `baseline`
#: and `baseline_paper`); the truth references and `classical` need no training
TRAINED_MODELS = ("baseline", "e2e", "e2e_paper", "assignment")


@dataclass(frozen=True)
class JobPreset:
    """Size of the whole ``muontrack run`` job: dataset size, and the model/training preset."""

    events: int
    train_preset: str
    models: tuple[str, ...] = ("baseline", "e2e", "e2e_paper")
    #: simulation shard size (smaller datasets get smaller shards so resume and workers have units)
    shard_events: int = 20_000


#: `muontrack run --preset P`: `test` for tests (seconds), `cpu` for this 2-core machine (~10 min), `paper` for a GPU
#: (the cpu job leaves out `assignment` to stay near ten minutes; `muontrack run --model ...` adds it back)
JOB_PRESETS: dict[str, JobPreset] = {
    "test": JobPreset(events=600, train_preset="test", models=TRAINED_MODELS, shard_events=300),
    "cpu": JobPreset(events=20_000, train_preset="cpu", shard_events=5_000),
    "paper": JobPreset(events=1_000_000, train_preset="paper", models=TRAINED_MODELS, shard_events=50_000),
}


def job_preset(name: str, models: Sequence[str] | None = None) -> JobPreset:
    """The job of a named preset; ``models`` (in any order, repeats ignored) replaces its list of models."""
    if name not in JOB_PRESETS:
        raise MuontrackError(f"unknown preset {name!r} (known: {', '.join(JOB_PRESETS)})")
    job = JOB_PRESETS[name]
    if not models:
        return job
    unknown = [model for model in models if model not in TRAINED_MODELS]
    if unknown:
        raise MuontrackError(f"unknown model {unknown[0]!r} (known: {', '.join(TRAINED_MODELS)})")
    return replace(job, models=tuple(model for model in TRAINED_MODELS if model in models))


def run_folder_name(model: str, preset: str, data_key: str) -> str:
    """The folder of one trained model in ``muontrack run``: what its weights depend on, the training code's
    version included, so a code change trains into a new folder instead of serving the old checkpoints."""
    from model.train import code_version as training_code_version

    return f"{model}-{preset}-{data_key}-c{training_code_version().rsplit('+', 1)[-1]}"


def code_version() -> str:
    """Version of all the project's code (pipeline.provenance): cache keys change when any source does."""
    return provenance.code_version("simulation", "pipeline", "model", "classical", "analysis", "flows")


def _check_report_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MuontrackError(f"report path {out} is a file, not a folder")
    if (
        out.is_dir()
        and any(out.iterdir())
        and not (out / "summary.json").exists()
        and not (out / "predictions").is_dir()
    ):
        raise MuontrackError(f"report folder {out} is not empty and holds no muontrack report; choose another --out")


def _write_parquet_atomic(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.write_parquet(tmp, compression="zstd")
    os.replace(tmp, path)


def predict_all(data: Path, runs: list[Path], out: Path, progress: bool = False) -> Path:
    """Write ``out/predictions/{hits,clusters,tracks}.parquet``: truth references, ``classical``, every run."""
    from classical import predict_classical
    from model.inference import predict_run, predict_truth
    from pipeline.batches import SPLIT_FRACTIONS, split_summary
    from pipeline.dataset import open_dataset

    dataset = open_dataset(data)
    _check_report_out(out)
    n_test, _ = split_summary(dataset, "test")
    if n_test == 0:
        raise DatasetError(
            f"dataset {data} has no events in the test split ({dataset.n_events} events, of which about "
            f"{SPLIT_FRACTIONS['test']:.0%} are test events): simulate more events"
        )
    for run in runs:
        if not Path(run).is_dir():
            raise RunError(f"run folder {run} does not exist")
    tables = [predict_truth(dataset, split="test"), predict_classical(dataset, split="test")]
    seen: set[str] = {"truth", "truth_charge", "classical"}
    for run in runs:
        predictions = predict_run(dataset, Path(run), split="test")
        model_names = set(predictions["tracks"]["model"].unique().to_list())
        duplicated = model_names & seen
        if duplicated:
            raise RunError(f"two runs are both model {sorted(duplicated)[0]!r}; evaluate one run per model")
        seen |= model_names
        tables.append(predictions)
    pred_dir = out / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for table in ("hits", "clusters", "tracks"):
        _write_parquet_atomic(pl.concat([t[table] for t in tables], how="vertical"), pred_dir / f"{table}.parquet")
    return pred_dir


def report_context(data: Path, runs: list[Path]) -> dict[str, Any]:
    """What the report says was run: dataset and each run's configuration."""
    from pipeline.dataset import open_dataset

    dataset = open_dataset(data)
    context: dict[str, Any] = {
        "dataset": str(Path(data).resolve()),
        "dataset_events": dataset.n_events,
        "dataset_seed": dataset.seed,
        "dataset_config_hash": dataset.manifest.get("config_hash"),
        "code_version": code_version(),
        "runs": [],
    }
    for run in runs:
        config_path = Path(run) / "config.json"
        run_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        metrics_path = Path(run) / "metrics.parquet"
        seconds = None
        if metrics_path.is_file():
            seconds = float(pl.read_parquet(metrics_path).filter(pl.col("split") == "train")["seconds"].sum())
        context["runs"].append(
            {
                "run": str(Path(run).resolve()),
                "model": run_config.get("model"),
                "preset": run_config.get("preset"),
                "epochs": (run_config.get("train_config") or {}).get("epochs"),
                "seed": run_config.get("seed"),
                "training_seconds": seconds,
            }
        )
    return context


def evaluate_runs(data: Path, runs: list[Path], out: Path, progress: bool = False) -> Path:
    """Inference of every run on the test split, the truth references, and the report in ``out``."""
    from analysis.report import write_report
    from pipeline.dataset import open_dataset

    out = Path(out)
    with exclusive_writer(out):
        predict_all(data, runs, out, progress=progress)
        dataset = open_dataset(data)
        write_report(out, dataset.hits(), dataset.events(), report_context(data, runs))
    return out / "report.md"
