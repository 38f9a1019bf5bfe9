"""The evaluation's metric tables, in Polars (docs/contracts.md, "Metric definitions"): ROC/AUC of hit scores, cluster
residual core fraction, q/pT resolution σ68 overall and in bins of true pT with the tails, bias and charge of the same
fits (median residual, share beyond 5 σ68, charge-misidentification rate), and the Cramér-Rao limit of that σ68 on
the evaluated events (:func:`resolution_limit`, the ``limit`` row; the bound itself is :mod:`analysis.limit`).

Column logic is written as functions returning ``pl.Expr``; each prediction table is read with one
``scan ... collect``. The statistics applied to the collected columns (σ68 and its bootstrap, the ROC, the Gaussian
core fit) are :mod:`analysis.statistics`.

Conventions:
- Residuals are dimensionless for q/pT (relative) and in mm for clusters.
- Quantiles always use *linear* interpolation (NumPy's default, method 7 of Hyndman & Fan); Polars 2
  defaults to 'nearest', so every Polars quantile here names ``interpolation="linear"``.
- ``truth`` and ``truth_charge`` are reference reconstructions from truth labels: they have no hit
  classification metrics (their "score" is the label itself).
- A prediction hit has two numbers: ``score``, the raw classifier output (sigmoid of the network logit; 1/0
  for classical's hard selection), and ``weight``, its weight in the model's final clusters (equal to the score
  in the paper chain, the refined weight in the robust chain, for assignment that of its 0/1 selection, 1/0 for
  classical). ROC, AUC and rejections are
  those of the score; ``auc_weight``, hit efficiency and purity those of the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from analysis.statistics import (
    CORE_WINDOW_N_SIGMA,
    N_BOOTSTRAP,
    GaussianFit,
    auc,
    auc_from_roc,
    auc_uncertainty,
    background_efficiency_at,
    background_rejection_at,
    bootstrap_median,
    bootstrap_sigma68,
    clopper_pearson,
    fit_gaussian_core,
    rejection_uncertainty,
    roc_curve,
)
from pipeline.batches import truth_share_expr
from pipeline.config import DetectorConfig
from pipeline.registry import LIMIT_ROW, get_model
from pipeline.stats import SIGMA68_COVERAGE

#: models whose hit weights come from truth labels (no classification metrics)
TRUTH_MODELS = get_model("truth").rows
#: a hit counts as selected by a model (hit efficiency and purity) when its final weight is at least this
HIT_SELECTION_THRESHOLD = 0.5
#: signal efficiencies at which background rejection is quoted
SIGNAL_EFFICIENCY_POINTS = (0.90, 0.95)
#: edges of the true-pT bins [GeV]: [20,25), [25,30), ..., [45,50] (the last bin is closed on both sides)
PT_BIN_EDGES = (20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0)
#: a successful fit is in the tail when |r − median(r)| exceeds this many σ68 of its row (tail_fraction)
TAIL_N_SIGMA68 = 5.0
#: edges [mm] of the classes of a hit's distance from the muon's crossing on its layer (hit_weight_table)
HIT_DISTANCE_EDGES = (5.0, 50.0)
#: origins of a hit (hit_origin_expr), in report order
HIT_ORIGINS = ("signal", "extra track", "noise")

#: edges of the truth-share classes of a strip (share s = charge_muon / charge clipped to [0, 1],
#: pipeline.batches.truth_share_expr): s <= 0.1 none of the muon's, 0.1 < s < 0.9 merged, s >= 0.9 the muon's
SHARE_CLASS_EDGES = (0.1, 0.9)
#: the share classes (share_class_expr), in report order
SHARE_CLASSES = ("other", "merged", "muon")
#: a cluster counts as used by its model's track (merged_cluster_table) when its ``weight`` is at least this
CLUSTER_USED_WEIGHT = 0.5
#: the dataset hit columns the share and merged-cluster tables need
SHARE_HIT_COLUMNS = ("event_id", "hit_id", "layer", "charge", "charge_muon")
#: the summary's columns of merged clusters and charge shares (merged_cluster_table, share_residual_table)
MERGED_COLUMNS = (
    "n_merged_clusters",
    "cluster_sigma68_merged",
    "cluster_sigma68_clean",
    "share_bias_merged",
    "share_sigma68_merged",
)

#: the events and hits columns the limit row needs (analysis.limit: the truth of each event, the clean clusters)
LIMIT_EVENT_COLUMNS = ("event_id", "pt", "q", "x0", "theta0", "x_true")
LIMIT_HIT_COLUMNS = ("event_id", "layer", "strip", "x", "charge", "is_signal", "particle_id")


# ---------------------------------------------------------------------------------------------------------
# Polars expressions
# ---------------------------------------------------------------------------------------------------------


def _as_expr(column: str | pl.Expr) -> pl.Expr:
    return pl.col(column) if isinstance(column, str) else column


def sigma68_expr(residual: str | pl.Expr) -> pl.Expr:
    """σ68 of a column: the 0.68 quantile (linear interpolation) of |r − median(r)|. Nulls are ignored.

    Usable in ``select`` and in ``group_by(...).agg``; NaNs must be filtered beforehand (Polars sorts NaN
    above every number, :func:`sigma68` drops them).
    """
    r = _as_expr(residual)
    return (r - r.median()).abs().quantile(SIGMA68_COVERAGE, interpolation="linear")


def tail_expr(residual: str | pl.Expr, n_sigma68: float = TAIL_N_SIGMA68) -> pl.Expr:
    """True where |r − median(r)| > ``n_sigma68`` · σ68(r), median and σ68 over the column (or the group, in
    ``group_by(...).agg``); null where r is null. ``.sum()`` of it counts the tail entries."""
    r = _as_expr(residual)
    return (r - r.median()).abs() > n_sigma68 * sigma68_expr(r)


def charge_misid_expr(q_pred: str = "q_pred", q: str = "q", fit_ok: str = "fit_ok") -> pl.Expr:
    """True where a successful fit's reconstructed charge differs from the true one; null where the fit failed."""
    return pl.when(pl.col(fit_ok)).then(pl.col(q_pred).cast(pl.Int64) != pl.col(q).cast(pl.Int64))


