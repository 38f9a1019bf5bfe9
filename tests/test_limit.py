"""The Cramér-Rao limit of q/pT (analysis/limit.py).

References: an independent linear model of the simulation built here from its own kernels
(simulation.physics.step_to_plane and highland_sigma, derivatives by central finite differences), Monte
Carlo samples of that model and of the simulation itself (generate_events), Monte Carlo samples of Gaussian
mixtures against the root-found σ68, and the pT binning of analysis.metrics.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from numpy.testing import assert_allclose

from analysis.limit import (
    PT_BIN_EDGES,
    clean_cluster_residuals,
    cramer_rao_sigma,
    event_bounds,
    highland_sigma,
    limit_table,
    mixture_sigma68,
    pt_bin_index,
    residual_summary,
)
from analysis.metrics import pt_bin_expr
from classical.gbl import fit_tracks
from pipeline.config import (
    PT_PER_TESLA_METRE,
    BackgroundConfig,
    DetectorConfig,
    MuonConfig,
    SimConfig,
    detector_material,
)
from pipeline.constants import MUON_MASS
from pipeline.dataset import open_dataset
from pipeline.stats import sigma68
from simulation.generate import generate_events
from simulation.physics import curvature, step_to_plane
from simulation.physics import highland_sigma as sim_highland

DETECTOR = DetectorConfig()
LAYER_Y = DETECTOR.layer_y()
NO_BACKGROUND = BackgroundConfig(noise_strips_per_layer=0.0, noise_clusters_per_layer=0.0, extra_tracks_per_event=0.0)


# ---- an independent linear model of the simulation ---------------------------------------------------------


def propagate(x0, theta0, kappa, kicks=None, layer_y=LAYER_Y):
    """Crossings and directions of the simulation's track (step_to_plane), with optional kicks after layers."""
    xs, thetas = np.empty(layer_y.size), np.empty(layer_y.size)
    x, theta = x0, theta0
    for k in range(layer_y.size):
        if k:
            x, theta, reached = step_to_plane(x, theta, kappa, layer_y[k] - layer_y[k - 1])
            assert reached
        xs[k], thetas[k] = x, theta
        if kicks is not None:
            theta += kicks[k]
    return xs, thetas


def linear_model(pt, q, x0, theta0, detector=DETECTOR):
    """(x_circle [L], J [L, 3] w.r.t. (x0, theta0, q/pT), G_theta [L, L] = d x_k / d kink_j times theta0_j) of
    the simulation's track, by central finite differences of its own propagation."""
    b = detector.b_field
    layer_y = detector.layer_y()
    to_kappa = PT_PER_TESLA_METRE * b / 1000.0

    def xs(p, kicks=None):
        return propagate(p[0], p[1], p[2] * to_kappa, kicks, layer_y)[0]

    p = np.array([x0, theta0, q / pt])
    x, thetas = propagate(x0, theta0, curvature(pt, q, b), None, layer_y)
    steps = np.array([1e-4, 1e-7, 1e-7])
    shifts = np.eye(3) * steps
    jac = np.stack([(xs(p + d) - xs(p - d)) / (2 * h) for d, h in zip(shifts, steps, strict=True)], axis=1)
    g = np.zeros((layer_y.size, layer_y.size))
    for j in range(layer_y.size):
        kick = np.zeros(layer_y.size)
        kick[j] = 1e-7
        g[:, j] = (xs(p, kick) - xs(p, -kick)) / 2e-7
    inside = (x >= detector.x_min) & (x <= detector.x_max)
    x_over_x0 = detector.x_over_x0 if detector.multiple_scattering else 0.0
    theta_ms = np.array([sim_highland(pt, MUON_MASS, x_over_x0 / math.cos(t)) for t in thetas]) * inside
    return x, jac, g * theta_ms[None, :]


def gls_sigma_q_over_pt(jac, g_theta, sigma, measured):
    """sqrt of the (q/pT, q/pT) entry of (J^T V^-1 J)^-1 over the measured layers, V = sigma^2 I + G G^T."""
    j, g = jac[measured], g_theta[measured]
    v = np.diag(np.broadcast_to(sigma, measured.shape)[measured] ** 2) + g @ g.T
    return math.sqrt(np.linalg.inv(j.T @ np.linalg.solve(v, j))[2, 2])


