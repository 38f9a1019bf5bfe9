"""Schedules against a real Prefect server (issue 26).

``prefect server start`` runs in a process group of its own (a temporary PREFECT_HOME, a free port); the nightly
deployment of ``muontrack serve`` (flows.deployments.build_deployments) is served with an interval schedule of a
few seconds instead of its 02:00 cron. The server's scheduler must create the flow run and the runner must
complete it. With SQLAlchemy 2.1 the scheduler failed at every loop ("Can't evaluate bulk DML statement") and
created no run; with FastAPI >= 0.151 the API answered the client's filters with 422.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prefect")

ROOT = Path(__file__).resolve().parents[1]
#: events of the scheduled nightly dataset (one shard, a few seconds)
EVENTS = 50
#: the test's schedule: every INTERVAL_S seconds (the runner executes one run at a time)
INTERVAL_S = 10
DEPLOYMENT = "nightly-simulate/nightly-regeneration"

#: the serve process: the nightly deployment of `muontrack serve` with a schedule that fires in seconds
SERVE = """
import sys
from pathlib import Path

from prefect import serve
from prefect.schedules import Interval

from flows.deployments import build_deployments

base, events, interval = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
schedules = {"nightly-regeneration": [Interval(interval)]}
nightly = [d for d in build_deployments(base, schedules, nightly_events=events) if d.name == "nightly-regeneration"]
serve(*nightly, limit=1)
"""


def test_nightly_dates_seeds_and_default_schedules():
    from prefect.runtime import flow_run

    from flows.deployments import build_deployments, nightly_date, nightly_seed
    from pipeline.errors import ConfigError

    assert nightly_date("2025-01-31") == datetime.date(2025, 1, 31)
    assert nightly_seed(datetime.date(2025, 1, 31)) == 20250131
    # outside a flow run: the scheduled start is now
    assert nightly_date() == flow_run.scheduled_start_time.astimezone(datetime.UTC).date()
    with pytest.raises(ConfigError, match="night '31/01/2025' is not a date"):
        nightly_date("31/01/2025")

    built = {d.name: d for d in build_deployments(Path("/tmp/muontrack-serve-test"))}
    crons = {name: [(s.schedule.cron, s.schedule.timezone) for s in d.schedules or []] for name, d in built.items()}
    assert crons == {
        "nightly-regeneration": [("0 2 * * *", "UTC")],
        "weekly-cpu": [("0 3 * * 0", "UTC")],
        "on-demand-test": [],
    }
    assert built["nightly-regeneration"].parameters == {
        "base": "/tmp/muontrack-serve-test/nightly-data",
        "events": 200_000,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (a graceful stop), SIGKILL to whatever of it is left after 20 s."""
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    # also the members that outlive the leader (the runner's flow-run processes)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=20)


class Processes:
    """The server and serve processes of one test, their logs, and waits that report both logs on failure."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = env
        self.started: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = self.tmp_path / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                cwd=self.tmp_path,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((name, process, log))
        return process

    def logs(self) -> str:
        return "".join(f"\n--- {name} (last lines of {log.name}) ---\n{_tail(log)}" for name, _, log in self.started)

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
        """``check()``'s first true value; the test fails with both logs when ``timeout`` seconds pass first or
        a process exits."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            for name, process, _ in self.started:
                if process.poll() is not None:
                    pytest.fail(f"{name} exited ({process.returncode}) waiting for {what}{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout:.0f} s{self.logs()}")
            time.sleep(every)

    def stop(self) -> None:
        for _, process, _ in reversed(self.started):
            _stop(process)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    home = tmp_path / "prefect-home"
    home.mkdir()
    # nothing of the user's Prefect configuration (profile, API URL or key) reaches the processes
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # the runner asks for due runs every 2 s instead of 10 s
        PREFECT_RUNNER_POLL_FREQUENCY="2",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    started = Processes(tmp_path, env)
    try:
        yield started
    finally:
        started.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_the_server_schedules_and_the_runner_completes_the_nightly_run(processes, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deployments import nightly_seed

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    processes.env["PREFECT_API_URL"] = url
    server = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    processes.start("server", server)
    processes.wait_for("healthy server", lambda: _healthy(url), timeout=180)
    base = tmp_path / "scheduled"
    processes.start("serve", [sys.executable, "-c", SERVE, str(base), str(EVENTS), str(INTERVAL_S)])

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:

        def deployment():
            try:
                return client.read_deployment_by_name(DEPLOYMENT)
            except ObjectNotFound:
                return None

        deployment_id = processes.wait_for("registered deployment", deployment, timeout=180).id

        def first_run():
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            )
            return runs[0] if runs else None

        # the scheduler's loop for recently changed deployments runs every 5 s
        scheduled = processes.wait_for("flow run created by the scheduler", first_run, timeout=60)
        assert scheduled.auto_scheduled, scheduled
        assert scheduled.created_by is not None
        assert scheduled.created_by.type == "SCHEDULE", scheduled.created_by
        assert "auto-scheduled" in scheduled.tags

        def finished():
            run = client.read_flow_run(scheduled.id)
            return run if run.state is not None and run.state.is_final() else None

        run = processes.wait_for("final state of the scheduled run", finished, timeout=180, every=2.0)
        assert run.state.type == StateType.COMPLETED, f"{run.state}{processes.logs()}"
        states = [state.type for state in client.read_flow_run_states(run.id)]
        assert states[0] == StateType.SCHEDULED, states
        assert states[-1] == StateType.COMPLETED, states

        # the night is the scheduled start's UTC date: its own folder and seed, named after it
        night = run.expected_start_time.astimezone(datetime.UTC).date()
        assert run.name == f"nightly-{night.isoformat()}"
        seed = nightly_seed(night)
        manifest = json.loads((base / "nightly-data" / night.isoformat() / "manifest.json").read_text())
        assert (manifest["seed"], manifest["n_events"]) == (seed, EVENTS)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
        )
        assert [(child.name, child.state.type) for child in children] == [
            (f"simulate-{EVENTS}-seed{seed}", StateType.COMPLETED)
        ]

        # what `prefect deployment ls`, `flow-run ls` and `artifact ls` ask (422 with FastAPI >= 0.151)
        assert [d.id for d in client.read_deployments()] == [deployment_id]
        assert client.read_flow_runs(limit=None)
        assert client.read_latest_artifacts() == []


def test_serve_without_a_server_at_its_url_is_one_line(tmp_path):
    from tests.helpers import assert_one_line_error, muontrack_command

    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path / "prefect")}
    result = subprocess.run(
        [*muontrack_command(), "serve"], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert_one_line_error(result, "no Prefect server answers", url)
    assert result.returncode == 1
