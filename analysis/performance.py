"""Tracking performance tables, as the performance writers of ACTS draw them: the hit efficiency and purity of the
final hit weights against true pT and against layer, and the failed-fit and charge-misidentification rates against
true pT. Every rate is a binomial fraction of two counts with its Clopper–Pearson 68.27 % interval
(:func:`analysis.metrics.binomial_interval_exprs`), so a bin with no failure still has an upper bound.

The definitions are those of the report's tables (docs/contracts.md, "Metric definitions"): a hit is selected when
its final weight is at least :data:`analysis.metrics.HIT_SELECTION_THRESHOLD` (hits with a NaN weight are left out),
hit efficiency = selected signal / signal, purity = selected signal / selected; the failed-fit rate is of all
tracks, the charge-misidentification rate of the successful fits. The counts are Polars ``group_by``s of the report's
own tables (no second histogramming library: one way to count, one way to bound).
"""

from __future__ import annotations

import polars as pl

from analysis.metrics import PT_BIN_EDGES, binomial_interval_exprs, hit_selected_expr, pt_bin_expr

#: the rate columns of :func:`hit_performance` and of :func:`track_performance_by_pt`, each with ``_lo``, ``_hi``
HIT_RATES = ("hit_efficiency", "hit_purity")
TRACK_RATES = ("failed_fit_rate", "charge_misid_rate")


def pt_edges_exprs(pt: str = "pt", edges: tuple[float, ...] = PT_BIN_EDGES) -> list[pl.Expr]:
    """``pt_lo`` and ``pt_hi``, the edges of the true-pT bin of :func:`analysis.metrics.pt_bin_expr` (null
    outside the binned range)."""
    index = pt_bin_expr(pt, edges)
    lows = dict(enumerate(edges[:-1]))
    highs = dict(enumerate(edges[1:]))
    return [
        index.replace_strict(lows, default=None, return_dtype=pl.Float64).alias("pt_lo"),
        index.replace_strict(highs, default=None, return_dtype=pl.Float64).alias("pt_hi"),
    ]


def hit_count_exprs(weight: str = "weight", is_signal: str = "is_signal") -> list[pl.Expr]:
    """Per group, of the hits with a finite weight: ``n_signal``, ``n_selected`` and ``n_selected_signal``
    (:func:`analysis.metrics.hit_selected_expr`)."""
    selected = hit_selected_expr(weight)
    return [
        (pl.col(is_signal) & selected.is_not_null()).sum().cast(pl.Int64).alias("n_signal"),
        selected.sum().cast(pl.Int64).alias("n_selected"),
        (selected & pl.col(is_signal)).sum().cast(pl.Int64).alias("n_selected_signal"),
    ]


def hit_truth_table(hit_scores: pl.DataFrame, dataset_hits: pl.LazyFrame, dataset_events: pl.LazyFrame) -> pl.DataFrame:
    """The classifying models' hits (:func:`analysis.metrics.hit_score_table`) with their event's true-pT bin
    (``pt_lo``, ``pt_hi``) and, where the dataset hits have it, their ``layer``."""
    events = dataset_events.select("event_id", *pt_edges_exprs()).collect()
    table = hit_scores.join(events, on="event_id", how="left")
    if "layer" in dataset_hits.collect_schema().names():
        layers = dataset_hits.select("event_id", "hit_id", pl.col("layer").cast(pl.Int64)).collect()
        table = table.join(layers, on=["event_id", "hit_id"], how="left")
    return table


def hit_performance(hits: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Hit efficiency and purity of the final weights per model and ``by`` (e.g. ``["pt_lo", "pt_hi"]`` or
    ``["layer"]``; rows with a null ``by`` are left out).

    Returns:
        DataFrame (model, *by, n_signal, n_selected, n_selected_signal, hit_efficiency, hit_efficiency_lo,
        hit_efficiency_hi, hit_purity, hit_purity_lo, hit_purity_hi), sorted by model and ``by``; a rate is null
        where its denominator is 0.
    """
    return (
        hits.drop_nulls(by)
        .group_by("model", *by)
        .agg(*hit_count_exprs())
        .with_columns(
            *binomial_interval_exprs("n_selected_signal", "n_signal", "hit_efficiency"),
            *binomial_interval_exprs("n_selected_signal", "n_selected", "hit_purity"),
        )
        .sort("model", *by)
    )


def track_performance_by_pt(track_residuals: pl.DataFrame, edges: tuple[float, ...] = PT_BIN_EDGES) -> pl.DataFrame:
    """Failed-fit and charge-misidentification rates per model and true-pT bin.

    Args:
        track_residuals: (model, pt, fit_ok, charge_misid) from :func:`analysis.metrics.track_residual_table`.

    Returns:
        DataFrame (model, pt_lo, pt_hi, n_tracks, n_failed, n, n_charge_misid, failed_fit_rate (of n_tracks),
        charge_misid_rate (of the n successful fits), each with ``_lo``, ``_hi``) sorted by model and pt_lo; tracks
        outside the binned pT range are left out.
    """
    return (
        track_residuals.with_columns(*pt_edges_exprs(edges=edges))
        .drop_nulls("pt_lo")
        .group_by("model", "pt_lo", "pt_hi")
        .agg(
            n_tracks=pl.len().cast(pl.Int64),
            n_failed=(~pl.col("fit_ok")).sum().cast(pl.Int64),
            n=pl.col("fit_ok").sum().cast(pl.Int64),
            n_charge_misid=pl.col("charge_misid").sum().cast(pl.Int64),
        )
        .with_columns(
            *binomial_interval_exprs("n_failed", "n_tracks", "failed_fit_rate"),
            *binomial_interval_exprs("n_charge_misid", "n", "charge_misid_rate"),
        )
        .sort("model", "pt_lo")
    )
