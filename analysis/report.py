"""The evaluation report: REPORT/report.md, REPORT/summary.json, REPORT/resolution.csv, REPORT/figures/ (PNG and
PDF) and the catalog files REPORT/summary.parquet and REPORT/resolution.parquet (:mod:`analysis.catalog`).

:func:`write_report` reads REPORT/predictions/*.parquet, joins them with the dataset's truth, computes every
metric of docs/contracts.md, "Metric definitions" (see :mod:`analysis.metrics`), with the ``limit`` row (the
Cramér-Rao limit of σ68(q/pT) on the evaluated events, :func:`analysis.metrics.resolution_limit`) and every row's
σ68 / limit, draws the figures and writes the files. All numbers are computed before anything is written, so a
bad input leaves an existing report untouched.

:func:`staged_report` makes a whole evaluation (predictions and report) atomic: it is written into a staging
folder beside REPORT and swapped into place at the end, so a writer killed at any point leaves the previous
report (or none), never a mixture of old and new files.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from analysis import catalog
from analysis import figures as fig
from analysis import metrics as m
from analysis.figures import format_value_error, model_order
from analysis.statistics import ratio_with_error, relative_change
from pipeline.atomic import write_text_atomic
from pipeline.config import DetectorConfig, load_config
from pipeline.errors import ConfigError, MuontrackError
from pipeline.models import LIMIT_ROW
from pipeline.schema import PRED_CLUSTERS_SCHEMA, PRED_HITS_SCHEMA, PRED_TRACKS_SCHEMA

#: a difference counts as significant from this many standard deviations on
SIGNIFICANCE_THRESHOLD = 2.0
#: the paper's relative gain in cluster core fraction, end-to-end vs baseline (Coccaro et al., section 4)
PAPER_CORE_FRACTION_GAIN = 0.127
#: keys of each model's entry in summary.json (docs/contracts.md, "summary.json"): ``auc`` and the rejections are
#: those of the raw classifier score, ``auc_weight``, ``hit_efficiency`` and ``hit_purity`` those of the final
#: hit weights
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
)
#: columns of resolution.csv
RESOLUTION_COLUMNS = ("model", "pt_lo", "pt_hi", "n", "sigma68", "sigma68_err")

_PREDICTION_SCHEMAS = {"hits": PRED_HITS_SCHEMA, "clusters": PRED_CLUSTERS_SCHEMA, "tracks": PRED_TRACKS_SCHEMA}
_DATASET_COLUMNS = {"hits": ("event_id", "hit_id", "is_signal"), "events": ("event_id", "pt", "q")}
#: further dataset hit columns of the optional "where the hit weight goes" table (metrics.hit_weight_table)
_HIT_WEIGHT_COLUMNS = ("layer", "x", "particle_id")


@dataclass(frozen=True)
class ComparisonPair:
    """Two models the report compares, and why."""

    candidate: str
    reference: str
    question: str
    #: the AUC compared: "auc" (raw classifier score) or "auc_weight" (final hit weights)
    auc_key: str
    #: whether the paper's core-fraction gain (PAPER_CORE_FRACTION_GAIN) is the yardstick of this pair
    paper_gain: bool


#: the comparisons of the report, in report order (each only when both models are in the predictions)
COMPARISON_PAIRS = (
    ComparisonPair(
        "e2e",
        "baseline",
        "the paper's question in the robust reconstruction chain: does training through the reconstruction beat "
        "BCE alone? (AUC of the raw classifier score)",
        "auc",
        paper_gain=True,
    ),
    ComparisonPair(
        "e2e",
        "classical",
        "does the learned tracker beat the non-learned reference a physicist would use? (AUC of the final hit "
        "weights; classical's is the single ROC point of its 0/1 selection, which favours any graded weight)",
        "auc_weight",
        paper_gain=False,
    ),
    ComparisonPair(
        "e2e_paper",
        "baseline_paper",
        "the faithful reproduction of the paper: weighted-mean clustering and Kasa fit (AUC of the raw classifier "
        "score)",
        "auc",
        paper_gain=True,
    ),
)
#: the model whose σ68 is quoted relative to the truth charge centroids, and that reference
RESOLUTION_LIMIT_PAIR = ("e2e", "truth_charge")
_AUC_LABELS = {"auc": "hit AUC (raw score)", "auc_weight": "hit AUC (final weights)"}

_FIGURE_NAMES = {
    "rejection": "roc_rejection.png",
    "scores": "score_histograms.png",
    "clusters": "cluster_residuals.png",
    "q_over_pt": "q_over_pt_residuals.png",
    "sigma68_pt": "sigma68_vs_pt.png",
}


@dataclass(frozen=True)
class ReportResults:
    """Every table the report is made of (see the producing functions in :mod:`analysis.metrics`)."""

    models: list[str]
    hit_scores: pl.DataFrame  # hit_score_table
    classification: pl.DataFrame  # classification_metrics
    rocs: dict[str, tuple[np.ndarray, np.ndarray]]
    cluster_residuals: pl.DataFrame  # cluster_residual_table
    core: pl.DataFrame  # core_fraction_table (empty when the fit failed)
    core_fit: m.GaussianFit | None
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


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def _scan_predictions(predictions_dir: Path) -> dict[str, pl.LazyFrame]:
    """LazyFrames of hits/clusters/tracks.parquet, checked for the documented columns."""
    if not predictions_dir.is_dir():
        raise MuontrackError(f"{predictions_dir}: no predictions folder (run the evaluation first)")
    frames = {}
    for name, schema in _PREDICTION_SCHEMAS.items():
        path = predictions_dir / f"{name}.parquet"
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


def _check_dataset_frame(frame: pl.LazyFrame, name: str) -> None:
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
    n_boot: int = m.N_BOOTSTRAP,
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
    core_fit: m.GaussianFit | None = None
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
        resolution = pl.concat([limit.resolution, resolution.select(limit.resolution.columns)], how="vertical_relaxed")
        resolution_pt = pl.concat([limit.resolution_pt, resolution_pt], how="vertical_relaxed")
    resolution = m.with_limit_ratio(resolution)
    hit_weights = None
    if set(_HIT_WEIGHT_COLUMNS) <= set(dataset_hits.collect_schema().names()):
        hit_weights = m.hit_weight_table(predictions["hits"], dataset_hits, predictions["clusters"])
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
    )


def context_detector(context: dict[str, Any]) -> DetectorConfig | None:
    """The dataset's detector config the limit row needs, from ``context["detector"]`` (a DetectorConfig, or a
    mapping of every one of its fields, as flows.steps.report_context writes it); None when the context has none.

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


