"""Ctrl-C and kill -9 (issue 22): exit 130 with one line, resumable outputs, and no Prefect server left behind.

Each test runs ``muontrack`` in a session of its own and signals it as a terminal or a user would: Ctrl-C
reaches the whole foreground process group, kill -9 the one process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.dataset import STAGING_DIR, open_dataset
from tests.helpers import muontrack_command, run_muontrack

pytestmark = pytest.mark.slow


def _start(arguments: list[str], cwd: Path) -> subprocess.Popen[str]:
    # as a user's shell would start it: no Prefect API of an earlier test (a test harness may have exported one)
    env = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    return subprocess.Popen(
        [*muontrack_command(), *arguments],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_ctrl_c_on_simulate_exits_130_with_one_line_and_the_dataset_resumes(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    config = tmp_path / "shards.json"
    config.write_text('{"simulation": {"shard_events": 2000}}')
    arguments = ["simulate", "--events", "400000", "--seed", "3", "--out", str(out), "--config", str(config)]
    process = _start(arguments, tmp_path)
    _wait_for(lambda: (out / STAGING_DIR).is_dir() and any((out / "hits").glob("part-*")), 120, "a first shard")
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr + stdout
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    resumed = run_muontrack(*arguments, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert open_dataset(out).n_events == 400_000


def _start_run_and_wait_for_its_flow(tmp_path: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """``muontrack run --preset test`` until its flow writes, and the local Prefect server it started."""
    out = tmp_path / "job"
    process = _start(["run", "--preset", "test", "--out", str(out)], tmp_path)
    _wait_for(lambda: (out / "data").is_dir(), 300, "the job's flow to start")
    servers = [pid for pid in _children(process.pid) if "uvicorn" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(servers) == 1, "muontrack run started no local Prefect server of its own"
    return process, servers


def test_a_killed_run_leaves_no_prefect_server_and_no_open_stdout(tmp_path: Path) -> None:
    process, servers = _start_run_and_wait_for_its_flow(tmp_path)
    os.kill(process.pid, signal.SIGKILL)
    # a caller reading muontrack's output to the end gets it: nothing else holds the pipes
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    _wait_for(lambda: not any(_alive(pid) for pid in servers), 30, "the Prefect server to stop")


def test_ctrl_c_on_run_exits_130_promptly_without_tracebacks(tmp_path: Path) -> None:
    process, servers = _start_run_and_wait_for_its_flow(tmp_path)
    os.killpg(process.pid, signal.SIGINT)
    started = time.monotonic()
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 130, stderr[-2000:]
    assert time.monotonic() - started < 120
    assert "Traceback" not in stderr + stdout
    assert "ConnectError" not in stderr
    # Prefect's own log line about stopping its server may follow the error line
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == ["error: interrupted"]
    _wait_for(lambda: not any(_alive(pid) for pid in servers), 30, "the Prefect server to stop")
