"""The results catalog: REPORT/summary.parquet and REPORT/resolution.parquet, and reading them back.

Every evaluation writes, beside summary.json, one row per model and one for the Cramér-Rao ``limit`` when the
report has it (``summary.parquet``: summary.json's score, core-fraction, σ68 and σ68 / limit figures with the
errors the report quotes; not the final-weight figures ``auc_weight``, ``hit_efficiency`` and ``hit_purity``) and
one row per model (and limit) and true-pT bin (``resolution.parquet``: the rows of resolution.csv), each with the
identity of the evaluation: the report folder, when it was written, the dataset and its regime (the named
detector and the background scale, :func:`regime_identity`), the code, and the training run behind the row (null
for the references ``truth``, ``truth_charge``, ``classical`` and for ``limit``). The
schemas are explicit, so the files of any number of reports concatenate in one scan even where a column is all
null in one of them::

    pl.scan_parquet("muontrack-out/reports/*/summary.parquet")

A report being written lives in a hidden folder one level deeper (``reports/.NAME.staging-…/NAME/``, see
:func:`analysis.report_folder.staged_report`), so that glob only ever sees published reports.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from analysis.metrics import MERGED_COLUMNS, TAIL_COLUMNS, TRUTH_MODELS
from analysis.report_folder import CATALOG_SUMMARY_NAME
from pipeline.atomic import write_atomic
from pipeline.config import BackgroundConfig, SimConfig, detector_name
from pipeline.errors import ConfigError, MuontrackError
from pipeline.registry import SUMMARY_ROWS

#: what a row is about: the evaluation (report, dataset, code) and the training run behind the model
IDENTITY_SCHEMA = pl.Schema(
    {
        "report": pl.String,
        "created": pl.Datetime("us", "UTC"),
        "dataset": pl.String,
        "dataset_config_hash": pl.String,
        "dataset_seed": pl.Int64,
        "dataset_events": pl.Int64,
        "detector": pl.String,
        "background_scale": pl.Float64,
        "code_version": pl.String,
        "model": pl.String,
        "preset": pl.String,
        "train_seed": pl.Int64,
        "epochs": pl.Int64,
        "run": pl.String,
        "run_code_version": pl.String,
    }
)
#: the tails, bias and charge of a row's successful fits (analysis.metrics.TAIL_COLUMNS): the median residual and
#: its bootstrap error, the charge-misidentified and tail counts and fractions with their Clopper–Pearson bounds;
#: null for the limit row
TAIL_SCHEMA = pl.Schema({name: pl.Int64 if name.startswith("n_") else pl.Float64 for name in TAIL_COLUMNS})
#: merged clusters and charge shares (analysis.metrics.MERGED_COLUMNS): the clusters on layers where the muon's
#: charge shares a strip with another source, their σ68 and that of the other clusters [mm], and the median and σ68
#: of the raw score's residual to the truth share on the merged strips; null where not computed
MERGED_SCHEMA = pl.Schema({name: pl.Int64 if name.startswith("n_") else pl.Float64 for name in MERGED_COLUMNS})
#: the per-model metrics with their errors (summary.json's score, core-fraction and σ68 figures, and the errors
#: that summary.json leaves out); AUC and rejections are those of the raw classifier score, null for the truth
#: references; a rejection is null where it is infinite (no background hit passes); ``sigma68_over_limit`` is
#: σ68 / the limit row's σ68 (null without a limit), the limit row's own ``sigma68_err`` is null (exact); then the
#: tails, bias and charge of the successful fits (:data:`TAIL_SCHEMA`)
METRICS_SCHEMA = pl.Schema(
    {
        "auc": pl.Float64,
        "auc_err": pl.Float64,
        "rejection_at_90": pl.Float64,
        "rejection_at_90_err": pl.Float64,
        "rejection_at_95": pl.Float64,
        "rejection_at_95_err": pl.Float64,
        "core_fraction": pl.Float64,
        "core_fraction_err": pl.Float64,
        "sigma68": pl.Float64,
        "sigma68_err": pl.Float64,
        "n_events": pl.Int64,
        "sigma68_over_limit": pl.Float64,
        "sigma68_over_limit_err": pl.Float64,
        **TAIL_SCHEMA,
        **MERGED_SCHEMA,
    }
)
#: where the evaluation ran
ENVIRONMENT_SCHEMA = pl.Schema(
    {
        "jax_version": pl.String,
        "flax_version": pl.String,
        "numba_version": pl.String,
        "python_version": pl.String,
        "device": pl.String,
    }
)
#: REPORT/summary.parquet: one row per model
SUMMARY_SCHEMA = pl.Schema({**IDENTITY_SCHEMA, **METRICS_SCHEMA, **ENVIRONMENT_SCHEMA})
#: the bin columns of resolution.csv (analysis.report.RESOLUTION_COLUMNS without ``model``)
BIN_SCHEMA = pl.Schema(
    {
        "pt_lo": pl.Float64,
        "pt_hi": pl.Float64,
        "n": pl.Int64,
        "sigma68": pl.Float64,
        "sigma68_err": pl.Float64,
        **TAIL_SCHEMA,
    }
)
#: REPORT/resolution.parquet: one row per model and true-pT bin
RESOLUTION_SCHEMA = pl.Schema({**IDENTITY_SCHEMA, **BIN_SCHEMA})

#: the background rates a regime scan multiplies (flows.scan): extra tracks, noise strips and noise clusters
SCALED_BACKGROUND_FIELDS = ("extra_tracks_per_event", "noise_strips_per_layer", "noise_clusters_per_layer")

_CLASSIFICATION_COLUMNS = tuple(name for name in METRICS_SCHEMA if name.startswith(("auc", "rejection")))
_VERSION_PACKAGES = {"jax_version": "jax", "flax_version": "flax", "numba_version": "numba"}


# ---------------------------------------------------------------------------------------------------------
# Building the rows
# ---------------------------------------------------------------------------------------------------------


def _package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_description() -> str | None:
    """The JAX device predictions run on: its platform, and its kind where that says more ("gpu: NVIDIA H200")."""
    try:
        import jax

        device = jax.devices()[0]
    except Exception:  # no usable backend: the catalog still gets written
        return None
    kind = str(getattr(device, "device_kind", "") or "")
    return device.platform if kind.lower() in ("", device.platform) else f"{device.platform}: {kind}"


def environment() -> dict[str, str | None]:
    """The versions and device of this process (the columns of :data:`ENVIRONMENT_SCHEMA`)."""
    versions: dict[str, str | None] = {key: _package_version(package) for key, package in _VERSION_PACKAGES.items()}
    return versions | {"python_version": platform.python_version(), "device": device_description()}


def _int_or_none(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _run_of(model: str, runs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The run entry of the context whose predictions carry the row ``model`` ({} for the references).

    A run lists its rows in ``reported_as`` (the ``baseline`` network gives ``baseline`` and
    ``baseline_paper``); an entry without that list gives the row of its own model name.
    """
    for run in runs:
        if model in (run.get("reported_as") or [run.get("model")]):
            return run
    return {}


