"""Prefect flows: the end-to-end job on the `test` preset, caching across runs, Dask scale-out."""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from polars.testing import assert_frame_equal

pytest.importorskip("prefect")

from prefect.testing.utilities import prefect_test_harness

from flows import commands, end_to_end, tasks
from pipeline import provenance
from pipeline.config import SimConfig
from pipeline.errors import ConfigError, DatasetError
from pipeline.registry import SUMMARY_ROWS, get_model
from tests.helpers import placeholder_figures, snapshot


@pytest.fixture(scope="module")
def prefect_server():
    """One ephemeral Prefect API for the whole module (it takes 10-20 s to start)."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _task_states_since(t0: float) -> dict[str, list[str]]:
    """Task name -> state names of the task runs that started after t0 (read back from the Prefect API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200)
    states: dict[str, list[str]] = {}
    for run in runs:
        started = run.expected_start_time or run.start_time
        if started is not None and started.timestamp() >= t0 and run.state is not None:
            states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def _dataset_rows(path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    hits = pl.read_parquet(path / "hits" / "*.parquet").sort("event_id", "hit_id")
    events = pl.read_parquet(path / "events" / "*.parquet").sort("event_id")
    return hits, events


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.slow
def test_end_to_end_caches_and_recomputes(tmp_path):
    out = tmp_path / "job"
    first = end_to_end.end_to_end(str(out), preset="test")
    report = Path(first["report"])
    assert report.is_file()
    folder = report.parent
    for name in ("summary.json", "resolution.csv", "predictions/hits.parquet", "predictions/tracks.parquet"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    # every row of the `model` contract but the share models' (the test job trains the others) and the limit
    share_rows = get_model("share_baseline").rows + get_model("share_e2e").rows
    expected = {row for row in SUMMARY_ROWS if row not in share_rows}
    assert set(summary) == expected
    # a real dataset carries x, layer and particle_id: the report says where each model's hit weight goes
    text = report.read_text()
    assert "### Where the hit weight goes" in text
    assert "| signal | ≤ 5 mm |" in text
    assert "| noise | > 50 mm |" in text

    # the first run drew every figure; the next two write placeholders (tests.helpers.placeholder_figures): about
    # 10 s less per report
    # second run, same config: the complete dataset is not touched (no simulation task runs at all), training
    # and predictions come from the cache
    (data,) = (out / "data").iterdir()
    dataset_before = snapshot(data)
    t0 = time.time()
    with placeholder_figures():
        end_to_end.end_to_end(str(out), preset="test")
    states = _task_states_since(t0)
    assert "simulate-shard" not in states
    assert "finalize-dataset" not in states
    assert snapshot(data) == dataset_before
    for name in ("train-model", "predict"):
        assert states.get(name), f"no {name} task run recorded: {states}"
        assert set(states[name]) == {"Cached"}, (name, states[name])

    # changed simulation code draws a new dataset beside the old one and trains on it; the old one is untouched
    import simulation.shards

    t2 = time.time()
    with pytest.MonkeyPatch.context() as patch, placeholder_figures():
        patch.setattr(simulation.shards, "code_version", lambda: "0.1.0+othergenerator")
        patch.setattr(end_to_end, "simulation_code_version", simulation.shards.code_version)
        end_to_end.end_to_end(str(out), preset="test", models=["baseline"])
    states = _task_states_since(t2)
    assert "Completed" in states["simulate-shard"]
    assert "Completed" in states["train-model"]
    assert snapshot(data) == dataset_before
    assert len(list((out / "data").iterdir())) == 2

    # a changed seed recomputes the dataset and the models (one model is enough to show it)
    t1 = time.time()
    with placeholder_figures():
        end_to_end.end_to_end(str(out), preset="test", seed=1, models=["baseline"])
    states = _task_states_since(t1)
    assert "Completed" in states["simulate-shard"]
    assert "Completed" in states["train-model"]
    assert len(list((out / "data").iterdir())) == 3


@pytest.mark.usefixtures("prefect_server")
def test_simulate_flow_matches_library_and_rejects_bad_input(tmp_path):
    from simulation.shards import simulate_dataset

    config = SimConfig(shard_events=40)
    flow_out = tmp_path / "flow"
    end_to_end.simulate_flow(str(flow_out), 100, 3, config.to_json())
    direct_out = tmp_path / "direct"
    simulate_dataset(direct_out, n_events=100, seed=3, config=config)
    for a, b in zip(_dataset_rows(flow_out), _dataset_rows(direct_out), strict=True):
        assert_frame_equal(a, b)

    # bad input fails the flow with the library's error, before any file is written or replaced
    before = snapshot(flow_out)
    with pytest.raises(DatasetError, match=r"already holds a dataset with another seed \(3, asked 4\)"):
        end_to_end.simulate_flow(str(flow_out), 100, 4, config.to_json())
    assert snapshot(flow_out) == before
    with pytest.raises(ConfigError, match="shard_events must be >= 1"):
        end_to_end.simulate_flow(str(tmp_path / "bad"), 100, 3, json.dumps({"shard_events": 0}))
    assert not (tmp_path / "bad").exists()


@pytest.mark.usefixtures("prefect_server")
def test_run_reports_a_user_error_in_one_line(tmp_path, capfd):
    """A MuontrackError inside the flows reaches the caller, without Prefect's tracebacks on the console."""
    job = commands.job_preset("test")
    simulation_code = end_to_end.simulation_code_version().rsplit("+", 1)[-1]
    key = f"{SimConfig(shard_events=job.shard_events).config_hash()}-n{job.events}-s0-c{simulation_code}"
    data = tmp_path / "job" / "data" / key
    data.mkdir(parents=True)
    (data / "notes.txt").write_text("not a dataset")
    with pytest.raises(DatasetError, match="holds no muontrack dataset"):
        end_to_end.run_end_to_end("test", tmp_path / "job")
    console = capfd.readouterr()
    assert "Traceback" not in console.err + console.out
    assert "DatasetError" not in console.err + console.out
    assert (data / "notes.txt").read_text() == "not a dataset"


def test_the_user_error_filter_keeps_other_records():
    import logging

    from flows.logs import UserErrorFilter

    def record(message: str, error: BaseException | None = None, level: int = logging.ERROR) -> logging.LogRecord:
        exc_info = (type(error), error, None) if error is not None else None
        return logging.LogRecord("prefect.flow_runs", level, __file__, 1, message, None, exc_info)

    keep = UserErrorFilter().filter
    assert not keep(record("Encountered exception", DatasetError("bad")))
    assert not keep(record("Finished in state Failed('... DatasetError: bad')", level=logging.INFO))
    assert keep(record("Encountered exception", ValueError("a bug keeps its traceback")))
    assert keep(record("Finished in state Failed('... ValueError: bug')", level=logging.INFO))
    assert keep(record("Finished in state Completed()", level=logging.INFO))


def test_task_functions_directly(tmp_path):
    """The tasks' underlying functions, without Prefect (`.fn`)."""
    config = SimConfig(shard_events=50)
    out = tmp_path / "data"
    from simulation.shards import plan_shards, prepare_dataset

    prepare_dataset(out, 120, 5, config)
    entries = [
        tasks.simulate_shard.fn(str(out), config.to_json(), 5, index, first, n)
        for index, first, n in plan_shards(120, config)
    ]
    assert [e["n_events"] for e in entries] == [50, 50, 20]
    manifest = tasks.finalize_dataset.fn(str(out), config.to_json(), 5, entries)
    assert manifest["n_events"] == 120
    hits, events = _dataset_rows(out)
    assert events["event_id"].to_list() == list(range(120))
    assert hits.height == manifest["n_hits"]


def test_a_training_code_change_trains_into_another_run_folder(monkeypatch):
    import model.run_folder

    name = commands.run_folder_name("e2e", "cpu", "abc-n20000-s0")
    assert name.startswith("e2e-cpu-abc-n20000-s0-c")
    assert name == commands.run_folder_name("e2e", "cpu", "abc-n20000-s0")
    monkeypatch.setattr(model.run_folder, "code_version", lambda: "0.1.0+0123456789ab")
    assert commands.run_folder_name("e2e", "cpu", "abc-n20000-s0") == "e2e-cpu-abc-n20000-s0-c0123456789ab"


def _shipped_sources() -> list[Path]:
    """Every ``*.py`` file, at any depth, of the packages the wheel ships (pyproject.toml), relative to ROOT."""
    pyproject = tomllib.loads((provenance.ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    return sorted(
        path.relative_to(provenance.ROOT) for package in packages for path in (provenance.ROOT / package).rglob("*.py")
    )


def test_any_source_change_invalidates_the_task_cache(tmp_path, monkeypatch):
    """The Prefect cache key of a task changes when any source file of the shipped packages changes (a cached
    shard, model or prediction is never served for other code), and stays when only tests or docs change."""
    sources = _shipped_sources()
    assert Path("simulation/shards.py") in sources
    assert Path("flows/tasks.py") in sources
    for source in sources:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(provenance.ROOT / source, tmp_path / source)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_something.py").write_text("")
    (tmp_path / "README.md").write_text("")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    context = SimpleNamespace(task=SimpleNamespace(name="simulate-shard"))
    parameters = {"out": "/data", "seed": 0}
    key = tasks._cache_key(context, parameters)

    ignored = []
    for source in sources:
        path = tmp_path / source
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        if tasks._cache_key(context, parameters) == key:
            ignored.append(source.as_posix())
        path.write_bytes(original)
    assert ignored == [], "source files the cache key does not cover"

    (tmp_path / "tests" / "test_something.py").write_text("# edited\n")
    (tmp_path / "README.md").write_text("edited\n")
    assert tasks._cache_key(context, parameters) == key
    assert tasks._cache_key(context, parameters | {"seed": 1}) != key


def test_job_preset_rejects_unknown():
    from pipeline.errors import MuontrackError

    with pytest.raises(MuontrackError, match="unknown preset"):
        commands.job_preset("huge")
    with pytest.raises(MuontrackError, match="unknown model 'gnn'"):
        commands.job_preset("cpu", ["e2e", "gnn"])


def test_job_models_default_per_preset_and_follow_the_report_order():
    assert commands.job_preset("cpu").models == ("baseline", "e2e", "e2e_paper")
    assert commands.job_preset("test").models == ("baseline", "e2e", "e2e_paper", "assignment")
    chosen = commands.job_preset("cpu", ["assignment", "e2e", "assignment"])
    assert chosen.models == ("e2e", "assignment")
    assert chosen.events == commands.job_preset("cpu").events


def test_deployments_have_schedules():
    from flows.deployments import build_deployments

    built = build_deployments(Path("/tmp/muontrack-serve-test"))
    names = {d.name for d in built}
    assert {"nightly-regeneration", "weekly-cpu", "on-demand-test"} == names
    scheduled = [d for d in built if d.schedules]
    assert len(scheduled) == 2


@pytest.mark.usefixtures("prefect_server")
def test_dask_path_equals_in_process(tmp_path):
    pytest.importorskip("prefect_dask")
    from simulation.shards import simulate_dataset

    config = SimConfig(shard_events=50)
    dask_out = tmp_path / "dask"
    end_to_end.simulate_on_dask(str(dask_out), 150, 7, config.to_json(), workers=2)
    direct_out = tmp_path / "direct"
    simulate_dataset(direct_out, n_events=150, seed=7, config=config, workers=1)
    for a, b in zip(_dataset_rows(dask_out), _dataset_rows(direct_out), strict=True):
        assert_frame_equal(a, b)
