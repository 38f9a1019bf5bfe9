"""`muontrack simulate` and `muontrack inspect` through a real subprocess: exit codes, one-line errors,
no traceback, and existing files left untouched on bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from polars.testing import assert_frame_equal

from pipeline.config import SimConfig
from pipeline.dataset import MANIFEST_NAME, open_dataset
from simulation.shards import simulate_dataset
from tests.helpers import assert_one_line_error, run_muontrack, snapshot

SMALL = SimConfig(shard_events=8)


@pytest.fixture(scope="module")
def small_config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "small.json"
    path.write_text(json.dumps({"simulation": {"shard_events": 8}}))
    return path


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "dataset"
    simulate_dataset(out, n_events=20, seed=5, config=SMALL)
    return out


def test_simulate_writes_the_same_rows_as_the_library(
    dataset_dir: Path, small_config_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "from-cli"
    arguments = ("--events", 20, "--seed", 5, "--out", out, "--workers", 2, "--config", small_config_file)
    result = run_muontrack("simulate", *arguments, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"wrote 20 events, {open_dataset(dataset_dir).manifest['n_hits']} hits" in result.stdout
    from_cli, from_library = open_dataset(out), open_dataset(dataset_dir)
    assert_frame_equal(from_cli.hits().collect(), from_library.hits().collect())
    assert_frame_equal(from_cli.events().collect(), from_library.events().collect())


def test_inspect_prints_a_summary(dataset_dir: Path, tmp_path: Path) -> None:
    result = run_muontrack("inspect", dataset_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "signal fraction" in result.stdout
    assert SMALL.config_hash() in result.stdout
    assert result.stderr == ""


def test_negative_event_count(tmp_path: Path) -> None:
    result = run_muontrack("simulate", "--events", -5, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(result, "number of events", "-5")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        ({"simulation": {"detector": {"pitchh": 0.4}}}, ("unknown config key simulation.detector.pitchh",)),
        ({"simulation": {"muon": {"pt_min": 50.0, "pt_max": 20.0}}}, ("muon.pt_max", "reversed")),
        ({"simulation": {"shard_events": "many"}}, ("simulation.shard_events must be an integer", "'many'")),
        ({"simulation": {"detector": {"pitch": "abc"}}}, ("config key simulation.detector.pitch must be a number",)),
        # the top level of the file holds sections: the former top-level SimConfig form says where its keys go
        ({"detector": {"pitch": 0.4}}, ("config key detector", "belongs in the simulation section")),
        ({"simulaton": {}}, ("unknown config key simulaton", "known sections: simulation, model, train")),
    ],
)
def test_bad_config_file(config: dict, fragments: tuple[str, ...], tmp_path: Path) -> None:
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    result = run_muontrack("simulate", "--events", 10, "--out", tmp_path / "out", "--config", config_file, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_out_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "results.txt"
    target.write_text("precious")
    before = snapshot(tmp_path)
    result = run_muontrack("simulate", "--events", 10, "--out", target, cwd=tmp_path)
    assert_one_line_error(result, "is a file")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "arguments",
    [
        ("--seed", "6"),  # another seed
        ("--seed", "5", "--events", "21"),  # another event count
        ("--seed", "5"),  # another config: the default shard size instead of 8
    ],
)
def test_out_holds_another_dataset(arguments: tuple[str, ...], dataset_dir: Path, tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    shutil.copytree(dataset_dir, existing)
    before = snapshot(existing)
    args = ["simulate", "--out", existing, *arguments]
    if "--events" not in arguments:
        args += ["--events", "20"]
    result = run_muontrack(*args, cwd=tmp_path)
    assert_one_line_error(result, "already holds a dataset with another", "choose another --out")
    assert snapshot(existing) == before


def test_inspect_a_missing_path(tmp_path: Path) -> None:
    result = run_muontrack("inspect", tmp_path / "nowhere", cwd=tmp_path)
    assert_one_line_error(result, "does not exist")


def test_inspect_an_incomplete_dataset(dataset_dir: Path, tmp_path: Path) -> None:
    incomplete = tmp_path / "incomplete"
    shutil.copytree(dataset_dir, incomplete)
    (incomplete / MANIFEST_NAME).unlink()
    (incomplete / ".staging").mkdir()
    before = snapshot(incomplete)
    result = run_muontrack("inspect", incomplete, cwd=tmp_path)
    assert_one_line_error(result, "incomplete dataset", "muontrack simulate")
    assert snapshot(incomplete) == before


def test_inspect_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / MANIFEST_NAME).write_text(json.dumps({"format": "album"}))
    result = run_muontrack("inspect", tmp_path / "photos", cwd=tmp_path)
    assert_one_line_error(result, "not a muontrack dataset")


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "--events", "abc", "--out", "unused"],
        ["simulate", "--out", "unused"],
        ["no-such-command"],
        ["train", "--data", "unused", "--model", "gnn", "--out", "unused"],
        ["run", "--preset", "test", "--model", "gnn", "--out", "unused"],
        ["simulate", "--events", str(10**12), "--out", "unused"],
        ["run", "--preset", "test", "--events", "0", "--out", "unused"],
        ["run", "--preset", "paper", "--events", str(10**12), "--out", "unused"],
    ],
)
def test_usage_errors_are_one_line(args, tmp_path):
    result = run_muontrack(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result)
    assert not (tmp_path / "unused").exists()


def test_evaluate_a_dataset_without_test_events(tmp_path: Path) -> None:
    from pipeline.batches import split_mask

    data = tmp_path / "tiny"
    simulate_dataset(data, n_events=15, seed=3, config=SMALL)
    assert not split_mask(open_dataset(data).events().collect()["event_id"].to_numpy(), "test").any()
    result = run_muontrack(
        "evaluate", "--data", data, "--run", tmp_path / "no-run", "--out", tmp_path / "report", cwd=tmp_path
    )
    assert_one_line_error(result, "no events in the test split")
    assert result.returncode == 1  # a failure at run time, not a usage error
    assert not (tmp_path / "report").exists()


def test_inspect_refuses_a_flipped_byte_with_one_line(dataset_dir: Path, tmp_path: Path) -> None:
    corrupted = tmp_path / "corrupted"
    shutil.copytree(dataset_dir, corrupted)
    assert run_muontrack("inspect", "--verify", corrupted, cwd=tmp_path).returncode == 0
    shard = corrupted / "hits" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit inside a data page; the size and the footer stay valid
    shard.write_bytes(bytes(data))
    before = snapshot(corrupted)
    for arguments in ((corrupted,), ("--verify", corrupted)):
        assert_one_line_error(run_muontrack("inspect", *arguments, cwd=tmp_path), "checksum mismatch", "part-00000")
    assert snapshot(corrupted) == before


def test_version(tmp_path: Path) -> None:
    from flows.commands import code_version

    result = run_muontrack("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"muontrack {code_version()}"


def test_inspect_json_is_one_document_on_stdout(dataset_dir: Path, tmp_path: Path) -> None:
    result = run_muontrack("inspect", "--json", dataset_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    dataset = open_dataset(dataset_dir)
    assert record["events"] == dataset.n_events == record["summary"]["events"]["events"]
    assert record["hits"] == dataset.n_hits == record["summary"]["hits"]["hits"]
    assert record["config_hash"] == dataset.config.config_hash()
    assert record["config"] == json.loads(json.dumps(dataset.config.to_dict()))


def test_a_runtime_failure_exits_1_and_a_held_folder_names_its_writer(tmp_path: Path) -> None:
    from pipeline.locks import exclusive_writer

    out = tmp_path / "busy"
    with exclusive_writer(out):
        result = run_muontrack("simulate", "--events", 20, "--out", out, cwd=tmp_path)
    assert_one_line_error(result, "is being written by another muontrack process", f"pid {os.getpid()}")
    assert result.returncode == 1


def test_bare_muontrack_prints_its_help_once_and_exits_2():
    result = run_muontrack()
    assert result.returncode == 2
    assert (result.stdout + result.stderr).count("Usage: muontrack") == 1


def test_inspect_verify_says_what_it_verified_and_names_the_detector(dataset_dir: Path, tmp_path: Path) -> None:
    result = run_muontrack("inspect", dataset_dir, "--verify", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    n_files = 2 * len(json.loads((dataset_dir / "manifest.json").read_text())["shards"])
    assert f"verified       {n_files} files re-read" in result.stdout
    assert "detector" in result.stdout
    record = json.loads(run_muontrack("inspect", dataset_dir, "--json", "--verify", cwd=tmp_path).stdout)
    assert record["verified_files"] == n_files
    assert record["detector"] == "default"


@pytest.mark.parametrize(
    "command", ["", "simulate", "inspect", "train", "evaluate", "results", "display", "run", "scan", "serve"]
)
def test_help_shows_the_type_of_one_value(command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ``<bool>`` beside a flag (it takes no value) and no ``<list[...]>`` beside a repeatable parameter (it
    takes one value each time)."""
    monkeypatch.setenv("COLUMNS", "250")
    result = run_muontrack(*command.split(), "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--help " in result.stdout
    assert "<bool>" not in result.stdout
    assert "list[" not in result.stdout
    lines = result.stdout.splitlines()

    def line_of(name: str) -> str:
        return next(line for line in lines if f" {name} " in line)

    for flag in ("--help", "--json", "--verify", "--overwrite", "--resume", "--version"):
        if any(f" {flag} " in line for line in lines):
            assert "<" not in line_of(flag), line_of(flag)
    expected = {
        "evaluate": ("--run", "<path>"),
        "results": ("folders...", "<path>"),
        "run": ("--model", "<baseline|e2e|"),
        "train": ("--model", "<baseline|e2e|"),
    }
    if command in expected:
        name, shown = expected[command]
        assert shown in line_of(name), line_of(name)
