"""Rendering: the text of report.md (Markdown, :func:`render_markdown`) and the console summary table
(:func:`format_summary_table`), from the assembled results (:mod:`analysis.results`) and the comparisons
(:mod:`analysis.comparisons`).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from analysis import display
from analysis import metrics as m
from analysis.comparisons import SIGNIFICANCE_THRESHOLD, comparison_blocks
from analysis.figures import format_value_error
from analysis.report_folder import FIGURES_DIR, training_figure_key
from analysis.results import ReportResults, model_row
from analysis.statistics import CORE_WINDOW_N_SIGMA, N_BOOTSTRAP
from pipeline.registry import LIMIT_ROW


def format_summary_table(summary: dict[str, dict[str, Any]]) -> str:
    """A compact fixed-width text table of a summary (as returned by :func:`analysis.report.write_report`)."""

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
        f"{'core':>7} {'sigma68':>9} {'±':>8} {'÷limit':>6} {'events':>7} {'q-mis':>5} {'tails':>5}"
    )
    lines = [header, "-" * len(header)]
    for model, row in summary.items():
        lines.append(
            f"{model:<{width}} {cell(row.get('auc'), '.4f'):>7} {cell(row.get('auc_weight'), '.4f'):>7} "
            f"{cell(row.get('hit_efficiency'), '.4f'):>7} {cell(row.get('hit_purity'), '.4f'):>7} "
            f"{cell(row.get('rejection_at_90'), '.4g'):>9} "
            f"{cell(row.get('rejection_at_95'), '.4g'):>9} {cell(row.get('core_fraction'), '.4f'):>7} "
            f"{cell(row.get('sigma68'), '.4g'):>9} {cell(row.get('sigma68_err'), '.2g'):>8} "
            f"{ratio(row.get('sigma68_over_limit')):>6} {cell(row.get('n_events'), 'd'):>7} "
            f"{cell(row.get('n_charge_misid'), 'd'):>5} {cell(row.get('n_tail'), 'd'):>5}"
        )
    lines.append(
        "AUC = raw classifier score; AUC(w), eff(w), pur(w) = final hit weights "
        f"(selected at w >= {m.HIT_SELECTION_THRESHOLD:g}); ÷limit = sigma68 / {LIMIT_ROW}'s."
    )
    lines.append(
        "q-mis, tails = how many of the events (the good fits) have the wrong charge, "
        f"|r - median| > {m.TAIL_N_SIGMA68:g} sigma68."
    )
    return "\n".join(lines)


def md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
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


#: what report.md says about the three code versions it shows or implies (docs/contracts.md, "Code versions")
CODE_VERSIONS_NOTE = (
    "Three code versions, each a hash of other sources: **code_version** above is all of muontrack's code, the code "
    "of this evaluation (`muontrack --version`); a run's **code_version** is its training code (`model/` and the "
    "pipeline modules training takes numbers from), which a changed training code must not resume; the dataset's is "
    "its simulation code (`simulation/`, in its manifest). `muontrack run` puts the last two in the folder names "
    "(`-c<hash>`)."
)


def _render_context(context: dict[str, Any]) -> list[str]:
    """Free-form context: scalars as a list, lists of records as tables, nested mappings as JSON blocks."""
    if not context:
        return ["(no run context was given)"]
    scalars, tables, blocks = [], [], []
    for key, value in context.items():
        if isinstance(value, list | tuple) and value and all(isinstance(item, dict) for item in value):
            headers = list(dict.fromkeys(k for item in value for k in item))
            tables += [f"**{key}**", "", *md_table(headers, [[item.get(h) for h in headers] for item in value]), ""]
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
        CODE_VERSIONS_NOTE,
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
        cls = model_row(results.classification, model) if model not in m.TRUTH_MODELS else {}
        core = model_row(results.core, model)
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
    lines += md_table(headers, rows)
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
        lines += md_table(headers, cls_rows)
    else:
        lines.append("No classifying model in the predictions (only truth references).")
    lines += ["", _figure_link(figure_paths, "rejection", "Background rejection vs signal efficiency")]
    lines += [
        "",
        "Background rejection vs signal efficiency of the raw classifier score (above) and of the final hit "
        "weights, the weight each hit has in the final clusters (below), each curve's AUC in the legend. Rows with "
        "identical curves are drawn once (`baseline` and `baseline_paper` share one classifier, so one score). A "
        "hard 0/1 selection (classical) has a single working point and is drawn as one marker; one with no "
        "background hit selected (infinite rejection) cannot be drawn on the log axis. The score histograms share "
        "one y scale.",
    ]
    lines += ["", _figure_link(figure_paths, "scores", "Hit score distributions")]
    lines += _hit_weight_rows(results)

    lines += ["", "## Cluster residuals", ""]
    if results.core_fit is None:
        lines.append(f"The Gaussian fit of the truth residuals failed ({results.core_fit_problem}); no core fraction.")
    else:
        fit = results.core_fit
        half_width = CORE_WINDOW_N_SIGMA * fit.sigma
        lines += [
            f"Gaussian fit to the `truth` residuals: μ = {format_value_error(fit.mu, fit.mu_err)} mm, "
            f"σ = {format_value_error(fit.sigma, fit.sigma_err)} mm ({fit.method} fit, {fit.n_fit} clusters in "
            "the final fit window). "
            f"Core window: [{fit.mu - half_width:.4g}, {fit.mu + half_width:.4g}] mm.",
            "",
        ]
        counts = ("n_clusters", "n_missing", "n_core")
        core_rows = _counts_and_value(results.core, results.models, counts, "core_fraction")
        lines += md_table(["model", "clusters", "no cluster built", "in core", "core fraction"], core_rows)
        lines += ["", _figure_link(figure_paths, "clusters", "Cluster residuals with the core window")]
        lines += [
            "",
            "Above: every row on the scale of the core window (shaded), with the `truth` row's median ± σ68 as "
            "dashed lines; the fitted Gaussian defines the window but is not drawn, as the `truth` residuals "
            "(unweighted strips) are flat-topped. Below: the rows whose σ68 is within 3 times the narrowest, in "
            "bins of a fifth of the narrowest σ68.",
        ]

    lines += ["", "## q/pT resolution", ""]
    res_rows = _counts_and_value(results.resolution, results.models, ("n_tracks", "n_failed", "n"), "sigma68")
    lines += md_table(["model", "tracks", "failed fits (excluded)", "in σ68", "σ68"], res_rows)
    lines += ["", _figure_link(figure_paths, "q_over_pt", "Relative q/pT residuals")]
    lines += [
        "",
        "The axis spans ± 6 times the median of the rows' σ68 (log y); the share of each row's fits beyond it is in "
        "the legend.",
    ]

    lines += ["", "### σ68 in bins of true pT", ""]
    lines += _resolution_pt_rows(results)
    lines += ["", _figure_link(figure_paths, "sigma68_pt", "σ68 vs true pT"), "", "Also in `resolution.csv`."]

    lines += ["", "## Tails, bias and charge", "", *_tails_rows(results)]
    lines += _merged_rows(results)

    lines += ["", "## Performance plots", ""]
    lines += [
        "Per bin a binomial fraction with its Clopper–Pearson 68.27 % interval (`analysis/performance.py`): hit "
        "efficiency (selected signal / signal) and purity (selected signal / selected) of the final weights "
        f"(selected: w ≥ {m.HIT_SELECTION_THRESHOLD:g}) against the event's true pT and against the layer; the "
        "failed-fit rate (of all tracks) and the charge-misidentification rate (of the successful fits) against "
        "true pT.",
        "",
        _figure_link(figure_paths, "hit_performance_pt", "Hit efficiency and purity vs true pT"),
        "",
        _figure_link(figure_paths, "hit_performance_layer", "Hit efficiency and purity per layer"),
        "",
        _figure_link(figure_paths, "track_performance_pt", "Failed-fit and charge-misidentification rates vs true pT"),
    ]

    lines += _training_rows(context, figure_paths)
    lines += ["", "## Event displays", "", *_event_display_rows(results, figure_paths)]

    lines += ["", "## Definitions", "", *DEFINITIONS, ""]
    return "\n".join(lines)


def _event_display_rows(results: ReportResults, figure_paths: dict[str, Path]) -> list[str]:
    """The "Event displays" section: each displayed event, why it is shown, and its figure."""
    if results.event_displays is None:
        return [f"No event displays: {results.event_displays_problem}."]
    lines = [
        f"The events of the {display.N_WORST} largest |relative q/pT residual| of `{display.WORST_OF}`, then those "
        f"where a row's successful fit has the wrong charge (at most {display.MAX_DISPLAYS} displays). Left: the "
        "event's strips (x against the layer's y, the charge as colour), the muon's true crossings (black circles) and "
        "each row's fitted track (its `x_fit` in predictions/tracks.parquet); right: the muon's road, x relative to "
        "the chord through its first and last true crossing, with each row's chosen clusters (layer weight ≥ "
        f"{display.CHOSEN_CLUSTER_WEIGHT:g}) as markers. Draw any other test event with "
        "`muontrack display --report REPORT --event N`.",
    ]
    if not results.event_displays:
        none = f"No event to show: `{display.WORST_OF}` has no successful fit and no fit has the wrong charge."
        return [*lines, "", none]
    for shown in results.event_displays:
        title = f"Event {shown.event_id}: {shown.title}"
        lines += ["", f"- {title}", "", _figure_link(figure_paths, display.figure_key(shown.event_id), title)]
    return lines


def _training_rows(context: dict[str, Any], figure_paths: dict[str, Path]) -> list[str]:
    """The Training section: per evaluated run the checkpoint its predictions were made with (best validation σ68
    or last epoch, its epoch and val σ68) and its training curves; nothing without runs in the context."""
    runs = [run for run in context.get("runs") or [] if isinstance(run, dict) and run.get("model")]
    if not runs:
        return []

    def sigma(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"

    lines = [
        "",
        "## Training",
        "",
        "Each network is evaluated with one of its run's checkpoints (`muontrack evaluate --checkpoint`): `best`, the "
        "epoch of the lowest validation σ68(q/pT) (the default), or `last`, the last epoch's.",
        "",
    ]
    rows = [
        [
            run["model"],
            run.get("checkpoint") or "n/a",
            run.get("checkpoint_epoch") if run.get("checkpoint_epoch") is not None else "n/a",
            sigma(run.get("checkpoint_val_sigma68")),
            run.get("best_epoch") if run.get("best_epoch") is not None else "n/a",
            run.get("last_epoch") if run.get("last_epoch") is not None else "n/a",
        ]
        for run in runs
    ]
    lines += md_table(
        ["run of", "checkpoint evaluated", "its epoch", "its val σ68(q/pT)", "best epoch", "last epoch"], rows
    )
    lines += [
        "",
        "Training curves per run (`RUN/metrics.parquet`): the loss terms (epoch means over the train split, solid, "
        "and the val split, dashed), the validation σ68(q/pT), the learning rate of each epoch's last step and the "
        "epoch's mean gradient norm before clipping; vertical lines mark the evaluated, the best and the last epoch.",
    ]
    for run in runs:
        title = f"Training curves of {run['model']}"
        lines += ["", _figure_link(figure_paths, training_figure_key(run["model"]), title)]
    return lines


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
        *md_table(headers, rows),
    ]


def _value_error_or_none(row: dict[str, Any], key: str) -> str | None:
    """'value ± error' of ``key`` and ``key_err`` in a table row; None (rendered "–") without a value."""
    return format_value_error(row[key], row.get(f"{key}_err")) if row.get(key) is not None else None


def _counts_and_value(table, models, counts: tuple[str, ...], value: str) -> list[list]:
    """Table rows in model order: the model, its ``counts`` columns, then ``value`` ± ``value_err``."""
    return [
        [row["model"], *(row[column] for column in counts), format_value_error(row[value], row[f"{value}_err"])]
        for row in _in_model_order(table, models)
    ]


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
    return md_table(["true pT [GeV]", *models], rows)


def _interval_text(value: float | None, lower: float | None, upper: float | None) -> str | None:
    """A fraction and its 68 % interval in percent, '0.339 % (0.23–0.5 %)'; None without a value."""
    if value is None:
        return None
    return f"{100 * value:.3g} % ({100 * lower:.2g}–{100 * upper:.2g} %)"


def _tails_rows(results: ReportResults) -> list[str]:
    """The "Tails, bias and charge" section: per model, then per model and true-pT bin (the limit has no tracks)."""
    rows = [
        [
            row["model"],
            row["n"],
            _value_error_or_none(row, "bias"),
            row["n_charge_misid"],
            _interval_text(row["charge_misid_rate"], row["charge_misid_rate_lo"], row["charge_misid_rate_hi"]),
            row["n_tail"],
            _interval_text(row["tail_fraction"], row["tail_fraction_lo"], row["tail_fraction_hi"]),
        ]
        for row in _in_model_order(results.resolution, results.models)
        if row["model"] != LIMIT_ROW
    ]
    n_sigma = f"{m.TAIL_N_SIGMA68:g} σ68"
    headers = [
        "model",
        "fits in σ68",
        "bias (median r)",
        "wrong charge",
        "charge misID rate (68 % interval)",
        f"tails > {n_sigma}",
        "tail fraction (68 % interval)",
    ]
    table = results.resolution_pt.filter(pl.col("model") != LIMIT_ROW)
    models = [model for model in results.models if model in set(table["model"].to_list())]
    bins = table.select("pt_lo", "pt_hi").unique().sort("pt_lo").rows()
    bin_rows = []
    for pt_lo, pt_hi in bins:
        closing = "]" if pt_hi == bins[-1][1] else ")"
        cells = {row["model"]: row for row in table.filter(pl.col("pt_lo") == pt_lo).iter_rows(named=True)}
        counts = [(cells[model]["n_charge_misid"], cells[model]["n_tail"], cells[model]["n"]) for model in models]
        bin_rows.append([f"[{pt_lo:g}, {pt_hi:g}{closing}"] + [f"{k} / {t} of {n}" for k, t, n in counts])
    return [
        "Over each row's successful fits (those in σ68): the bias is the median of the relative q/pT residual r "
        f"(bootstrap error), a fit has the wrong charge when its `q_pred` differs from the muon's, and it is in the "
        f"tail when |r − median| > {n_sigma} of its row. Fractions with their Clopper–Pearson 68.27 % interval. "
        "No pulls: the predictions carry no q/pT error.",
        "",
        *md_table(headers, rows),
        "",
        f"Per bin of true pT (wrong charge / tails beyond {n_sigma} of the bin's own, of the fits in the bin; "
        "rates and bias in `resolution.csv`):",
        "",
        *md_table(["true pT [GeV]", *models], bin_rows),
    ]


def _merged_rows(results: ReportResults) -> list[str]:
    """The "Merged clusters and charge shares" section (empty when the dataset has no charge_muon column)."""
    if results.merged_clusters is None or results.shares is None:
        return []
    low, high = m.SHARE_CLASS_EDGES
    cluster_rows = [
        [
            row["model"],
            f"{row['n_merged_clusters']} of {row['n_merged_layers']}",
            None if row["cluster_sigma68_merged"] is None else f"{1000 * row['cluster_sigma68_merged']:.1f}",
            row["n_clean_clusters"],
            None if row["cluster_sigma68_clean"] is None else f"{1000 * row['cluster_sigma68_clean']:.1f}",
        ]
        for row in _in_model_order(results.merged_clusters, results.models)
    ]
    share_cells = {(row["model"], row["share_class"]): row for row in results.shares.iter_rows(named=True)}
    share_models = [model for model in results.models if any((model, c) in share_cells for c in m.SHARE_CLASSES)]
    share_rows = []
    for model in share_models:
        row: list[Any] = [model]
        for share_class in m.SHARE_CLASSES:
            cell = share_cells.get((model, share_class))
            row += [f"{cell['bias']:+.3f} / {cell['sigma68']:.3f}" if cell else None]
        share_rows.append(row)
    counts = {c: next((r["n_hits"] for (_, cc), r in share_cells.items() if cc == c), 0) for c in m.SHARE_CLASSES}
    return [
        "",
        "## Merged clusters and charge shares",
        "",
        "A layer's cluster is *merged* when a strip of the muon's shares its charge with another particle or the "
        f"noise (the muon's share s = charge_muon / charge of that strip between {low:g} and {high:g}); the others "
        "are clean. σ68 of the cluster residual x_reco − x_true [µm] on each, over the clusters the row's track "
        f"uses (cluster weight ≥ {m.CLUSTER_USED_WEIGHT:g}; a row that drops a merged layer loses a point, one that "
        "keeps it takes its position):",
        "",
        *md_table(
            ["model", "merged clusters used", "σ68 merged [µm]", "clean clusters used", "σ68 clean [µm]"],
            cluster_rows,
        ),
        "",
        "How well each row's raw score estimates the muon's share s of each strip's charge: median / σ68 of "
        "score − s, by the strip's truth share (the share models predict s; a label classifier's score is the "
        "probability that the strip is the muon's, classical's is 1/0):",
        "",
        *md_table(
            ["model", *(f"{c} ({counts[c]} strips)" for c in m.SHARE_CLASSES)],
            share_rows,
        ),
    ]


def _figure_link(figure_paths: dict[str, Path], key: str, title: str) -> str:
    path = figure_paths.get(key)
    if path is None:
        return f"({title}: not drawn)"
    return f"![{title}]({FIGURES_DIR}/{path.name}) ([PDF]({FIGURES_DIR}/{path.with_suffix('.pdf').name}))"


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
    f"- **Core window**: μ ± {CORE_WINDOW_N_SIGMA:g}σ of a Gaussian fitted to the `truth` residuals. Fit "
    "(`analysis.statistics.fit_gaussian_core`): start from μ = median, σ = min(σ68, 2 × the 0.383 quantile of "
    "|r − median|); on a fixed grid of σ/10 wide bins, least-squares fit A·exp(−(x−μ)²/2σ²) (Poisson errors, "
    f"scipy.optimize.curve_fit) to the bins within μ ± {CORE_WINDOW_N_SIGMA:g}σ, move the window to the new "
    "(μ, σ) and repeat until it selects the same bins again; if that runs away (flat-topped distribution) a "
    "single fit within median ± 2σ68 is used instead (the method used is stated above). "
    "**Core fraction** = clusters in the window / clusters, binomial error.",
    "- **q/pT residual**: ((q/pT)_reco − (q/pT)_true) / (q/pT)_true with (q/pT)_true = q/pT of the generated "
    "muon. Tracks with `fit_status` ≠ 0 or a non-finite q/pT are failures: excluded from σ68 and counted.",
    f"- **σ68**: the 0.68 quantile of |r − median(r)| (linear interpolation between order statistics), the "
    "half-width of the median-centred interval holding 68 % of the events; 0.9945σ for a Gaussian. Error: "
    f"standard deviation of σ68 over {N_BOOTSTRAP} bootstrap resamples (seed 0).",
    "- **pT bins**: true pT in [20, 25), [25, 30), ..., [45, 50] GeV (last bin closed); successful fits only.",
    "- **Bias**: the median of r over the successful fits; error: standard deviation of the median over the "
    "bootstrap resamples of σ68.",
    "- **Charge misidentification rate**: the share of the successful fits whose reconstructed charge `q_pred` "
    "differs from the muon's q. **Tail fraction**: the share of the successful fits with |r − median(r)| > "
    f"{m.TAIL_N_SIGMA68:g} σ68, median and σ68 those of the row (or of the pT bin). Both with the central "
    "Clopper–Pearson interval of 68.27 % (±1σ) coverage, exact for a binomial count, also for 0 counts.",
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


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("muontrack")
    except Exception:  # not installed: running from a checkout
        return "(version unknown)"
