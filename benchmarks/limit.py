"""The Cramér-Rao limit of σ68(q/pT) on a dataset, and the scattering-aware fit against the Hyper fit (issue 23).

    python -m benchmarks.limit --data DATASET [--split SPLIT] [--sigma MM] [--pull-cut C] [--max-removed K]

Reads the split's events and hits (``--split``: train, val, test or all; default all) and prints one
``key=value`` line per measurement, then a Markdown table:

    resolution clusters=.. sigma68_mm=.. rms_mm=..       clean-cluster charge centroid - x_true
    method=M bin=B events=.. sigma68=.. sigma68_err=.. failed=.. removed=..   per method and pT bin ("all" first)

Methods (every fit is float64):

- ``bound``: the Cramér-Rao bound of each event (analysis.limit: exact circle, a Highland kink after every
  crossed layer, point error ``--sigma``, default the clean-cluster RMS measured here), and σ68 of the mixture
  of the events' Gaussians (no sampling).
- ``scattering_truth_noise``: the scattering fit (classical.gbl) of the true crossings plus Gaussian
  point errors of ``--sigma``: what an efficient fit of ideal clusters reaches (the bound, up to the sample).
- ``scattering``: the scattering fit of the charge centroids of the true signal strips on each layer (the
  ``truth_charge`` clusters), point error ``--sigma``, the layer with the largest |pull| above ``--pull-cut``
  (default 5) removed and refitted, at most ``--max-removed`` (default 4) per track (merged clusters);
  ``removed`` = mean layers removed per track.
- ``scattering_no_removal``: the same without removing layers.
- ``hyper``: the Hyper circle fit of the same centroids on every layer (the ``truth_charge`` row's fit).
- ``hyper_same_layers``: the Hyper fit of the layers that ``scattering`` kept.

σ68 and its bootstrap error as the evaluation's (analysis.statistics.bootstrap_sigma68 of ((q/pT)_fit -
(q/pT)_true) / (q/pT)_true over the fits with status 0; the bound's line has no error: it is exact for the
events' pT); failed = share of fits with status > 0; pT bins as analysis.metrics.

Run as a file, the script runs itself again as ``python -m benchmarks.limit`` from the repository root (as a
file, benchmarks/classical.py would shadow the ``classical`` package).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: seed of the Gaussian point errors of ``scattering_truth_noise``
NOISE_SEED = 0


def _hyper(x, y, w, b_field):
    """Hyper fit (classical.circle) of each row's points with w > 0: (q/pT, status)."""
    import numpy as np

    from classical.circle import hyper_fit, track_parameters
    from pipeline.schema import STATUS_OK

    n_events = x.shape[0]
    q_over_pt = np.zeros(n_events)
    status = np.zeros(n_events, np.int64)
    for e in range(n_events):
        keep = w[e] > 0
        if keep.sum() < 3:
            status[e] = 1
            continue
        xs, ys = np.ascontiguousarray(x[e, keep]), np.ascontiguousarray(y[keep])
        xc, _, radius, st = hyper_fit(xs, ys, np.ones(xs.size), xs.size)
        status[e] = st
        if st == STATUS_OK:
            q_over_pt[e] = track_parameters(xc, radius, xs[0], b_field)[2]
    return q_over_pt, status


def _bin_lines(method, truth, q_over_pt, status, pt, removed=None):
    import numpy as np

    from analysis.limit import PT_BIN_EDGES, pt_bin_index
    from analysis.statistics import bootstrap_sigma68

    bins = pt_bin_index(pt)
    r = (q_over_pt - truth) / truth
    lines, row = [], {}
    for b in range(-1, len(PT_BIN_EDGES) - 1):
        sel = np.ones(pt.size, bool) if b < 0 else bins == b
        ok = sel & (status == 0) & np.isfinite(r)
        name = "all" if b < 0 else f"{PT_BIN_EDGES[b]:g}-{PT_BIN_EDGES[b + 1]:g}"
        value, error = bootstrap_sigma68(r[ok]) if ok.any() else (float("nan"), float("nan"))
        extra = "" if removed is None else f" removed={np.mean(removed[sel]):.3f}"
        lines.append(
            f"method={method} bin={name} events={int(sel.sum())} sigma68={value:.5f} sigma68_err={error:.5f} "
            f"failed={1 - ok.sum() / max(sel.sum(), 1):.4f}{extra}"
        )
        row[name] = f"{value:.5f} ± {error:.5f}"
    return lines, row


