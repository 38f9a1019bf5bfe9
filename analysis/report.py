"""The evaluation report: REPORT/report.md, REPORT/summary.json, REPORT/resolution.csv, REPORT/figures/ (PNG and
PDF) and the catalog files REPORT/summary.parquet and REPORT/resolution.parquet (:mod:`analysis.catalog`); the names
and the atomic publication of the folder are :mod:`analysis.report_folder`.

:func:`write_report` reads REPORT/predictions/*.parquet, joins them with the dataset's truth and computes every
metric of docs/contracts.md, "Metric definitions" (:mod:`analysis.results`, with the ``limit`` row: the Cramér-Rao
limit of σ68(q/pT) on the evaluated events, and every row's σ68 / limit), then draws the figures
(:mod:`analysis.figures`), renders report.md (:mod:`analysis.render`) and writes the files. All numbers are computed
before anything is written, so a bad input leaves an existing report untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from analysis import catalog
from analysis import display as event_display
from analysis import figures as fig
from analysis import report_folder as folder
from analysis.metrics import TAIL_COLUMNS
from analysis.render import render_markdown
from analysis.results import (
    ReportResults,
    build_summary,
    check_dataset_frame,
    compute_results,
    context_detector,
    merged_summary_table,
    scan_predictions,
)
from analysis.training import plot_training_curves, training_curves
from pipeline.atomic import write_text_atomic
from pipeline.registry import LIMIT_ROW

#: columns of resolution.csv
RESOLUTION_COLUMNS = ("model", "pt_lo", "pt_hi", "n", "sigma68", "sigma68_err", *TAIL_COLUMNS)


def write_figures(results: ReportResults, figures_dir: Path) -> dict[str, Path]:
    """Draw every figure into ``figures_dir``; returns {figure key: path} of those drawn."""
    paths = {
        "rejection": fig.plot_rejection_vs_efficiency(
            results.hit_scores, figures_dir / folder.FIGURE_NAMES["rejection"]
        ),
        "scores": fig.plot_score_histograms(results.hit_scores, figures_dir / folder.FIGURE_NAMES["scores"]),
        "q_over_pt": fig.plot_q_over_pt_residuals(
            results.track_residuals,
            results.resolution.filter(pl.col("model") != LIMIT_ROW),
            figures_dir / folder.FIGURE_NAMES["q_over_pt"],
        ),
        "sigma68_pt": fig.plot_sigma68_vs_pt(results.resolution_pt, figures_dir / folder.FIGURE_NAMES["sigma68_pt"]),
    }
    hit_panels = (("hit_efficiency", "hit efficiency"), ("hit_purity", "hit purity"))
    pt_label = "$p_T^{true}$ [GeV]"
    if results.hit_performance_pt is not None:
        paths["hit_performance_pt"] = fig.plot_rates(
            results.hit_performance_pt,
            "pt",
            hit_panels,
            pt_label,
            "Hit selection by the final weights vs transverse momentum",
            figures_dir / folder.FIGURE_NAMES["hit_performance_pt"],
        )
    if results.hit_performance_layer is not None:
        paths["hit_performance_layer"] = fig.plot_rates(
            results.hit_performance_layer,
            "layer",
            hit_panels,
            "layer",
            "Hit selection by the final weights per layer",
            figures_dir / folder.FIGURE_NAMES["hit_performance_layer"],
        )
    if results.track_performance_pt is not None:
        paths["track_performance_pt"] = fig.plot_rates(
            results.track_performance_pt,
            "pt",
            (("failed_fit_rate", "failed-fit rate"), ("charge_misid_rate", "charge misid. rate")),
            pt_label,
            "Track fit failures and charge misidentification",
            figures_dir / folder.FIGURE_NAMES["track_performance_pt"],
        )
    for shown in results.event_displays or []:
        path = figures_dir / folder.EVENT_DISPLAY_NAME.format(event_id=shown.event_id)
        paths[event_display.figure_key(shown.event_id)] = event_display.save_report_display(shown, path)
    if results.core_fit is not None:
        paths["clusters"] = fig.plot_cluster_residuals(
            results.cluster_residuals, results.core_fit, figures_dir / folder.FIGURE_NAMES["clusters"]
        )
    return paths


def write_training_figures(
    context: dict[str, Any], training: Mapping[str, pl.DataFrame], figures_dir: Path
) -> dict[str, Path]:
    """The training curves of each run of ``context["runs"]`` whose metrics table ``training`` holds (keyed by the
    run's path as the context gives it), the evaluated checkpoint's epoch marked with the best and the last;
    returns {:func:`analysis.report_folder.training_figure_key`: path}."""
    paths = {}
    for run in context.get("runs") or []:
        if not isinstance(run, Mapping) or run.get("run") not in training or not run.get("model"):
            continue
        marks = {
            "evaluated": run.get("checkpoint_epoch"),
            "best": run.get("best_epoch"),
            "last": run.get("last_epoch"),
        }
        title = f"{run['model']}: {Path(str(run['run'])).name}"
        if run.get("checkpoint") and run.get("checkpoint_epoch") is not None:
            title += f" (evaluated: {run['checkpoint']} checkpoint, epoch {run['checkpoint_epoch']})"
        paths[folder.training_figure_key(str(run["model"]))] = plot_training_curves(
            training_curves(training[run["run"]], marks),
            title,
            figures_dir / folder.training_figure_name(str(run["model"])),
        )
    return paths


def catalog_frames(
    results: ReportResults, context: dict[str, Any], report: Path, created: datetime | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The rows of summary.parquet and resolution.parquet (:mod:`analysis.catalog`) of a report published at
    ``report``. The versions and device come from ``context["environment"]`` when it has them."""
    created = created or datetime.now(UTC)
    identity = catalog.identity_frame(context, results.models, report, created)
    metrics = catalog.metrics_frame(
        results.models, results.classification, results.core, results.resolution, merged_summary_table(results)
    )
    environment = context.get("environment")
    summary = catalog.summary_frame(identity, metrics, environment if isinstance(environment, dict) else None)
    return summary, catalog.resolution_frame(identity, results.resolution_pt)


def _write_catalog(report_dir: Path, summary: pl.DataFrame, resolution: pl.DataFrame) -> None:
    catalog.write_parquet_atomic(summary, report_dir / folder.CATALOG_SUMMARY_NAME)
    catalog.write_parquet_atomic(resolution, report_dir / folder.CATALOG_RESOLUTION_NAME)


def write_report(
    report_dir: Path,
    dataset_hits: pl.LazyFrame,
    dataset_events: pl.LazyFrame,
    context: dict[str, Any],
    published_as: Path | None = None,
    training: Mapping[str, pl.DataFrame] | None = None,
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
            detector config from its ``detector`` (:func:`analysis.results.context_detector`; without one the report
            has no limit row and says so).
        published_as: the folder the report will be read from, when ``report_dir`` is a staging folder
            (:func:`analysis.report_folder.staged_report`); the catalog's ``report`` column. Default: ``report_dir``.
        training: each run's metrics table (RUN/metrics.parquet as a frame) by the run's path as ``context["runs"]``
            names it: the report draws those runs' training curves (:func:`write_training_figures`) in its
            Training section, which also says which checkpoint each run was evaluated with.

    Returns:
        The summary written to summary.json (see :func:`analysis.results.build_summary`).

    Raises:
        MuontrackError: missing or malformed predictions or truth, or a malformed ``context["detector"]``;
            nothing is written then.
    """
    report_dir = Path(report_dir)
    context = context or {}
    predictions = scan_predictions(report_dir)
    check_dataset_frame(dataset_hits, "hits")
    check_dataset_frame(dataset_events, "events")
    results = compute_results(predictions, dataset_hits, dataset_events, detector=context_detector(context))
    summary = build_summary(results)
    catalog_summary, catalog_resolution = catalog_frames(
        results, context, Path(os.path.abspath(published_as or report_dir))
    )

    figure_paths = write_figures(results, report_dir / folder.FIGURES_DIR)
    figure_paths |= write_training_figures(context, training or {}, report_dir / folder.FIGURES_DIR)
    write_text_atomic(report_dir / folder.REPORT_NAME, render_markdown(results, summary, figure_paths, context))
    write_text_atomic(report_dir / folder.SUMMARY_NAME, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    rank = {model: index for index, model in enumerate(results.models)}
    csv_text = (
        results.resolution_pt.with_columns(rank=pl.col("model").replace_strict(rank, default=len(rank)))
        .sort("rank", "pt_lo")
        .select(RESOLUTION_COLUMNS)
        .write_csv()
    )
    write_text_atomic(report_dir / folder.RESOLUTION_NAME, csv_text)
    _write_catalog(report_dir, catalog_summary, catalog_resolution)
    return summary
