"""Event displays: one event of a report drawn with every row's clusters and fitted track (``muontrack display``,
and the report's "Event displays" section).

An event display has two panels. Left, the whole detector: every fired strip of the event at (x, layer y), its
measured charge as colour; the muon's true crossings; each row's chosen clusters (layer weight ≥
:data:`CHOSEN_CLUSTER_WEIGHT`) and its fitted track, the polyline through its ``x_fit`` (predictions/tracks.parquet)
on every layer. Right, the same zoomed on the muon's road: x is drawn relative to the chord through the muon's first
and last true crossing (a straight track would be a vertical line at 0, the sagitta of a 20 GeV muon is about
5 mm), strips as bars of one pitch, over ROAD_HALF_WIDTH either side of the truth.

What is drawn is computed apart from the drawing (:class:`EventDisplay`, plain arrays), so that tests can check it
against the prediction tables. This module reads Parquet and draws; it never imports the model (JAX).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.style
import numpy as np
import polars as pl
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from analysis import figures as fig
from analysis.report_folder import PREDICTIONS_DIR
from pipeline.atomic import replacing
from pipeline.errors import MuontrackError

#: a row's cluster on a layer counts as chosen (drawn) from this summed hit weight on: the fit's own threshold for a
#: layer that counts (model.fit ``min_layer_weight``); classical's clusters have weight 1 or 0
CHOSEN_CLUSTER_WEIGHT = 0.5
#: the report draws the events of this many largest |q/pT residual| of e2e (its successful fits) ...
N_WORST = 2
#: ... then the events where any row's successful fit has the wrong charge, up to this many displays in all
MAX_DISPLAYS = 6
#: the row whose worst events the report draws
WORST_OF = "e2e"
#: the zoomed panel shows this much [mm] either side of the muon's true crossings (a track that strays further
#: leaves it)
ROAD_HALF_WIDTH = 4.0
#: dataset columns a display needs
DISPLAY_HIT_COLUMNS = ("event_id", "hit_id", "layer", "x", "charge")
DISPLAY_EVENT_COLUMNS = ("event_id", "pt", "q", "x_true")
#: formats ``muontrack display`` may write (from ``--out``'s suffix)
DISPLAY_FORMATS = ("png", "pdf", "svg")


@dataclass(frozen=True)
class TrackRow:
    """One row's (model's) reconstruction of the event."""

    model: str
    x_fit: np.ndarray  # [L] float32, the fitted crossing of each layer [mm]; NaN where none (a failed fit)
    cluster_x: np.ndarray  # [k] x_reco of the chosen clusters [mm]
    cluster_layer: np.ndarray  # [k] their layers
    q_over_pt: float  # q_over_pt_pred [1/GeV]
    fit_status: int


@dataclass(frozen=True)
class EventDisplay:
    """Everything an event display draws (plain arrays)."""

    event_id: int
    pt: float  # true pT [GeV]
    q: int  # true charge
    layer_y: np.ndarray  # [L] the layer planes [mm]
    pitch: float  # strip pitch [mm]
    x_range: tuple[float, float]  # the active width [mm]
    hit_x: np.ndarray  # [H] strip centres [mm]
    hit_layer: np.ndarray  # [H]
    hit_charge: np.ndarray  # [H]
    x_true: np.ndarray  # [L] the muon's crossings [mm], NaN where it left the active width
    rows: tuple[TrackRow, ...]  # in report order
    title: str = ""  # why the event is shown (the report's displays)

    @property
    def hit_y(self) -> np.ndarray:
        return self.layer_y[self.hit_layer]

    def chord(self, y: np.ndarray) -> np.ndarray:
        """x of the straight line through the muon's first and last true crossing at ``y`` (0 without two)."""
        known = np.flatnonzero(np.isfinite(self.x_true))
        if known.size < 2:
            return np.zeros_like(np.asarray(y, np.float64))
        a, b = known[0], known[-1]
        slope = (self.x_true[b] - self.x_true[a]) / (self.layer_y[b] - self.layer_y[a])
        return self.x_true[a] + slope * (np.asarray(y, np.float64) - self.layer_y[a])

    def road_window(self) -> tuple[float, float]:
        """The zoomed panel's x range relative to the chord [mm]: the truth, ROAD_HALF_WIDTH either side."""
        offsets = self.x_true - self.chord(self.layer_y)
        offsets = offsets[np.isfinite(offsets)]
        if offsets.size == 0:
            return -ROAD_HALF_WIDTH, ROAD_HALF_WIDTH
        return float(offsets.min()) - ROAD_HALF_WIDTH, float(offsets.max()) + ROAD_HALF_WIDTH


