"""benchmarks/gpu.sh, the sized `paper` job for a GPU machine: its one-line refusals (no GPU, bad options) and,
on the CPU, a tiny `--preset test` job with its key=value figures, written under --out and nowhere else."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import job_config, prediction_figures

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _fake_nvidia_smi(folder: Path, listing: str) -> Path:
    """A folder holding an ``nvidia-smi`` that lists ``listing`` for ``-L`` (and fails on anything else)."""
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\n[ "$1" = -L ] && printf "{listing}" && exit 0\nexit 9\n')
    smi.chmod(0o755)
    return folder


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


def _env(tmp_path: Path, path_first: Path | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("XDG_", "MUONTRACK_"))}
    env |= {"HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"), "JAX_PLATFORMS": "cpu"}
    if path_first is not None:
        env["PATH"] = f"{path_first}:{env['PATH']}"
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return env


def test_paper_without_a_gpu_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    env = _env(tmp_path, _fake_nvidia_smi(tmp_path / "bin", ""))
    result = _run("--preset", "paper", "--out", tmp_path / "out", cwd=tmp_path, env=env)
    assert result.returncode == 1
    _one_line_error(result, "no NVIDIA GPU visible", "--allow-cpu")
    assert not (tmp_path / "out").exists()
    assert not any((tmp_path / "home").iterdir())


def test_paper_where_jax_sees_no_gpu_is_one_line(tmp_path: Path) -> None:
    """The driver lists a GPU but JAX runs on the CPU (no `cuda` extra, say): refused before the job."""
    env = _env(tmp_path, _fake_nvidia_smi(tmp_path / "bin", "GPU 0: Fake GPU (UUID: GPU-0)\\n"))
    out = tmp_path / "out"
    result = _run("--preset", "paper", "--no-install", "--python", sys.executable, "--out", out, cwd=tmp_path, env=env)
    assert result.returncode == 1
    _one_line_error(result, "JAX sees no GPU (platform cpu)", "--allow-cpu")
    assert "platform=cpu" in result.stdout.splitlines()
    assert not (out / "job").exists()
    assert not (out / "job-config.json").exists()
    assert not any((tmp_path / "home").iterdir())


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--preset", "cpu"], "--preset must be paper or test"),
        (["--events", "0"], "--events must be a positive integer"),
        (["--epochs", "two"], "--epochs must be a positive integer"),
        (["--budget", "-5"], "--budget must be a whole number"),
        (["--model"], "--model needs a value"),
        (["--config", "missing.toml"], "config file missing.toml does not exist"),
        (["--python", "python3"], "--python is for --no-install"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = _run("--preset", "test", "--out", tmp_path / "out", *args, cwd=tmp_path, env=_env(tmp_path))
    assert result.returncode == 2
    _one_line_error(result, fragment)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["home", "tmp"]


def test_an_out_folder_of_something_else_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("keep me")
    result = _run("--preset", "test", "--no-install", "--out", tmp_path / "out", cwd=tmp_path, env=_env(tmp_path))
    assert result.returncode == 2
    _one_line_error(result, "is not empty and was not written by benchmarks/gpu.sh")
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["thesis.tex"]


def test_the_sized_job_is_the_defaults_then_the_file_then_the_options(tmp_path: Path) -> None:
    events, sections = job_config("paper")
    assert events == 20_000
    assert sections["train"] == {
        "epochs": 2,
        "lambda_warmup_epochs": 1,
        "max_train_events": 4096,
        "node_buckets": [160, 256],
    }
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train": {"epochs": 5, "batch_size": 8}, "model": {"hidden": 256}}))
    events, sections = job_config("paper", config, events=1000, epochs=3)
    assert events == 1000
    assert sections["train"] == {
        "epochs": 3,
        "lambda_warmup_epochs": 1,
        "max_train_events": 4096,
        "node_buckets": [160, 256],
        "batch_size": 8,
    }
    assert sections["model"] == {"hidden": 256}
    assert sections["simulation"] == {"shard_events": 2500}
    assert job_config("test") == (600, {})


def test_prediction_lines_give_the_networks_and_classical_rates() -> None:
    log = "\n".join(
        [
            "12:00:00.000 | INFO | Task run 'predict-e0f' - predict truth references: 65 test events",
            "12:00:06.000 | INFO | Task run 'predict-e0f' - predict truth, truth_charge, truth_share: 65 events, 6.1 s",
            "12:00:50.000 | INFO | Task run 'predict-e0f' - predict classical: 65 events, 43.8 s",
            "12:01:00.000 | INFO | Task run 'predict-e0f' - predict baseline, baseline_paper: 100 events, 10.0 s",
            "12:01:05.000 | INFO | Task run 'predict-e0f' - predict e2e: 100 events, 5.0 s",
        ]
    )
    figures = prediction_figures(log)
    assert figures == {"eval_events": 200.0, "eval_s": 15.0, "classical_events": 65.0, "classical_s": 43.8}


@pytest.mark.slow
def test_a_tiny_test_job_prints_its_figures_and_writes_only_under_out(tmp_path: Path) -> None:
    """~2.5 min on 2 loaded cores, nearly all of it compilations (Numba's and JAX's caches start empty in OUT)."""
    config = tmp_path / "tiny.toml"
    config.write_text("[train]\nepochs = 1\nmax_train_events = 32\n")
    env = _env(tmp_path)
    repo_before = _files(ROOT)
    out = tmp_path / "out"
    result = _run(
        *("--preset", "test", "--no-install", "--allow-cpu", "--python", sys.executable, "--out", out),
        *("--events", "300", "--model", "baseline", "--config", config),
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line and " " not in line)
    summary = json.loads((out / "job.json").read_text())["summary"]
    expected = {
        **dict.fromkeys(["preset", "platform", "device_kind", "devices", "events", "max_train_events", "epochs"]),
        **dict.fromkeys(["models", "node_buckets", "budget_s", "jax_cache", "wall_s", "train_s", "train_events"]),
        **dict.fromkeys(["train_events_per_s", "train_steady_events_per_s", "eval_events", "eval_events_per_s"]),
        **dict.fromkeys(["classical_events_per_s", "report", *(f"sigma68_{row}" for row in summary)]),
    }
    assert set(figures) == set(expected)  # no nvidia-smi here: no GPU memory keys
    assert (figures["preset"], figures["platform"], figures["events"], figures["models"]) == (
        "test",
        "cpu",
        "300",
        "baseline",
    )
    assert (figures["epochs"], figures["max_train_events"], figures["jax_cache"]) == ("1", "32", "cold")
    assert figures["train_events"] == "32"
    assert figures["train_steady_events_per_s"] == "nan"
    for key in ("wall_s", "train_events_per_s", "eval_events_per_s", "classical_events_per_s"):
        assert 0 < float(figures[key]) < math.inf, key
    assert float(figures["sigma68_baseline"]) == pytest.approx(summary["baseline"]["sigma68"], rel=1e-5)
    assert "baseline_paper" in result.stdout
    assert "sigma68" in result.stdout
    assert (out / "figures.txt").read_text().splitlines() == [
        line for line in result.stdout.splitlines() if line.split("=", 1)[0] in figures and "=" in line
    ]
    assert Path(figures["report"]).is_relative_to(out)
    # only under --out: not in the caller's folder, home, temporary folder, nor the repository (Numba's cache)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["home", "out", "tiny.toml", "tmp"]
    assert not any((tmp_path / "home").iterdir())
    assert not any((tmp_path / "tmp").iterdir())
    assert _files(ROOT) == repo_before


def _files(root: Path) -> dict[str, int]:
    """Every file of the working tree but the venvs and .git: path -> modification time."""
    found = {}
    for folder, names, files in os.walk(root):
        names[:] = [name for name in names if name not in {".git", ".venv", ".venv-ci", "gpu-out"}]
        for name in files:
            path = Path(folder, name)
            found[str(path.relative_to(root))] = path.stat().st_mtime_ns
    return found