def measure(data: Path, split: str | None, sigma: float | None, pull_cut: float, max_removed: int) -> list[str]:
    import numpy as np
    import polars as pl

    from analysis.limit import clean_cluster_residuals, event_bounds, limit_table, residual_summary
    from classical.gbl import fit_tracks
    from pipeline.batches import split_expr
    from pipeline.config import detector_material
    from pipeline.dataset import open_dataset

    dataset = open_dataset(data)
    detector = dataset.config.detector
    layer_y = detector.layer_y()
    keep = pl.lit(True) if split is None else split_expr(split)
    events = dataset.events().filter(keep).sort("event_id").collect()
    hits = dataset.hits().filter(keep)
    n_events, n_layers = events.height, detector.n_layers

    resolution = residual_summary(clean_cluster_residuals(hits, events)["residual"])
    lines = [
        f"resolution clusters={resolution['clusters']} sigma68_mm={resolution['sigma68']:.5f} "
        f"rms_mm={resolution['rms']:.5f}"
    ]
    sigma = resolution["rms"] if sigma is None else sigma
    pt = events["pt"].to_numpy().astype(np.float64)
    truth = events["q"].to_numpy() / pt
    rows = {}

    bounds = event_bounds(events, detector, sigma)
    table = limit_table(pt, bounds["relative_sigma"].to_numpy())
    for record in table.iter_rows(named=True):
        lines.append(f"method=bound bin={record['bin']} events={record['events']} sigma68={record['sigma68']:.5f}")
    rows["bound"] = {b: f"{v:.5f}" for b, v in zip(table["bin"], table["sigma68"], strict=True)}

    material = detector_material(detector)
    x_true = np.asarray(events["x_true"].to_list(), np.float64).reshape(n_events, n_layers)
    noisy = x_true + np.random.default_rng(NOISE_SEED).normal(0, sigma, x_true.shape)
    fit = fit_tracks(noisy, layer_y, np.isfinite(x_true).astype(np.float64), sigma, **material)
    new, rows["scattering_truth_noise"] = _bin_lines("scattering_truth_noise", truth, fit.q_over_pt, fit.status, pt)
    lines += new

    # the charge centroid of the true signal strips on each layer (the truth_charge clusters)
    centroids = (
        hits.filter(pl.col("is_signal"))
        .group_by("event_id", "layer")
        .agg(x=(pl.col("x").cast(pl.Float64) * pl.col("charge")).sum() / pl.col("charge").cast(pl.Float64).sum())
        .collect()
    )
    row_of = dict(zip(events["event_id"].to_list(), range(n_events), strict=True))
    x = np.zeros((n_events, n_layers))
    w = np.zeros((n_events, n_layers))
    rows_index = np.array([row_of[e] for e in centroids["event_id"].to_list()], np.int64)
    layers = centroids["layer"].to_numpy().astype(np.int64)
    x[rows_index, layers] = centroids["x"].to_numpy()
    w[rows_index, layers] = 1.0

    fit = fit_tracks(x, layer_y, w, sigma, **material, pull_cut=pull_cut, max_removed=max_removed)
    new, rows["scattering"] = _bin_lines("scattering", truth, fit.q_over_pt, fit.status, pt, fit.removed)
    lines += new
    plain = fit_tracks(x, layer_y, w, sigma, **material)
    new, rows["scattering_no_removal"] = _bin_lines("scattering_no_removal", truth, plain.q_over_pt, plain.status, pt)
    lines += new
    q_over_pt, status = _hyper(x, layer_y, w, detector.b_field)
    new, rows["hyper"] = _bin_lines("hyper", truth, q_over_pt, status, pt)
    lines += new
    q_over_pt, status = _hyper(x, layer_y, fit.weight, detector.b_field)
    new, rows["hyper_same_layers"] = _bin_lines("hyper_same_layers", truth, q_over_pt, status, pt)
    lines += new

    bins = list(rows["bound"])
    lines += ["", f"σ68(q/pT), {n_events} events, point error {sigma * 1000:.2f} µm:", ""]
    lines.append("| method | " + " | ".join(bins) + " |")
    lines.append("|---|" + "---|" * len(bins))
    for method, values in rows.items():
        lines.append(f"| {method} | " + " | ".join(values[b] for b in bins) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a dataset folder")
    parser.add_argument("--split", default="all", choices=["train", "val", "test", "all"])
    parser.add_argument("--sigma", type=float, default=None, help="point error [mm] (default: clean-cluster RMS)")
    parser.add_argument("--pull-cut", type=float, default=5.0, help="remove layers whose |pull| exceeds this")
    parser.add_argument("--max-removed", type=int, default=4, help="at most this many layers removed per track")
    args = parser.parse_args()
    if not __package__:  # run as a file: again as a module of the repository root (see the docstring)
        argv = ["--data", str(args.data.resolve()), "--split", args.split, "--pull-cut", str(args.pull_cut)]
        argv += ["--max-removed", str(args.max_removed)] + ([] if args.sigma is None else ["--sigma", str(args.sigma)])
        raise SystemExit(subprocess.call([sys.executable, "-m", "benchmarks.limit", *argv], cwd=REPO_ROOT))
    split = None if args.split == "all" else args.split
    for line in measure(args.data, split, args.sigma, args.pull_cut, args.max_removed):
        print(line, flush=True)


if __name__ == "__main__":
    main()
