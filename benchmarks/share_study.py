"""The share models against the classical tracker and the label networks, paired on the same events (issue #25).

    python -m benchmarks.share_study REPORT [REPORT ...] [--label NAME ...]

Each REPORT is a ``muontrack evaluate`` report folder; its dataset is the one its catalog (summary.parquet) names.
For every report, and every pair of :data:`PAIRS` whose two rows it holds, prints one ``key=value`` line:

    report=.. candidate=.. reference=.. sigma68_candidate=.. sigma68_reference=.. difference=.. difference_err=..
    n_sigma=.. winner=.. failed_difference=.. failed_difference_err=.. n_events=..

σ68 and its paired bootstrap error as in the regime scan (analysis.scan_report.paired_sigma68: the events resampled
together, so the hard events both rows share cancel in the difference); ``n_sigma`` > 0 favours the candidate, a
winner from 2σ. Then, per report and row, ``row=.. sigma68=.. sigma68_over_limit=.. cluster_sigma68_merged=..
cluster_sigma68_clean=.. share_sigma68_merged=..`` from summary.json. Reports given the same ``--label`` (one
per report, in order; seeds of one regime) are also combined: the mean of their paired differences, its error
the standard error over the reports (``report=LABEL seeds=K``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl

from analysis.report_folder import CATALOG_SUMMARY_NAME
from analysis.scan_report import paired_failed_fit_rate, paired_sigma68, point_residuals, winner
from pipeline.dataset import open_dataset

#: (candidate, reference): the share models against the classical tracker, the share regression and the label
#: networks, and the label network against the classical tracker for scale
PAIRS = (
    ("share_e2e", "classical"),
    ("share_baseline", "classical"),
    ("share_e2e", "share_baseline"),
    ("share_e2e", "e2e"),
    ("share_baseline", "baseline"),
    ("e2e", "classical"),
)
#: the summary.json keys printed per row
ROW_KEYS = (
    "sigma68",
    "sigma68_err",
    "sigma68_over_limit",
    "cluster_sigma68_merged",
    "cluster_sigma68_clean",
    "share_bias_merged",
    "share_sigma68_merged",
    "charge_misid_rate",
)


def _fmt(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def report_dataset(report: Path) -> Path:
    """The dataset folder a report was evaluated on (its catalog's ``dataset`` column)."""
    names = pl.read_parquet(report / CATALOG_SUMMARY_NAME, columns=["dataset"])["dataset"].unique().to_list()
    if len(names) != 1 or names[0] is None:
        raise SystemExit(f"error: {report}: its catalog names no single dataset")
    return Path(names[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="evaluation report folders")
    parser.add_argument("--label", action="append", help="a regime label per report (reports of one label combine)")
    args = parser.parse_args()
    labels = args.label or [report.name for report in args.reports]
    if len(labels) != len(args.reports):
        raise SystemExit("error: give one --label per report, or none")

    differences: dict[tuple[str, str, str], list[float]] = {}
    for label, report in zip(labels, args.reports, strict=True):
        events = open_dataset(report_dataset(report)).events()
        residuals = point_residuals(report, events)
        present = set(residuals["model"].unique().to_list())
        for candidate, reference in PAIRS:
            if not {candidate, reference} <= present:
                continue
            result = paired_sigma68(residuals, candidate, reference)
            failed = paired_failed_fit_rate(residuals, candidate, reference)
            differences.setdefault((label, candidate, reference), []).append(result.difference)
            fields = {
                "report": report.name,
                "label": label,
                "candidate": candidate,
                "reference": reference,
                "sigma68_candidate": result.candidate_value,
                "sigma68_reference": result.reference_value,
                "difference": result.difference,
                "difference_err": result.difference_err,
                "n_sigma": result.n_sigma,
                "winner": winner(candidate, reference, result.n_sigma),
                "failed_difference": failed.difference,
                "failed_difference_err": failed.difference_err,
                "n_events": result.n_events,
            }
            print(" ".join(f"{key}={_fmt(value)}" for key, value in fields.items()), flush=True)
        summary = json.loads((report / "summary.json").read_text())
        for row, values in summary.items():
            print(f"report={report.name} row={row} " + " ".join(f"{k}={_fmt(values.get(k))}" for k in ROW_KEYS))
    for (label, candidate, reference), values in differences.items():
        if len(values) < 2:
            continue
        series = pl.Series(values)
        mean, err = float(series.mean()), float(series.std(ddof=1)) / len(values) ** 0.5
        n_sigma = -mean / err if err > 0 else 0.0
        print(
            f"report={label} seeds={len(values)} candidate={candidate} reference={reference} difference={mean:.6g} "
            f"difference_err={err:.6g} n_sigma={n_sigma:.3g} winner={winner(candidate, reference, n_sigma)}"
        )


if __name__ == "__main__":
    main()
