"""One writer per output folder (pipeline.locks): a second writer is refused at once, with one line, and a
killed writer's lock does not outlive it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import SimConfig
from pipeline.dataset import open_dataset
from pipeline.errors import MuontrackError
from pipeline.locks import exclusive_writer, lock_path
from simulation.shards import simulate_dataset
from tests.helpers import assert_one_line_error, muontrack_command

SMALL = SimConfig(shard_events=8)

HOLD = """
import sys, time
from pipeline.locks import exclusive_writer
with exclusive_writer(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _hold_in_another_process(out: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    holder = _hold_in_another_process(out)
    try:
        message = rf"{re.escape(str(out))} is being written by another muontrack process \(pid {holder.pid}\)"
        with pytest.raises(MuontrackError, match=message):
            simulate_dataset(out, n_events=16, seed=0, config=SMALL)
        assert not out.exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_killed_writer_leaves_no_lock_behind(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    holder = _hold_in_another_process(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    assert lock_path(out).exists()  # kill -9: no clean-up ran, but the kernel dropped the lock
    simulate_dataset(out, n_events=16, seed=0, config=SMALL)
    assert open_dataset(out).n_events == 16
    assert not lock_path(out).exists()  # a clean release removes the file


def test_the_same_folder_cannot_be_locked_twice_in_one_process(tmp_path: Path) -> None:
    with exclusive_writer(tmp_path / "run"):
        with (
            pytest.raises(MuontrackError, match="being written by another muontrack process"),
            exclusive_writer(tmp_path / "run"),
        ):
            pass
        with exclusive_writer(tmp_path / "other-run"):  # another folder is another lock
            pass
    with exclusive_writer(tmp_path / "run"):  # released
        pass


def test_two_simulate_commands_on_one_out_leave_one_valid_dataset(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    config = tmp_path / "small.json"
    config.write_text('{"simulation": {"shard_events": 20000}}')
    commands = [
        [
            *muontrack_command(),
            "simulate",
            "--events",
            "100000",
            "--seed",
            str(seed),
            "--out",
            str(out),
            "--config",
            str(config),
        ]
        for seed in (7, 8)
    ]
    started = [
        subprocess.Popen(c, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    results = []
    for process, command in zip(started, commands, strict=True):
        stdout, stderr = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    winners = [r for r in results if r.returncode == 0]
    losers = [r for r in results if r.returncode != 0]
    assert len(winners) == 1, [r.stderr for r in results]
    assert len(losers) == 1, [r.stderr for r in results]
    # the loser either met the lock or, starting late, the winner's complete dataset of another seed
    assert_one_line_error(losers[0])
    assert "being written by another muontrack process" in losers[0].stderr or "another seed" in losers[0].stderr
    dataset = open_dataset(out)
    dataset.verify(force=True)
    assert dataset.seed == int(winners[0].args[winners[0].args.index("--seed") + 1])
