"""Session-wide fixtures. Plain helpers (folder snapshots, the `muontrack` subprocess) are in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.memory import release_compiled_programs, release_free_memory
from tests import helpers

#: the tiny dataset: 300 events in two shards of 150 (seed 11, otherwise the default SimConfig)
TINY_EVENTS = 300
TINY_SHARD_EVENTS = 150
TINY_SEED = 11


def pytest_configure(config: pytest.Config) -> None:  # noqa: ARG001 (pytest's hook signature)
    """JAX's persistent compilation cache on for the whole session (and the ``muontrack`` and training processes
    the tests start, which inherit it), as the ``muontrack`` command turns it on: no library function does."""
    from pipeline.cache import enable_compilation_cache

    enable_compilation_cache()


#: resident memory (MB) above which JAX's compiled programs are dropped after a test rather than after its module
RESIDENT_LIMIT_MB = 2000


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs() -> Iterator[None]:
    """Drop JAX's compiled programs after each test module and give the heap's free memory back.

    JAX's caches keep every program compiled in the process alive, with its memory mappings: the whole suite in
    one process crossed Linux's ``vm.max_map_count`` of 65 530 mappings (XLA aborted: "Fatal Python error:
    Aborted" while writing the compilation cache). A module rarely reuses another's programs, and the persistent
    compilation cache reloads those it does.
    """
    yield
    release_compiled_programs()


@pytest.fixture(autouse=True)
def _bounded_memory() -> Iterator[None]:
    """After each test: the heap's free memory back to the system (pipeline.memory), and JAX's compiled programs
    dropped when the process is still above RESIDENT_LIMIT_MB.

    glibc keeps what XLA's compilations free in its arenas (with the caches cleared per module only, the one
    pytest process grew to 8.7 GB), and the finite-difference tests of the float64 chains keep 0.5-0.9 GB of
    programs each (tests/test_tracker.py rose from 0.9 to 4.7 GB over four tests). Clearing after every test
    instead doubles test_tracker's time (its programs compile again), hence the limit.
    """
    yield
    release_free_memory()
    if helpers.resident_mb() > RESIDENT_LIMIT_MB:
        release_compiled_programs()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real dataset of TINY_EVENTS events (event ids 0 .. TINY_EVENTS - 1), simulated once per session.

    Shared by every module that asks for it: read it, never write into it (copy it to ``tmp_path`` first).
    """
    from pipeline.config import SimConfig
    from simulation.shards import simulate_dataset

    out = tmp_path_factory.mktemp("tiny") / "data"
    simulate_dataset(out, n_events=TINY_EVENTS, seed=TINY_SEED, config=SimConfig(shard_events=TINY_SHARD_EVENTS))
    before = helpers.snapshot(out)
    yield out
    assert helpers.snapshot(out) == before, "a test wrote into the shared tiny_dataset (copy it to tmp_path first)"


@pytest.fixture(scope="session")
def tiny_baseline_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A ``baseline`` run of one epoch on :func:`tiny_dataset` (test preset, seed 0), trained once per session.

    Shared by every module that asks for it: read it, never write into it (train a run of your own to resume).
    """
    from model.train import train_run

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    train_run(tiny_dataset, "baseline", out, preset="test", epochs=1, seed=0)
    before = helpers.snapshot(out)
    yield out
    assert helpers.snapshot(out) == before, "a test wrote into the shared tiny_baseline_run"


@pytest.fixture
def placeholder_figures() -> Iterator[None]:
    """The report's figures written as placeholder files, not rendered (tests.helpers.placeholder_figures)."""
    with helpers.placeholder_figures():
        yield
