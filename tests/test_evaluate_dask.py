"""Inference shard by shard (flows.commands.predict_shard, ``muontrack evaluate --workers/--dask-address``) gives the
predictions and the summary of the in-process evaluation; the inference batch size does not change a prediction."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from numpy.testing import assert_allclose

from flows import commands

TABLES = ("hits", "clusters", "tracks")


@pytest.fixture(scope="module")
def run_dir(tiny_baseline_run) -> Path:
    """The session's tiny baseline run (two model rows: baseline and baseline_paper) on the shared tiny dataset."""
    return tiny_baseline_run


def _predictions(report: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(report / "predictions" / f"{name}.parquet") for name in TABLES}


#: the rows whose chain ends with the scattering-aware fit (model.scattering_fit): its batched linear algebra
#: rounds differently with the batch an event is in (measured between batches of 8 and 64: q/pT within 2.4e-6
#: 1/GeV, positions within 1.5e-5 mm, 4 of 30 tracks), so they agree to float32 rounding, not bit for bit; the
#: soft pull gates amplify that rounding in the hit weights (measured: 10 of 8970 weights of one event off by up
#: to 3.8e-4, 0.6 %), hence the tolerances below
SCATTERING_ROWS = ("truth_charge", "truth_share", "baseline", "e2e", "assignment")
SCATTERING_RTOL, SCATTERING_ATOL = 1e-2, 1e-3


def _assert_same_tables(got: dict[str, pl.DataFrame], expected: dict[str, pl.DataFrame]) -> None:
    for name in TABLES:
        assert got[name].height == expected[name].height > 0, name
        assert got[name].columns == expected[name].columns, name
        # every other row bit for bit, row order included (equals: NaN equal to NaN, nulls equal to nulls)
        exact = pl.col("model").is_in(SCATTERING_ROWS).not_()
        assert got[name].filter(exact).equals(expected[name].filter(exact)), name
        for column, dtype in expected[name].schema.items():
            if dtype.is_float() or (isinstance(dtype, pl.List) and dtype.inner.is_float()):
                # a list column (the fitted crossings, x_fit) compared value by value
                values = [frame[column] for frame in (got[name], expected[name])]
                if isinstance(dtype, pl.List):
                    values = [series.explode() for series in values]
                assert_allclose(
                    values[0].to_numpy(),
                    values[1].to_numpy(),
                    rtol=SCATTERING_RTOL,
                    atol=SCATTERING_ATOL,
                    err_msg=f"{name}.{column}",
                )
            else:
                assert got[name][column].equals(expected[name][column]), (name, column)


def _assert_same_summary(got, expected) -> None:
    """Equal summaries, the numbers to 1e-3 relative (they are computed from tables equal to float32 rounding),
    everything else exactly."""
    got = json.loads(json.dumps(got, default=str))
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            _assert_same_summary(got[key], value)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-6, nan_ok=True)
    else:
        assert got == expected


@pytest.mark.slow
def test_predictions_do_not_depend_on_the_inference_batch_size(tiny_dataset, run_dir):
    """The default inference batch (model.inference.INFERENCE_BATCH_SIZE) gives the rows of the run's training
    batch, which was the default before: an event's rows do not depend on the batch it is in (bit for bit but
    for the rounding of the scattering-aware fit, :data:`SCATTERING_ROWS`)."""
    from model.inference import INFERENCE_BATCH_SIZE, predict_run

    trained_with = json.loads((run_dir / "config.json").read_text())["train_config"]["batch_size"]
    assert trained_with != INFERENCE_BATCH_SIZE
    default = predict_run(tiny_dataset, run_dir, split="test")
    _assert_same_tables(predict_run(tiny_dataset, run_dir, split="test", batch_size=trained_with), default)