# ---------------------------------------------------------------------------------------------------------
# What to draw
# ---------------------------------------------------------------------------------------------------------


def missing_dataset_columns(dataset_hits: pl.LazyFrame, dataset_events: pl.LazyFrame) -> list[str]:
    """The dataset columns a display needs that ``dataset_hits`` or ``dataset_events`` lacks."""
    hits = set(dataset_hits.collect_schema().names())
    events = set(dataset_events.collect_schema().names())
    return [f"hits.{c}" for c in DISPLAY_HIT_COLUMNS if c not in hits] + [
        f"events.{c}" for c in DISPLAY_EVENT_COLUMNS if c not in events
    ]


def event_display(
    predictions: dict[str, pl.LazyFrame],
    dataset_hits: pl.LazyFrame,
    dataset_events: pl.LazyFrame,
    event_id: int,
    layer_y: np.ndarray,
    pitch: float,
    x_range: tuple[float, float],
    title: str = "",
) -> EventDisplay:
    """The :class:`EventDisplay` of ``event_id`` from the report's prediction frames (``clusters``, ``tracks``)
    and the dataset's hits and events.

    Raises:
        MuontrackError: the predictions hold no track of the event (not in the report's test split), the dataset
            does not have the event, or a row's ``x_fit`` does not hold one value per layer.
    """
    layer_y = np.asarray(layer_y, np.float64)
    n_layers = layer_y.size
    tracks = predictions["tracks"].filter(pl.col("event_id") == event_id).collect()
    if tracks.height == 0:
        raise MuontrackError(f"event {event_id} is not in the report's test split (no prediction of it)")
    events = dataset_events.filter(pl.col("event_id") == event_id).select(DISPLAY_EVENT_COLUMNS).collect()
    if events.height != 1:
        raise MuontrackError(f"event {event_id} is not in the report's dataset")
    hits = dataset_hits.filter(pl.col("event_id") == event_id).select(DISPLAY_HIT_COLUMNS).sort("hit_id").collect()
    clusters = (
        predictions["clusters"]
        .filter((pl.col("event_id") == event_id) & (pl.col("weight") >= CHOSEN_CLUSTER_WEIGHT))
        .select("model", "layer", "x_reco")
        .sort("model", "layer")
        .collect()
    )
    x_true = np.asarray(events["x_true"][0].to_numpy(), np.float64)
    if x_true.size != n_layers:
        raise MuontrackError(f"event {event_id}: x_true has {x_true.size} values, the detector {n_layers} layers")
    rows = []
    for model in fig.model_order(set(tracks["model"].to_list())):
        track = tracks.filter(pl.col("model") == model).row(0, named=True)
        x_fit = np.asarray(track["x_fit"] if track["x_fit"] is not None else [], np.float32)
        if x_fit.size != n_layers:
            raise MuontrackError(
                f"{PREDICTIONS_DIR}/tracks.parquet: x_fit of {model}, event {event_id} has {x_fit.size} values for "
                f"{n_layers} layers"
            )
        chosen = clusters.filter(pl.col("model") == model)
        q_over_pt = track["q_over_pt_pred"]
        rows.append(
            TrackRow(
                model=model,
                x_fit=x_fit,
                cluster_x=chosen["x_reco"].to_numpy().astype(np.float64),
                cluster_layer=chosen["layer"].to_numpy().astype(np.int64),
                q_over_pt=math.nan if q_over_pt is None else float(q_over_pt),
                fit_status=int(track["fit_status"]),
            )
        )
    return EventDisplay(
        event_id=int(event_id),
        pt=float(events["pt"][0]),
        q=int(events["q"][0]),
        layer_y=layer_y,
        pitch=float(pitch),
        x_range=(float(x_range[0]), float(x_range[1])),
        hit_x=hits["x"].to_numpy().astype(np.float64),
        hit_layer=hits["layer"].to_numpy().astype(np.int64),
        hit_charge=hits["charge"].to_numpy().astype(np.float64),
        x_true=x_true,
        rows=tuple(rows),
        title=title,
    )


