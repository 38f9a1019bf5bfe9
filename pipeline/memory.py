"""Give the C heap's free memory back to the operating system.

glibc's malloc keeps the memory a process frees in its arenas (one per thread that allocated, up to eight per
core) rather than returning it; XLA's compilations allocate hundreds of megabytes on their compile threads and
free them when the program is built. Measured on tests/test_tracker.py alone: 4 473 MB resident at its end with
JAX's caches cleared, 572 MB after :func:`release_free_memory` (the memory was free, only not returned). In one
long process (the test suite, ``muontrack run`` training several models) the retained memory adds up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the free pages of every malloc arena to the system (``malloc_trim(0)``). Frees nothing in use;
    takes milliseconds. Returns whether the C library has the call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def release_compiled_programs() -> None:
    """Drop JAX's compiled programs (when JAX is loaded; never imports it) and give the freed heap back: between
    the models of a job, each compiling programs of its own, and between test modules. A program used again
    after this is loaded from the persistent compilation cache."""
    if "jax" in sys.modules:
        import jax

        jax.clear_caches()
        gc.collect()
    release_free_memory()