def _row(frame: pl.DataFrame, model: str) -> dict[str, Any]:
    rows = frame.filter(pl.col("model") == model)
    return rows.row(0, named=True) if rows.height else {}


def build_summary(results: ReportResults) -> dict[str, dict[str, float | int | None]]:
    """{model: {key: value for key in SUMMARY_KEYS}}.

    ``auc`` and the rejections are those of the raw classifier score (``score``); ``auc_weight``,
    ``hit_efficiency`` and ``hit_purity`` (with ``_err``) those of the final hit weights (``weight``). All of
    them are null for the truth models; a rejection is also null when no background hit passes at that
    efficiency (infinite). ``n_events`` counts the events whose track fit succeeded (those that enter σ68); for
    the ``limit`` row, the events with a bound. ``sigma68_over_limit`` (with ``_err``) is σ68 / the limit row's
    σ68 (null without a limit); the limit's own ``sigma68_err`` is null (exact, no bootstrap).
    """
    summary: dict[str, dict[str, float | int | None]] = {}
    for model in results.models:
        classification = {} if model in m.TRUTH_MODELS else _row(results.classification, model)
        resolution = _row(results.resolution, model)
        core = _row(results.core, model)
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
    return summary


def format_summary_table(summary: dict[str, dict[str, Any]]) -> str:
    """A compact fixed-width text table of a summary (as returned by :func:`write_report`)."""

    def cell(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def ratio(value: float | None) -> str:
        """σ68 / limit in at most 6 characters: 1.152, 45.3, 6645, 2e+06."""
        if value is None:
            return "-"
        return format(value, ".3f" if value < 10 else ".1f" if value < 1000 else ".0f" if value < 1e6 else ".0e")

    width = max([13, *map(len, summary)])
    header = (
        f"{'model':<{width}} {'AUC':>7} {'AUC(w)':>7} {'eff(w)':>7} {'pur(w)':>7} {'rej@90%':>9} {'rej@95%':>9} "
        f"{'core':>7} {'sigma68':>9} {'±':>8} {'÷limit':>6} {'events':>7}"
    )
    lines = [header, "-" * len(header)]
    for model, row in summary.items():
        lines.append(
            f"{model:<{width}} {cell(row.get('auc'), '.4f'):>7} {cell(row.get('auc_weight'), '.4f'):>7} "
            f"{cell(row.get('hit_efficiency'), '.4f'):>7} {cell(row.get('hit_purity'), '.4f'):>7} "
            f"{cell(row.get('rejection_at_90'), '.4g'):>9} "
            f"{cell(row.get('rejection_at_95'), '.4g'):>9} {cell(row.get('core_fraction'), '.4f'):>7} "
            f"{cell(row.get('sigma68'), '.4g'):>9} {cell(row.get('sigma68_err'), '.2g'):>8} "
            f"{ratio(row.get('sigma68_over_limit')):>6} {cell(row.get('n_events'), 'd'):>7}"
        )
    lines.append(
        "AUC = raw classifier score; AUC(w), eff(w), pur(w) = final hit weights "
        f"(selected at w >= {m.HIT_SELECTION_THRESHOLD:g}); ÷limit = sigma68 / {LIMIT_ROW}'s."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Comparison sentences
# ---------------------------------------------------------------------------------------------------------


def compare_sentence(
    label: str,
    candidate: str,
    value: float | None,
    err: float | None,
    reference: str,
    reference_value: float | None,
    reference_err: float | None,
    higher_is_better: bool,
) -> str:
    """One honest sentence comparing a metric of two models, from the numbers and their uncertainties.

    The errors are combined in quadrature as if independent; both models are evaluated on the same events,
    so the estimates are positively correlated and this overstates the error of the difference
    (conservative). "better" needs at least :data:`SIGNIFICANCE_THRESHOLD` standard deviations.
    """
    if value is None or reference_value is None or not (math.isfinite(value) and math.isfinite(reference_value)):
        return f"{candidate} vs {reference} on {label}: not comparable (a value is missing or infinite)."
    both = f"{format_value_error(value, err)} vs {reference} {format_value_error(reference_value, reference_err)}"
    advantage = (value - reference_value) if higher_is_better else (reference_value - value)
    combined = math.hypot(err or 0.0, reference_err or 0.0)
    finite_error = math.isfinite(combined) and combined > 0
    if not finite_error:
        verdict = "better" if advantage > 0 else ("worse" if advantage < 0 else "equal")
        return (
            f"{candidate} {label} = {both}: nominally {verdict}, but without an uncertainty no significance "
            "can be given."
        )
    n_sigma = advantage / combined
    if n_sigma >= SIGNIFICANCE_THRESHOLD:
        return f"{candidate} {label} = {both}: {candidate} better by {n_sigma:.1f}σ."
    if n_sigma <= -SIGNIFICANCE_THRESHOLD:
        return f"{candidate} is NOT better than {reference} on {label}: {both}; {reference} better by {-n_sigma:.1f}σ."
    if advantage == 0:
        outcome = "the two are equal"
    else:
        direction = "better" if n_sigma > 0 else "worse"
        outcome = f"{candidate} nominally {direction} by {abs(n_sigma):.1f}σ (below {SIGNIFICANCE_THRESHOLD:g}σ)"
    return f"{candidate} is NOT significantly better than {reference} on {label}: {both}; {outcome}."


def _pair_sentences(results: ReportResults, pair: ComparisonPair) -> list[str]:
    """The comparison of one pair on its AUC, the cluster core fraction and σ68(q/pT), plus per-pT-bin counts."""
    model, reference = pair.candidate, pair.reference
    cls, cls_ref = _row(results.classification, model), _row(results.classification, reference)
    core, core_ref = _row(results.core, model), _row(results.core, reference)
    res, res_ref = _row(results.resolution, model), _row(results.resolution, reference)
    specs = [
        (_AUC_LABELS[pair.auc_key], cls, cls_ref, pair.auc_key, f"{pair.auc_key}_err", True),
        ("cluster core fraction", core, core_ref, "core_fraction", "core_fraction_err", True),
        ("σ68(q/pT)", res, res_ref, "sigma68", "sigma68_err", False),
    ]
    sentences = [
        compare_sentence(
            label,
            model,
            row.get(key),
            row.get(err_key),
            reference,
            row_ref.get(key),
            row_ref.get(err_key),
            higher_is_better,
        )
        for label, row, row_ref, key, err_key, higher_is_better in specs
    ]
    if pair.paper_gain and core.get("core_fraction") is not None and core_ref.get("core_fraction"):
        change, change_err = relative_change(
            core["core_fraction"],
            core["core_fraction_err"],
            core_ref["core_fraction"],
            core_ref["core_fraction_err"],
        )
        sentences.append(
            f"Relative change of the core fraction, {model} vs {reference}: "
            f"{100 * change:+.1f} ± {100 * change_err:.1f} % (the paper reports "
            f"{100 * PAPER_CORE_FRACTION_GAIN:+.1f} % for its end-to-end model)."
        )
    sentences.append(_per_bin_sentence(results.resolution_pt, model, reference))
    return sentences


def _resolution_limit_sentence(results: ReportResults, model: str, limit: str) -> str:
    """σ68(q/pT) of ``model`` as a multiple of the ``limit`` reference's."""
    res, res_limit = _row(results.resolution, model), _row(results.resolution, limit)
    value, limit_value = res.get("sigma68"), res_limit.get("sigma68")
    if value is None or not limit_value:
        return f"σ68(q/pT) of {model} relative to {limit}: not computable (a σ68 is missing or zero)."
    ratio, ratio_err = ratio_with_error(
        value,
        res.get("sigma68_err") or 0.0,
        limit_value,
        res_limit.get("sigma68_err") or 0.0,
    )
    return (
        f"σ68(q/pT) of {model} / {limit} = {format_value_error(ratio, ratio_err)} ({model} "
        f"{format_value_error(value, res.get('sigma68_err'))}, {limit} "
        f"{format_value_error(limit_value, res_limit.get('sigma68_err'))}; errors as independent). "
        f"1: as good as the charge centroids of the true signal strips on every layer; below 1 is possible, as the "
        f"robust chain (like classical) drops layers where an extra track's charge merged into the muon's cluster, "
        f"which {limit} keeps."
    )


def comparison_blocks(results: ReportResults) -> list[tuple[str, list[str]]]:
    """The report's comparisons as (lead line, sentences): each of :data:`COMPARISON_PAIRS` whose two models
    are both in the predictions, then e2e's σ68 relative to the truth charge centroids (truth_charge), then the
    pairs left out."""
    present = set(results.models)
    blocks = [
        (f"**{pair.candidate} vs {pair.reference}**: {pair.question}", _pair_sentences(results, pair))
        for pair in COMPARISON_PAIRS
        if {pair.candidate, pair.reference} <= present
    ]
    model, limit = RESOLUTION_LIMIT_PAIR
    if {model, limit} <= present:
        blocks.append(
            (
                f"**{model} vs {limit}**: how does {model} compare with the charge centroids of the true signal "
                "strips?",
                [_resolution_limit_sentence(results, model, limit)],
            )
        )
    skipped = []
    for pair in COMPARISON_PAIRS:
        missing = [name for name in (pair.candidate, pair.reference) if name not in present]
        if missing:
            skipped.append(f"{pair.candidate} vs {pair.reference} (no {' and no '.join(missing)} predictions)")
    if skipped and blocks:
        blocks.append(("**Not compared** (a model is missing from the predictions)", skipped))
    elif skipped:
        blocks.append(("**No comparison**: no pair of models to compare is in the predictions", skipped))
    return blocks


def _per_bin_sentence(resolution_pt: pl.DataFrame, model: str, reference: str) -> str:
    joined = (
        resolution_pt.filter(pl.col("model") == model)
        .join(resolution_pt.filter(pl.col("model") == reference), on=["pt_lo", "pt_hi"], suffix="_ref")
        .drop_nulls(["sigma68", "sigma68_ref"])
    )
    if joined.height == 0:
        return f"σ68 vs pT, {model} vs {reference}: no bin with entries for both."
    smaller = int((joined["sigma68"] < joined["sigma68_ref"]).sum())
    difference = joined["sigma68_ref"] - joined["sigma68"]
    combined = (
        joined["sigma68_err"].fill_null(float("nan")) ** 2 + joined["sigma68_err_ref"].fill_null(float("nan")) ** 2
    ).sqrt()
    significant_better = int((difference >= SIGNIFICANCE_THRESHOLD * combined).sum())
    significant_worse = int((difference <= -SIGNIFICANCE_THRESHOLD * combined).sum())
    return (
        f"σ68 vs pT: {model} has a smaller σ68 than {reference} in {smaller} of {joined.height} pT bins "
        f"({significant_better} by ≥ {SIGNIFICANCE_THRESHOLD:g}σ; {significant_worse} bins where it is worse "
        f"by ≥ {SIGNIFICANCE_THRESHOLD:g}σ)."
    )


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    def text(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, list | tuple):
            return text(", ".join(map(str, value)))
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(text(value) for value in row) + " |" for row in rows]
    return lines


def _render_context(context: dict[str, Any]) -> list[str]:
    """Free-form context: scalars as a list, lists of records as tables, nested mappings as JSON blocks."""
    if not context:
        return ["(no run context was given)"]
    scalars, tables, blocks = [], [], []
    for key, value in context.items():
        if isinstance(value, list | tuple) and value and all(isinstance(item, dict) for item in value):
            headers = list(dict.fromkeys(k for item in value for k in item))
            tables += [f"**{key}**", "", *_md_table(headers, [[item.get(h) for h in headers] for item in value]), ""]
        elif isinstance(value, dict):
            blocks += [f"**{key}**", "", "```json", json.dumps(value, indent=2, default=str), "```", ""]
        else:
            rendered = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            scalars.append(f"- **{key}**: {rendered}")
    return [*scalars, "", *tables, *blocks]


def _rejection_text(value: float | None, err: float | None, n_background: int) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return f"∞ (no background hit passes; > {n_background})"
    return format_value_error(value, err)


def render_markdown(
    results: ReportResults, summary: dict[str, Any], figure_paths: dict[str, Path], context: dict[str, Any]
) -> str:
    """The text of report.md (figures linked relative to the report folder)."""
    lines = [
        "# muontrack evaluation report",
        "",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} by muontrack {_version()}.",
        "",
        "## What was run",
        "",
        *_render_context(context),
        "",
        "Events evaluated per model (tracks joined with the dataset's truth): "
        + ", ".join(f"{row['model']} {row['n_tracks']}" for row in _in_model_order(results.resolution, results.models)),
        "",
        "## Summary",
        "",
    ]
    headers = [
        "model",
        "AUC (score)",
        "AUC (weight)",
        "rejection @ 90 %",
        "rejection @ 95 %",
        "core fraction",
        "σ68(q/pT)",
        "σ68 / limit",
        "events in σ68",
    ]
    rows = []
    for model, row in summary.items():
        cls = _row(results.classification, model) if model not in m.TRUTH_MODELS else {}
        core = _row(results.core, model)
        n_background = cls.get("n_background") or 0
        rows.append(
            [
                model,
                _value_error_or_none(cls, "auc"),
                _value_error_or_none(cls, "auc_weight"),
                _rejection_text(cls.get("rejection_at_90"), cls.get("rejection_at_90_err"), n_background),
                _rejection_text(cls.get("rejection_at_95"), cls.get("rejection_at_95_err"), n_background),
                format_value_error(core["core_fraction"], core["core_fraction_err"]) if core else None,
                format_value_error(row["sigma68"], row["sigma68_err"]) if row["sigma68"] is not None else None,
                _value_error_or_none(row, "sigma68_over_limit"),
                row["n_events"],
            ]
        )
    lines += _md_table(headers, rows)
    lines += [
        "",
        "AUC (score): the raw classifier score; AUC (weight): the final hit weights (see Hit classification).",
        "",
        _limit_sentence(results),
    ]
    lines += ["", "## Comparison", "", "Generated from the numbers above; significance uses the quoted errors.", ""]
    for lead, sentences in comparison_blocks(results):
        lines += [f"- {lead}", *(f"  - {sentence}" for sentence in sentences)]

    lines += ["", "## Hit classification", ""]
    if results.classification.height:
        lines += [
            _SCORE_AND_WEIGHT_SENTENCE + " A hard 0/1 selection (classical) has a single-point ROC: "
            "its AUC is (ε_s + 1 − ε_b)/2, and its ε_b at 90 % / 95 % is read off the straight lines from (0, 0) "
            "through its working point to (1, 1) (hits dropped from or added to the selection at random).",
            "",
        ]
        cls_rows = [
            [
                row["model"],
                row["n_signal"],
                row["n_background"],
                row["n_bad_scores"],
                _value_error_or_none(row, "auc"),
                row["background_eff_at_90"],
                row["background_eff_at_95"],
                row["n_bad_weights"],
                _value_error_or_none(row, "auc_weight"),
                _value_error_or_none(row, "hit_efficiency"),
                _value_error_or_none(row, "hit_purity"),
            ]
            for row in _in_model_order(results.classification, results.models)
        ]
        threshold = f"{m.HIT_SELECTION_THRESHOLD:g}"
        headers = [
            "model",
            "signal hits",
            "background hits",
            "dropped (non-finite score)",
            "AUC (score)",
            "ε_b @ 90 %",
            "ε_b @ 95 %",
            "dropped (non-finite weight)",
            "AUC (weight)",
            f"hit efficiency (w ≥ {threshold})",
            f"hit purity (w ≥ {threshold})",
        ]
        lines += _md_table(headers, cls_rows)
    else:
        lines.append("No classifying model in the predictions (only truth references).")
    lines += ["", _figure_link(figure_paths, "rejection", "Background rejection vs signal efficiency")]
    lines += [
        "",
        "Background rejection vs signal efficiency of the raw classifier score. A hard 0/1 selection (classical) "
        "has a single working point and is drawn as one marker; one with no background hit selected "
        "(infinite rejection) cannot be drawn on the log axis.",
    ]
    lines += ["", _figure_link(figure_paths, "scores", "Hit score distributions")]
    lines += _hit_weight_rows(results)

    lines += ["", "## Cluster residuals", ""]
    if results.core_fit is None:
        lines.append(f"The Gaussian fit of the truth residuals failed ({results.core_fit_problem}); no core fraction.")
    else:
        fit = results.core_fit
        half_width = m.CORE_WINDOW_N_SIGMA * fit.sigma
        lines += [
            f"Gaussian fit to the `truth` residuals: μ = {format_value_error(fit.mu, fit.mu_err)} mm, "
            f"σ = {format_value_error(fit.sigma, fit.sigma_err)} mm ({fit.method} fit, {fit.n_fit} clusters in "
            "the final fit window). "
            f"Core window: [{fit.mu - half_width:.4g}, {fit.mu + half_width:.4g}] mm.",
            "",
        ]
        core_rows = [
            [
                row["model"],
                row["n_clusters"],
                row["n_missing"],
                row["n_core"],
                format_value_error(row["core_fraction"], row["core_fraction_err"]),
            ]
            for row in _in_model_order(results.core, results.models)
        ]
        lines += _md_table(["model", "clusters", "no cluster built", "in core", "core fraction"], core_rows)
        lines += ["", _figure_link(figure_paths, "clusters", "Cluster residuals with the core window")]

    lines += ["", "## q/pT resolution", ""]
    res_rows = [
        [
            row["model"],
            row["n_tracks"],
            row["n_failed"],
            row["n"],
            format_value_error(row["sigma68"], row["sigma68_err"]),
        ]
        for row in _in_model_order(results.resolution, results.models)
    ]
    lines += _md_table(["model", "tracks", "failed fits (excluded)", "in σ68", "σ68"], res_rows)
    lines += ["", _figure_link(figure_paths, "q_over_pt", "Relative q/pT residuals")]

    lines += ["", "### σ68 in bins of true pT", ""]
    lines += _resolution_pt_rows(results)
    lines += ["", _figure_link(figure_paths, "sigma68_pt", "σ68 vs true pT"), "", "Also in `resolution.csv`."]

    lines += ["", "## Definitions", "", *DEFINITIONS, ""]
    return "\n".join(lines)