def display_choices(track_residuals: pl.DataFrame) -> list[tuple[int, str]]:
    """The events the report displays, as ``(event_id, why)``: the :data:`N_WORST` largest |relative q/pT residual|
    of :data:`WORST_OF`'s successful fits, then the events where any row's successful fit has the wrong charge
    (most rows wrong first, then by event id), :data:`MAX_DISPLAYS` in all. ``track_residuals``:
    analysis.metrics.track_residual_table."""
    choices: dict[int, str] = {}
    worst = (
        track_residuals.filter((pl.col("model") == WORST_OF) & pl.col("fit_ok") & pl.col("residual").is_finite())
        .sort(pl.col("residual").abs(), "event_id", descending=[True, False])
        .head(N_WORST)
    )
    for rank, (event_id, residual) in enumerate(worst.select("event_id", "residual").iter_rows(), start=1):
        choices[int(event_id)] = f"{WORST_OF}'s worst fit no. {rank}: relative q/pT residual {residual:+.3g}"
    misid = (
        track_residuals.filter(pl.col("charge_misid").fill_null(False))
        .group_by("event_id")
        .agg(pl.col("model").sort())
        .with_columns(n=pl.col("model").list.len())
        .sort(["n", "event_id"], descending=[True, False])
    )
    for event_id, models, _ in misid.iter_rows():
        if len(choices) >= MAX_DISPLAYS:
            break
        if event_id not in choices:
            choices[int(event_id)] = f"charge misidentified by {', '.join(models)}"
        else:
            choices[int(event_id)] += f"; charge misidentified by {', '.join(models)}"
    return list(choices.items())


# ---------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------


def figure_key(event_id: int) -> str:
    """The key of an event's display among the report's figure paths (analysis.report.write_figures)."""
    return f"event_display_{event_id}"


def _row_label(display: EventDisplay, row: TrackRow) -> str:
    label = fig.model_style(row.model)["label"]
    if row.fit_status != 0 or not math.isfinite(row.q_over_pt):
        return f"{label}: fit failed (status {row.fit_status})"
    true = display.q / display.pt
    return f"{label}: q/pT {row.q_over_pt:+.4f} (r = {(row.q_over_pt - true) / true:+.3f})"


def draw(display: EventDisplay) -> Figure:
    """The two-panel figure of ``display`` (module docstring), not saved. Each row's track is the line whose data
    are (x_fit, layer y) on the left panel and (x_fit − chord, layer y) on the right."""
    figure = Figure(figsize=(15.0, 8.0))
    full, road = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.25]})
    norm = Normalize(vmin=0.0, vmax=max(float(display.hit_charge.max(initial=0.0)), 1e-6))
    cmap = matplotlib.colormaps["viridis"]
    hit_y = display.hit_y
    # left: the whole event
    strips = full.scatter(
        display.hit_x, hit_y, c=display.hit_charge, cmap=cmap, norm=norm, s=9, marker="s", linewidths=0, zorder=1
    )
    full.plot(display.x_true, display.layer_y, "o", color="black", ms=3.5, zorder=4, label="truth (true crossings)")
    for row in display.rows:
        style = fig.model_style(row.model)
        full.plot(
            row.x_fit,
            display.layer_y,
            color=style["color"],
            linestyle=style["linestyle"],
            linewidth=1.2,
            zorder=2,
            label=_row_label(display, row),
            gid=f"track:{row.model}",
        )
    margin = 0.02 * (display.x_range[1] - display.x_range[0])
    full.set_xlim(display.x_range[0] - margin, display.x_range[1] + margin)
    full.set_xlabel("x [mm]")
    full.set_ylabel("layer y [mm]")
    full.set_title("whole detector", fontsize="medium")
    # right: the muon's road, x relative to the truth's chord
    lo, hi = display.road_window()
    bar_height = 0.6 * float(np.min(np.diff(display.layer_y))) if display.layer_y.size > 1 else 10.0
    near = (display.hit_x - display.chord(hit_y) >= lo - display.pitch) & (
        display.hit_x - display.chord(hit_y) <= hi + display.pitch
    )
    road.bar(
        display.hit_x[near] - display.chord(hit_y[near]),
        bar_height,
        width=display.pitch,
        bottom=hit_y[near] - bar_height / 2,
        color=cmap(norm(display.hit_charge[near])),
        edgecolor="none",
        zorder=1,
    )
    chord = display.chord(display.layer_y)
    road.plot(display.x_true - chord, display.layer_y, "o", color="black", ms=3.5, zorder=4)
    for row in display.rows:
        style = fig.model_style(row.model)
        road.plot(
            row.x_fit - chord,
            display.layer_y,
            color=style["color"],
            linestyle=style["linestyle"],
            linewidth=1.4,
            zorder=2,
            gid=f"track:{row.model}",
        )
        if row.cluster_x.size:
            y = display.layer_y[row.cluster_layer]
            road.plot(
                row.cluster_x - display.chord(y),
                y,
                linestyle="none",
                marker=style["marker"],
                mfc="none",
                mec=style["color"],
                ms=9,
                mew=1.2,
                zorder=3,
                gid=f"clusters:{row.model}",
            )
            full.plot(row.cluster_x, y, linestyle="none", marker=style["marker"], mfc="none", mec=style["color"], ms=5)
    road.set_xlim(lo, hi)
    road.set_xlabel("x − chord of the true crossings [mm]")
    road.set_title("the muon's road (markers: each row's chosen clusters)", fontsize="medium")
    colorbar = figure.colorbar(strips, ax=road, pad=0.02)
    colorbar.set_label("strip charge")
    full.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)
    sign = "+" if display.q > 0 else "−"
    heading = f"event {display.event_id}: true pT {display.pt:.2f} GeV, q = {sign}1, {display.hit_x.size} strips"
    figure.suptitle(heading + (f"\n{display.title}" if display.title else ""), fontsize="medium")
    return figure


