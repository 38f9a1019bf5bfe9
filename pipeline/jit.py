"""Numba helpers shared by :mod:`simulation` and :mod:`classical` (both may import pipeline, not each other).

:func:`jit` is the one place for the jit options of every Numba kernel in the project.
"""

from __future__ import annotations

import numba as nb


def jit(parallel: bool = False, inline: bool = False, refcounts: bool = True):
    """``njit`` compiled once per signature and cached on disk; ``error_model="numpy"`` so a division by zero
    gives inf/NaN instead of raising (inside a ``prange`` loop too). ``inline``: Numba inlines the function
    into its callers, for small helpers on a hot path that take NamedTuples of arrays (as real calls, the
    simulation's per-crossing helpers cost ~15 % of its run time).

    ``refcounts=False`` compiles the function without Numba's reference counting (its NRT), for the kernels
    run once per event or per crossing that only read and write arrays their caller owns. With the counting,
    each array argument, NamedTuple field read and slice costs an atomic increment and decrement of the
    array's count (``NRT_incref``/``NRT_decref`` were 6.6 % of the simulation kernels' samples in a perf
    profile, 10-12 % of their time with the code around the calls). Without it the function cannot allocate
    (a compile error), and it must neither return an array nor store one anywhere that outlives the call:
    nothing would count that reference. Its inlined helpers follow its setting. ``_nrt`` is a private Numba
    option (used with Numba 0.68)"""
    options = {"_nrt": False} if not refcounts else {}
    return nb.njit(
        cache=True,
        nogil=True,
        error_model="numpy",
        parallel=parallel,
        inline="always" if inline else "never",
        **options,
    )


@jit(refcounts=False)
def argsort_small(keys, n, order):
    """Stable insertion argsort of ``keys[:n]`` into ``order[:n]``. Meant for the few dozen keys of one event
    that arrive sorted or in nearly sorted runs, where it is linear and beats np.argsort several times over."""
    for i in range(n):
        key = keys[i]
        j = i
        while j > 0 and keys[order[j - 1]] > key:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i


@jit()
def chunk_bounds(chunk, per_chunk, n_items):
    """Items ``lo .. hi - 1`` of prange chunk ``chunk`` when ``n_items`` are cut into chunks of ``per_chunk``."""
    lo = chunk * per_chunk
    return lo, min(lo + per_chunk, n_items)


@jit()
def largest_span(offsets, lo, hi, at_least):
    """``max(at_least, offsets[i + 1] - offsets[i] for i in lo .. hi - 1)``: the scratch a chunk needs."""
    span = at_least
    for i in range(lo, hi):
        span = max(span, offsets[i + 1] - offsets[i])
    return span