# ---- the bound -----------------------------------------------------------------------------------------------


def test_highland_equals_the_simulation():
    p = np.array([0.3, 1.0, 20.0, 50.0])
    t = np.array([0.01, 0.02, 0.01, 0.0])
    expected = [sim_highland(pi, MUON_MASS, ti) for pi, ti in zip(p, t, strict=True)]
    assert_allclose(highland_sigma(p, t), expected, rtol=1e-14)


TRACKS = [(20.0, 1, 0.0, 0.0), (35.0, -1, 120.0, -0.08), (50.0, 1, -200.0, 0.12)]


@pytest.mark.parametrize(("pt", "q", "x0", "theta0"), TRACKS)
def test_bound_equals_the_fisher_information_of_the_simulation(pt, q, x0, theta0):
    _, jac, g = linear_model(pt, q, x0, theta0)
    measured = np.ones(LAYER_Y.size, bool)
    measured[[3, 9]] = False  # two layers without a measurement keep their material
    sigma = np.linspace(0.004, 0.008, LAYER_Y.size)
    expected = gls_sigma_q_over_pt(jac, g, sigma, measured)
    got = cramer_rao_sigma(DETECTOR, pt, q, x0, theta0, sigma, measured=measured[None, :])
    assert_allclose(got, [expected], rtol=1e-6)


def test_bound_without_material_is_the_point_resolution_limit():
    thin = DetectorConfig(x_over_x0=0.0)
    _, jac, g = linear_model(30.0, 1, 10.0, 0.02, thin)
    assert np.all(g == 0)
    expected = gls_sigma_q_over_pt(jac, g, 0.005, np.ones(LAYER_Y.size, bool))
    assert_allclose(cramer_rao_sigma(thin, 30.0, 1, 10.0, 0.02, 0.005), [expected], rtol=1e-6)
    # and the same detector with scattering switched off
    off = DetectorConfig(multiple_scattering=False)
    assert_allclose(cramer_rao_sigma(off, 30.0, 1, 10.0, 0.02, 0.005), [expected], rtol=1e-6)
    # scattering costs resolution
    assert cramer_rao_sigma(DETECTOR, 30.0, 1, 10.0, 0.02, 0.005)[0] > 2 * expected


def test_bound_against_a_monte_carlo_of_the_linear_model():
    """GLS with the true V on samples of the linear Gaussian model: the spread of q/pT is the bound."""
    pt, q, x0, theta0, sigma = 25.0, -1, 50.0, 0.05, 0.005
    x, jac, g = linear_model(pt, q, x0, theta0)
    rng = np.random.default_rng(3)
    n = 20_000
    samples = x + rng.normal(size=(n, x.size)) @ g.T + rng.normal(0, sigma, (n, x.size))
    v = sigma**2 * np.eye(x.size) + g @ g.T
    estimator = np.linalg.solve(jac.T @ np.linalg.solve(v, jac), jac.T @ np.linalg.inv(v))  # [3, L]
    q_over_pt = q / pt + (samples - x) @ estimator[2]
    bound = cramer_rao_sigma(DETECTOR, pt, q, x0, theta0, sigma)[0]
    assert abs(np.std(q_over_pt) / bound - 1) < 4 / math.sqrt(2 * n)
    # plain least squares of the same samples is measurably worse
    plain = np.linalg.solve(jac.T @ jac, jac.T)[2]
    assert np.std(q / pt + (samples - x) @ plain) > 1.05 * bound


def test_bound_against_a_monte_carlo_of_the_simulation():
    """The simulation's own tracks (fixed pT, x0, angle) with Gaussian point errors, fitted by the float64
    scattering fit: the spread of the relative q/pT residual is the bound (the fit is efficient)."""
    pt, sigma = 30.0, 0.005
    config = SimConfig(
        muon=MuonConfig(pt_min=pt, pt_max=pt * (1 + 1e-9), x0_sigma=0.0, theta0_sigma=0.0),
        background=NO_BACKGROUND,
    )
    n = 12_000
    _, events = generate_events(config, 5, 0, n)
    x_true = events["x_true"].astype(np.float64)
    x = x_true + np.random.default_rng(4).normal(0, sigma, x_true.shape)
    fit = fit_tracks(x, LAYER_Y, 1.0, sigma, **detector_material(DETECTOR))
    relative = fit.q_over_pt * events["pt"] * events["q"] - 1
    bound = cramer_rao_sigma(DETECTOR, events["pt"], events["q"], events["x0"], events["theta0"], sigma)
    assert np.ptp(bound * events["pt"]) < 1e-6 * bound[0] * pt  # one track, both charges
    assert abs(np.std(relative) / (bound[0] * pt) - 1) < 4 / math.sqrt(2 * n)
    assert abs(np.mean(relative)) < 4 * bound[0] * pt / math.sqrt(n)


