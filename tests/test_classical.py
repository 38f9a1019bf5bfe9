"""The classical reconstruction: Hyper fit against a generalised-eigenvalue reference, clustering against a
plain loop, exact truth centroids without background and the final fit against a direct call of the
scattering fit on them, a planted outlier layer, decoy tracks in the muon's road, the prediction tables, the
one-way imports, and the resolution against trivially worse reconstructions."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from classical import (
    ClassicalParams,
    find_clusters,
    hyper_circle_fit_f64,
    predict_classical,
    read_split,
    track_events,
)
from classical.gbl import GBL_STEPS, gbl_fit, new_scattering_scratch
from pipeline.batches import split_expr
from pipeline.config import PT_PER_TESLA_METRE, BackgroundConfig, SimConfig, detector_material, point_resolution
from pipeline.dataset import open_dataset
from pipeline.schema import (
    PRED_CLUSTERS_SCHEMA,
    PRED_HITS_SCHEMA,
    PRED_TRACKS_SCHEMA,
    STATUS_DEGENERATE,
    STATUS_NONFINITE,
    STATUS_OK,
)
from simulation.shards import simulate_dataset
from tests.sim_reference import strip_fraction_erf
from tests.synthetic_events import DETECTOR, LAYER_Y, crossings

N_LAYERS = DETECTOR.n_layers


# ---- references ------------------------------------------------------------------------------------------


def hyper_fit_eig(x, y, w=None) -> tuple[float, float, float]:
    """Hyper fit as the generalised eigenproblem M A = eta N A (Al-Sharadqah & Chernov 2009) in float64:
    A = (A, B, C, D) of A (x^2 + y^2) + B x + C y + D = 0, M the weighted moment matrix of (z, x, y, 1) and N
    Hyper's constraint matrix; the circle of the smallest non-negative eta. Solved on points centred on their
    weighted centroid and scaled to unit RMS radius (the fit is similarity-covariant), so that the
    eigenproblem is well conditioned."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    w = w / w.sum()
    mx, my = w @ x, w @ y
    scale = math.sqrt(w @ ((x - mx) ** 2 + (y - my) ** 2))
    u, v = (x - mx) / scale, (y - my) / scale
    z = u * u + v * v
    design = np.stack([z, u, v, np.ones_like(u)], axis=1)
    moments = (design * w[:, None]).T @ design
    z_mean, u_mean, v_mean = w @ z, w @ u, w @ v
    constraint = np.array(
        [
            [8.0 * z_mean, 4.0 * u_mean, 4.0 * v_mean, 2.0],
            [4.0 * u_mean, 1.0, 0.0, 0.0],
            [4.0 * v_mean, 0.0, 1.0, 0.0],
            [2.0, 0.0, 0.0, 0.0],
        ]
    )
    eta, vectors = np.linalg.eig(np.linalg.solve(constraint, moments))
    assert np.all(np.abs(eta.imag) <= 1e-12 * np.abs(eta).max())
    eta, vectors = eta.real, vectors.real
    candidates = np.flatnonzero(eta > -1e-12 * np.abs(eta).max())
    k = candidates[np.argmin(eta[candidates])]
    a, b, c, d = vectors[:, k]
    uc, vc = -b / (2.0 * a), -c / (2.0 * a)
    radius = math.sqrt(b * b + c * c - 4.0 * a * d) / (2.0 * abs(a))
    return uc * scale + mx, vc * scale + my, radius * scale


def q_over_pt_of_circle(xc: float, radius: float, x_track: float) -> float:
    """q/pT [1/GeV] of a track near x_track moving towards +y (centre on +x: positive charge)."""
    q = 1.0 if xc > x_track else -1.0
    return q / (PT_PER_TESLA_METRE * DETECTOR.b_field * radius * 1e-3)