def _limit_sentence(results: ReportResults) -> str:
    """What the limit row is, with the point resolution it used (or why there is none)."""
    limit = results.limit
    if limit is None:
        return f"No `{LIMIT_ROW}` row and no σ68 / limit: {results.limit_problem}."
    unbounded = (
        f"; {limit.n_unbounded} events crossing fewer than three layers have no bound and are left out"
        if limit.n_unbounded
        else ""
    )
    return (
        f"`{LIMIT_ROW}`: the Cramér–Rao limit of σ68(q/pT) on the {limit.n_events} evaluated events, σ68 = "
        f"{limit.sigma68:.4g} (exact for these events' true pT, position and angle; no error quoted){unbounded}. "
        f"Its point resolution is {1000 * limit.point_sigma:.2f} µm, the RMS of the charge-centroid residuals of "
        f"the {limit.clusters} clean clusters of the same events (the muon's cluster where no other particle or "
        f"noise strip touches it; their σ68 {1000 * limit.point_sigma68:.2f} µm), on every layer the muon crosses, "
        "with the Highland scattering of the dataset's material after each. It is what an efficient fit of the "
        "muon's clusters would reach were every cluster as good as a clean one: σ68 / limit = 1 is that floor, "
        "1.2 is 20 % above it (error: the row's bootstrap error over the limit)."
    )