def binomial_interval_exprs(successes: str, trials: str, name: str) -> list[pl.Expr]:
    """The fraction ``name`` = successes / trials and its Clopper–Pearson 68.27 % interval ``name_lo``,
    ``name_hi`` (:func:`analysis.statistics.clopper_pearson`) of two count columns; all null where trials is 0
    or null."""

    def bound(index: int) -> pl.Expr:
        def interval(counts: pl.Series) -> pl.Series:
            k = counts.struct.field(successes).fill_null(0).to_numpy()
            n = counts.struct.field(trials).fill_null(0).to_numpy()
            return pl.Series(clopper_pearson(k, n)[index], dtype=pl.Float64).fill_nan(None)

        return (
            pl.struct(pl.col(successes).cast(pl.Int64), pl.col(trials).cast(pl.Int64))
            .map_batches(interval, return_dtype=pl.Float64)
            .alias(f"{name}_{('lo', 'hi')[index]}")
        )

    rate = pl.when(pl.col(trials) > 0).then(pl.col(successes).cast(pl.Float64) / pl.col(trials)).alias(name)
    return [rate, bound(0), bound(1)]


def q_over_pt_true_expr(q: str = "q", pt: str = "pt") -> pl.Expr:
    """(q/pT)_true = q / pT [1/GeV] as float64."""
    return pl.col(q).cast(pl.Float64) / pl.col(pt).cast(pl.Float64)


def q_over_pt_residual_expr(q_over_pt_reco: str = "q_over_pt_pred", q: str = "q", pt: str = "pt") -> pl.Expr:
    """Relative q/pT residual ((q/pT)_reco − (q/pT)_true) / (q/pT)_true, dimensionless, float64."""
    true = q_over_pt_true_expr(q, pt)
    return (pl.col(q_over_pt_reco).cast(pl.Float64) - true) / true


def fit_ok_expr(fit_status: str = "fit_status", q_over_pt_reco: str = "q_over_pt_pred") -> pl.Expr:
    """True where the track fit succeeded: status 0 and a finite q/pT. Everything else is a failure."""
    return (pl.col(fit_status) == 0) & pl.col(q_over_pt_reco).is_finite().fill_null(False)


def cluster_residual_expr(x_reco: str = "x_reco", x_true: str = "x_true") -> pl.Expr:
    """Cluster residual r = x_reco − x_true [mm], float64."""
    return pl.col(x_reco).cast(pl.Float64) - pl.col(x_true).cast(pl.Float64)


def pt_bin_expr(pt: str = "pt", edges: tuple[float, ...] = PT_BIN_EDGES) -> pl.Expr:
    """Index (UInt32) of the true-pT bin: [e0,e1) -> 0, ..., [e_{n-1}, e_n] -> n-1; null outside [e0, e_n].

    The last bin is closed so that pT = e_n (the top of the generated range) is not lost.
    """
    inner = list(edges[1:-1])
    index = pl.col(pt).bin_intervals(inner, labels=False) if inner else pl.lit(0, dtype=pl.UInt32)
    return pl.when(pl.col(pt).is_between(edges[0], edges[-1], closed="both")).then(index)


def in_core_expr(centre: float, half_width: float, residual: str = "residual") -> pl.Expr:
    """True where |residual − centre| <= half_width; a null/NaN residual (no cluster) is outside the core."""
    return ((pl.col(residual) - centre).abs() <= half_width).fill_null(False)


def binomial_error_expr(fraction: str | pl.Expr, n: str | pl.Expr) -> pl.Expr:
    """sqrt(f (1 − f) / n) of two columns (binomial error of a fraction f of n); null where n = 0."""
    f, count = _as_expr(fraction), _as_expr(n)
    return pl.when(count > 0).then((f * (1 - f) / count).sqrt())


def hit_selected_expr(weight: str = "weight", threshold: float = HIT_SELECTION_THRESHOLD) -> pl.Expr:
    """True where a hit's final weight selects it (weight >= threshold); null for a null or NaN weight.

    NaN is mapped to null explicitly: Polars orders NaN above every number, so ``NaN >= 0.5`` would be True.
    """
    return pl.col(weight).fill_nan(None) >= threshold


def hit_efficiency_expr(weight: str = "weight", is_signal: str = "is_signal") -> pl.Expr:
    """Share of the signal hits that the final weights select (:func:`hit_selected_expr`); null without signal.

    Hits with a null or NaN weight are left out (filter them beforehand to count them).
    """
    return hit_selected_expr(weight).filter(pl.col(is_signal)).mean()