def _styled_figure(display: EventDisplay) -> Figure:
    figure = draw(display)
    figure.tight_layout()
    return figure


def save_report_display(display: EventDisplay, path: Path) -> Path:
    """Draw ``display`` as the report figure ``path`` (PNG and PDF, analysis.figures' atomic save)."""
    with matplotlib.style.context(fig.hep_style()):
        return fig._save(_styled_figure(display), path)


def save_display(display: EventDisplay, path: Path) -> Path:
    """Draw ``display`` into the one file ``path`` (its format from the suffix, :data:`DISPLAY_FORMATS`), written
    under a temporary name and renamed over ``path``."""
    path = Path(path)
    extension = path.suffix.lstrip(".").lower()
    if extension not in DISPLAY_FORMATS:
        raise MuontrackError(f"--out {path}: the file name must end in one of .{', .'.join(DISPLAY_FORMATS)}")
    with matplotlib.style.context(fig.hep_style()):
        figure = _styled_figure(display)
        with replacing([path]) as (temporary,):
            figure.savefig(temporary, format=extension, dpi=120)
    return path


# ---------------------------------------------------------------------------------------------------------
# muontrack display
# ---------------------------------------------------------------------------------------------------------


def display_event(report_dir: Path, event_id: int, out: Path) -> Path:
    """Draw event ``event_id`` of the report ``report_dir`` into ``out`` (``muontrack display``); returns ``out``.

    The dataset is the one the report recorded (its summary.parquet, analysis.catalog.recorded_identity), opened
    and checked as every reader does, and refused when its config hash is not the recorded one. Nothing but
    ``out`` is written, never inside the report.

    Raises:
        MuontrackError: no such report, no recorded dataset, the event not in the report's test split, ``out``
            inside the report, a directory or in a missing folder, or an unknown format.
    """
    from analysis.catalog import recorded_identity
    from analysis.results import scan_predictions
    from pipeline.dataset import open_dataset

    report_dir, out = Path(report_dir), Path(out)
    if not report_dir.is_dir():
        raise MuontrackError(f"report folder {report_dir} does not exist")
    if out.resolve().is_relative_to(report_dir.resolve()):
        raise MuontrackError(f"--out {out} is inside the report {report_dir}: write the display elsewhere")
    if out.is_dir():
        raise MuontrackError(f"--out {out} is a directory; give a file name such as display-{event_id}.png")
    if not out.resolve().parent.is_dir():
        raise MuontrackError(f"--out {out}: folder {out.parent} does not exist")
    if out.suffix.lstrip(".").lower() not in DISPLAY_FORMATS:
        raise MuontrackError(f"--out {out}: the file name must end in one of .{', .'.join(DISPLAY_FORMATS)}")
    predictions = scan_predictions(report_dir)
    identity = recorded_identity(report_dir)
    if identity is None or not identity.dataset:
        raise MuontrackError(f"{report_dir} records no dataset (no readable summary.parquet): evaluate it again")
    # the event first: a refusal should not cost the dataset's checks
    if predictions["tracks"].filter(pl.col("event_id") == event_id).select(pl.len()).collect().item() == 0:
        raise MuontrackError(f"event {event_id} is not in the test split of report {report_dir} (no prediction of it)")
    dataset = open_dataset(identity.dataset)
    recorded_hash = identity.dataset_config_hash
    if recorded_hash is not None and dataset.manifest.get("config_hash") != recorded_hash:
        raise MuontrackError(
            f"dataset {identity.dataset} has config hash {dataset.manifest.get('config_hash')}, the report recorded "
            f"{recorded_hash}: it is not the report's dataset"
        )
    detector = dataset.config.detector
    display = event_display(
        predictions,
        dataset.hits(),
        dataset.events(),
        event_id,
        detector.layer_y(),
        detector.pitch,
        (detector.x_min, detector.x_max),
    )
    return save_display(display, out)
