"""The report of a regime scan (``muontrack scan``, flows.scan): OUT/scan/summary.parquet, comparisons.parquet,
report.md and figures/.

A scan evaluates the same rows at every point of a grid of detectors and background scales; each point (and
seed) has its own ordinary report (analysis.report) under OUT/reports/. This module gathers them:

- ``summary.parquet``: one row per point, seed and row (:data:`SCAN_SUMMARY_SCHEMA`): σ68 with its bootstrap
  error and σ68 / limit from the report's summary.json, the failed-fit rate from its predictions, the hit
  efficiency and purity of the final weights;
- ``comparisons.parquet``: the paired comparisons of :data:`SCAN_PAIRS` at every point (:func:`paired_comparison`):
  both rows on the same events, resampled together, so the error of the difference is that of the difference,
  not the two rows' errors added as if independent (analysis.comparisons.compare_sentence, which overstates it);
- one figure per metric of :data:`SCAN_METRICS` against the background scale, one line per row of
  :data:`SCAN_FIGURE_ROWS`, one panel per detector (analysis.figures.plot_scan_metric);
- ``report.md``: the grid, the tables, who wins at each point and by how many σ, the figures.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from analysis import figures as fig
from analysis import metrics as m
from analysis import statistics as st
from analysis.catalog import model_rank_expr, write_parquet_atomic
from analysis.comparisons import SIGNIFICANCE_THRESHOLD
from analysis.figures import format_value_error
from analysis.render import md_table
from analysis.report_folder import SUMMARY_NAME, prediction_path
from pipeline.atomic import write_text_atomic
from pipeline.errors import MuontrackError
from pipeline.registry import LIMIT_ROW
from pipeline.stats import sigma68

#: the folder of the scan report inside the scan's --out
SCAN_DIR = "scan"
#: the rows drawn in the scan figures: the limit, the robust chain's truth reference, classical and the two
#: trained rows (the paper chain's rows are in summary.parquet; a hundred times worse, they would flatten the rest)
SCAN_FIGURE_ROWS = (LIMIT_ROW, "truth_charge", "classical", "baseline", "e2e")
#: the comparisons at every point, (candidate, reference): the paper's question, then each learned row against
#: the non-learned reference
SCAN_PAIRS = (("e2e", "baseline"), ("e2e", "classical"), ("baseline", "classical"))
#: the figures' metrics: column -> (axis label, whether lower is better, log axis)
SCAN_METRICS: dict[str, tuple[str, bool, bool]] = {
    "sigma68": ("$\\sigma_{68}$ of relative $q/p_T$ residual", True, True),
    "failed_fit_rate": ("failed-fit rate", True, False),
    "hit_efficiency": ("hit efficiency (weight $\\geq$ 0.5)", False, False),
    "hit_purity": ("hit purity (weight $\\geq$ 0.5)", False, False),
}
#: the paired comparisons' metrics, both lower-is-better
PAIRED_METRICS = ("sigma68", "failed_fit_rate")

#: what a point is: its regime and the seed of its dataset and training
POINT_SCHEMA = pl.Schema({"detector": pl.String, "background_scale": pl.Float64, "seed": pl.Int64})
#: OUT/scan/summary.parquet: one row per point, seed and row of its report
SCAN_SUMMARY_SCHEMA = pl.Schema(
    {
        **POINT_SCHEMA,
        "model": pl.String,
        "sigma68": pl.Float64,
        "sigma68_err": pl.Float64,
        "sigma68_over_limit": pl.Float64,
        "failed_fit_rate": pl.Float64,
        "failed_fit_rate_err": pl.Float64,
        "hit_efficiency": pl.Float64,
        "hit_efficiency_err": pl.Float64,
        "hit_purity": pl.Float64,
        "hit_purity_err": pl.Float64,
        "auc": pl.Float64,
        "n_tracks": pl.Int64,
        "n_events": pl.Int64,
        "report": pl.String,
    }
)
#: OUT/scan/comparisons.parquet: one row per point, seed (null: the seeds combined), pair and metric
COMPARISON_SCHEMA = pl.Schema(
    {
        **POINT_SCHEMA,
        "candidate": pl.String,
        "reference": pl.String,
        "metric": pl.String,
        "candidate_value": pl.Float64,
        "reference_value": pl.Float64,
        "difference": pl.Float64,
        "difference_err": pl.Float64,
        "n_sigma": pl.Float64,
        "winner": pl.String,
        "n_events": pl.Int64,
    }
)
_BOOTSTRAP_CHUNK_VALUES = 4_000_000


# ---------------------------------------------------------------------------------------------------------
# Paired comparison of two rows on the same events
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedDifference:
    """``candidate`` − ``reference`` of a lower-is-better metric on the same events, with the error of the
    difference itself; ``n_sigma`` > 0 when the candidate is better."""

    candidate_value: float
    reference_value: float
    difference: float
    difference_err: float
    n_events: int

    @property
    def n_sigma(self) -> float:
        if self.difference_err > 0 and math.isfinite(self.difference_err):
            return -self.difference / self.difference_err
        return 0.0 if self.difference == 0 else math.copysign(math.inf, -self.difference)


def _paired_residuals(track_residuals: pl.DataFrame, candidate: str, reference: str) -> pl.DataFrame:
    """(event_id, c, r): the two rows' residuals (null where the fit failed) on the events both rows have, sorted
    by event (the bootstrap then depends on the events, not on the row order)."""

    def row(model: str, name: str) -> pl.DataFrame:
        return track_residuals.filter(pl.col("model") == model).select("event_id", pl.col("residual").alias(name))

    return row(candidate, "c").join(row(reference, "r"), on="event_id", how="inner").sort("event_id")


def _sigma68_rows(samples: np.ndarray) -> np.ndarray:
    """σ68 (pipeline.stats.sigma68, NaNs (failed fits) left out) of each row of ``samples``."""
    return np.array([sigma68(row) if not np.isnan(row).all() else np.nan for row in samples])


def paired_sigma68(
    track_residuals: pl.DataFrame, candidate: str, reference: str, n_boot: int = st.N_BOOTSTRAP, seed: int = 0
) -> PairedDifference:
    """σ68(candidate) − σ68(reference) on the events both rows have, each row's σ68 over its own successful fits
    (as in the report), and the bootstrap error of the difference: the events are resampled with replacement
    together (``n_boot`` replicas, NumPy generator ``seed``), so what both rows share (the same hard events)
    cancels in the difference.

    Args:
        track_residuals: analysis.metrics.track_residual_table of the report's predictions.

    Raises:
        MuontrackError: a row has no successful fit on the shared events.
    """
    paired = _paired_residuals(track_residuals, candidate, reference)
    values = paired.select(pl.col("c", "r").cast(pl.Float64).fill_null(np.nan)).to_numpy()
    for column, model in enumerate((candidate, reference)):
        if not np.isfinite(values[:, column]).any():
            raise MuontrackError(f"paired comparison: {model} has no successful fit on the events of {candidate}")
    c_value, r_value = st.sigma68(values[:, 0]), st.sigma68(values[:, 1])
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    differences = np.empty(n_boot)
    chunk = max(1, _BOOTSTRAP_CHUNK_VALUES // max(1, n))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        sample = values[rng.integers(0, n, size=(stop - start, n))]
        # a replica whose rows are all failed fits has a NaN σ68 (NumPy warns; the suite makes warnings errors)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            differences[start:stop] = _sigma68_rows(sample[..., 0]) - _sigma68_rows(sample[..., 1])
    finite = differences[np.isfinite(differences)]
    err = float(np.std(finite, ddof=1)) if finite.size >= 2 else math.nan
    return PairedDifference(c_value, r_value, c_value - r_value, err, n)


def paired_failed_fit_rate(track_residuals: pl.DataFrame, candidate: str, reference: str) -> PairedDifference:
    """failed-fit rate(candidate) − failed-fit rate(reference) on the events both rows have: the mean of the
    per-event difference of the two failure indicators, its error the standard error of that mean (paired)."""
    paired = _paired_residuals(track_residuals, candidate, reference)
    failed = paired.select(pl.col("c").is_null(), pl.col("r").is_null()).to_numpy().astype(np.float64)
    n = failed.shape[0]
    if n == 0:
        raise MuontrackError(f"paired comparison: {candidate} and {reference} share no event")
    per_event = failed[:, 0] - failed[:, 1]
    err = float(np.std(per_event, ddof=1) / math.sqrt(n)) if n >= 2 else math.nan
    return PairedDifference(float(failed[:, 0].mean()), float(failed[:, 1].mean()), float(per_event.mean()), err, n)


def winner(candidate: str, reference: str, n_sigma: float) -> str | None:
    """The better row when the difference reaches analysis.comparisons.SIGNIFICANCE_THRESHOLD σ, else None."""
    if n_sigma >= SIGNIFICANCE_THRESHOLD:
        return candidate
    if n_sigma <= -SIGNIFICANCE_THRESHOLD:
        return reference
    return None


# ---------------------------------------------------------------------------------------------------------
# Gathering the points' reports
# ---------------------------------------------------------------------------------------------------------


def failed_fit_table(track_residuals: pl.DataFrame) -> pl.DataFrame:
    """(model, n_tracks, failed_fit_rate, failed_fit_rate_err): the share of a row's tracks whose fit failed, with
    its binomial error."""
    return track_residuals.group_by("model").agg(
        n_tracks=pl.len(),
        failed_fit_rate=(~pl.col("fit_ok")).mean(),
        failed_fit_rate_err=m.binomial_error_expr((~pl.col("fit_ok")).mean(), pl.len()),
    )


def point_residuals(report: Path, dataset_events: pl.LazyFrame) -> pl.DataFrame:
    """analysis.metrics.track_residual_table of a point's report (its predictions/tracks.parquet)."""
    tracks = prediction_path(Path(report), "tracks")
    if not tracks.is_file():
        raise MuontrackError(f"{tracks}: the report of a scan point has no predictions (run the scan again)")
    return m.track_residual_table(pl.scan_parquet(tracks), dataset_events)


