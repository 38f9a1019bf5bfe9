"""Hostile and faulty input (issue 22): nothing outside ``--out`` is written or deleted, nothing is silently
corrupted, one line and a non-zero exit for what is refused.

Families here: resumes from every subset of written shards; symbolic links planted in or beside an output
folder; two names for one folder; outputs nested in other outputs; a reader beside a writer's checkpoints.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import SimConfig
from pipeline.dataset import MANIFEST_NAME, STAGING_DIR, TABLES, open_dataset
from pipeline.errors import MuontrackError
from pipeline.locks import exclusive_writer, lock_path
from simulation.shards import simulate_dataset
from tests.helpers import assert_one_line_error, run_muontrack, snapshot

#: four shards, large enough that generating one takes as long as the writer thread's encoding of another
RESUME_CONFIG = SimConfig(shard_events=200)
RESUME_EVENTS = 800
RESUME_SEED = 11
SMALL = SimConfig(shard_events=8)


@pytest.fixture(scope="module")
def resume_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "reference"
    simulate_dataset(out, n_events=RESUME_EVENTS, seed=RESUME_SEED, config=RESUME_CONFIG)
    return out


def _tables(folder: Path) -> dict[str, object]:
    return {
        f"{table}/{path.name}": pq.read_table(path)
        for table in TABLES
        for path in sorted((folder / table).glob("part-*.parquet"))
    }


def _shard_files(folder: Path, shard: int) -> list[Path]:
    return [path for table in TABLES for path in (folder / table).glob(f"part-{shard:05d}.parquet")]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_resume_from_any_subset_of_shards_equals_an_uninterrupted_run(
    resume_reference: Path, tmp_path: Path, workers: int
) -> None:
    """Every subset of the reference's shards, copied without a manifest (a folder docs/operations.md says resumes),
    resumed with 1, 2 and 3 workers: every table equals the uninterrupted run's. With one worker the two
    buffer sets once alternated by plan position, so a shard after an odd number of skipped ones was drawn into
    the buffers the writer thread was still encoding (shard 2's events written as shard 0's)."""
    reference = _tables(resume_reference)
    n_shards = RESUME_EVENTS // RESUME_CONFIG.shard_events
    for size in range(n_shards):
        for kept in itertools.combinations(range(n_shards), size):
            out = tmp_path / f"w{workers}-{'-'.join(map(str, kept)) or 'none'}"
            for shard in kept:
                for path in _shard_files(resume_reference, shard):
                    (out / path.parent.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, out / path.parent.name / path.name)
            simulate_dataset(out, n_events=RESUME_EVENTS, seed=RESUME_SEED, config=RESUME_CONFIG, workers=workers)
            open_dataset(out).verify(force=True)
            resumed = _tables(out)
            assert resumed.keys() == reference.keys()
            for name, table in reference.items():
                assert resumed[name].equals(table), f"{name} differs after resuming from shards {kept}"
            shutil.rmtree(out)


# ---- symbolic links ----------------------------------------------------------------------------------------


def _victim(tmp_path: Path) -> tuple[Path, dict]:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    (victim / "sub" / "more.txt").write_text("and me")
    return victim, snapshot(victim)


@pytest.mark.parametrize("planted", [STAGING_DIR, "hits", "events", "notes"])
def test_a_symlink_planted_in_a_dataset_folder_is_refused_and_its_target_untouched(
    tmp_path: Path, planted: str
) -> None:
    victim, before = _victim(tmp_path)
    out = tmp_path / "ds"
    out.mkdir()
    (out / planted).symlink_to(victim)
    result = run_muontrack("simulate", "--events", 16, "--seed", 4, "--out", out, cwd=tmp_path)
    assert_one_line_error(result, "symbolic link", planted)
    assert result.returncode == 1
    assert snapshot(victim) == before
    assert sorted(path.name for path in out.iterdir()) == [planted]


def test_a_symlink_planted_in_a_complete_dataset_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    simulate_dataset(out, n_events=16, seed=4, config=SMALL)
    victim, before = _victim(tmp_path)
    shard = next((out / "hits").glob("part-*.parquet"))
    shard.rename(victim / "moved.parquet")
    shard.symlink_to(victim / "moved.parquet")
    with pytest.raises(MuontrackError, match="symbolic link inside --out"):
        simulate_dataset(out, n_events=16, seed=4, config=SMALL)
    assert (victim / "moved.parquet").is_file()
    assert {k: v for k, v in snapshot(victim).items() if k != "moved.parquet"} == before


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    out = tmp_path / "ds"
    lock_path(out).symlink_to(precious)
    result = run_muontrack("simulate", "--events", 16, "--seed", 4, "--out", out, cwd=tmp_path)
    assert_one_line_error(result, "lock file", "symbolic link")
    assert precious.read_text() == "keep me"
    assert not out.exists()


HOLD = """
import sys, time
from pipeline.locks import exclusive_writer
with exclusive_writer(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_name_for_the_same_folder_meets_the_same_lock(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    link = tmp_path / "ds_link"
    link.symlink_to(out)
    assert lock_path(link) == lock_path(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        result = run_muontrack("simulate", "--events", 16, "--seed", 4, "--out", link, cwd=tmp_path)
        assert_one_line_error(result, "being written by another muontrack process", f"pid {holder.pid}")
        assert list(out.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # once free, the link is a fine name for the folder: the dataset lands in its target
    simulate_dataset(link, n_events=16, seed=4, config=SMALL)
    assert open_dataset(out).n_events == 16


# ---- outputs inside outputs --------------------------------------------------------------------------------


def test_an_out_inside_a_dataset_is_refused_and_the_dataset_untouched(tmp_path: Path) -> None:
    dataset = tmp_path / "DS"
    simulate_dataset(dataset, n_events=16, seed=4, config=SMALL)
    before = snapshot(dataset)
    for inner in (dataset / "hits" / "part-00009.parquet", dataset / "nested", dataset / "events" / "x" / "y"):
        result = run_muontrack("simulate", "--events", 16, "--seed", 4, "--out", inner, cwd=tmp_path)
        assert_one_line_error(result, "is inside the dataset folder", str(dataset))
    assert snapshot(dataset) == before
    assert not any(path.name.endswith(".muontrack-lock") for path in dataset.rglob("*"))


@pytest.mark.parametrize(
    ("kind", "markers"),
    [("run", ["config.json", "checkpoints/"]), ("report", ["summary.json", "report.md"])],
)
def test_an_out_inside_a_run_or_report_folder_is_refused(tmp_path: Path, kind: str, markers: list[str]) -> None:
    folder = tmp_path / kind
    for marker in markers:
        if marker.endswith("/"):
            (folder / marker).mkdir(parents=True)
        else:
            folder.mkdir(exist_ok=True)
            (folder / marker).write_text("{}")
    before = snapshot(folder)
    with pytest.raises(MuontrackError, match=f"is inside the {kind} folder"), exclusive_writer(folder / "inner"):
        pass
    assert snapshot(folder) == before
    assert sorted(os.listdir(folder)) == sorted(marker.rstrip("/") for marker in markers)


def test_a_folder_beside_an_output_is_not_inside_it(tmp_path: Path) -> None:
    simulate_dataset(tmp_path / "a", n_events=16, seed=4, config=SMALL)
    simulate_dataset(tmp_path / "b", n_events=16, seed=4, config=SMALL)
    assert (tmp_path / "b" / MANIFEST_NAME).is_file()


# ---- a reader beside a writer ------------------------------------------------------------------------------


def test_a_reader_leaves_a_writers_unfinished_checkpoint_alone(tmp_path: Path) -> None:
    """``evaluate`` (restore_params) and the resume check (latest_epoch) read a run while ``train --resume``
    may be saving into it: the writer's ``*.orbax-checkpoint-tmp`` folder must survive them."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from model.run_folder import CHECKPOINT_DIR, checkpoint_manager, latest_epoch, restore_params

    params = {"w": jnp.arange(3.0)}
    with checkpoint_manager(tmp_path) as manager:
        manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    unfinished = tmp_path / CHECKPOINT_DIR / "2.orbax-checkpoint-tmp"
    (unfinished / "params").mkdir(parents=True)
    (unfinished / "params" / "partial").write_bytes(b"being written")
    before = snapshot(tmp_path / CHECKPOINT_DIR)

    assert latest_epoch(tmp_path) == 1
    restored = restore_params(tmp_path, params, 1)
    assert restored["w"].tolist() == [0.0, 1.0, 2.0]
    assert snapshot(tmp_path / CHECKPOINT_DIR) == before


def test_a_run_folder_left_by_a_kill_mid_write_is_resumable(tmp_path: Path) -> None:
    """A kill while config.json (or metrics.parquet) was being written leaves its hidden temporary: the folder is
    then no foreign folder, and the next writer removes the temporary (only it)."""
    from model.run_folder import prepare_run_dir
    from pipeline.atomic import remove_temporaries, unique_name

    run = tmp_path / "run"
    run.mkdir()
    leftovers = [unique_name("config.json"), unique_name("metrics.parquet")]
    for name in leftovers:
        (run / name).write_text("cut short")
    with pytest.raises(MuontrackError, match="holds no muontrack run"):
        prepare_run_dir(run, {}, resume=True)
    (tmp_path / "mine.tmp").write_text("a user's")
    (run / ".notes.tmp").write_text("a user's")
    assert sorted(remove_temporaries(run)) == sorted(leftovers)
    assert sorted(os.listdir(run)) == [".notes.tmp"]
    (run / ".notes.tmp").unlink()
    assert prepare_run_dir(run, {}, resume=True) == 0


# ---- configs whose sizes overflow the columns or the memory -----------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('{"detector": {"x_max": 1e12}}', "the strip column holds at most 2**31 - 1"),
        ('{"detector": {"layers_per_station": [40000], "station_y": [0.0]}}', "the layer column holds at most 32767"),
        ('{"background": {"extra_tracks_per_event": 1e12}}', "hit ids are int32"),
        ('{"background": {"extra_tracks_per_event": 1e5}}', "GiB of hit buffers, more than this machine's"),
    ],
    ids=["strip-int32", "layer-int16", "hits-per-event-int32", "shard-memory"],
)
def test_a_config_that_overflows_its_columns_or_the_memory_is_refused_before_any_work(
    tmp_path: Path, section: str, message: str
) -> None:
    config = tmp_path / "config.json"
    config.write_text(f'{{"simulation": {section}}}')
    out = tmp_path / "ds"
    result = run_muontrack("simulate", "--events", 10, "--seed", 1, "--out", out, "--config", config, cwd=tmp_path)
    assert_one_line_error(result, message)
    assert result.returncode == 2
    assert not out.exists()


def test_an_out_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path) -> None:
    out = os.fsdecode(bytes(tmp_path) + b"/bad\xff")
    result = run_muontrack("simulate", "--events", 10, "--seed", 1, "--out", out, cwd=tmp_path)
    assert_one_line_error(result, "not valid UTF-8")
    assert result.returncode == 2
    assert os.listdir(tmp_path) == []


# ---- a full disk -------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 KiB tmpfs: room for a run's config and metrics, not for its checkpoint (needs mount rights)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line(tiny_dataset: Path, small_disk: Path) -> None:
    result = run_muontrack(
        "train", "--data", tiny_dataset, "--model", "baseline", "--preset", "test", "--epochs", 1,
        "--out", small_disk / "run", cwd=small_disk.parent,
    )  # fmt: skip
    assert_one_line_error(result, "no space left for the checkpoint of epoch 1", "--resume")
    assert result.returncode == 1


# ---- a Dask address that answers, but not as Dask ----------------------------------------------------------


@pytest.mark.slow
def test_a_dask_address_of_another_server_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        out = tmp_path / "ds"
        result = run_muontrack(
            "simulate", "--events", 10, "--seed", 1, "--out", out, "--dask-address", f"tcp://127.0.0.1:{port}",
            cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert_one_line_error(result, "answers, but not as a Dask scheduler")
        assert result.returncode == 1
        assert not out.exists()
    finally:
        web.kill()
        web.wait()