def _hit_weight_rows(results: ReportResults) -> list[str]:
    """The "where the hit weight goes" subsection (empty when the table could not be computed)."""
    table = results.hit_weights
    if table is None or table.height == 0:
        return []
    listed = set(table["model"].to_list())
    models = [model for model in results.models if model in listed]
    cells = {(row["model"], row["origin"], row["distance_class"]): row for row in table.iter_rows(named=True)}
    classes = table.select("origin", "distance_class").unique(maintain_order=True).rows()
    headers = ["hit origin", "distance from the muon", "hits"]
    for model in models:
        headers += [f"{model}: mean w", f"{model}: Σ w·d per event [mm]"]
    rows = []
    for origin, distance in classes:
        present = [cells.get((model, origin, distance)) for model in models]
        row: list[Any] = [origin, distance, next((c["n_hits"] for c in present if c), 0)]
        for cell in present:
            row += [f"{cell['mean_weight']:.4f}", f"{cell['pull_per_event']:.2f}"] if cell else [None, None]
        rows.append(row)
    return [
        "",
        "### Where the hit weight goes",
        "",
        "A cluster's offset from the muon is Σ w_i (x_i − x_true) / W over the hits of its layer, so a hit pulls "
        "it by up to its weight w times its distance d = |x − x_true| from the muon's crossing: a noise strip "
        "300 mm away with w = 0.01 moves a 4-strip cluster by as much as a strip 6 mm away with w = 0.5. Signal "
        "strips sit on both sides of the crossing (their Σ w·d is the cluster width and largely cancels); "
        "everything else pulls. w is the hit's final weight in the model's clusters (the `weight` column: the "
        "classifier score for the paper chain, the refined weight for the robust chain, 1/0 for classical; "
        "for assignment, the robust chain's weight of the hits in its chosen windows).",
        "",
        *_md_table(headers, rows),
    ]


