"""The one place for the Numba options of the classical reconstruction (as in :mod:`simulation.kernels`)."""

from __future__ import annotations

import numba as nb


def jit(parallel: bool = False):
    """``njit`` compiled once per signature and cached on disk; ``error_model="numpy"`` so a division by zero
    gives inf/NaN (caught by the fit status) instead of raising inside a ``prange`` loop."""
    return nb.njit(cache=True, nogil=True, error_model="numpy", parallel=parallel)
