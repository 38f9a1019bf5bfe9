"""``muontrack inspect``: a human-readable Polars summary of a dataset.

Each table is one lazy query over the dataset's shards; all of them are collected together with
:func:`polars.collect_all`, so the files are scanned once per table and never loaded whole into memory.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import polars as pl
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.config import detector_name
from pipeline.dataset import Dataset, open_dataset

# ---- expressions -----------------------------------------------------------------------------------------


def new_cluster() -> pl.Expr:
    """True on the first strip of each run of adjacent strips, on frames sorted by (event_id, layer, strip)."""
    return (
        (pl.col("strip") != pl.col("strip").shift(1) + 1)
        | (pl.col("layer") != pl.col("layer").shift(1))
        | (pl.col("event_id") != pl.col("event_id").shift(1))
    ).fill_null(True)


def new_event_layer() -> pl.Expr:
    """True on the first row of each (event_id, layer), on frames sorted by (event_id, layer)."""
    return (
        (pl.col("layer") != pl.col("layer").shift(1)) | (pl.col("event_id") != pl.col("event_id").shift(1))
    ).fill_null(True)


def count_where(condition: pl.Expr) -> pl.Expr:
    return condition.cast(pl.Int64).sum()


# ---- queries (one row each) ------------------------------------------------------------------------------


def events_summary(dataset: Dataset) -> pl.LazyFrame:
    """Event counts, hits per event, pT and charge of the muons."""
    return dataset.events().select(
        pl.len().alias("events"),
        pl.col("n_hits").mean().alias("hits_mean"),
        pl.col("n_hits").min().alias("hits_min"),
        pl.col("n_hits").max().alias("hits_max"),
        pl.col("pt").min().alias("pt_min"),
        pl.col("pt").max().alias("pt_max"),
        pl.col("pt").mean().alias("pt_mean"),
        count_where(pl.col("q") > 0).alias("q_plus"),
        count_where(pl.col("q") < 0).alias("q_minus"),
        pl.col("x_true").list.eval(pl.element().is_nan().cast(pl.Int64).sum()).list.first().sum().alias("x_outside"),
    )


def hits_summary(dataset: Dataset) -> pl.LazyFrame:
    """Hit counts by origin (muon, noise, extra tracks) and the signal fraction."""
    return dataset.hits().select(
        pl.len().alias("hits"),
        count_where(pl.col("is_signal")).alias("signal"),
        count_where(~pl.col("is_signal")).alias("background"),
        count_where(pl.col("particle_id") == 0).alias("muon"),
        count_where(pl.col("particle_id") == -1).alias("noise"),
        count_where(pl.col("particle_id") > 0).alias("extra_track"),
        pl.col("charge").mean().alias("charge_mean"),
    )


def signal_cluster_summary(dataset: Dataset) -> pl.LazyFrame:
    """Clusters of the muon: runs of adjacent signal strips in one layer of one event."""
    return (
        dataset.hits()
        .filter(pl.col("is_signal"))
        .select("event_id", "layer", "strip")
        .sort("event_id", "layer", "strip")
        .select(
            pl.len().alias("signal_strips"),
            count_where(new_cluster()).alias("clusters"),
            count_where(new_event_layer()).alias("layers_with_signal"),
        )
    )


# ---- formatting ------------------------------------------------------------------------------------------


def _table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_header=False, min_width=64)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in rows:
        # Text, not str: names like "pT [GeV]" are not rich markup
        table.add_row(Text(name), Text(value if isinstance(value, str) else _format(value)))
    return table


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if not denominator or numerator is None else numerator / denominator


def _summaries(
    path: str | Path, verify: bool
) -> tuple[Dataset, dict[str, Any], dict[str, Any], dict[str, Any], int | None]:
    """The dataset, its events, hits and muon-cluster summary rows (one scan per table), and the number of files
    ``verify`` read (None without it)."""
    dataset = open_dataset(path, verify=not verify)
    verified = dataset.verify(force=True) if verify else None
    events, hits, clusters = (
        frame.row(0, named=True)
        for frame in pl.collect_all([events_summary(dataset), hits_summary(dataset), signal_cluster_summary(dataset)])
    )
    return dataset, events, hits, clusters, verified


def dataset_record(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """What `muontrack inspect --json` prints: the manifest's identity, the config and the summary rows."""
    dataset, events, hits, clusters, verified = _summaries(path, verify)
    manifest = dataset.manifest
    return {
        "verified_files": verified,
        "dataset": str(dataset.path.resolve()),
        "events": dataset.n_events,
        "hits": dataset.n_hits,
        "shards": dataset.n_shards,
        "seed": dataset.seed,
        "config_hash": manifest.get("config_hash"),
        "physics_hash": dataset.config.physics_hash(),
        "code_version": manifest.get("code_version"),
        "created": manifest.get("created"),
        "detector": detector_name(dataset.config.detector),
        "config": dataset.config.to_dict(),
        "summary": {"events": events, "hits": hits, "muon_clusters": clusters},
    }