def _value_error_or_none(row: dict[str, Any], key: str) -> str | None:
    """'value ± error' of ``key`` and ``key_err`` in a table row; None (rendered "–") without a value."""
    return format_value_error(row[key], row.get(f"{key}_err")) if row.get(key) is not None else None


def _in_model_order(frame: pl.DataFrame, models: list[str]) -> list[dict[str, Any]]:
    """Rows of a table with a ``model`` column, in report model order (unknown models last)."""
    rank = {model: index for index, model in enumerate(models)}
    return sorted(frame.iter_rows(named=True), key=lambda row: rank.get(row["model"], len(rank)))


def _resolution_pt_rows(results: ReportResults) -> list[str]:
    models = [model for model in results.models if model in set(results.resolution_pt["model"].to_list())]
    bins = results.resolution_pt.select("pt_lo", "pt_hi").unique().sort("pt_lo").rows()
    rows = []
    for pt_lo, pt_hi in bins:
        closing = "]" if pt_hi == bins[-1][1] else ")"
        row: list[Any] = [f"[{pt_lo:g}, {pt_hi:g}{closing}"]
        for model in models:
            cell = results.resolution_pt.filter((pl.col("model") == model) & (pl.col("pt_lo") == pt_lo)).row(
                0, named=True
            )
            row.append(
                f"{format_value_error(cell['sigma68'], cell['sigma68_err'])} (n={cell['n']})"
                if cell["sigma68"] is not None
                else "– (n=0)"
            )
        rows.append(row)
    return _md_table(["true pT [GeV]", *models], rows)