def scaled_background(background: BackgroundConfig, scale: float) -> BackgroundConfig:
    """``background`` with its :data:`SCALED_BACKGROUND_FIELDS` multiplied by ``scale`` (> 0), the rest kept."""
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"a background scale must be a finite number > 0, got {scale!r}")
    return replace(background, **{name: getattr(background, name) * scale for name in SCALED_BACKGROUND_FIELDS})


def background_scale(background: BackgroundConfig) -> float | None:
    """The multiple of the default background (``BackgroundConfig()``) that ``background`` is in the
    :data:`SCALED_BACKGROUND_FIELDS` (whatever its other fields): the ``s`` of :func:`scaled_background`
    ``(BackgroundConfig(), s)``; None when the three rates are not one common multiple of the defaults."""
    default = BackgroundConfig()
    ratios = [
        getattr(background, name) / getattr(default, name)
        for name in SCALED_BACKGROUND_FIELDS
        if getattr(default, name) > 0
    ]
    if not ratios or any(not math.isclose(ratio, ratios[0], rel_tol=1e-9) for ratio in ratios):
        return None
    return ratios[0]


def _simulation_config(context: Mapping[str, Any]) -> SimConfig | None:
    """The dataset's simulation config: ``context["simulation"]`` (a SimConfig mapping) when the context has it,
    else the config recorded in the manifest of the dataset folder ``context["dataset"]``; None when neither can
    be read."""
    from pipeline.dataset import MANIFEST_NAME

    data = context.get("simulation")
    if not isinstance(data, Mapping) and context.get("dataset") is not None:
        try:
            data = json.loads((Path(str(context["dataset"])) / MANIFEST_NAME).read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            data = None
    if not isinstance(data, Mapping):
        return None
    try:
        return SimConfig.from_dict(dict(data))
    except ConfigError:
        return None


def regime_identity(context: Mapping[str, Any]) -> dict[str, str | float | None]:
    """The regime of the evaluated dataset, the identity columns a scan adds (flows.scan): ``detector``, the name of
    its detector in pipeline.config.DETECTORS (``custom`` for another), and ``background_scale``
    (:func:`background_scale`); both None when the dataset's config cannot be read (:func:`_simulation_config`)."""
    config = _simulation_config(context)
    if config is None:
        return {"detector": None, "background_scale": None}
    return {"detector": detector_name(config.detector), "background_scale": background_scale(config.background)}


def identity_frame(context: Mapping[str, Any], models: Sequence[str], report: Path, created: datetime) -> pl.DataFrame:
    """One row per model of :data:`IDENTITY_SCHEMA` from the report context (as built by
    ``flows.commands.report_context``: dataset, dataset_config_hash, dataset_seed, dataset_events, code_version and
    runs as a list of {run, model, reported_as, preset, epochs, seed, code_version}); missing keys give nulls.
    ``detector`` and ``background_scale`` come from the dataset's config (:func:`regime_identity`)."""
    runs = [run for run in context.get("runs") or [] if isinstance(run, Mapping)]
    regime = regime_identity(context)
    rows = []
    for model in models:
        run = _run_of(model, runs)
        rows.append(
            {
                "report": str(report),
                "created": created,
                "dataset": _str_or_none(context.get("dataset")),
                "dataset_config_hash": _str_or_none(context.get("dataset_config_hash")),
                "dataset_seed": _int_or_none(context.get("dataset_seed")),
                "dataset_events": _int_or_none(context.get("dataset_events")),
                **regime,
                "code_version": _str_or_none(context.get("code_version")),
                "model": model,
                "preset": _str_or_none(run.get("preset")),
                "train_seed": _int_or_none(run.get("seed")),
                "epochs": _int_or_none(run.get("epochs")),
                "run": _str_or_none(run.get("run")),
                "run_code_version": _str_or_none(run.get("code_version")),
            }
        )
    return pl.DataFrame(rows, schema=IDENTITY_SCHEMA)


def finite_or_null(column: str) -> pl.Expr:
    """``column`` where finite, null where NaN or infinite (summary.json's convention)."""
    return pl.when(pl.col(column).is_finite()).then(pl.col(column)).otherwise(None).alias(column)


def _conform(frame: pl.DataFrame, schema: pl.Schema) -> pl.DataFrame:
    """``frame`` with exactly the columns of ``schema``, in order and of its types (missing ones null)."""
    present = set(frame.columns)
    return frame.select(
        (pl.col(name) if name in present else pl.lit(None)).cast(dtype).alias(name) for name, dtype in schema.items()
    )


def metrics_frame(
    models: Sequence[str],
    classification: pl.DataFrame,
    core: pl.DataFrame,
    resolution: pl.DataFrame,
    merged: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One row per model (in ``models`` order) of ``model`` and :data:`METRICS_SCHEMA`, from the report's tables
    (analysis.metrics classification_metrics, core_fraction_table, resolution_by_model with the limit row and
    the ratio columns of analysis.metrics.with_limit_ratio where it has them, and ``merged``:
    analysis.results.merged_summary_table)."""
    base = pl.DataFrame({"model": list(models)}, schema={"model": pl.String})
    scores = classification.select("model", *_CLASSIFICATION_COLUMNS).filter(~pl.col("model").is_in(TRUTH_MODELS))
    frame = (
        base.join(scores, on="model", how="left", maintain_order="left")
        .join(core.select("model", "core_fraction", "core_fraction_err"), on="model", how="left", maintain_order="left")
        .join(
            resolution.select(
                "model",
                "sigma68",
                "sigma68_err",
                *(
                    name
                    for name in ("sigma68_over_limit", "sigma68_over_limit_err", *TAIL_SCHEMA)
                    if name in resolution.columns
                ),
                n_events="n",
            ),
            on="model",
            how="left",
            maintain_order="left",
        )
        .with_columns(pl.col("n_events").fill_null(0))
    )
    if merged is not None:
        frame = frame.join(merged.select("model", *MERGED_SCHEMA), on="model", how="left", maintain_order="left")
    frame = _conform(frame, pl.Schema({"model": pl.String, **METRICS_SCHEMA}))
    return frame.with_columns(finite_or_null(name) for name, dtype in METRICS_SCHEMA.items() if dtype == pl.Float64)


def summary_frame(
    identity: pl.DataFrame, metrics: pl.DataFrame, env: Mapping[str, str | None] | None = None
) -> pl.DataFrame:
    """The rows of summary.parquet: ``identity`` (:func:`identity_frame`) joined on ``model`` with ``metrics``
    (:func:`metrics_frame`), plus ``env`` (:func:`environment` when None), typed as :data:`SUMMARY_SCHEMA`."""
    env = environment() if env is None else env
    frame = identity.join(metrics, on="model", how="left", maintain_order="left").with_columns(
        pl.lit(env.get(name), dtype=dtype).alias(name) for name, dtype in ENVIRONMENT_SCHEMA.items()
    )
    return _conform(frame, SUMMARY_SCHEMA)


def resolution_frame(identity: pl.DataFrame, resolution_pt: pl.DataFrame) -> pl.DataFrame:
    """The rows of resolution.parquet: each model's row of ``identity`` with its bins of ``resolution_pt``
    (analysis.metrics.resolution_by_pt), in identity's model order then pt_lo, typed as :data:`RESOLUTION_SCHEMA`."""
    rank = identity.select("model").with_row_index("rank")
    frame = (
        identity.join(resolution_pt, on="model", how="inner")
        .join(rank, on="model", how="left")
        .sort("rank", "pt_lo")
        .with_columns(
            finite_or_null(name) for name, dtype in BIN_SCHEMA.items() if dtype == pl.Float64 and name in resolution_pt
        )
    )
    return _conform(frame, RESOLUTION_SCHEMA)


def write_parquet_atomic(frame: pl.DataFrame, path: Path) -> None:
    """Write ``frame`` to ``path`` through a temporary file beside it (never a partial file at ``path``)."""
    write_atomic(path, lambda temporary: frame.write_parquet(temporary, compression="zstd"))


# ---------------------------------------------------------------------------------------------------------
# The identity of a report: what "the same evaluation" means
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationIdentity:
    """The dataset and the set of training runs an evaluation was made of."""

    dataset: str | None
    dataset_config_hash: str | None
    dataset_seed: int | None
    dataset_events: int | None
    runs: frozenset[str]

    def describe(self) -> str:
        """One line: the dataset (with its seed and size) and the run folders' names."""
        details = [f"seed {self.dataset_seed}"] if self.dataset_seed is not None else []
        details += [f"{self.dataset_events} events"] if self.dataset_events is not None else []
        dataset = f"dataset {self.dataset}" + (f" ({', '.join(details)})" if details else "")
        runs = ", ".join(sorted(Path(run).name for run in self.runs)) or "none"
        return f"{dataset}, runs {runs}"


def context_identity(context: Mapping[str, Any]) -> EvaluationIdentity:
    """The identity of the evaluation a report context describes (see :func:`identity_frame`)."""
    runs = [run for run in context.get("runs") or [] if isinstance(run, Mapping)]
    return EvaluationIdentity(
        dataset=_str_or_none(context.get("dataset")),
        dataset_config_hash=_str_or_none(context.get("dataset_config_hash")),
        dataset_seed=_int_or_none(context.get("dataset_seed")),
        dataset_events=_int_or_none(context.get("dataset_events")),
        runs=frozenset(str(run["run"]) for run in runs if run.get("run") is not None),
    )


def recorded_identity(report_dir: Path) -> EvaluationIdentity | None:
    """The identity recorded in ``report_dir/summary.parquet``; None when the folder has no readable catalog
    (no report, or one written before the catalog existed)."""
    path = Path(report_dir) / CATALOG_SUMMARY_NAME
    if not path.is_file():
        return None
    try:
        frame = pl.read_parquet(
            path, columns=["dataset", "dataset_config_hash", "dataset_seed", "dataset_events", "run"]
        )
    except (pl.exceptions.PolarsError, OSError):
        return None
    datasets = frame.select("dataset", "dataset_config_hash", "dataset_seed", "dataset_events").unique()
    if datasets.height != 1:
        return None
    dataset, config_hash, seed, events = datasets.row(0)
    return EvaluationIdentity(
        dataset=dataset,
        dataset_config_hash=config_hash,
        dataset_seed=seed,
        dataset_events=events,
        runs=frozenset(frame["run"].drop_nulls().to_list()),
    )


# ---------------------------------------------------------------------------------------------------------
# Reading the catalog back (muontrack results)
# ---------------------------------------------------------------------------------------------------------


def find_summaries(folders: Iterable[Path]) -> list[Path]:
    """Every ``summary.parquet`` under ``folders`` (recursively; hidden folders such as a report being written
    are skipped), sorted.

    Raises:
        MuontrackError: a folder does not exist, or none holds a summary.parquet.
    """
    folders = [Path(folder) for folder in folders]
    found: set[Path] = set()
    for folder in folders:
        if not folder.is_dir():
            raise MuontrackError(f"{folder}: no such folder")
        for parent, subfolders, files in os.walk(folder):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            if CATALOG_SUMMARY_NAME in files:
                found.add((Path(parent) / CATALOG_SUMMARY_NAME).resolve())
    if not found:
        where = ", ".join(str(folder) for folder in folders)
        raise MuontrackError(
            f"no {CATALOG_SUMMARY_NAME} under {where} (evaluate first: muontrack evaluate or muontrack run)"
        )
    return sorted(found)


def model_rank_expr(column: str = "model") -> pl.Expr:
    """The rank of a row in the report order (pipeline.registry.SUMMARY_ROWS: the limit, then the models; unknown
    models last)."""
    rank = {model: index for index, model in enumerate(SUMMARY_ROWS)}
    return pl.col(column).replace_strict(rank, default=len(rank), return_dtype=pl.Int64)


def scan_summaries(paths: Sequence[Path]) -> pl.LazyFrame:
    """The summary.parquet files as one LazyFrame of :data:`SUMMARY_SCHEMA`, oldest report first, models in report
    order (a column missing from an older file reads as null; extra columns are ignored)."""
    return (
        pl.scan_parquet(
            [str(path) for path in paths],
            schema=SUMMARY_SCHEMA,
            missing_columns="insert",
            extra_columns="ignore",
        )
        .with_columns(_rank=model_rank_expr())
        .sort("created", "report", "_rank")
        .drop("_rank")
    )


def read_catalog(folders: Iterable[Path]) -> pl.DataFrame:
    """Every summary row found under ``folders`` (:func:`find_summaries`, :func:`scan_summaries`).

    Raises:
        MuontrackError: no folder, no summary.parquet, or an unreadable one.
    """
    paths = find_summaries(folders)
    try:
        return scan_summaries(paths).collect()
    except (pl.exceptions.PolarsError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MuontrackError(f"cannot read the catalog of {len(paths)} summary.parquet files: {message}") from None


def compact_table(catalog: pl.DataFrame) -> pl.DataFrame:
    """The columns of the catalog worth reading at a glance, rounded for display."""
    return catalog.select(
        pl.col("report").str.split("/").list.last(),
        pl.col("created").dt.strftime("%Y-%m-%d %H:%M"),
        "model",
        pl.col("run").str.split("/").list.last(),
        "detector",
        "background_scale",
        "dataset_seed",
        "train_seed",
        "epochs",
        pl.col("auc").round(4),
        pl.col("core_fraction").round(4),
        pl.col("sigma68").round_sig_figs(4),
        pl.col("sigma68_err").round_sig_figs(2),
        pl.col("sigma68_over_limit").round(3),
        "n_events",
    )


#: what :func:`format_catalog` does to fit a width, in this order: leave out a column of :func:`compact_table`,
#: shorten the report names (``None``), name ``sigma68_over_limit`` ``σ68/limit`` (``"σ68/limit"``); the report,
#: the model, its sigma68 and sigma68 / limit and its events always stay
NARROWING_ORDER: tuple[str | None, ...] = (
    "created",
    "run",
    "background_scale",
    "dataset_seed",
    "train_seed",
    "epochs",
    None,
    "σ68/limit",
    "core_fraction",
    "detector",
    "auc",
    "sigma68_err",
)
#: the shortest a report's name is cut to: "…" and its end, which carries the dataset key
_MIN_REPORT_CHARS = 16


def _render_table(table: pl.DataFrame) -> str:
    with pl.Config(
        tbl_rows=-1,
        tbl_cols=-1,
        tbl_width_chars=10_000,
        fmt_str_lengths=200,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        tbl_formatting="ASCII_MARKDOWN",
    ):
        return str(table)


def _width(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def _shorten_reports(table: pl.DataFrame, excess: int) -> pl.DataFrame:
    """``table`` with report names longer than their longest minus ``excess`` (at least _MIN_REPORT_CHARS) cut
    to "…" and their end."""
    longest = int(table["report"].str.len_chars().max() or 0)
    keep = max(_MIN_REPORT_CHARS, longest - excess)
    return table.with_columns(
        pl.when(pl.col("report").str.len_chars() > keep)
        .then(pl.lit("…") + pl.col("report").str.slice(-(keep - 1)))
        .otherwise(pl.col("report"))
        .alias("report")
    )


def format_catalog(catalog: pl.DataFrame, width: int | None = None) -> str:
    """The catalog as a readable text table (:func:`compact_table`, every row).

    ``width`` (``muontrack results`` passes the terminal's): columns are left out and the report names shortened
    in the order of :data:`NARROWING_ORDER` until the table fits (or nothing more can go), and a last line, wrapped
    to ``width``, names the columns left out. None: every column, however wide."""
    import textwrap

    table = compact_table(catalog)
    text = _render_table(table)
    if width is None or _width(text) <= width:
        return text
    dropped: list[str] = []
    for step in NARROWING_ORDER:
        if step is None:
            table = _shorten_reports(table, _width(text) - width)
        elif step == "σ68/limit":
            table = table.rename({"sigma68_over_limit": step})
        else:
            table = table.drop(step)
            dropped.append(step)
        text = _render_table(table)
        if _width(text) <= width:
            break
    note = f"(left out to fit {width} columns: {', '.join(dropped)}; --json or a wider terminal shows them)"
    return text + "\n" + textwrap.fill(note, width=max(width, 20))


def catalog_records(catalog: pl.DataFrame) -> list[dict[str, Any]]:
    """The catalog rows as JSON-ready dicts (``created`` as an ISO 8601 string)."""
    return catalog.with_columns(pl.col("created").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ")).to_dicts()