def test_fewer_than_three_measured_layers_have_no_bound():
    measured = np.zeros((2, LAYER_Y.size), bool)
    measured[0, :2] = True
    measured[1, [0, 8, 15]] = True
    got = cramer_rao_sigma(DETECTOR, [30.0, 30.0], [1, 1], [0.0, 0.0], [0.0, 0.0], 0.005, measured=measured)
    assert got[0] == math.inf
    assert np.isfinite(got[1])


# ---- σ68 of the mixture --------------------------------------------------------------------------------------


def test_mixture_sigma68_of_one_gaussian():
    # P(|r| < h) = 0.68 for N(0, s^2): h = sqrt(2) erfinv(0.68) s
    from scipy.special import erfinv

    assert_allclose(mixture_sigma68(np.full(7, 0.01)), math.sqrt(2) * erfinv(0.68) * 0.01, rtol=1e-10)


def test_mixture_sigma68_against_a_monte_carlo_sample():
    rng = np.random.default_rng(7)
    widths = np.exp(rng.uniform(np.log(0.005), np.log(0.02), 400))
    n_per = 1000
    sample = rng.normal(size=(widths.size, n_per)) * widths[:, None]
    exact = mixture_sigma68(widths)
    # the sample's σ68 scatters by ~1.3 / sqrt(N) of itself for these mixtures (measured over seeds)
    assert abs(sigma68(sample) / exact - 1) < 4 * 1.3 / math.sqrt(sample.size)
    # a single-width answer would be wrong: the mixture is not Gaussian
    assert abs(mixture_sigma68([np.sqrt(np.mean(widths**2))]) / exact - 1) > 0.03


def test_mixture_sigma68_failed_fits_count_outside():
    widths = np.array([0.01] * 8 + [math.inf] * 2)
    # 68 % of all events inside = 85 % of the finite ones
    from scipy.special import erfinv

    assert_allclose(mixture_sigma68(widths), math.sqrt(2) * erfinv(0.85) * 0.01, rtol=1e-9)
    assert mixture_sigma68([0.01, math.inf, math.inf]) == math.inf
    with pytest.raises(ValueError, match="non-NaN"):
        mixture_sigma68([0.01, math.nan])


def test_pt_bins_are_those_of_the_metrics():
    pt = np.array([19.99, 20.0, 24.999, 25.0, 37.5, 49.999, 50.0, 50.01])
    expected = pl.DataFrame({"pt": pt}).select(pt_bin_expr("pt"))["pt"].fill_null(-1).to_numpy()
    assert_allclose(pt_bin_index(pt), expected)
    table = limit_table(pt, np.full(pt.size, 0.01))
    assert table["bin"].to_list() == ["all", "20-25", "25-30", "30-35", "35-40", "40-45", "45-50"]
    assert table["events"].to_list() == [8, 2, 1, 0, 1, 0, 2]
    assert table["pt_lo"].to_list()[1:] == list(PT_BIN_EDGES[:-1])


# ---- on a dataset ------------------------------------------------------------------------------------------


def test_clean_cluster_resolution_and_event_bounds(tiny_dataset):
    dataset = open_dataset(tiny_dataset)
    events = dataset.events().collect()
    clean = clean_cluster_residuals(dataset.hits(), events)
    crossings = int(np.isfinite(np.asarray(events["x_true"].to_list(), np.float64)).sum())
    assert 0.8 * crossings < clean.height < crossings  # background touches some of the muon's clusters
    summary = residual_summary(clean["residual"])
    # a clean charge centroid is worth far less than a strip (pitch / sqrt(12) = 0.144 mm)
    assert 0 < summary["sigma68"] < 0.02
    assert summary["clusters"] == clean.height

    bounds = event_bounds(events, dataset.config.detector, summary["rms"])
    assert bounds.height == events.height
    assert np.all(np.isfinite(bounds["relative_sigma"].to_numpy()))
    assert_allclose(bounds["relative_sigma"], bounds["sigma_q_over_pt"] * bounds["pt"].cast(pl.Float64))