def _figure_link(figure_paths: dict[str, Path], key: str, title: str) -> str:
    path = figure_paths.get(key)
    if path is None:
        return f"({title}: not drawn)"
    return f"![{title}](figures/{path.name}) ([PDF](figures/{path.with_suffix('.pdf').name}))"


_SCORE_AND_WEIGHT_SENTENCE = (
    "AUC (score), the ROC and the rejections are those of the raw classifier score (`score`: the network's "
    "sigmoid output); AUC (weight), hit efficiency and purity those of the hit's final weight in the model's "
    "clusters (`weight`). In summary.json `auc` is the raw score's AUC and `auc_weight` the final weights'."
)

DEFINITIONS = [
    "- **Hit score, ROC**: a hit is selected when its score ≥ threshold. Signal efficiency ε_s = selected "
    "signal hits / signal hits; background efficiency ε_b = selected background hits / background hits, "
    "over all evaluated hits (signal = `is_signal`). The ROC has one point per distinct score (ties enter "
    "together), from (0, 0) to (1, 1).",
    "- **AUC**: trapezoidal area under ε_s(ε_b) = P(score_signal > score_background) + ½ P(tie). "
    "Error: Hanley–McNeil (1982), which treats hits as independent.",
    "- **Hit score, hit weight**: `score` is the classifier output (sigmoid of the network logit; 1/0 for a hard "
    "selection); `weight` is the hit's weight in the model's final clusters (the score in the paper chain, the "
    "refined weight after the last reweighting step in the robust chain, for assignment that chain's weight of "
    "its 0/1 window selection, 1/0 for classical).",
    f"- **Hit efficiency, purity**: a hit is selected when its weight is ≥ {m.HIT_SELECTION_THRESHOLD:g}. "
    "Efficiency = selected signal hits / signal hits, purity = selected signal hits / selected hits; binomial "
    "errors. **AUC (weight)** is the AUC of the weight, error as for the AUC.",
    "- **Background rejection at ε_s = 90 % / 95 %**: 1/ε_b, with ε_b linearly interpolated between the two "
    "ROC points that bracket the target ε_s (the smallest ε_b if the ROC passes exactly through it). Error: "
    "binomial on the background count only. Infinite (∞, null in summary.json) when no background hit passes.",
    "- **Cluster residual**: r = x̂_l − x_true,l [mm] per event and layer; layers where the muon left the "
    "active width (x_true NaN) are skipped; a layer where a model built no cluster (x̂ not finite) counts as "
    "outside the core.",
    f"- **Core window**: μ ± {m.CORE_WINDOW_N_SIGMA:g}σ of a Gaussian fitted to the `truth` residuals. Fit "
    "(`analysis.metrics.fit_gaussian_core`): start from μ = median, σ = min(σ68, 2 × the 0.383 quantile of "
    "|r − median|); on a fixed grid of σ/10 wide bins, least-squares fit A·exp(−(x−μ)²/2σ²) (Poisson errors, "
    f"scipy.optimize.curve_fit) to the bins within μ ± {m.CORE_WINDOW_N_SIGMA:g}σ, move the window to the new "
    "(μ, σ) and repeat until it selects the same bins again; if that runs away (flat-topped distribution) a "
    "single fit within median ± 2σ68 is used instead (the method used is stated above). "
    "**Core fraction** = clusters in the window / clusters, binomial error.",
    "- **q/pT residual**: ((q/pT)_reco − (q/pT)_true) / (q/pT)_true with (q/pT)_true = q/pT of the generated "
    "muon. Tracks with `fit_status` ≠ 0 or a non-finite q/pT are failures: excluded from σ68 and counted.",
    f"- **σ68**: the 0.68 quantile of |r − median(r)| (linear interpolation between order statistics), the "
    "half-width of the median-centred interval holding 68 % of the events; 0.9945σ for a Gaussian. Error: "
    f"standard deviation of σ68 over {m.N_BOOTSTRAP} bootstrap resamples (seed 0).",
    "- **pT bins**: true pT in [20, 25), [25, 30), ..., [45, 50] GeV (last bin closed); successful fits only.",
    f"- **{LIMIT_ROW}, σ68 / limit**: for each evaluated event the Cramér–Rao bound on σ(q/pT) of an unbiased fit "
    "of its clusters (`analysis/limit.py`): an exact circle from the event's true x0, angle and pT, a Gaussian "
    "Highland kink (the detector's x/X0 per layer, the path through it) after every layer the muon crosses, and a "
    "Gaussian point error on every layer with a true crossing, equal to the RMS of the clean-cluster "
    "charge-centroid residuals of the evaluated events. Relative to |q/pT| each event is a zero-mean Gaussian; "
    "the row's σ68 (overall and per pT bin) is the exact σ68 of the mixture of the events' Gaussians (root "
    "finding, no sampling), so it has no error (null). Events crossing fewer than three layers have no bound "
    "(counted as failed). A row's σ68 / limit is its σ68 over the limit's, its error the row's σ68 error over "
    "the limit.",
    f"- **Comparisons**: a difference is called significant from {SIGNIFICANCE_THRESHOLD:g}σ, σ being the two "
    "errors added in quadrature (conservative: both models see the same events).",
]


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("muontrack")
    except Exception:  # not installed: running from a checkout
        return "(version unknown)"