def point_summary(point: Mapping[str, Any], track_residuals: pl.DataFrame) -> pl.DataFrame:
    """The rows of :data:`SCAN_SUMMARY_SCHEMA` of one point: its report's summary.json with the failed-fit rates."""
    report = Path(point["report"])
    try:
        summary = json.loads((report / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        raise MuontrackError(f"{report / 'summary.json'}: missing or unreadable (run the scan again)") from None
    rows = [
        {"model": model, **{key: value for key, value in values.items() if key in SCAN_SUMMARY_SCHEMA}}
        for model, values in summary.items()
    ]
    frame = pl.DataFrame(rows, schema_overrides={"model": pl.String}, infer_schema_length=None)
    frame = frame.join(failed_fit_table(track_residuals), on="model", how="left", maintain_order="left")
    frame = frame.with_columns(
        pl.lit(point["detector"], pl.String).alias("detector"),
        pl.lit(float(point["background_scale"]), pl.Float64).alias("background_scale"),
        pl.lit(int(point["seed"]), pl.Int64).alias("seed"),
        pl.lit(str(report), pl.String).alias("report"),
    )
    present = set(frame.columns)
    return frame.select(
        (pl.col(name) if name in present else pl.lit(None)).cast(dtype).alias(name)
        for name, dtype in SCAN_SUMMARY_SCHEMA.items()
    )


def point_comparisons(point: Mapping[str, Any], track_residuals: pl.DataFrame) -> pl.DataFrame:
    """The rows of :data:`COMPARISON_SCHEMA` of one point and seed: each pair of :data:`SCAN_PAIRS` whose two rows
    the report has, on each metric of :data:`PAIRED_METRICS`."""
    present = set(track_residuals["model"].unique().to_list())
    rows = []
    for candidate, reference in SCAN_PAIRS:
        if not {candidate, reference} <= present:
            continue
        for metric, compare in (("sigma68", paired_sigma68), ("failed_fit_rate", paired_failed_fit_rate)):
            result = compare(track_residuals, candidate, reference)
            rows.append(
                {
                    "detector": point["detector"],
                    "background_scale": float(point["background_scale"]),
                    "seed": int(point["seed"]),
                    "candidate": candidate,
                    "reference": reference,
                    "metric": metric,
                    "candidate_value": result.candidate_value,
                    "reference_value": result.reference_value,
                    "difference": result.difference,
                    "difference_err": result.difference_err,
                    "n_sigma": result.n_sigma,
                    "winner": winner(candidate, reference, result.n_sigma),
                    "n_events": result.n_events,
                }
            )
    return pl.DataFrame(rows, schema=COMPARISON_SCHEMA)


def seeds_combined(comparisons: pl.DataFrame) -> pl.DataFrame:
    """For every point, pair and metric with more than one seed, a row with a null seed: the mean of the seeds'
    differences, its error the standard error of that mean over the seeds (the seeds are independent datasets
    and trainings, so their spread holds both the event sample and the training's randomness)."""
    keys = ["detector", "background_scale", "candidate", "reference", "metric"]
    per_seed = comparisons.filter(pl.col("seed").is_not_null())
    combined = (
        per_seed.group_by(keys, maintain_order=True)
        .agg(
            pl.len().alias("_seeds"),
            pl.col("candidate_value").mean(),
            pl.col("reference_value").mean(),
            pl.col("difference").mean(),
            (pl.col("difference").std(ddof=1) / pl.len().sqrt()).alias("difference_err"),
            pl.col("n_events").sum(),
        )
        .filter(pl.col("_seeds") > 1)
        .with_columns(
            pl.lit(None, pl.Int64).alias("seed"),
            pl.when(pl.col("difference_err") > 0)
            .then(-pl.col("difference") / pl.col("difference_err"))
            .otherwise(0.0)
            .alias("n_sigma"),
        )
    )
    combined = combined.with_columns(
        pl.when(pl.col("n_sigma") >= SIGNIFICANCE_THRESHOLD)
        .then(pl.col("candidate"))
        .when(pl.col("n_sigma") <= -SIGNIFICANCE_THRESHOLD)
        .then(pl.col("reference"))
        .otherwise(None)
        .alias("winner")
    )
    return combined.select(COMPARISON_SCHEMA.names()).cast(dict(COMPARISON_SCHEMA))


def seed_mean_expr(value: str) -> pl.Expr:
    """A row's ``value`` over the seeds of a point: the mean (the value itself for one seed)."""
    return pl.col(value).mean().alias(value)


def seed_error_expr(value: str) -> pl.Expr:
    """The error of :func:`seed_mean_expr`: with one seed the row's own error (``value_err``), with more the
    standard error of the mean over the seeds."""
    return (
        pl.when(pl.col(value).count() > 1)
        .then(pl.col(value).std(ddof=1) / pl.col(value).count().sqrt())
        .otherwise(pl.col(f"{value}_err").first())
        .alias(f"{value}_err")
    )


def points_table(summary: pl.DataFrame) -> pl.DataFrame:
    """One row per detector, background scale and model: each metric of :data:`SCAN_METRICS` averaged over the
    seeds (:func:`seed_mean_expr`, :func:`seed_error_expr`), rows in scan order then report order."""
    return (
        summary.group_by("detector", "background_scale", "model", maintain_order=True)
        .agg(
            pl.col("seed").n_unique().alias("seeds"),
            *(expr for metric in SCAN_METRICS for expr in (seed_mean_expr(metric), seed_error_expr(metric))),
        )
        .with_columns(_rank=model_rank_expr())
        .sort("_rank", maintain_order=True)
        .drop("_rank")
    )


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def comparison_sentence(row: Mapping[str, Any]) -> str:
    """One sentence for a row of comparisons.parquet: both values, the paired difference and who wins by how
    many σ."""
    metric = "σ68(q/pT)" if row["metric"] == "sigma68" else "failed-fit rate"
    candidate, reference = row["candidate"], row["reference"]
    values = f"{row['candidate_value']:.5g} vs {row['reference_value']:.5g}"
    difference = format_value_error(row["difference"], row["difference_err"])
    n_sigma = row["n_sigma"]
    if n_sigma is None or not math.isfinite(n_sigma):
        verdict = "no error on the difference, no significance"
    elif row["winner"] is not None:
        verdict = f"**{row['winner']} wins by {abs(n_sigma):.1f}σ**"
    elif n_sigma == 0:
        verdict = "equal"
    else:
        better = candidate if n_sigma > 0 else reference
        verdict = f"{better} nominally better by {abs(n_sigma):.1f}σ (below {SIGNIFICANCE_THRESHOLD:g}σ: no winner)"
    paired = "seeds combined" if row["seed"] is None else "paired"
    return f"{candidate} vs {reference}, {metric}: {values}, difference {difference} ({paired}): {verdict}."


def _point_label(detector: str, scale: float) -> str:
    return f"{detector} × {scale:g}"


def _metric_table(table: pl.DataFrame, metric: str) -> list[str]:
    models = [model for model in fig.model_order(set(table["model"].to_list())) if model in SCAN_FIGURE_ROWS]
    rows = []
    for (detector, scale), group in table.group_by("detector", "background_scale", maintain_order=True):
        cells = []
        for model in models:
            found = group.filter(pl.col("model") == model)
            value = found[metric][0] if found.height else None
            err = found[f"{metric}_err"][0] if found.height else None
            cells.append(format_value_error(value, err) if value is not None else "–")
        rows.append([_point_label(str(detector), float(scale)), *cells])
    return md_table(["point", *models], rows)


def render_scan_markdown(
    context: Mapping[str, Any], summary: pl.DataFrame, comparisons: pl.DataFrame, figure_paths: Mapping[str, Path]
) -> str:
    """report.md of the scan."""
    table = points_table(summary)
    points = summary.select("detector", "background_scale", "seed", "report").unique(maintain_order=True)
    lines = [
        "# Regime scan",
        "",
        f"Preset `{context.get('preset')}`, {context.get('seeds')} seed(s) per point (seed k: dataset seed and "
        f"training seed k), detectors {', '.join(f'`{d}`' for d in context.get('detectors', []))}, background scales "
        f"{', '.join(f'{s:g}' for s in context.get('background_scales', []))} (× the extra tracks, noise strips and "
        f"noise clusters per layer of the preset's background). Written {context.get('created')}; code "
        f"{context.get('code_version')}.",
        "",
        'Every point is an ordinary report under `reports/` (`pl.scan_parquet("reports/*/summary.parquet")` reads '
        "them as one table, with the `detector` and `background_scale` columns):",
        "",
        *md_table(
            ["point", "seed", "report"],
            [
                [_point_label(d, s), str(seed), f"[{Path(r).name}](../reports/{Path(r).name}/report.md)"]
                for d, s, seed, r in points.rows()
            ],
        ),
        "",
        "## Who wins, point by point (paired on the same events)",
        "",
        f"Each pair is compared on the events both rows have: σ68 with the events resampled together "
        f"({st.N_BOOTSTRAP} bootstrap replicas), the failed-fit rate as the mean per-event difference. A row wins "
        f"from {SIGNIFICANCE_THRESHOLD:g}σ of the difference on; σ > 0 favours the first row.",
        "",
    ]
    for (detector, scale), group in comparisons.group_by("detector", "background_scale", maintain_order=True):
        lines.append(f"**{_point_label(str(detector), float(scale))}**")
        lines.append("")
        for row in group.sort("seed", nulls_last=True, maintain_order=True).iter_rows(named=True):
            seed = "seeds combined" if row["seed"] is None else f"seed {row['seed']}"
            lines.append(f"- {seed}: {comparison_sentence(row)}")
        lines.append("")
    lines += ["## The metrics against the background scale", ""]
    seeds_note = "mean over the seeds ± its standard error" if int(context.get("seeds", 1)) > 1 else "± its error"
    for metric, (label, lower_is_better, _log) in SCAN_METRICS.items():
        direction = "lower is better" if lower_is_better else "higher is better"
        plain = label.replace("$\\sigma_{68}$", "σ68").replace("$q/p_T$", "q/pT").replace("$\\geq$", "≥")
        lines += [f"### {plain} ({direction}; {seeds_note})", "", *_metric_table(table, metric), ""]
        if metric in figure_paths:
            lines += [f"![{plain}](figures/{Path(figure_paths[metric]).name})", ""]
    lines += [
        "## Definitions",
        "",
        "- σ68 and its bootstrap error, σ68 / limit, hit efficiency and purity (final weights ≥ 0.5): as in each "
        "point's report (docs/contracts.md, Metric definitions). Failed-fit rate: the share of a row's test events "
        "whose fit failed, binomial error.",
        f"- The figures draw {', '.join(SCAN_FIGURE_ROWS)}; `summary.parquet` holds every row of every report.",
        "",
    ]
    return "\n".join(lines)


def write_scan_report(out: Path, points: Sequence[Mapping[str, Any]], context: Mapping[str, Any]) -> dict[str, Any]:
    """Gather the points' reports into the scan report in ``out`` (OUT/scan): summary.parquet, comparisons.parquet,
    figures/ and report.md, each written atomically. ``points``: {detector, background_scale, seed, report,
    dataset} per point and seed (flows.scan). ``context``: preset, seeds, detectors, background_scales,
    code_version. Returns {"report", "summary", "comparisons"}: the paths written."""
    from pipeline.dataset import open_dataset

    if not points:
        raise MuontrackError("a scan without points has no report")
    summaries, comparisons = [], []
    for point in points:
        residuals = point_residuals(Path(point["report"]), open_dataset(Path(point["dataset"]), verify=False).events())
        summaries.append(point_summary(point, residuals))
        comparisons.append(point_comparisons(point, residuals))
    summary = pl.concat(summaries, how="vertical")
    per_seed = pl.concat(comparisons, how="vertical")
    all_comparisons = pl.concat([per_seed, seeds_combined(per_seed)], how="vertical")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = points_table(summary).filter(pl.col("model").is_in(SCAN_FIGURE_ROWS))
    figure_paths = {
        metric: fig.plot_scan_metric(table, metric, label, out / "figures" / f"scan_{metric}.png", log_y=log_y)
        for metric, (label, _lower, log_y) in SCAN_METRICS.items()
    }
    write_parquet_atomic(summary, out / "summary.parquet")
    write_parquet_atomic(all_comparisons, out / "comparisons.parquet")
    context = {"created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), **context}
    write_text_atomic(out / "report.md", render_scan_markdown(context, summary, all_comparisons, figure_paths))
    return {
        "report": str(out / "report.md"),
        "summary": str(out / "summary.parquet"),
        "comparisons": str(out / "comparisons.parquet"),
    }


def format_scan_table(comparisons: pl.DataFrame) -> str:
    """The console table of a scan: per point and seed, for each pair on σ68, the winner and the paired σ."""
    pairs = [f"{c} vs {r}" for c, r in SCAN_PAIRS]
    header = f"{'detector':<10} {'scale':>6} {'seed':>5}  " + "  ".join(f"{p:<24}" for p in pairs)
    lines = [header, "-" * len(header)]
    sigma = comparisons.filter(pl.col("metric") == "sigma68")
    for (detector, scale, seed), group in sigma.group_by("detector", "background_scale", "seed", maintain_order=True):
        cells = []
        for candidate, reference in SCAN_PAIRS:
            found = group.filter((pl.col("candidate") == candidate) & (pl.col("reference") == reference))
            if not found.height:
                cells.append(f"{'-':<24}")
                continue
            row = found.row(0, named=True)
            cell = f"{row['winner'] or 'no winner'} ({row['n_sigma']:+.1f}σ)"
            cells.append(f"{cell:<24}")
        seed_text = "all" if seed is None else str(seed)
        lines.append(f"{detector!s:<10} {scale:>6g} {seed_text:>5}  " + "  ".join(cells))
    lines.append(
        f"sigma68 paired on the same events; σ > 0 favours the first row; a winner from {SIGNIFICANCE_THRESHOLD:g}σ."
    )
    return "\n".join(lines)