@pytest.mark.slow
def test_shard_by_shard_predictions_equal_the_in_process_ones(tiny_dataset, run_dir, tmp_path):
    """predict_shard on each shard, concatenated by combine_shards, writes predict_all's tables (bit for bit but
    for the rounding of the scattering-aware fit, :data:`SCATTERING_ROWS`)."""
    from pipeline.dataset import open_dataset

    runs = [run_dir]
    commands.predict_all(tiny_dataset, runs, tmp_path / "in-process")
    n_shards, max_hits = commands.plan_prediction_shards(tiny_dataset, runs, tmp_path / "sharded")
    assert n_shards == open_dataset(tiny_dataset).n_shards >= 2
    shards = [commands.predict_shard(tiny_dataset, runs, index, max_hits) for index in range(n_shards)]
    commands.combine_shards(shards, tmp_path / "sharded")
    expected = _predictions(tmp_path / "in-process")
    _assert_same_tables(_predictions(tmp_path / "sharded"), expected)
    assert expected["tracks"]["model"].unique(maintain_order=True).to_list() == [
        "truth",
        "truth_charge",
        "truth_share",
        "classical",
        "baseline",
        "baseline_paper",
    ]


def test_a_shard_view_holds_one_shard(tiny_dataset):
    from pipeline.dataset import open_dataset

    dataset = open_dataset(tiny_dataset)
    events = [commands.shard_view(dataset, index).events().collect() for index in range(dataset.n_shards)]
    assert [frame.height for frame in events] == [shard["n_events"] for shard in dataset.manifest["shards"]]
    assert pl.concat(events).equals(dataset.events().collect())


@pytest.mark.slow
@pytest.mark.usefixtures("placeholder_figures")
def test_evaluate_on_dask_equals_in_process(tiny_dataset, run_dir, tmp_path, monkeypatch):
    """``muontrack evaluate --workers 2``'s path: one Prefect task per shard on a local Dask cluster of two
    processes; the same prediction tables and the same summary as the in-process evaluation."""
    pytest.importorskip("prefect_dask")
    from prefect.testing.utilities import prefect_test_harness

    from flows.end_to_end import evaluate_on_dask

    runs = [run_dir]
    commands.evaluate_runs(tiny_dataset, runs, tmp_path / "in-process")
    # dask_task_runner exports the harness's API URL to the workers; monkeypatch removes it afterwards
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with prefect_test_harness(server_startup_timeout=120):
        summary = evaluate_on_dask(str(tiny_dataset), [str(run) for run in runs], str(tmp_path / "dask"), workers=2)
    _assert_same_tables(_predictions(tmp_path / "dask"), _predictions(tmp_path / "in-process"))
    expected = json.loads((tmp_path / "in-process" / "summary.json").read_text())
    for row, values in expected.items():
        _assert_same_summary(json.loads((tmp_path / "dask" / "summary.json").read_text())[row], values)
        _assert_same_summary(summary[row], values)


def test_evaluate_refuses_zero_workers(tmp_path):
    from tests.helpers import assert_one_line_error, run_muontrack

    result = run_muontrack(
        "evaluate", "--data", tmp_path, "--run", tmp_path / "run", "--out", tmp_path / "report", "--workers", "0"
    )
    assert result.returncode == 2
    assert_one_line_error(result, "--workers")


def _closed_port() -> int:
    """A local TCP port that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("command", ["evaluate", "simulate"])
def test_an_unreachable_dask_scheduler_is_one_line_and_touches_nothing(tiny_dataset, run_dir, tmp_path, command):
    """Before the flow starts (inside it Prefect would log tracebacks first): exit 1, one line, no output."""
    from tests.helpers import assert_one_line_error, run_muontrack

    address = f"tcp://127.0.0.1:{_closed_port()}"
    out = tmp_path / "out"
    if command == "evaluate":
        arguments = ["--data", tiny_dataset, "--run", run_dir, "--out", out]
    else:
        arguments = ["--events", "100", "--out", out]
    result = run_muontrack(command, *arguments, "--dask-address", address)
    assert result.returncode == 1
    assert_one_line_error(result, f"cannot reach the Dask scheduler at {address}")
    assert not out.exists()
    result = run_muontrack(command, *arguments, "--dask-address", "tcp://no-port-here")
    assert result.returncode == 2
    assert_one_line_error(result, "--dask-address")
    assert not out.exists()
