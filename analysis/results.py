"""Results assembly: the prediction files read and checked, every metric table of the report computed
(:class:`ReportResults`, from :mod:`analysis.metrics`), and the per-model summary of summary.json.

All numbers are computed here, before anything is written (analysis.report), so a bad input leaves an existing
report untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from analysis import display as event_displays
from analysis import metrics as m
from analysis import performance
from analysis.figures import model_order
from analysis.report_folder import PREDICTIONS_DIR, prediction_path
from analysis.statistics import N_BOOTSTRAP, GaussianFit
from pipeline.config import DetectorConfig, load_config
from pipeline.errors import ConfigError, MuontrackError
from pipeline.registry import LIMIT_ROW
from pipeline.schema import PRED_CLUSTERS_SCHEMA, PRED_HITS_SCHEMA, PRED_TRACKS_SCHEMA

#: keys of each model's entry in summary.json (docs/contracts.md, "summary.json"): ``auc`` and the rejections are
#: those of the raw classifier score, ``auc_weight``, ``hit_efficiency`` and ``hit_purity`` those of the final
#: hit weights; the tails, bias and charge (``bias`` to ``n_tail``) are those of the successful fits that enter σ68
SUMMARY_KEYS = (
    "auc",
    "rejection_at_90",
    "rejection_at_95",
    "core_fraction",
    "sigma68",
    "sigma68_err",
    "n_events",
    "auc_weight",
    "auc_weight_err",
    "hit_efficiency",
    "hit_efficiency_err",
    "hit_purity",
    "hit_purity_err",
    "sigma68_over_limit",
    "sigma68_over_limit_err",
    *m.TAIL_COLUMNS,
    *m.MERGED_COLUMNS,
)

_PREDICTION_SCHEMAS = {"hits": PRED_HITS_SCHEMA, "clusters": PRED_CLUSTERS_SCHEMA, "tracks": PRED_TRACKS_SCHEMA}
_DATASET_COLUMNS = {"hits": ("event_id", "hit_id", "is_signal"), "events": ("event_id", "pt", "q")}
#: further dataset hit columns of the optional "where the hit weight goes" table (metrics.hit_weight_table)
_HIT_WEIGHT_COLUMNS = ("layer", "x", "particle_id")


@dataclass(frozen=True)
class ReportResults:
    """Every table the report is made of (see the producing functions in :mod:`analysis.metrics`)."""

    models: list[str]
    hit_scores: pl.DataFrame  # hit_score_table
    classification: pl.DataFrame  # classification_metrics
    rocs: dict[str, tuple[np.ndarray, np.ndarray]]
    cluster_residuals: pl.DataFrame  # cluster_residual_table
    core: pl.DataFrame  # core_fraction_table (empty when the fit failed)
    core_fit: GaussianFit | None
    core_fit_problem: str | None
    track_residuals: pl.DataFrame  # track_residual_table
    resolution: pl.DataFrame  # resolution_by_model
    resolution_pt: pl.DataFrame  # resolution_by_pt
    #: hit_weight_table; None when the dataset hits lack the columns it needs (x, layer, particle_id)
    hit_weights: pl.DataFrame | None = None
    #: the limit row (its rows are also in ``resolution``, ``resolution_pt``); None when it could not be computed,
    #: and why in ``limit_problem``
    limit: m.ResolutionLimit | None = None
    limit_problem: str | None = None
    #: share_residual_table and merged_cluster_table; None when the dataset hits lack charge_muon (format 1)
    shares: pl.DataFrame | None = None
    merged_clusters: pl.DataFrame | None = None
    #: analysis.performance tables: hit efficiency and purity per true-pT bin and per layer (None when the dataset
    #: hits have no ``layer``), failed-fit and charge-misidentification rates per true-pT bin
    hit_performance_pt: pl.DataFrame | None = None
    hit_performance_layer: pl.DataFrame | None = None
    track_performance_pt: pl.DataFrame | None = None
    #: analysis.display: the events the report draws (display_choices), each with why; None when they cannot be
    #: drawn, and why in ``event_displays_problem``
    event_displays: list[event_displays.EventDisplay] | None = None
    event_displays_problem: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def scan_predictions(report_dir: Path) -> dict[str, pl.LazyFrame]:
    """LazyFrames of ``report_dir``'s predictions/{hits,clusters,tracks}.parquet, checked for the documented
    columns."""
    predictions_dir = Path(report_dir) / PREDICTIONS_DIR
    if not predictions_dir.is_dir():
        raise MuontrackError(f"{predictions_dir}: no predictions folder (run the evaluation first)")
    frames = {}
    for name, schema in _PREDICTION_SCHEMAS.items():
        path = prediction_path(report_dir, name)
        if not path.is_file():
            raise MuontrackError(f"{path}: predictions file missing")
        try:
            frame = pl.scan_parquet(path)
            columns = frame.collect_schema().names()
        except (pl.exceptions.PolarsError, OSError) as err:
            raise MuontrackError(f"{path}: unreadable predictions file ({type(err).__name__})") from err
        missing = [column for column in schema.names if column not in columns]
        if missing:
            raise MuontrackError(f"{path}: missing columns {', '.join(missing)}")
        frames[name] = frame
    return frames


def check_dataset_frame(frame: pl.LazyFrame, name: str) -> None:
    """Raise MuontrackError unless the dataset frame ``name`` ("hits", "events") has the columns the report needs."""
    try:
        columns = frame.collect_schema().names()
    except pl.exceptions.PolarsError as err:
        raise MuontrackError(f"dataset {name}: unreadable ({type(err).__name__})") from err
    missing = [column for column in _DATASET_COLUMNS[name] if column not in columns]
    if missing:
        raise MuontrackError(f"dataset {name}: missing columns {', '.join(missing)}")


def compute_results(
    predictions: dict[str, pl.LazyFrame],
    dataset_hits: pl.LazyFrame,
    dataset_events: pl.LazyFrame,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    detector: DetectorConfig | None = None,
) -> ReportResults:
    """All metric tables from the prediction LazyFrames ({"hits", "clusters", "tracks"}) and the truth.

    With the dataset's ``detector`` (and events and hits with the columns of metrics.LIMIT_EVENT_COLUMNS,
    LIMIT_HIT_COLUMNS) the ``limit`` row is computed on the events of the predictions and added to the
    resolution tables; every row of ``resolution`` gets its σ68 / limit (metrics.with_limit_ratio).

    Raises:
        MuontrackError: the predictions hold no ``truth`` clusters (the core window needs them).
    """
    hit_scores = m.hit_score_table(predictions["hits"], dataset_hits)
    classification, rocs = m.classification_metrics(hit_scores)
    cluster_residuals = m.cluster_residual_table(predictions["clusters"])
    if cluster_residuals.filter(pl.col("model") == "truth").height == 0:
        raise MuontrackError("predictions/clusters.parquet: no 'truth' clusters to define the core window")
    core_fit: GaussianFit | None = None
    core_fit_problem = None
    try:
        core, core_fit = m.core_fraction_table(cluster_residuals)
    except ValueError as err:
        core_fit_problem = str(err)
        core = pl.DataFrame(schema={"model": pl.String, "core_fraction": pl.Float64, "core_fraction_err": pl.Float64})
    track_residuals = m.track_residual_table(predictions["tracks"], dataset_events)
    resolution = m.resolution_by_model(track_residuals, n_boot=n_boot, seed=seed)
    resolution_pt = m.resolution_by_pt(track_residuals, n_boot=n_boot, seed=seed)
    limit, limit_problem = None, "no detector config was given (the report context's `detector`)"
    if detector is not None:
        try:
            limit = m.resolution_limit(track_residuals["event_id"].unique(), dataset_hits, dataset_events, detector)
            limit_problem = None
        except ValueError as err:
            limit_problem = str(err)
    if limit is not None:
        # the limit has no tracks: its tails, bias and charge columns are null
        resolution = pl.concat([limit.resolution, resolution], how="diagonal_relaxed")
        resolution_pt = pl.concat([limit.resolution_pt, resolution_pt], how="diagonal_relaxed")
    resolution = m.with_limit_ratio(resolution)
    hit_weights = None
    if set(_HIT_WEIGHT_COLUMNS) <= set(dataset_hits.collect_schema().names()):
        hit_weights = m.hit_weight_table(predictions["hits"], dataset_hits, predictions["clusters"])
    shares = merged_clusters = None
    if set(m.SHARE_HIT_COLUMNS) <= set(dataset_hits.collect_schema().names()):
        shares = m.share_residual_table(predictions["hits"], dataset_hits)
        merged_clusters = m.merged_cluster_table(predictions["clusters"], dataset_hits)
    hits_with_truth = performance.hit_truth_table(hit_scores, dataset_hits, dataset_events)
    hit_performance_layer = None
    if "layer" in hits_with_truth.columns:
        hit_performance_layer = performance.hit_performance(hits_with_truth, ["layer"])
    displays, displays_problem = _event_displays(predictions, dataset_hits, dataset_events, track_residuals, detector)
    models = model_order(
        set(classification["model"].to_list())
        | set(cluster_residuals["model"].unique().to_list())
        | set(track_residuals["model"].unique().to_list())
        | ({LIMIT_ROW} if limit is not None else set())
    )
    return ReportResults(
        models=models,
        hit_scores=hit_scores,
        classification=classification,
        rocs=rocs,
        cluster_residuals=cluster_residuals,
        core=core,
        core_fit=core_fit,
        core_fit_problem=core_fit_problem,
        track_residuals=track_residuals,
        resolution=resolution,
        resolution_pt=resolution_pt,
        hit_weights=hit_weights,
        limit=limit,
        limit_problem=limit_problem,
        shares=shares,
        merged_clusters=merged_clusters,
        hit_performance_pt=performance.hit_performance(hits_with_truth, ["pt_lo", "pt_hi"]),
        hit_performance_layer=hit_performance_layer,
        track_performance_pt=performance.track_performance_by_pt(track_residuals),
        event_displays=displays,
        event_displays_problem=displays_problem,
    )


def _event_displays(
    predictions: dict[str, pl.LazyFrame],
    dataset_hits: pl.LazyFrame,
    dataset_events: pl.LazyFrame,
    track_residuals: pl.DataFrame,
    detector: DetectorConfig | None,
) -> tuple[list[event_displays.EventDisplay] | None, str | None]:
    """The report's event displays (analysis.display.display_choices), or None and why they cannot be drawn."""
    if detector is None:
        return None, "no detector config was given (the report context's `detector`)"
    missing = event_displays.missing_dataset_columns(dataset_hits, dataset_events)
    if missing:
        return None, f"the dataset lacks {', '.join(missing)}"
    layer_y = detector.layer_y()
    return [
        event_displays.event_display(
            predictions,
            dataset_hits,
            dataset_events,
            event_id,
            layer_y,
            detector.pitch,
            (detector.x_min, detector.x_max),
            title=why,
        )
        for event_id, why in event_displays.display_choices(track_residuals)
    ], None


