"""pipeline.memory: the heap's free pages go back to the system, the pages in use stay."""

from __future__ import annotations

import sys

import pytest

from pipeline.memory import release_free_memory
from tests.helpers import resident_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")


def test_free_memory_inside_the_heap_goes_back_and_the_memory_in_use_stays():
    # 300 000 blocks of 1 000 bytes (past Python's small-object allocator: glibc's heap), every 100th kept, so
    # the freed ones sit between blocks in use and malloc cannot shrink its heap from the top by itself
    blocks = [bytes(1000) for _ in range(300_000)]
    kept = blocks[::100]
    del blocks
    before = resident_mb()
    assert release_free_memory()
    after = resident_mb()
    assert before - after > 150, (before, after)
    assert all(len(block) == 1000 and not any(block) for block in kept)