def clusters_loop(layer, strip, x, charge, split_ratio):
    """Plain-Python clustering: (layer, centroid, charge, rms, sorted hit indices) per cluster."""
    by_layer: dict[int, list[int]] = {}
    for i in range(len(layer)):
        by_layer.setdefault(int(layer[i]), []).append(i)
    out = []
    for lay in sorted(by_layer):
        hits = sorted(by_layer[lay], key=lambda i: (strip[i], i))
        runs = [[hits[0]]]
        for i in hits[1:]:
            if strip[i] - strip[runs[-1][-1]] > 1:
                runs.append([])
            runs[-1].append(i)
        for run in runs:
            pieces, start, k = [], 0, 1
            while k < len(run) - 1:  # split at the first clear local minimum, as documented in _emit_run
                q = [charge[i] for i in run]
                if q[k] < q[k - 1] and q[k] < q[k + 1] and q[k] < split_ratio * min(max(q[start:k]), max(q[k + 1 :])):
                    cut = k + 1 if q[k - 1] >= q[k + 1] else k
                    pieces.append(run[start:cut])
                    start, k = cut, cut + 1
                    continue
                k += 1
            pieces.append(run[start:])
            for piece in pieces:
                q = np.array([charge[i] for i in piece], np.float64)
                xs = np.array([x[i] for i in piece], np.float64)
                centroid = float(np.sum(q * xs) / np.sum(q))
                rms = math.sqrt(float(np.sum(q * (xs - centroid) ** 2) / np.sum(q)))
                out.append((lay, centroid, float(q.sum()), rms, sorted(piece)))
    return out


def sigma68(r: np.ndarray) -> float:
    return float(np.quantile(np.abs(r - np.median(r)), 0.68))