def hit_purity_expr(weight: str = "weight", is_signal: str = "is_signal") -> pl.Expr:
    """Share of the hits selected by the final weights that are signal; null when nothing is selected."""
    return pl.col(is_signal).filter(hit_selected_expr(weight)).cast(pl.Float64).mean()


def hit_origin_expr(is_signal: str = "is_signal", particle_id: str = "particle_id") -> pl.Expr:
    """Where a hit comes from: "signal" (the muon gave most of its charge), "noise" (particle_id -1) or
    "extra track" (a low-momentum track, or a muon strip whose charge an extra track dominates)."""
    return (
        pl.when(pl.col(is_signal))
        .then(pl.lit("signal"))
        .when(pl.col(particle_id) == -1)
        .then(pl.lit("noise"))
        .otherwise(pl.lit("extra track"))
    )


def hit_distance_classes(edges: tuple[float, float] = HIT_DISTANCE_EDGES) -> tuple[str, str, str]:
    """The labels of the distance classes for ``edges`` (a, b), nearest first: "≤ a mm", "a–b mm", "> b mm"."""
    near, far = edges
    return f"≤ {near:g} mm", f"{near:g}–{far:g} mm", f"> {far:g} mm"


def hit_distance_class_expr(distance: str = "distance", edges: tuple[float, float] = HIT_DISTANCE_EDGES) -> pl.Expr:
    """Class of |x − x_true| [mm], one of :func:`hit_distance_classes`."""
    near, far = edges
    close, middle, remote = hit_distance_classes(edges)
    return (
        pl.when(pl.col(distance) <= near)
        .then(pl.lit(close))
        .when(pl.col(distance) <= far)
        .then(pl.lit(middle))
        .otherwise(pl.lit(remote))
    )


# ---------------------------------------------------------------------------------------------------------
# Tables: one scan ... collect per prediction table
# ---------------------------------------------------------------------------------------------------------


def hit_score_table(pred_hits: pl.LazyFrame, dataset_hits: pl.LazyFrame) -> pl.DataFrame:
    """Scores and final weights of the classifying models joined to the truth label.

    Args:
        pred_hits: REPORT/predictions/hits.parquet (event_id, hit_id, model, score, weight).
        dataset_hits: the dataset's hits (event_id, hit_id, is_signal, ...).

    Returns:
        DataFrame (model, event_id, hit_id, score float64, weight float64, is_signal bool) without the truth
        models; hits with no truth row are dropped (inner join).
    """
    truth = dataset_hits.select("event_id", "hit_id", "is_signal")
    return (
        pred_hits.filter(~pl.col("model").is_in(TRUTH_MODELS))
        .select("model", "event_id", "hit_id", pl.col("score").cast(pl.Float64), pl.col("weight").cast(pl.Float64))
        .join(truth, on=["event_id", "hit_id"], how="inner")
        .collect()
    )


def share_class_expr(share: str = "share", edges: tuple[float, float] = SHARE_CLASS_EDGES) -> pl.Expr:
    """The class of a strip by the muon's share of its charge: "other" (s <= edges[0]), "merged" (between) or "muon"
    (s >= edges[1]); :data:`SHARE_CLASSES`."""
    low, high = edges
    return (
        pl.when(pl.col(share) <= low)
        .then(pl.lit(SHARE_CLASSES[0]))
        .when(pl.col(share) < high)
        .then(pl.lit(SHARE_CLASSES[1]))
        .otherwise(pl.lit(SHARE_CLASSES[2]))
    )


def share_residual_table(pred_hits: pl.LazyFrame, dataset_hits: pl.LazyFrame) -> pl.DataFrame:
    """How well each model's raw score estimates the muon's share of a strip's charge, by share class.

    The residual is ``score − s`` with s the truth share (pipeline.batches.truth_share_expr). For the share models
    the score is the predicted share; for the label classifiers it is a probability that the strip is the muon's
    (1/0 for classical), so on merged strips their residual says how far an all-or-nothing weight is from the
    muon's part of the charge.

    Returns:
        DataFrame (model, share_class, n_hits, bias = median residual, sigma68 of the residual, mean_abs = mean
        |residual|), sorted by model and :data:`SHARE_CLASSES`; the truth references are left out.
    """
    truth = dataset_hits.select("event_id", "hit_id", share=truth_share_expr().cast(pl.Float64))
    rank = {name: index for index, name in enumerate(SHARE_CLASSES)}
    return (
        pred_hits.filter(~pl.col("model").is_in(TRUTH_MODELS))
        .select("model", "event_id", "hit_id", pl.col("score").cast(pl.Float64))
        .join(truth, on=["event_id", "hit_id"], how="inner")
        .with_columns(residual=pl.col("score") - pl.col("share"), share_class=share_class_expr())
        .group_by("model", "share_class")
        .agg(
            n_hits=pl.len(),
            bias=pl.col("residual").median(),
            sigma68=sigma68_expr("residual"),
            mean_abs=pl.col("residual").abs().mean(),
        )
        .sort("model", pl.col("share_class").replace_strict(rank, return_dtype=pl.Int32))
        .collect()
    )


def merged_layers(dataset_hits: pl.LazyFrame) -> pl.LazyFrame:
    """(event_id, layer Int32) of every layer where the muon's charge shares a strip: a strip with charge of the
    muon's in the "merged" share class (another particle's or the noise's charge is 10-90 % of it)."""
    low, high = SHARE_CLASS_EDGES
    share = truth_share_expr()
    return (
        dataset_hits.filter((pl.col("charge_muon") > 0) & (share > low) & (share < high))
        .select("event_id", pl.col("layer").cast(pl.Int32))
        .unique()
    )