def summarize_dataset(path: str | Path, verify: bool = False) -> str:
    """A plain-text summary of the dataset at ``path`` (refuses missing, incomplete, corrupted or foreign
    folders). ``verify`` re-reads every shard file (checksums, finite hits) instead of trusting the files
    verified before in the same state."""
    dataset, events, hits, clusters, verified = _summaries(path, verify)
    config = dataset.config
    manifest = dataset.manifest
    n_events = events["events"]
    n_layers = config.detector.n_layers

    tables = [
        _table(
            f"dataset {dataset.path}",
            [
                ("events", n_events),
                ("hits", hits["hits"]),
                ("shards", dataset.n_shards),
                ("seed", dataset.seed),
                ("config hash", manifest.get("config_hash", config.config_hash())),
                ("code version", manifest.get("code_version", "-")),
                ("created", manifest.get("created", "-")),
                *(
                    [("verified", f"{verified} files re-read: sizes, SHA-256, the dataset contract")]
                    if verified is not None
                    else []
                ),
            ],
        ),
        _table(
            "events",
            [
                ("hits per event (mean)", events["hits_mean"]),
                ("hits per event (min / max)", f"{events['hits_min']} / {events['hits_max']}"),
                ("muon pT [GeV] (min / max)", f"{events['pt_min']:.2f} / {events['pt_max']:.2f}"),
                ("muon pT [GeV] (mean)", events["pt_mean"]),
                ("charge +1 / -1", f"{events['q_plus']:,} / {events['q_minus']:,}"),
                ("fraction of q = +1", _ratio(events["q_plus"], n_events)),
                ("muon crossings outside the active width", _ratio(events["x_outside"], n_events * n_layers)),
            ],
        ),
        _table(
            "hits",
            [
                ("signal fraction", _ratio(hits["signal"], hits["hits"])),
                ("signal hits per event", _ratio(hits["signal"], n_events)),
                ("background hits per event", _ratio(hits["background"], n_events)),
                ("noise hits (particle_id = -1)", hits["noise"]),
                ("extra-track hits (particle_id > 0)", hits["extra_track"]),
                ("muon hits (particle_id = 0)", hits["muon"]),
                ("mean strip charge", hits["charge_mean"]),
            ],
        ),
        _table(
            "muon clusters (runs of adjacent signal strips in a layer)",
            [
                ("mean cluster size [strips]", _ratio(clusters["signal_strips"], clusters["clusters"])),
                ("clusters per layer with signal", _ratio(clusters["clusters"], clusters["layers_with_signal"])),
                (
                    "layers with signal per event",
                    f"{_format(_ratio(clusters['layers_with_signal'], n_events))} of {n_layers}",
                ),
            ],
        ),
        _config_table(dataset),
    ]
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, color_system=None, force_terminal=False, highlight=False)
    for table in tables:
        console.print(table)
    return buffer.getvalue().rstrip() + "\n"


def _config_table(dataset: Dataset) -> Table:
    detector, muon, background = dataset.config.detector, dataset.config.muon, dataset.config.background
    return _table(
        "config",
        [
            ("detector", detector_name(detector)),
            ("layers (per station)", f"{detector.n_layers} {detector.layers_per_station}"),
            ("strip pitch [mm] / strips per layer", f"{detector.pitch} / {detector.n_strips}"),
            ("field B [T]", detector.b_field),
            ("x/X0 per layer", f"{detector.x_over_x0} (scattering {'on' if detector.multiple_scattering else 'off'})"),
            ("threshold [fraction of mean charge]", detector.threshold),
            (
                "electronic noise [fraction of mean charge] / cross-talk",
                f"{detector.electronic_noise} / {detector.crosstalk}",
            ),
            ("muon pT range [GeV]", f"[{muon.pt_min}, {muon.pt_max}]"),
            (
                "noise strips / clusters per layer",
                f"{background.noise_strips_per_layer} / {background.noise_clusters_per_layer}",
            ),
            ("extra tracks per event", background.extra_tracks_per_event),
            ("events per shard", dataset.config.shard_events),
        ],
    )
