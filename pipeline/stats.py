"""Plain NumPy statistics shared by training (model) and evaluation (analysis), which may not import each other.

The q/pT resolution σ68 is the figure of merit of both: training reports it on the validation split after every
epoch, the evaluation per model and pT bin. One definition serves both (analysis.statistics calls
:func:`sigma68`; its Polars form ``sigma68_expr`` computes the same quantile inside a query).
"""

from __future__ import annotations

import math

import numpy as np

#: fraction of events inside ± σ68 around the median
SIGMA68_COVERAGE = 0.68


def sigma68(residuals: np.ndarray) -> float:
    """Half-width of the interval centred on the median that holds 68 % of the entries.

    Defined as the 0.68 quantile of |r − median(r)| with linear interpolation between order statistics
    (NumPy ``method="linear"``). For a Gaussian it is 0.9945 σ. Any shape is flattened; NaNs are dropped
    (infinities are kept: they count as entries beyond every finite one).

    Raises:
        ValueError: no non-NaN residual.
    """
    r = np.asarray(residuals, dtype=np.float64).ravel()
    r = r[~np.isnan(r)]
    if r.size == 0:
        raise ValueError("sigma68: no non-NaN values")
    return float(np.quantile(np.abs(r - np.median(r)), SIGMA68_COVERAGE, method="linear"))


def finite_sigma68(residuals: np.ndarray) -> float:
    """:func:`sigma68` of the finite residuals only (a failed fit gives an infinite or NaN residual); NaN when
    there is none (training's validation figure, null in metrics.parquet then)."""
    r = np.asarray(residuals, dtype=np.float64).ravel()
    r = r[np.isfinite(r)]
    return sigma68(r) if r.size else math.nan
