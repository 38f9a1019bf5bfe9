"""The report's comparisons: which models are compared, and the sentences that say, from the numbers and their
uncertainties, whether one is significantly better (the Comparison section of report.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from analysis.figures import format_value_error
from analysis.results import ReportResults, model_row
from analysis.statistics import ratio_with_error, relative_change

#: a difference counts as significant from this many standard deviations on
SIGNIFICANCE_THRESHOLD = 2.0
#: the paper's relative gain in cluster core fraction, end-to-end vs baseline (Coccaro et al., section 4)
PAPER_CORE_FRACTION_GAIN = 0.127


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
    ComparisonPair(
        "share_e2e",
        "classical",
        "do the learned charge shares beat the classical tracker's charge-minimum split of merged clusters? (AUC "
        "of the final hit weights)",
        "auc_weight",
        paper_gain=False,
    ),
    ComparisonPair(
        "share_e2e",
        "share_baseline",
        "the paper's question for the charge shares: does training through the reconstruction beat the share "
        "regression alone? (AUC of the raw score against the labels)",
        "auc",
        paper_gain=True,
    ),
    ComparisonPair(
        "share_e2e",
        "e2e",
        "do charge shares beat one yes/no score per strip, both trained end to end through the robust chain? (AUC "
        "of the final hit weights)",
        "auc_weight",
        paper_gain=False,
    ),
)
#: the model whose σ68 is quoted relative to the truth charge centroids, and that reference
RESOLUTION_LIMIT_PAIR = ("e2e", "truth_charge")
_AUC_LABELS = {"auc": "hit AUC (raw score)", "auc_weight": "hit AUC (final weights)"}


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
    cls, cls_ref = model_row(results.classification, model), model_row(results.classification, reference)
    core, core_ref = model_row(results.core, model), model_row(results.core, reference)
    res, res_ref = model_row(results.resolution, model), model_row(results.resolution, reference)
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
    res, res_limit = model_row(results.resolution, model), model_row(results.resolution, limit)
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