def merged_cluster_table(pred_clusters: pl.LazyFrame, dataset_hits: pl.LazyFrame) -> pl.DataFrame:
    """σ68 of each model's cluster residuals on the layers with a merged strip (:func:`merged_layers`) and on the
    others (clean), over the clusters its track uses: ``weight`` >= :data:`CLUSTER_USED_WEIGHT`, a finite
    ``x_reco`` and a finite ``x_true`` (the muon crosses the layer).

    Args:
        pred_clusters: REPORT/predictions/clusters.parquet.
        dataset_hits: the dataset's hits with :data:`SHARE_HIT_COLUMNS`.

    Returns:
        DataFrame (model, n_merged_layers, n_merged_clusters, cluster_sigma68_merged, n_clean_clusters,
        cluster_sigma68_clean) sorted by model: ``n_merged_layers`` merged layers the muon crosses, of which the
        model uses ``n_merged_clusters``; σ68 of x_reco − x_true [mm] of the used clusters on each kind of layer.
    """
    merged = merged_layers(dataset_hits).with_columns(merged=pl.lit(True))
    used = pl.col("used")
    return (
        pred_clusters.filter(pl.col("x_true").is_finite())
        .select(
            "model",
            "event_id",
            pl.col("layer").cast(pl.Int32),
            cluster_residual_expr().alias("residual"),
            used=(pl.col("weight") >= CLUSTER_USED_WEIGHT) & pl.col("x_reco").is_finite(),
        )
        .join(merged, on=["event_id", "layer"], how="left")
        .with_columns(pl.col("merged").fill_null(False))
        .group_by("model")
        .agg(
            n_merged_layers=pl.col("merged").sum().cast(pl.Int64),
            n_merged_clusters=(used & pl.col("merged")).sum().cast(pl.Int64),
            cluster_sigma68_merged=sigma68_expr(pl.col("residual").filter(used & pl.col("merged"))),
            n_clean_clusters=(used & ~pl.col("merged")).sum().cast(pl.Int64),
            cluster_sigma68_clean=sigma68_expr(pl.col("residual").filter(used & ~pl.col("merged"))),
        )
        .sort("model")
        .collect()
    )


def hit_weight_table(
    pred_hits: pl.LazyFrame,
    dataset_hits: pl.LazyFrame,
    pred_clusters: pl.LazyFrame,
    edges: tuple[float, float] = HIT_DISTANCE_EDGES,
) -> pl.DataFrame:
    """Where each model puts its final hit weight, by hit origin and distance from the muon.

    A cluster's offset from the muon is x̂_l − x_true,l = Σ_i w_i (x_i − x_true,l) / W_l, so a hit pulls the
    cluster by its weight times its distance |x_i − x_true,l|: a far noise strip with a weight of 0.01 moves a
    4-strip cluster by as much as a near one with 0.5. This table shows which hits do the pulling. The weight is
    the ``weight`` column (the hit's weight in the final clusters), not the classifier ``score``: in the robust
    chain the clusters are built from refined weights, and a hard selection clusters its 1/0 choice.

    Args:
        pred_hits: predictions/hits.parquet (event_id, hit_id, model, weight).
        dataset_hits: the dataset's hits (event_id, hit_id, layer, x, is_signal, particle_id).
        pred_clusters: predictions/clusters.parquet; its ``truth`` rows give x_true per event and layer.
        edges: distance class edges [mm] (:func:`hit_distance_class_expr`).

    Returns:
        DataFrame (model, origin, distance_class, n_hits, mean_weight, frac_above_half, pull_per_event [mm]
        = Σ w |x − x_true| / events of the model), sorted by model, origin (HIT_ORIGINS order) and distance.
        Hits on layers without a muon crossing (x_true NaN) are left out, and so are the truth references
        (their weights are the labels).
    """
    crossings = (
        pred_clusters.filter((pl.col("model") == "truth") & pl.col("x_true").is_finite())
        .select("event_id", pl.col("layer").cast(pl.Int32), "x_true")
        .unique(["event_id", "layer"])
    )
    truth = dataset_hits.select("event_id", "hit_id", pl.col("layer").cast(pl.Int32), "x", "is_signal", "particle_id")
    distance_rank = {label: rank for rank, label in enumerate(hit_distance_classes(edges))}
    origin_rank = {origin: rank for rank, origin in enumerate(HIT_ORIGINS)}
    return (
        pred_hits.filter(~pl.col("model").is_in(TRUTH_MODELS))
        .select("model", "event_id", "hit_id", pl.col("weight").cast(pl.Float64))
        .join(truth, on=["event_id", "hit_id"], how="inner")
        .join(crossings, on=["event_id", "layer"], how="inner")
        .with_columns(
            distance=(pl.col("x").cast(pl.Float64) - pl.col("x_true")).abs(),
            origin=hit_origin_expr(),
            n_events=pl.col("event_id").n_unique().over("model"),
        )
        .with_columns(distance_class=hit_distance_class_expr(edges=edges))
        .group_by("model", "origin", "distance_class")
        .agg(
            n_hits=pl.len(),
            mean_weight=pl.col("weight").mean(),
            frac_above_half=(pl.col("weight") > 0.5).mean(),
            pull_per_event=(pl.col("weight") * pl.col("distance")).sum() / pl.col("n_events").first(),
        )
        .sort(
            "model",
            pl.col("origin").replace_strict(origin_rank, return_dtype=pl.Int32),
            pl.col("distance_class").replace_strict(distance_rank, return_dtype=pl.Int32),
        )
        .collect()
    )