def scattering_reference(x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(q/pT [E], pulls [E, L])`` of :func:`classical.gbl.gbl_fit` called directly on each
    row of points ``x`` [E, L] with weights ``weight`` (0/1; x ignored where 0), the point error of
    ClassicalParams and the detector's material; every fit must succeed."""
    x, weight = np.atleast_2d(x), np.atleast_2d(weight).astype(np.float64)
    material = detector_material(DETECTOR)
    sigma = np.full(N_LAYERS, point_resolution(DETECTOR))
    x_over_x0 = np.full(N_LAYERS, material["x_over_x0"])
    scratch = new_scattering_scratch(N_LAYERS)
    q_over_pt, pulls, x_fit = np.empty(len(x)), np.empty(x.shape), np.empty(N_LAYERS)
    for e in range(len(x)):
        row = np.ascontiguousarray(np.where(weight[e] > 0, x[e], 0.0))
        result = gbl_fit(
            row,
            LAYER_Y,
            np.ascontiguousarray(weight[e]),
            sigma,
            material["b_field"],
            x_over_x0,
            material["x_min"],
            material["x_max"],
            GBL_STEPS,
            scratch,
            x_fit,
            pulls[e],
        )
        assert result[4] == STATUS_OK
        q_over_pt[e] = result[0]
    return q_over_pt, pulls


# ---- constructed events ----------------------------------------------------------------------------------


def digitise(deposits) -> dict[str, np.ndarray]:
    """Strips of crossings ``(layer, x [mm], charge, particle)`` with the simulation's Gaussian charge sharing
    and threshold, summed per strip, in (layer, strip) order; ``particle`` is the strip's main contributor."""
    sigma = DETECTOR.charge_sigma
    cells: dict[tuple[int, int], dict[int, float]] = {}
    for layer, x_cross, charge, particle in deposits:
        centre = math.floor((x_cross - DETECTOR.x_min) / DETECTOR.pitch)
        for s in range(centre - 5, centre + 6):
            lo = DETECTOR.x_min + s * DETECTOR.pitch
            share = charge * strip_fraction_erf(lo, lo + DETECTOR.pitch, x_cross, sigma)
            cell = cells.setdefault((layer, s), {})
            cell[particle] = cell.get(particle, 0.0) + share
    rows = [
        (layer, s, sum(c.values()), max(c, key=c.get))
        for (layer, s), c in sorted(cells.items())
        if sum(c.values()) > DETECTOR.threshold * DETECTOR.charge_mean
    ]
    layer, strip, charge, particle = (np.array(v) for v in zip(*rows, strict=True))
    return {
        "layer": layer,
        "strip": strip,
        "x": DETECTOR.strip_center(strip),
        "charge": charge,
        "particle": particle,
    }


def reconstruct_one(hits: dict[str, np.ndarray], params: ClassicalParams | None = None):
    return track_events(
        np.array([0, len(hits["layer"])]), hits["layer"], hits["strip"], hits["x"], hits["charge"], DETECTOR, params
    )


# ---- Hyper fit -------------------------------------------------------------------------------------------


def _muon_arc(rng, noise):
    pt = rng.uniform(20.0, 50.0)
    q = rng.choice([-1.0, 1.0])
    x = crossings(pt, q, rng.normal(0.0, 100.0), rng.normal(0.0, 0.05)) + rng.normal(0.0, noise, N_LAYERS)
    return x, LAYER_Y.copy()


def test_hyper_fit_matches_the_generalised_eigenvalue_solution_on_noisy_arcs():
    rng = np.random.default_rng(1)
    for trial in range(60):
        if trial < 40:  # our tracks: 1.6 m of a 70-170 m circle, noisy points, some weighted
            x, y = _muon_arc(rng, noise=rng.choice([0.01, 0.1, 1.0]))
        else:  # generic circles: a partial arc of a small circle
            radius = rng.uniform(1.0, 100.0)
            phi = rng.uniform(0.0, rng.uniform(0.5, 6.0), 12)
            x = 3.0 + radius * np.cos(phi) + rng.normal(0, 0.02 * radius, 12)
            y = -2.0 + radius * np.sin(phi) + rng.normal(0, 0.02 * radius, 12)
        w = rng.uniform(0.1, 1.0, len(x)) if trial % 2 else None
        xc, yc, radius, status = hyper_circle_fit_f64(x, y, w)
        assert status == STATUS_OK
        ref = hyper_fit_eig(x, y, w)
        assert_allclose([xc, yc, radius], ref, rtol=1e-9, atol=1e-9 * ref[2])


def test_hyper_fit_is_exact_on_exact_circles():
    rng = np.random.default_rng(2)
    for _ in range(20):
        pt, q = rng.uniform(20.0, 50.0), rng.choice([-1.0, 1.0])
        x0, theta0 = rng.normal(0.0, 100.0), rng.normal(0.0, 0.05)
        radius = pt / (PT_PER_TESLA_METRE * DETECTOR.b_field) * 1e3
        xc_true = x0 + q * radius * math.cos(theta0)  # the centre is on the +x side for q > 0
        yc_true = -q * radius * math.sin(theta0)
        x = crossings(pt, q, x0, theta0)
        xc, yc, r, status = hyper_circle_fit_f64(x, LAYER_Y, rng.uniform(0.5, 1.0, N_LAYERS))
        assert status == STATUS_OK
        assert_allclose([xc, yc, r], [xc_true, yc_true, radius], rtol=1e-9, atol=1e-9 * radius)
    phi = np.linspace(0.0, 2.0, 7)
    assert_allclose(hyper_circle_fit_f64(5.0 + 2.0 * np.cos(phi), -1.0 + 2.0 * np.sin(phi))[:3], [5.0, -1.0, 2.0])


def test_hyper_fit_reports_degenerate_and_nonfinite_input():
    y = np.arange(5.0) * 100.0
    assert hyper_circle_fit_f64(0.3 * y + 2.0, y)[3] == STATUS_DEGENERATE  # collinear
    assert hyper_circle_fit_f64(np.ones(5), np.ones(5))[3] == STATUS_DEGENERATE  # one point
    assert hyper_circle_fit_f64(y, y[::-1], np.zeros(5))[3] == STATUS_DEGENERATE  # no weight
    assert hyper_circle_fit_f64(np.array([0.0, 1.0, np.nan, 3.0]), np.arange(4.0))[3] == STATUS_NONFINITE


# ---- clustering ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split_ratio", [0.0, 0.5, 1.0])
def test_clustering_matches_a_plain_loop_on_random_strip_sets(split_ratio):
    rng = np.random.default_rng(3)
    n_split = 0
    for _ in range(200):
        n = int(rng.integers(1, 40))
        layer = rng.integers(0, 4, n)
        strip = rng.integers(100, 130, n)  # dense: long runs, duplicates of a strip
        charge = rng.uniform(0.01, 1.0, n)
        x = DETECTOR.strip_center(strip)
        got = find_clusters(layer, strip, x, charge, n_layers=4, split_ratio=split_ratio)
        want = clusters_loop(layer, strip, x, charge, split_ratio)
        assert len(got.x) == len(want)
        n_split += len(want) - len(clusters_loop(layer, strip, x, charge, 0.0))
        for k, (lay, centroid, q_sum, rms, hits) in enumerate(want):
            assert got.layer[k] == lay
            assert got.size[k] == len(hits)
            assert sorted(got.hits[k].tolist()) == hits
            assert_allclose([got.x[k], got.charge[k], got.sigma[k]], [centroid, q_sum, rms], rtol=1e-12, atol=1e-12)
    assert (n_split > 0) == (split_ratio > 0)


def test_clustering_keeps_a_single_charge_cloud_whole_and_splits_two():
    one = digitise([(0, 12.3, 1.0, 0)])
    assert len(find_clusters(one["layer"], one["strip"], one["x"], one["charge"], 1, 1.0).x) == 1
    two = digitise([(0, 12.3, 1.0, 0), (0, 14.3, 1.0, 1)])  # 2 mm apart: one run of strips, a valley
    assert len(find_clusters(two["layer"], two["strip"], two["x"], two["charge"], 1, 0.0).x) == 1
    split = find_clusters(two["layer"], two["strip"], two["x"], two["charge"], 1, 1.0)
    assert len(split.x) == 2
    assert_allclose(split.x, [12.3, 14.3], atol=0.15)


# ---- reconstruction --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_decoy_tracks_in_the_road_do_not_steal_the_muon():
    """A muon of 20 GeV (4.6 mm sagitta) with a decoy track 9 mm inside its bend on station 3, which makes
    the straight line (muon on station 1, decoy on station 3) follow the muon through station 2, a second
    decoy 3 mm beside it along station 1, and one 2 mm off (merged strips) on layers 8-10."""
    pt, q = 20.0, 1.0
    muon = crossings(pt, q, x0=-30.0, theta0=0.02)
    deposits = [(lay, muon[lay], 1.0, 0) for lay in range(N_LAYERS)]
    deposits += [(lay, muon[lay] - 9.0, 1.0, 1) for lay in range(12, 16)]
    deposits += [(lay, muon[lay] + 3.0 + 0.01 * LAYER_Y[lay], 0.8, 2) for lay in range(8)]
    deposits += [(lay, muon[lay] + 2.0, 1.2, 3) for lay in range(8, 11)]
    hits = digitise(deposits)

    # the premise: by the straight line's own residuals the decoy seed beats the muon's
    clusters = find_clusters(hits["layer"], hits["strip"], hits["x"], hits["charge"], N_LAYERS, 1.0)

    def line_ssr(x_first, x_last):
        line = x_first + (x_last - x_first) * (LAYER_Y - LAYER_Y[0]) / (LAYER_Y[-1] - LAYER_Y[0])
        d = [np.min(np.abs(clusters.x[clusters.layer == lay] - line[lay])) for lay in range(N_LAYERS)]
        return np.sum(np.square(d)), np.sum(np.array(d) < 5.0)

    (ssr_muon, n_muon), (ssr_decoy, n_decoy) = line_ssr(muon[0], muon[-1]), line_ssr(muon[0], muon[-1] - 9.0)
    assert n_muon == n_decoy == N_LAYERS
    assert ssr_decoy < ssr_muon / 5

    reco = reconstruct_one(hits)
    assert reco.status[0] == STATUS_OK
    assert_array_equal(reco.layer_weight[0], np.ones(N_LAYERS))
    clean = [lay for lay in range(N_LAYERS) if lay not in (8, 9, 10)]
    selected = reco.hit_weight > 0.5
    assert_array_equal(selected[np.isin(hits["layer"], clean)], (hits["particle"] == 0)[np.isin(hits["layer"], clean)])
    assert np.all(hits["particle"][selected] != 1)
    assert np.all(hits["particle"][selected] != 2)
    assert_allclose(reco.x_reco[0][clean], muon[clean], atol=0.02)
    assert_allclose(reco.x_reco[0][8:11], muon[8:11], atol=0.2)  # the split cluster: some shared charge
    assert_allclose(reco.q_over_pt[0], q / pt, rtol=0.03)


def test_an_event_without_a_seed_fails_cleanly():
    hits = digitise([(0, 1.0, 1.0, 0), (1, 1.1, 1.0, 0)])  # two layers of station 1 only
    reco = reconstruct_one(hits)
    assert reco.status[0] == 1
    assert reco.pt[0] == 0.0
    assert reco.q_over_pt[0] == 0.0
    assert reco.q[0] == 1
    assert_array_equal(reco.layer_weight[0], np.zeros(N_LAYERS))
    assert_allclose(reco.sigma[0], DETECTOR.pitch / math.sqrt(12.0))


def test_the_final_fit_removes_a_planted_outlier_layer():
    """A 30 GeV muon whose layer-5 deposit is planted 0.06 mm off its path: within the annealing filter's
    window (2 point_sigma), so the filter keeps it, but some 9 of the final fit's pulls: it is removed,
    and q/pT is the scattering fit of the other 15 centroids."""
    pt, q, outlier = 30.0, -1.0, 5
    path = crossings(pt, q, x0=40.0, theta0=-0.03)
    planted = path.copy()
    planted[outlier] += 0.06
    hits = digitise([(lay, planted[lay], 1.0, 0) for lay in range(N_LAYERS)])
    centroid = np.array(
        [
            np.sum((hits["charge"] * hits["x"])[hits["layer"] == lay]) / np.sum(hits["charge"][hits["layer"] == lay])
            for lay in range(N_LAYERS)
        ]
    )
    every = np.ones(N_LAYERS)
    without = every.copy()
    without[outlier] = 0.0

    kept_all = reconstruct_one(hits, ClassicalParams(max_removed=0))
    assert_array_equal(kept_all.layer_weight[0], every)
    all_q_over_pt, pulls = scattering_reference(centroid, every)
    assert_allclose(kept_all.q_over_pt[0], all_q_over_pt[0], rtol=1e-9)
    assert np.argmax(np.abs(pulls[0])) == outlier
    assert abs(pulls[0, outlier]) > 1.5 * ClassicalParams().pull_cut

    reco = reconstruct_one(hits)
    assert reco.status[0] == STATUS_OK
    assert_array_equal(reco.layer_weight[0], without)
    assert reco.x_reco[0, outlier] == 0.0
    assert_array_equal(reco.hit_weight > 0.5, hits["layer"] != outlier)
    assert_allclose(reco.q_over_pt[0], scattering_reference(centroid, without)[0][0], rtol=1e-9)
    assert_allclose(reco.q_over_pt[0], q / pt, rtol=0.02)


# ---- datasets --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quiet_dataset(tmp_path_factory):
    """Muons only: no noise strips or clusters, no extra tracks."""
    background = BackgroundConfig(noise_strips_per_layer=0.0, noise_clusters_per_layer=0.0, extra_tracks_per_event=0.0)
    path = tmp_path_factory.mktemp("classical") / "quiet"
    simulate_dataset(path, n_events=400, seed=5, config=SimConfig(background=background))
    return open_dataset(path)


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("classical") / "default"
    simulate_dataset(path, n_events=2000, seed=0, config=SimConfig(shard_events=1000))
    return open_dataset(path)


def _truth_centroids(dataset, split) -> tuple[np.ndarray, pl.DataFrame, pl.DataFrame]:
    """float64 [E, L] charge centroid of the signal strips per layer (NaN where none), computed here with
    NumPy, and the split's hits and events."""
    hits = dataset.hits().filter(split_expr(split)).sort("event_id", "hit_id").collect()
    events = dataset.events().filter(split_expr(split)).sort("event_id").collect()
    signal = hits["is_signal"].to_numpy()
    row = np.searchsorted(events["event_id"].to_numpy(), hits["event_id"].to_numpy()[signal])
    cell = row * N_LAYERS + hits["layer"].to_numpy()[signal].astype(np.int64)
    charge = hits["charge"].to_numpy()[signal].astype(np.float64)
    x = hits["x"].to_numpy()[signal].astype(np.float64)
    size = events.height * N_LAYERS
    strips = np.bincount(cell, minlength=size)
    charge_sum = np.bincount(cell, weights=charge, minlength=size)
    moment = np.bincount(cell, weights=charge * x, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid = np.where(strips > 0, moment / charge_sum, np.nan)
    return centroid.reshape(events.height, N_LAYERS), hits, events


def test_without_background_the_final_fit_is_the_scattering_fit_of_the_truth_charge_centroids(quiet_dataset):
    """Every signal layer is found at its truth charge centroid; the final fit equals the scattering fit of
    those centroids on the layers it keeps, and it drops a layer exactly where the fit of all of them has a
    pull beyond the cut (the worst one first)."""
    centroid, hits, events = _truth_centroids(quiet_dataset, "train")
    split = read_split(quiet_dataset, "train")
    reco = track_events(split.event_start, split.layer, split.strip, split.x, split.charge, DETECTOR)
    has_signal = np.isfinite(centroid)
    assert has_signal.sum(axis=1).min() >= 3
    assert np.mean(has_signal) > 0.99
    assert np.all(reco.status == STATUS_OK)
    kept = reco.layer_weight > 0.5
    removed = has_signal & ~kept
    assert not np.any(kept & ~has_signal)
    assert removed.sum() < 0.005 * has_signal.sum()
    assert_allclose(reco.x_reco[kept], centroid[kept], rtol=0, atol=1e-10)
    layer_kept = kept[np.searchsorted(events["event_id"].to_numpy(), hits["event_id"].to_numpy()), hits["layer"]]
    assert_array_equal(reco.hit_weight > 0.5, hits["is_signal"].to_numpy() & layer_kept)

    expected, _ = scattering_reference(centroid, kept)
    assert_allclose(reco.q_over_pt, expected, rtol=1e-9)
    assert_array_equal(np.sign(reco.q_over_pt), events["q"].to_numpy())
    assert_allclose(reco.pt, 1.0 / np.abs(expected), rtol=1e-9)
    assert_array_equal(reco.q, np.sign(expected))
    assert_allclose(reco.radius, reco.pt / (PT_PER_TESLA_METRE * DETECTOR.b_field) * 1e3, rtol=1e-12)
    # the Hyper circle of the same points is another estimate, far outside that tolerance
    xc, _, radius = hyper_fit_eig(centroid[0, kept[0]], LAYER_Y[kept[0]])
    assert abs(q_over_pt_of_circle(xc, radius, centroid[0, 0]) / expected[0] - 1) > 1e-6

    _, pulls = scattering_reference(centroid, has_signal)
    worst = np.abs(np.where(has_signal, pulls, 0.0))
    lost = removed.any(axis=1)
    assert_array_equal(worst.max(axis=1) > ClassicalParams().pull_cut, lost)
    assert np.all(removed[lost, np.argmax(worst[lost], axis=1)])

    # the same clusters when the annealing filter's last refits are scattering fits
    scattering_daf = track_events(
        split.event_start,
        split.layer,
        split.strip,
        split.x,
        split.charge,
        DETECTOR,
        ClassicalParams(scattering_temperatures=3),
    )
    assert_array_equal(scattering_daf.layer_weight, reco.layer_weight)
    assert_array_equal(scattering_daf.q_over_pt, reco.q_over_pt)

    # the tables carry the same numbers (float32)
    tables = predict_classical(quiet_dataset, split="train")
    clusters = tables["clusters"]
    assert_allclose(clusters["x_reco"].to_numpy().reshape(-1, N_LAYERS), reco.x_reco.astype(np.float32))
    assert_allclose(tables["tracks"]["q_over_pt_pred"].to_numpy(), reco.q_over_pt.astype(np.float32))
    assert_allclose(tables["tracks"]["radius"].to_numpy(), reco.radius.astype(np.float32))


def test_prediction_tables_have_the_documented_rows_and_types(default_dataset):
    tables = predict_classical(default_dataset.path, split="test")
    hits = default_dataset.hits().filter(split_expr("test")).collect()
    events = default_dataset.events().filter(split_expr("test")).sort("event_id").collect()
    for name, schema in (
        ("hits", PRED_HITS_SCHEMA),
        ("clusters", PRED_CLUSTERS_SCHEMA),
        ("tracks", PRED_TRACKS_SCHEMA),
    ):
        assert tables[name].schema == pl.from_arrow(schema.empty_table()).schema, name
        assert tables[name]["model"].unique().to_list() == ["classical"]
    assert (
        tables["hits"].select("event_id", "hit_id").equals(hits.select("event_id", "hit_id").sort("event_id", "hit_id"))
    )
    assert tables["hits"]["score"].equals(tables["hits"]["weight"])
    assert set(tables["hits"]["weight"].unique().to_list()) <= {0.0, 1.0}
    assert_array_equal(tables["tracks"]["event_id"].to_numpy(), events["event_id"].to_numpy())
    clusters = tables["clusters"]
    assert_array_equal(clusters["event_id"].to_numpy(), np.repeat(events["event_id"].to_numpy(), N_LAYERS))
    assert_array_equal(clusters["layer"].to_numpy(), np.tile(np.arange(N_LAYERS), events.height))
    x_true = np.stack(events["x_true"].to_list()).astype(np.float32)
    assert_array_equal(clusters["x_true"].to_numpy().reshape(-1, N_LAYERS), x_true)
    sigma = clusters["sigma"].to_numpy()
    assert np.all(sigma >= np.float32(DETECTOR.pitch / math.sqrt(12.0)))
    empty = clusters["weight"].to_numpy() == 0
    assert np.all(clusters["x_reco"].to_numpy()[empty] == 0)
    tracks = tables["tracks"]
    ok = tracks["fit_status"].to_numpy() == STATUS_OK
    assert_allclose(
        tracks["pt_pred"].to_numpy()[ok] * tracks["q_over_pt_pred"].to_numpy()[ok],
        tracks["q_pred"].to_numpy()[ok],
        rtol=1e-6,
    )
    assert_allclose(
        tracks["pt_pred"].to_numpy()[ok], PT_PER_TESLA_METRE * tracks["radius"].to_numpy()[ok] * 1e-3, rtol=1e-6
    )


def test_resolution_beats_the_centroid_of_all_strips_the_road_alone_and_the_hyper_fit(default_dataset):
    """sigma68 of the relative q/pT residual, hit efficiency and purity, against worse reconstructions measured
    here: the Hyper fit of each layer's charge centroid of all its strips (no pattern recognition), the road
    search without the annealing filter (purity of the clusters chosen, before the final fit removes
    outliers), the Hyper fit of the clusters that the final fit keeps (no multiple scattering), and the final
    fit without outlier removal (its purity)."""
    split = "train"
    _, hits, events = _truth_centroids(default_dataset, split)
    q_over_pt_true = events["q"].to_numpy() / events["pt"].to_numpy().astype(np.float64)
    signal = hits["is_signal"].to_numpy()

    def measure(tables):
        tracks = tables["tracks"]
        ok = tracks["fit_status"].to_numpy() == STATUS_OK
        r = (tracks["q_over_pt_pred"].to_numpy().astype(np.float64) - q_over_pt_true) / q_over_pt_true
        selected = tables["hits"]["weight"].to_numpy() > 0.5
        efficiency = np.sum(selected & signal) / np.sum(signal)
        purity = np.sum(selected & signal) / np.sum(selected)
        return sigma68(r[ok]), efficiency, purity, 1.0 - ok.mean()

    tables = predict_classical(default_dataset, split)
    s68, efficiency, purity, failed = measure(tables)
    all_s68, all_efficiency, all_purity, _ = measure(
        predict_classical(default_dataset, split, ClassicalParams(max_removed=0))
    )
    road_s68, road_efficiency, road_purity, _ = measure(
        predict_classical(
            default_dataset, split, ClassicalParams(temperatures=(), restart_temperatures=(), max_removed=0)
        )
    )
    print(f"classical: sigma68={s68:.5f} efficiency={efficiency:.4f} purity={purity:.4f} failed={failed:.4f}")
    print(f"no outlier removal: sigma68={all_s68:.5f} efficiency={all_efficiency:.4f} purity={all_purity:.4f}")
    print(f"road only: sigma68={road_s68:.5f} efficiency={road_efficiency:.4f} purity={road_purity:.4f}")

    clusters = tables["clusters"]
    x_reco = clusters["x_reco"].to_numpy().astype(np.float64).reshape(-1, N_LAYERS)
    kept = clusters["weight"].to_numpy().reshape(-1, N_LAYERS) > 0.5
    hyper = np.full(len(x_reco), np.nan)
    for e in range(len(x_reco)):
        if kept[e].sum() >= 3:
            xs = x_reco[e, kept[e]]
            xc, _, radius, status = hyper_circle_fit_f64(xs, LAYER_Y[kept[e]])
            hyper[e] = q_over_pt_of_circle(xc, radius, xs[0]) if status == STATUS_OK else np.nan
    r_hyper = hyper / q_over_pt_true - 1.0
    hyper_s68 = sigma68(r_hyper[np.isfinite(r_hyper)])
    print(f"Hyper fit of the same clusters: sigma68={hyper_s68:.5f}")

    all_strips = (
        hits.with_columns(pl.col("x", "charge").cast(pl.Float64))
        .group_by("event_id", "layer")
        .agg(centroid=(pl.col("charge") * pl.col("x")).sum() / pl.col("charge").sum())
    )
    naive = {}
    for (event_id,), group in all_strips.group_by(["event_id"]):
        group = group.sort("layer")
        xs, ys = group["centroid"].to_numpy(), LAYER_Y[group["layer"].to_numpy()]
        xc, _, radius, status = hyper_circle_fit_f64(xs, ys)
        naive[event_id] = q_over_pt_of_circle(xc, radius, xs[0]) if status == STATUS_OK else np.nan
    r_naive = np.array([naive.get(e, np.nan) for e in events["event_id"].to_list()]) / q_over_pt_true - 1.0
    naive_s68 = sigma68(r_naive[np.isfinite(r_naive)])
    print(f"all-strip centroids: sigma68={naive_s68:.5f} purity={signal.mean():.4f}")

    assert s68 < naive_s68 / 5
    assert s68 < 0.95 * hyper_s68
    assert purity > all_purity > road_purity > signal.mean()
    assert all_efficiency > efficiency
    assert failed < 0.01
    assert efficiency > 0.9


def test_classical_imports_only_pipeline():
    code = (
        "import sys, classical; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'model', 'simulation', 'analysis', 'flows', 'jax'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