def test_clean_clusters_without_background_are_all_the_muon_crossings():
    config = SimConfig(background=NO_BACKGROUND)
    hits, events = generate_events(config, 2, 0, 200)
    events_df = pl.DataFrame({"event_id": events["event_id"], "x_true": events["x_true"].tolist()})
    clean = clean_cluster_residuals(pl.DataFrame(hits), events_df)
    assert clean.height >= 0.99 * np.isfinite(events["x_true"]).sum()
    # the residuals are those of the centroid of every strip of the layer (there is nothing else)
    one = clean.row(0, named=True)
    h = pl.DataFrame(hits).filter((pl.col("event_id") == one["event_id"]) & (pl.col("layer") == one["layer"]))
    centroid = float((h["x"].cast(pl.Float64) * h["charge"]).sum() / h["charge"].cast(pl.Float64).sum())
    assert_allclose(one["x_centroid"], centroid, rtol=1e-12)


def test_the_limit_row_of_an_evaluation(tiny_dataset):
    """analysis.metrics.resolution_limit: the bound of the given events with the point resolution of their own
    clean clusters; events crossing fewer than three layers are left out and counted, as failed fits are."""
    from analysis.metrics import resolution_limit, with_limit_ratio

    dataset = open_dataset(tiny_dataset)
    events = dataset.events().sort("event_id").collect()
    chosen = events["event_id"].to_numpy()[::2]
    # two of the chosen events keep only two measured layers
    cut = set(chosen[:2].tolist())
    two_layers = [
        [x if (layer < 2 or event_id not in cut) else math.nan for layer, x in enumerate(xs)]
        for event_id, xs in zip(events["event_id"].to_list(), events["x_true"].to_list(), strict=True)
    ]
    events = events.with_columns(pl.Series("x_true", two_layers, dtype=pl.List(pl.Float32)))
    limit = resolution_limit(chosen, dataset.hits(), events.lazy(), DETECTOR)
    assert (limit.n_events, limit.n_unbounded) == (chosen.size, 2)
    row = limit.resolution.row(0, named=True)
    assert (row["model"], row["n_tracks"], row["n_failed"], row["n"]) == ("limit", chosen.size, 2, chosen.size - 2)
    assert row["sigma68_err"] is None
    # the same numbers from the module's parts on the chosen events
    selected = events.filter(pl.col("event_id").is_in(chosen.tolist()))
    hits = dataset.hits().filter(pl.col("event_id").is_in(chosen.tolist()))
    point = residual_summary(clean_cluster_residuals(hits, selected)["residual"])
    assert (limit.point_sigma, limit.clusters) == (point["rms"], point["clusters"])
    bounds = event_bounds(selected, DETECTOR, point["rms"])["relative_sigma"].to_numpy()
    assert np.isinf(bounds).sum() == 2
    assert limit.sigma68 == mixture_sigma68(bounds[np.isfinite(bounds)])
    assert limit.resolution_pt["n"].sum() == chosen.size - 2
    # the ratio of every row to it
    table = pl.concat(
        [limit.resolution, limit.resolution.with_columns(model=pl.lit("e2e"), sigma68=0.02, sigma68_err=0.001)]
    )
    ratios = with_limit_ratio(table)
    assert ratios["sigma68_over_limit"].to_list() == [1.0, 0.02 / limit.sigma68]
    assert ratios["sigma68_over_limit_err"].to_list() == [None, 0.001 / limit.sigma68]
    assert with_limit_ratio(table.slice(1))["sigma68_over_limit"].to_list() == [None]
    # what it needs
    with pytest.raises(ValueError, match="lack the columns x0, theta0"):
        resolution_limit(chosen, dataset.hits(), events.drop("x0", "theta0").lazy(), DETECTOR)
    with pytest.raises(ValueError, match="17 layers"):
        resolution_limit(chosen, dataset.hits(), events.lazy(), DetectorConfig(layers_per_station=(8, 4, 5)))