def classification_metrics(hit_scores: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per-model hit metrics from :func:`hit_score_table`: the ROC of the classifier score and the selection
    made by the final weights.

    Score metrics (auc, rejections, ε_b) use the hits with a finite ``score``, the others are dropped and
    counted (``n_bad_scores``). Weight metrics use the hits with a finite ``weight`` (``n_bad_weights``
    dropped): ``auc_weight`` is the ROC AUC of the weight, a hit is selected when its weight is at least
    :data:`HIT_SELECTION_THRESHOLD`, ``hit_efficiency`` = selected signal / signal and ``hit_purity`` =
    selected signal / selected, each with a binomial error. A model lacking signal or background hits gets
    null AUCs and rejections. A hard 0/1 score or weight has a single-point ROC: its AUC is (ε_s + 1 − ε_b)/2.

    Returns:
        (table with columns model, n_signal, n_background, n_bad_scores, auc, auc_err, rejection_at_90,
        rejection_at_90_err, background_eff_at_90, rejection_at_95, rejection_at_95_err, background_eff_at_95,
        n_bad_weights, auc_weight, auc_weight_err, n_selected, hit_efficiency, hit_efficiency_err, hit_purity,
        hit_purity_err; {model: (signal_eff, background_eff)} of the score, for plotting).
    """
    rows = []
    rocs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for (model,), group in sorted(hit_scores.partition_by("model", as_dict=True).items()):
        labels = group["is_signal"].to_numpy().astype(bool)
        scores, weights = group["score"].to_numpy(), group["weight"].to_numpy()
        finite_score, finite_weight = np.isfinite(scores), np.isfinite(weights)
        score_labels = labels[finite_score]
        n_signal, n_background = int(score_labels.sum()), int((~score_labels).sum())
        row: dict[str, object] = {
            "model": model,
            "n_signal": n_signal,
            "n_background": n_background,
            "n_bad_scores": int((~finite_score).sum()),
            "n_bad_weights": int((~finite_weight).sum()),
        }
        if n_signal and n_background:
            signal_eff, background_eff, _ = roc_curve(scores[finite_score], score_labels)
            rocs[model] = (signal_eff, background_eff)
            area = auc_from_roc(signal_eff, background_eff)
            row |= {"auc": area, "auc_err": auc_uncertainty(area, n_signal, n_background)}
            for target in SIGNAL_EFFICIENCY_POINTS:
                key = f"{round(100 * target)}"
                eff = float(background_efficiency_at(signal_eff, background_eff, target))
                rejection = background_rejection_at(signal_eff, background_eff, target)
                row |= {
                    f"background_eff_at_{key}": eff,
                    f"rejection_at_{key}": rejection,
                    f"rejection_at_{key}_err": rejection_uncertainty(rejection, n_background),
                }
        weight_labels = labels[finite_weight]
        n_weight_signal, n_weight_background = int(weight_labels.sum()), int((~weight_labels).sum())
        if n_weight_signal and n_weight_background:
            area = auc(weights[finite_weight], weight_labels)
            row |= {"auc_weight": area, "auc_weight_err": auc_uncertainty(area, n_weight_signal, n_weight_background)}
        rows.append(row)
    schema = {"model": pl.String, "n_signal": pl.Int64, "n_background": pl.Int64, "n_bad_scores": pl.Int64}
    schema |= {"auc": pl.Float64, "auc_err": pl.Float64}
    for target in SIGNAL_EFFICIENCY_POINTS:
        key = f"{round(100 * target)}"
        schema |= {f"rejection_at_{key}": pl.Float64, f"rejection_at_{key}_err": pl.Float64}
        schema |= {f"background_eff_at_{key}": pl.Float64}
    schema |= {"n_bad_weights": pl.Int64, "auc_weight": pl.Float64, "auc_weight_err": pl.Float64}
    # the selection counts are plain column logic: one group_by, NaN weights left out by hit_selected_expr
    selection = (
        hit_scores.group_by("model")
        .agg(
            n_selected=hit_selected_expr().sum().cast(pl.Int64),
            n_weighted_signal=hit_selected_expr().filter(pl.col("is_signal")).count().cast(pl.Int64),
            hit_efficiency=hit_efficiency_expr(),
            hit_purity=hit_purity_expr(),
        )
        .with_columns(
            hit_efficiency_err=binomial_error_expr("hit_efficiency", "n_weighted_signal"),
            hit_purity_err=binomial_error_expr("hit_purity", "n_selected"),
        )
        .drop("n_weighted_signal")
    )
    table = pl.DataFrame(rows, schema=schema).join(selection, on="model", how="left", maintain_order="left")
    return table, rocs


def cluster_residual_table(pred_clusters: pl.LazyFrame) -> pl.DataFrame:
    """Cluster residuals per model: (model, event_id, layer, residual [mm] float64, null if no cluster).

    Rows without a finite ``x_true`` (the muon outside the layer's active width) are dropped: there is
    nothing to compare with. A non-finite ``x_reco`` (no cluster built) gives a null residual, which counts
    as outside the core.
    """
    return (
        pred_clusters.filter(pl.col("x_true").is_finite())
        .select(
            "model",
            "event_id",
            "layer",
            pl.when(pl.col("x_reco").is_finite()).then(cluster_residual_expr()).alias("residual"),
        )
        .collect()
    )


def core_fraction_table(
    cluster_residuals: pl.DataFrame, reference_model: str = "truth", window_n_sigma: float = CORE_WINDOW_N_SIGMA
) -> tuple[pl.DataFrame, GaussianFit]:
    """Core fraction per model: share of clusters with |r − μ| <= ``window_n_sigma``·σ, (μ, σ) fitted to the
    ``reference_model`` residuals by :func:`fit_gaussian_core` (fit window ±``window_n_sigma``·σ too).

    Returns:
        (DataFrame model, n_clusters, n_missing, n_core, core_fraction, core_fraction_err (binomial);
        the reference fit).

    Raises:
        ValueError: the reference model has no clusters.
    """
    reference = cluster_residuals.filter(pl.col("model") == reference_model)["residual"].drop_nulls()
    if reference.len() == 0:
        raise ValueError(f"core_fraction_table: no '{reference_model}' clusters to define the core window")
    core = fit_gaussian_core(reference, window_n_sigma=window_n_sigma)
    half_width = window_n_sigma * core.sigma
    table = (
        cluster_residuals.group_by("model")
        .agg(
            n_clusters=pl.len(),
            n_missing=pl.col("residual").is_null().sum(),
            n_core=in_core_expr(core.mu, half_width).sum(),
        )
        .with_columns(core_fraction=pl.col("n_core") / pl.col("n_clusters"))
        .with_columns(
            core_fraction_err=(pl.col("core_fraction") * (1 - pl.col("core_fraction")) / pl.col("n_clusters")).sqrt()
        )
        .sort("model")
    )
    return table, core


def track_residual_table(pred_tracks: pl.LazyFrame, dataset_events: pl.LazyFrame) -> pl.DataFrame:
    """q/pT residuals of every predicted track joined with the truth.

    Returns:
        DataFrame (model, event_id, pt [GeV], q, q_pred, fit_ok bool, residual float64 — null where the fit
        failed, charge_misid bool — q_pred ≠ q, null where the fit failed, pt_bin UInt32 — null outside the binned
        range). Tracks without a truth event are dropped.
    """
    truth = dataset_events.select("event_id", "pt", "q")
    return (
        pred_tracks.join(truth, on="event_id", how="inner")
        .with_columns(fit_ok=fit_ok_expr())
        .select(
            "model",
            "event_id",
            "pt",
            "q",
            "q_pred",
            "fit_ok",
            pl.when("fit_ok").then(q_over_pt_residual_expr()).alias("residual"),
            charge_misid_expr().alias("charge_misid"),
            pt_bin_expr().alias("pt_bin"),
        )
        .collect()
    )


#: the columns of the tails, bias and charge of a resolution row (resolution_by_model, resolution_by_pt), after σ68
TAIL_COLUMNS = (
    "bias",
    "bias_err",
    "n_charge_misid",
    "charge_misid_rate",
    "charge_misid_rate_lo",
    "charge_misid_rate_hi",
    "n_tail",
    "tail_fraction",
    "tail_fraction_lo",
    "tail_fraction_hi",
)


def _residual_aggregations() -> dict[str, pl.Expr]:
    """The per-group figures of the successful fits (rows with a null residual are the failed fits): their number,
    σ68, the bias (median residual), the charge-misidentified and tail counts."""
    return {
        "n": pl.col("residual").is_not_null().sum(),
        "sigma68": sigma68_expr("residual"),
        "bias": pl.col("residual").median(),
        "n_charge_misid": pl.col("charge_misid").sum(),
        "n_tail": tail_expr("residual").sum(),
    }


def _bootstrap_errors(
    frame: pl.DataFrame, keys: list[str], n_boot: int, seed: int
) -> dict[tuple[object, ...], tuple[float, float]]:
    """{group key: (σ68 error, median error)} by bootstrap (the same replicas for both) over the successful-fit
    rows of each group."""
    result = {}
    for key, group in frame.partition_by(keys, as_dict=True).items():
        residuals = group["residual"].to_numpy()
        if residuals.size:
            result[key] = (
                bootstrap_sigma68(residuals, n_boot=n_boot, seed=seed)[1],
                bootstrap_median(residuals, n_boot=n_boot, seed=seed)[1],
            )
    return result


def _with_errors_and_rates(table: pl.DataFrame, errors: dict, keys: list[str]) -> pl.DataFrame:
    """``table`` (one row per ``keys``, with the counts of :func:`_residual_aggregations`) with sigma68_err and
    bias_err from ``errors`` (:func:`_bootstrap_errors`; NaN, fewer than 2 entries, as null) and the charge and
    tail fractions with their Clopper–Pearson intervals."""
    missing = (math.nan, math.nan)
    found = [errors.get(tuple(row), missing) for row in table.select(keys).iter_rows()]
    return table.with_columns(
        pl.Series("sigma68_err", [err[0] for err in found], dtype=pl.Float64).fill_nan(None),
        pl.Series("bias_err", [err[1] for err in found], dtype=pl.Float64).fill_nan(None),
        pl.col("n_charge_misid", "n_tail").fill_null(0).cast(pl.Int64),
    ).with_columns(
        *binomial_interval_exprs("n_charge_misid", "n", "charge_misid_rate"),
        *binomial_interval_exprs("n_tail", "n", "tail_fraction"),
    )


def resolution_by_model(track_residuals: pl.DataFrame, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> pl.DataFrame:
    """σ68 of the q/pT residual per model over all events with a successful fit, with the tails, bias and charge of
    the same fits.

    Returns:
        DataFrame (model, n_tracks, n_failed, n, sigma68, sigma68_err, then :data:`TAIL_COLUMNS`): ``n`` tracks
        enter σ68, ``n_failed`` have fit_status != 0 or a non-finite q/pT and are left out; ``bias`` is the median
        residual, ``bias_err`` its bootstrap error (the replicas of σ68's); ``n_charge_misid`` of the ``n`` have
        q_pred ≠ q, ``n_tail`` have |r − bias| > :data:`TAIL_N_SIGMA68` σ68; each fraction of ``n`` with its
        Clopper–Pearson 68.27 % interval (``_lo``, ``_hi``).
    """
    table = (
        track_residuals.group_by("model")
        .agg(n_tracks=pl.len(), n_failed=(~pl.col("fit_ok")).sum(), **_residual_aggregations())
        .sort("model")
    )
    errors = _bootstrap_errors(track_residuals.filter(pl.col("fit_ok")), ["model"], n_boot, seed)
    table = _with_errors_and_rates(table, errors, ["model"])
    return table.select("model", "n_tracks", "n_failed", "n", "sigma68", "sigma68_err", *TAIL_COLUMNS)


def resolution_by_pt(
    track_residuals: pl.DataFrame,
    edges: tuple[float, ...] = PT_BIN_EDGES,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> pl.DataFrame:
    """σ68 of the q/pT residual per model and true-pT bin (successful fits only), empty bins included, with the
    tails, bias and charge of each bin's fits (as :func:`resolution_by_model`; the tail is beyond
    :data:`TAIL_N_SIGMA68` times the bin's own σ68 around the bin's own median).

    ``track_residuals`` must carry ``pt_bin`` computed with the same ``edges`` (see :func:`pt_bin_expr`);
    it is recomputed here so any edges work.

    Returns:
        DataFrame (model, pt_lo, pt_hi, n, sigma68, sigma68_err, then :data:`TAIL_COLUMNS`) sorted by model then
        pt_lo; n = 0, zero counts and null figures in empty bins.
    """
    ok = track_residuals.filter(pl.col("fit_ok")).with_columns(pt_bin=pt_bin_expr(edges=edges)).drop_nulls("pt_bin")
    models = sorted(track_residuals["model"].unique().to_list())
    grid = pl.DataFrame(
        {
            "model": [m for m in models for _ in range(len(edges) - 1)],
            "pt_bin": [b for _ in models for b in range(len(edges) - 1)],
            "pt_lo": [edges[b] for _ in models for b in range(len(edges) - 1)],
            "pt_hi": [edges[b + 1] for _ in models for b in range(len(edges) - 1)],
        },
        schema={"model": pl.String, "pt_bin": pl.UInt32, "pt_lo": pl.Float64, "pt_hi": pl.Float64},
    )
    stats = ok.group_by("model", "pt_bin").agg(**_residual_aggregations())
    errors = _bootstrap_errors(ok, ["model", "pt_bin"], n_boot, seed)
    table = (
        grid.join(stats, on=["model", "pt_bin"], how="left")
        .with_columns(pl.col("n").fill_null(0).cast(pl.Int64))
        .sort("model", "pt_bin")
    )
    # a NaN error (fewer than 2 entries) is written as null, like an empty bin
    table = _with_errors_and_rates(table, errors, ["model", "pt_bin"])
    return table.select("model", "pt_lo", "pt_hi", "n", "sigma68", "sigma68_err", *TAIL_COLUMNS)


# ---------------------------------------------------------------------------------------------------------
# The limit row: the Cramér-Rao bound of σ68(q/pT) on the evaluated events
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolutionLimit:
    """The ``limit`` row (pipeline.registry.LIMIT_ROW) of an evaluation, :func:`resolution_limit`."""

    #: the bound's point error [mm]: the RMS of the clean-cluster charge-centroid residuals
    point_sigma: float
    #: σ68 and mean [mm] of the same residuals, and how many clusters they are
    point_sigma68: float
    point_mean: float
    clusters: int
    #: the events the bound was computed for, and those among them with fewer than three measured layers
    #: (no bound: left out of σ68, as failed fits are)
    n_events: int
    n_unbounded: int
    #: σ68 of the mixture of the bounded events' Gaussians (exact; no error)
    sigma68: float
    #: the row of the resolution table (resolution_by_model's columns; sigma68_err null)
    resolution: pl.DataFrame
    #: the rows of the pT-binned table (resolution_by_pt's columns; sigma68_err null, empty bins null)
    resolution_pt: pl.DataFrame


def resolution_limit(
    event_ids: pl.Series | np.ndarray,
    dataset_hits: pl.LazyFrame,
    dataset_events: pl.LazyFrame,
    detector: DetectorConfig,
    edges: tuple[float, ...] = PT_BIN_EDGES,
) -> ResolutionLimit:
    """The Cramér-Rao limit of σ68 of the relative q/pT residual on the events ``event_ids`` (the evaluated ones).

    Per event, the bound on σ(q/pT) of :func:`analysis.limit.cramer_rao_sigma` (an exact circle from the true
    x0 and angle, a Highland kink of the ``detector``'s material after every layer crossed, the measured layers
    those with a finite ``x_true``) with the point error measured on the same events: the RMS of the
    charge-centroid residuals of their clean clusters (:func:`analysis.limit.clean_cluster_residuals`; the muon's
    cluster where no other particle or noise strip touches it). Relative to |q/pT| it is a zero-mean Gaussian
    width; σ68 of the limit, overall and per true-pT bin, is that of the mixture of the events' Gaussians
    (:func:`analysis.limit.mixture_sigma68`, exact). Events with fewer than three measured layers have no bound
    and are left out, as failed fits are from the models' σ68.

    Raises:
        ValueError: a column the bound needs is missing (:data:`LIMIT_EVENT_COLUMNS`, :data:`LIMIT_HIT_COLUMNS`),
            ``x_true`` does not have one entry per layer of ``detector``, or no event or clean cluster.
    """
    from analysis import limit as cramer_rao  # scipy: imported when a limit is computed

    for frame, columns, what in (
        (dataset_events, LIMIT_EVENT_COLUMNS, "events"),
        (dataset_hits, LIMIT_HIT_COLUMNS, "hits"),
    ):
        missing = [column for column in columns if column not in frame.collect_schema().names()]
        if missing:
            raise ValueError(f"the dataset {what} lack the columns {', '.join(missing)}")
    ids = pl.DataFrame({"event_id": np.asarray(event_ids)}, schema={"event_id": pl.Int64}).unique().lazy()
    events = (
        dataset_events.select(LIMIT_EVENT_COLUMNS)
        .with_columns(pl.col("event_id").cast(pl.Int64))
        .join(ids, on="event_id", how="semi")
        .sort("event_id")
        .collect()
    )
    if events.height == 0:
        raise ValueError("no evaluated event in the dataset events")
    lengths = events["x_true"].list.len().unique().to_list()
    if lengths != [detector.n_layers]:
        raise ValueError(f"x_true has {lengths} entries per event, the detector {detector.n_layers} layers")
    hits = dataset_hits.with_columns(pl.col("event_id").cast(pl.Int64)).join(ids, on="event_id", how="semi")
    clean = cramer_rao.clean_cluster_residuals(hits, events)
    if clean.height == 0:
        raise ValueError("no clean cluster in the evaluated events")
    point = cramer_rao.residual_summary(clean["residual"])
    bounds = cramer_rao.event_bounds(events, detector, point["rms"])
    relative = bounds["relative_sigma"].to_numpy()
    bounded = np.isfinite(relative)
    if not bounded.any():
        raise ValueError("no evaluated event crosses three layers")
    pt = bounds["pt"].cast(pl.Float64).to_numpy()[bounded]
    table = cramer_rao.limit_table(pt, relative[bounded], edges)
    overall, bins = table.row(0, named=True), table.slice(1)
    resolution = pl.DataFrame(
        {
            "model": [LIMIT_ROW],
            "n_tracks": [events.height],
            "n_failed": [int((~bounded).sum())],
            "n": [overall["events"]],
            "sigma68": [overall["sigma68"]],
            "sigma68_err": [None],
        },
        schema={
            "model": pl.String,
            "n_tracks": pl.UInt32,
            "n_failed": pl.UInt32,
            "n": pl.UInt32,
            "sigma68": pl.Float64,
            "sigma68_err": pl.Float64,
        },
    )
    resolution_pt = bins.select(
        model=pl.lit(LIMIT_ROW),
        pt_lo="pt_lo",
        pt_hi="pt_hi",
        n=pl.col("events").cast(pl.Int64),
        sigma68=pl.when(pl.col("events") > 0).then(pl.col("sigma68")),
        sigma68_err=pl.lit(None, dtype=pl.Float64),
    )
    return ResolutionLimit(
        point_sigma=point["rms"],
        point_sigma68=point["sigma68"],
        point_mean=point["mean"],
        clusters=point["clusters"],
        n_events=events.height,
        n_unbounded=int((~bounded).sum()),
        sigma68=float(overall["sigma68"]),
        resolution=resolution,
        resolution_pt=resolution_pt,
    )


def with_limit_ratio(resolution: pl.DataFrame) -> pl.DataFrame:
    """``resolution`` (resolution_by_model's columns, the ``limit`` row among them or not) with
    ``sigma68_over_limit`` = sigma68 / the limit row's sigma68 and ``sigma68_over_limit_err`` = sigma68_err / the
    same (the limit is exact: no error of its own); both null without a limit row or a finite, positive limit."""
    limits = resolution.filter(pl.col("model") == LIMIT_ROW)["sigma68"].to_list()
    limit = limits[0] if limits else None
    if limit is None or not (math.isfinite(limit) and limit > 0):
        return resolution.with_columns(
            sigma68_over_limit=pl.lit(None, dtype=pl.Float64), sigma68_over_limit_err=pl.lit(None, dtype=pl.Float64)
        )
    return resolution.with_columns(
        sigma68_over_limit=pl.col("sigma68").cast(pl.Float64) / limit,
        sigma68_over_limit_err=pl.col("sigma68_err").cast(pl.Float64) / limit,
    )