def context_detector(context: dict[str, Any]) -> DetectorConfig | None:
    """The dataset's detector config the limit row needs, from ``context["detector"]`` (a DetectorConfig, or a
    mapping of every one of its fields, as flows.commands.report_context writes it); None when the context has none.

    Raises:
        MuontrackError: ``context["detector"]`` is not a complete, valid detector config.
    """
    value = context.get("detector")
    if value is None or isinstance(value, DetectorConfig):
        return value
    names = {field.name for field in fields(DetectorConfig)}
    if not isinstance(value, dict) or set(value) != names:
        raise MuontrackError(f"report context: `detector` must hold exactly the fields {', '.join(sorted(names))}")
    try:
        return load_config(DetectorConfig, value, "detector")
    except ConfigError as err:
        raise MuontrackError(f"report context: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def model_row(frame: pl.DataFrame, model: str) -> dict[str, Any]:
    """The row of ``model`` in a table with a ``model`` column, as a dict; {} when it has none."""
    rows = frame.filter(pl.col("model") == model)
    return rows.row(0, named=True) if rows.height else {}


def build_summary(results: ReportResults) -> dict[str, dict[str, float | int | None]]:
    """{model: {key: value for key in SUMMARY_KEYS}}.

    ``auc`` and the rejections are those of the raw classifier score (``score``); ``auc_weight``,
    ``hit_efficiency`` and ``hit_purity`` (with ``_err``) those of the final hit weights (``weight``). All of
    them are null for the truth models; a rejection is also null when no background hit passes at that
    efficiency (infinite). ``n_events`` counts the events whose track fit succeeded (those that enter σ68); for
    the ``limit`` row, the events with a bound. ``sigma68_over_limit`` (with ``_err``) is σ68 / the limit row's
    σ68 (null without a limit); the limit's own ``sigma68_err`` is null (exact, no bootstrap). ``bias`` (the
    median residual, bootstrap ``bias_err``), ``charge_misid_rate`` and ``tail_fraction`` (with their
    Clopper–Pearson 68.27 % bounds ``_lo``, ``_hi`` and their counts ``n_charge_misid``, ``n_tail``) are those of
    the successful fits (metrics.resolution_by_model); all null for the ``limit`` row (no tracks). The merged
    clusters and charge shares (metrics.MERGED_COLUMNS) are :func:`merged_summary_table`'s.
    """
    summary: dict[str, dict[str, float | int | None]] = {}
    merged = merged_summary_table(results)
    for model in results.models:
        classification = {} if model in m.TRUTH_MODELS else model_row(results.classification, model)
        resolution = model_row(results.resolution, model)
        core = model_row(results.core, model)
        summary[model] = {
            "auc": _finite_or_none(classification.get("auc")),
            "rejection_at_90": _finite_or_none(classification.get("rejection_at_90")),
            "rejection_at_95": _finite_or_none(classification.get("rejection_at_95")),
            "core_fraction": _finite_or_none(core.get("core_fraction")),
            "sigma68": _finite_or_none(resolution.get("sigma68")),
            "sigma68_err": _finite_or_none(resolution.get("sigma68_err")),
            "n_events": int(resolution.get("n") or 0),
        }
        summary[model] |= {
            key: _finite_or_none(classification.get(key))
            for key in SUMMARY_KEYS
            if key.startswith(("auc_weight", "hit_efficiency", "hit_purity"))
        }
        summary[model] |= {key: _finite_or_none(resolution.get(key)) for key in SUMMARY_KEYS if "_over_limit" in key}
        summary[model] |= {
            key: _int_or_none(resolution.get(key)) if key.startswith("n_") else _finite_or_none(resolution.get(key))
            for key in m.TAIL_COLUMNS
        }
        summary[model] |= _merged_summary(merged, model)
    return summary


def merged_summary_table(results: ReportResults) -> pl.DataFrame:
    """One row per model of ``results.models`` with :data:`analysis.metrics.MERGED_COLUMNS`: its clusters on layers
    with a merged strip, and its raw score's residual to the truth share on the merged strips (null where not
    computed or not applicable: the limit row, the truth references' scores)."""
    frame = pl.DataFrame({"model": results.models}, schema={"model": pl.String})
    if results.merged_clusters is not None:
        clusters = results.merged_clusters.select(
            "model", "n_merged_clusters", "cluster_sigma68_merged", "cluster_sigma68_clean"
        )
        frame = frame.join(clusters, on="model", how="left", maintain_order="left")
    if results.shares is not None:
        shares = results.shares.filter(pl.col("share_class") == "merged").select(
            "model", share_bias_merged="bias", share_sigma68_merged="sigma68"
        )
        frame = frame.join(shares, on="model", how="left", maintain_order="left")
    types = {name: pl.Int64 if name.startswith("n_") else pl.Float64 for name in m.MERGED_COLUMNS}
    return frame.select(
        "model",
        *(
            pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype).alias(name)
            for name, dtype in types.items()
        ),
    )


def _merged_summary(merged: pl.DataFrame, model: str) -> dict[str, float | int | None]:
    row = model_row(merged, model)
    return {
        key: _int_or_none(row.get(key)) if key.startswith("n_") else _finite_or_none(row.get(key))
        for key in m.MERGED_COLUMNS
    }