def write_figures(results: ReportResults, figures_dir: Path) -> dict[str, Path]:
    """Draw every figure into ``figures_dir``; returns {figure key: path} of those drawn."""
    paths = {
        "rejection": fig.plot_rejection_vs_efficiency(results.rocs, figures_dir / _FIGURE_NAMES["rejection"]),
        "scores": fig.plot_score_histograms(results.hit_scores, figures_dir / _FIGURE_NAMES["scores"]),
        "q_over_pt": fig.plot_q_over_pt_residuals(
            results.track_residuals,
            results.resolution.filter(pl.col("model") != LIMIT_ROW),
            figures_dir / _FIGURE_NAMES["q_over_pt"],
        ),
        "sigma68_pt": fig.plot_sigma68_vs_pt(results.resolution_pt, figures_dir / _FIGURE_NAMES["sigma68_pt"]),
    }
    if results.core_fit is not None:
        paths["clusters"] = fig.plot_cluster_residuals(
            results.cluster_residuals, results.core_fit, figures_dir / _FIGURE_NAMES["clusters"]
        )
    return paths


def catalog_frames(
    results: ReportResults, context: dict[str, Any], report: Path, created: datetime | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The rows of summary.parquet and resolution.parquet (:mod:`analysis.catalog`) of a report published at
    ``report``. The versions and device come from ``context["environment"]`` when it has them."""
    created = created or datetime.now(UTC)
    identity = catalog.identity_frame(context, results.models, report, created)
    metrics = catalog.metrics_frame(results.models, results.classification, results.core, results.resolution)
    environment = context.get("environment")
    summary = catalog.summary_frame(identity, metrics, environment if isinstance(environment, dict) else None)
    return summary, catalog.resolution_frame(identity, results.resolution_pt)


def _write_catalog(report_dir: Path, summary: pl.DataFrame, resolution: pl.DataFrame) -> None:
    catalog.write_parquet_atomic(summary, report_dir / catalog.SUMMARY_FILE)
    catalog.write_parquet_atomic(resolution, report_dir / catalog.RESOLUTION_FILE)


def write_report(
    report_dir: Path,
    dataset_hits: pl.LazyFrame,
    dataset_events: pl.LazyFrame,
    context: dict[str, Any],
    published_as: Path | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Compute every metric and write report.md, summary.json, resolution.csv, figures/ and the catalog
    (summary.parquet, resolution.parquet) into ``report_dir``.

    Args:
        report_dir: the REPORT folder; its ``predictions/{hits,clusters,tracks}.parquet`` are read.
        dataset_hits: the dataset's hits (needs event_id, hit_id, is_signal).
        dataset_events: the dataset's events (needs event_id, pt [GeV], q).
        context: free-form description of what was run (e.g. dataset, n_events, config, runs as a list of
            {model, preset, epochs, seed, training_seconds}); rendered as given. The catalog takes its identity
            columns from it (see :func:`analysis.catalog.identity_frame`), the ``limit`` row the dataset's
            detector config from its ``detector`` (:func:`context_detector`; without one the report has no limit
            row and says so).
        published_as: the folder the report will be read from, when ``report_dir`` is a staging folder
            (:func:`staged_report`); the catalog's ``report`` column. Default: ``report_dir``.

    Returns:
        The summary written to summary.json (see :func:`build_summary`).

    Raises:
        MuontrackError: missing or malformed predictions or truth, or a malformed ``context["detector"]``;
            nothing is written then.
    """
    report_dir = Path(report_dir)
    context = context or {}
    predictions = _scan_predictions(report_dir / "predictions")
    _check_dataset_frame(dataset_hits, "hits")
    _check_dataset_frame(dataset_events, "events")
    results = compute_results(predictions, dataset_hits, dataset_events, detector=context_detector(context))
    summary = build_summary(results)
    catalog_summary, catalog_resolution = catalog_frames(
        results, context, Path(os.path.abspath(published_as or report_dir))
    )

    figure_paths = write_figures(results, report_dir / "figures")
    write_text_atomic(report_dir / "report.md", render_markdown(results, summary, figure_paths, context))
    write_text_atomic(report_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    rank = {model: index for index, model in enumerate(results.models)}
    csv_text = (
        results.resolution_pt.with_columns(rank=pl.col("model").replace_strict(rank, default=len(rank)))
        .sort("rank", "pt_lo")
        .select(RESOLUTION_COLUMNS)
        .write_csv()
    )
    write_text_atomic(report_dir / "resolution.csv", csv_text)
    _write_catalog(report_dir, catalog_summary, catalog_resolution)
    return summary


# ---------------------------------------------------------------------------------------------------------
# Atomic publication of a report folder
# ---------------------------------------------------------------------------------------------------------

#: the hidden folders beside REPORT: ``.NAME.staging-<pid>-<hex>/NAME`` (a report being written) and
#: ``.NAME.old-<pid>-<hex>/NAME`` (the report being replaced). The report sits one level down so that a glob
#: over published reports (``reports/*/summary.parquet``) never sees them.
_STAGING, _OLD = "staging", "old"


def _shell_pattern(out: Path, kind: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out.name)}\.{kind}-\d+-[0-9a-f]+")


def _new_shell(out: Path, kind: str) -> Path:
    """A new, empty hidden folder beside ``out`` (same file system: renames out of it are atomic)."""
    shell = out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    shell.mkdir(parents=True)
    return shell


def _shells(out: Path, kind: str) -> list[Path]:
    """The ``kind`` folders a writer of ``out`` left beside it, oldest first."""
    if not out.parent.is_dir():
        return []
    pattern = _shell_pattern(out, kind)
    found = [path for path in out.parent.iterdir() if pattern.fullmatch(path.name) and path.is_dir()]
    return sorted(found, key=lambda path: path.stat().st_mtime_ns)


def _discard(path: Path) -> None:
    """Delete a staging or replaced report folder (a writer killed here leaves it for the next one)."""
    shutil.rmtree(path, ignore_errors=True)


def recover_report_dir(out: Path) -> None:
    """Finish or undo what a killed writer of ``out`` left beside it. Call with ``out``'s lock held
    (pipeline.locks.exclusive_writer).

    A writer killed between moving the previous report away and moving the new one in leaves no ``out`` and
    the previous report in ``.NAME.old-*/NAME``: it is moved back. Every other leftover (staging folders, a
    replaced report not yet deleted) is deleted.
    """
    out = Path(os.path.abspath(out))
    old = _shells(out, _OLD)
    if not os.path.lexists(out):
        previous = [shell / out.name for shell in old if (shell / out.name).is_dir()]
        if previous:
            os.rename(previous[-1], out)
    for shell in [*old, *_shells(out, _STAGING)]:
        _discard(shell)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def _replace_dir(new: Path, out: Path) -> None:
    """Move the folder ``new`` to ``out``. Where the system can, the two are exchanged atomically (a reader sees
    the old report or the new one, never none) and the old one, now at ``new``, goes with the staging folder.
    Elsewhere: rename the current ``out`` away, rename ``new`` in, delete the old one; a kill in between leaves
    no report until the next writer, whose :func:`recover_report_dir` moves the previous one back."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    if _exchange(new, out):
        return
    old_shell = _new_shell(out, _OLD)
    os.rename(out, old_shell / out.name)
    os.rename(new, out)
    _discard(old_shell)


@contextmanager
def staged_report(out: Path) -> Iterator[Path]:
    """A fresh folder in which to write the whole report of ``out`` (predictions included), moved to ``out``
    when the ``with`` block ends without an exception; on an exception ``out`` is left as it was.

    The folder is ``.NAME.staging-<pid>-<hex>/NAME`` beside ``out``; leftovers of killed writers are cleaned up
    first (:func:`recover_report_dir`). Call with ``out``'s lock held (pipeline.locks.exclusive_writer).
    """
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise MuontrackError(f"report path {out} is a file, not a folder")
    recover_report_dir(out)
    try:
        shell = _new_shell(out, _STAGING)
    except OSError as err:
        raise MuontrackError(f"cannot write beside {out}: {err.strerror or err}") from None
    try:
        yield shell / out.name
        staged = shell / out.name
        if not staged.is_dir():
            raise MuontrackError(f"nothing was written for the report {out}")
        _replace_dir(staged, out)
    finally:
        _discard(shell)
