"""The scattering-aware track fit: float64 Numba (classical/gbl.py) and JAX (model/scattering_fit.py).

References: an independent Gauss-Newton GLS with the explicit covariance V = diag(sigma^2 / w) + G Θ^2 G^T of
the simulation's own linear model (tests.test_limit.linear_model: the simulation's propagation and Highland
formula, derivatives by finite differences), refits without a layer for the pulls, Monte Carlo toys of the
linear model against the Cramér-Rao bound (analysis.limit), simulated tracks (generate_events: the truth
crossings plus Gaussian point errors) for the pulls, the float64 fit for the JAX fit, and central finite
differences in float64 for the gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from analysis.limit import cramer_rao_sigma, pt_bin_index
from classical.gbl import fit_tracks
from model.scattering_fit import scattering_fit
from pipeline.config import SimConfig, detector_material
from pipeline.schema import STATUS_NONFINITE, STATUS_OK, STATUS_TOO_FEW_LAYERS
from simulation.generate import generate_events
from tests.helpers import central_differences
from tests.test_limit import DETECTOR, LAYER_Y, NO_BACKGROUND, linear_model, propagate

MATERIAL = detector_material(DETECTOR)
N_LAYERS = LAYER_Y.size


def gls_reference(x, w, sigma, q_over_pt, x0, theta0, iterations=6):
    """Gauss-Newton GLS of the measurements ``x`` (weights ``w``) on the simulation's linear model, with V
    written out: ``(q/pT, its variance, chi2, smoothed crossings, their variances)``. The smoothed crossings
    are the posterior mean of the true crossings tau = x_circle + G beta given the measurements."""
    p = np.array([x0, theta0, q_over_pt], np.float64)
    sigma = np.broadcast_to(sigma, x.shape)
    used = w > 0
    for _ in range(iterations):
        x_circle, jac, g = linear_model(1 / abs(p[2]), np.sign(p[2]), p[0], p[1])
        s = g @ g.T
        v = s[np.ix_(used, used)] + np.diag(sigma[used] ** 2 / w[used])
        vinv_j = np.linalg.solve(v, jac[used])
        cov = np.linalg.inv(jac[used].T @ vinv_j)
        r = (x - x_circle)[used]
        step = cov @ (vinv_j.T @ r)
        p = p + step
    x_circle, jac, g = linear_model(1 / abs(p[2]), np.sign(p[2]), p[0], p[1])
    s = g @ g.T
    v = s[np.ix_(used, used)] + np.diag(sigma[used] ** 2 / w[used])
    vinv = np.linalg.inv(v)
    cov = np.linalg.inv(jac[used].T @ vinv @ jac[used])
    r = (x - x_circle)[used]
    s_all_used = s[:, used]
    smoothed = x_circle + s_all_used @ vinv @ r
    b = jac - s_all_used @ vinv @ jac[used]
    variance = np.diag(s - s_all_used @ vinv @ s_all_used.T + b @ cov @ b.T)
    return p[2], cov[2, 2], float(r @ vinv @ r), smoothed, variance


def toy_track(seed, sigma=0.005):
    """A simulated track (x0, theta0, q/pT) with scattering kicks drawn from the linear model, measured with
    Gaussian errors ``sigma``."""
    rng = np.random.default_rng(seed)
    pt, q = rng.uniform(20, 50), rng.choice([-1.0, 1.0])
    x0, theta0 = rng.normal(0, 100), rng.normal(0, 0.05)
    x_circle, _, g = linear_model(pt, q, x0, theta0)
    x = x_circle + g @ rng.normal(size=N_LAYERS) + rng.normal(0, 1, N_LAYERS) * sigma
    return x, q / pt, x0, theta0


# ---- the float64 fit is the GLS estimator ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_fit_equals_the_gls_estimator_with_the_covariance_written_out(seed):
    x, q_over_pt, x0, theta0 = toy_track(seed)
    rng = np.random.default_rng(10 + seed)
    w = np.ones(N_LAYERS)
    w[rng.choice(N_LAYERS, 3, replace=False)] = 0.0  # removed measurements keep their material
    w[rng.choice(np.flatnonzero(w), 2, replace=False)] = 0.5
    sigma = rng.uniform(0.004, 0.01, N_LAYERS)
    x = np.where(w > 0, x, np.nan)  # a removed measurement may be NaN
    fit = fit_tracks(x, LAYER_Y, w, sigma, **MATERIAL)
    assert fit.status == STATUS_OK
    ref_q, ref_var, ref_chi2, ref_smoothed, ref_variance = gls_reference(x, w, sigma, q_over_pt, x0, theta0)
    assert_allclose(fit.q_over_pt, ref_q, rtol=1e-8)
    assert_allclose(fit.var_q_over_pt, ref_var, rtol=1e-6)
    assert_allclose(fit.chi2, ref_chi2, rtol=1e-6)
    assert_allclose(fit.x_fit, ref_smoothed, atol=1e-8)
    assert_allclose(fit.x_fit_variance, ref_variance, rtol=1e-5)
    # the plain least-squares circle is another estimate, far outside these tolerances
    plain = fit_tracks(x, LAYER_Y, w, sigma, **{**MATERIAL, "x_over_x0": 0.0})
    assert abs(plain.q_over_pt - ref_q) > 1e-6 * abs(ref_q)


def test_pulls_are_leave_one_out_residuals():
    x, *_ = toy_track(5)
    w = np.ones(N_LAYERS)
    w[4] = 0.5
    w[11] = 0.0
    sigma = 0.006
    fit = fit_tracks(x, LAYER_Y, w, sigma, **MATERIAL)
    for layer in (2, 4, 11, 15):  # weight 1, 1/2, 0, and the last layer
        without = w.copy()
        without[layer] = 0.0
        loo = fit_tracks(x, LAYER_Y, without, sigma, **MATERIAL)
        expected = (x[layer] - loo.x_fit[layer]) / math.sqrt(sigma**2 + loo.x_fit_variance[layer])
        # equal for the linear model; the refit's own pT sets its theta0, which moves it by ~1e-5
        assert_allclose(fit.pull[layer], expected, rtol=3e-4)
        assert abs(expected) > 0.05


def test_exact_circles_without_material_are_recovered():
    thin = {**MATERIAL, "x_over_x0": 0.0}
    for pt, q, x0, theta0 in [(20.0, 1, -300.0, 0.15), (50.0, -1, 10.0, -0.1), (200.0, 1, 0.0, 0.0)]:
        x, _ = propagate(x0, theta0, q * 0.299792458e-3 / pt)
        fit = fit_tracks(x, LAYER_Y, 1.0, 0.005, **thin)
        assert_allclose(fit.q_over_pt, q / pt, rtol=1e-9)
        assert_allclose(fit.x_fit, x, atol=1e-9)
        assert fit.chi2 < 1e-12
        # with material the kinks fitted to an exact circle are zero, and so is the change
        fit = fit_tracks(x, LAYER_Y, 1.0, 0.005, **MATERIAL)
        assert_allclose(fit.q_over_pt, q / pt, rtol=1e-9)
        assert np.all(np.abs(fit.kink) < 1e-12)


def test_spread_over_linear_toys_is_the_bound():
    """Toys of the linear Gaussian model around one track: the fit's q/pT scatters by the Cramér-Rao bound,
    the plain least-squares circle of the same toys by more, and the fit's own variance is the bound."""
    pt, q, x0, theta0, sigma = 28.0, 1.0, -40.0, 0.03, 0.005
    x_circle, _, g = linear_model(pt, q, x0, theta0)
    n = 20_000
    rng = np.random.default_rng(21)
    x = x_circle + rng.normal(size=(n, N_LAYERS)) @ g.T + rng.normal(0, sigma, (n, N_LAYERS))
    fit = fit_tracks(x, LAYER_Y, 1.0, sigma, **MATERIAL)
    plain = fit_tracks(x, LAYER_Y, 1.0, sigma, **{**MATERIAL, "x_over_x0": 0.0})
    bound = cramer_rao_sigma(DETECTOR, pt, q, x0, theta0, sigma)[0]
    tolerance = 4 / math.sqrt(2 * n)
    assert abs(np.std(fit.q_over_pt) / bound - 1) < tolerance
    assert abs(np.mean(fit.q_over_pt) - q / pt) < 4 * bound / math.sqrt(n)
    assert np.std(plain.q_over_pt) / bound > 1 + 3 * tolerance
    assert_allclose(np.median(np.sqrt(fit.var_q_over_pt)), bound, rtol=0.01)


@pytest.mark.parametrize("sigma", [0.005, 0.05])
def test_pulls_have_unit_width_on_simulated_tracks(sigma):
    """The truth crossings of the simulation plus Gaussian point errors: the q/pT pulls have unit width in
    every pT bin, and so do the layer pulls; chi2 / ndf is 1."""
    n = 15_000
    _, events = generate_events(SimConfig(background=NO_BACKGROUND), 8, 0, n)
    x_true = events["x_true"].astype(np.float64)
    x = x_true + np.random.default_rng(9).normal(0, sigma, x_true.shape)
    w = np.isfinite(x).astype(np.float64)
    fit = fit_tracks(x, LAYER_Y, w, sigma, **MATERIAL)
    assert np.all(fit.status == STATUS_OK)
    truth = events["q"] / events["pt"].astype(np.float64)
    pull = (fit.q_over_pt - truth) / np.sqrt(fit.var_q_over_pt)
    bins = pt_bin_index(events["pt"])
    for b in range(6):
        in_bin = pull[bins == b]
        assert in_bin.size > 2000
        assert 0.95 < np.std(in_bin) < 1.05, (b, np.std(in_bin))
        assert abs(np.mean(in_bin)) < 4 / math.sqrt(in_bin.size)
    layer_pulls = fit.pull[w > 0]
    assert 0.98 < np.std(layer_pulls) < 1.02
    ndf = w.sum(axis=1) - 3
    assert abs(fit.chi2.sum() / ndf.sum() - 1) < 4 * math.sqrt(2 / ndf.sum())


def test_outliers_are_removed_worst_first():
    x, q_over_pt, *_ = toy_track(31)
    clean = fit_tracks(x, LAYER_Y, 1.0, 0.005, **MATERIAL, pull_cut=5.0, max_removed=4)
    assert clean.removed == 0
    assert np.all(clean.weight == 1.0)
    bad = x.copy()
    bad[[6, 12]] += [0.3, -0.2]  # two merged clusters, off by tenths of a millimetre
    fit = fit_tracks(bad, LAYER_Y, 1.0, 0.005, **MATERIAL, pull_cut=5.0, max_removed=4)
    assert fit.removed == 2
    assert np.flatnonzero(fit.weight == 0).tolist() == [6, 12]
    expected = fit_tracks(bad, LAYER_Y, fit.weight, 0.005, **MATERIAL)
    assert_allclose(fit.q_over_pt, expected.q_over_pt, rtol=1e-12)
    assert abs(fit.q_over_pt / q_over_pt - 1) < 0.05
    # at most max_removed, and never below four layers
    capped = fit_tracks(bad, LAYER_Y, 1.0, 0.005, **MATERIAL, pull_cut=5.0, max_removed=1)
    assert capped.removed == 1
    few = np.zeros(N_LAYERS)
    few[[0, 6, 12, 15]] = 1.0
    assert fit_tracks(bad, LAYER_Y, few, 0.005, **MATERIAL, pull_cut=5.0, max_removed=4).removed == 0


def test_status_of_the_float64_fit():
    x, *_ = toy_track(2)
    w = np.zeros(N_LAYERS)
    w[[0, 15]] = 1.0
    two = fit_tracks(x, LAYER_Y, w, 0.005, **MATERIAL)
    assert two.status == STATUS_TOO_FEW_LAYERS
    assert np.isfinite(two.q_over_pt)
    nan = x.copy()
    nan[3] = np.nan
    assert fit_tracks(nan, LAYER_Y, 1.0, 0.005, **MATERIAL).status == STATUS_NONFINITE
    w = np.ones(N_LAYERS)
    w[3] = 0.0
    assert fit_tracks(nan, LAYER_Y, w, 0.005, **MATERIAL).status == STATUS_OK
    with pytest.raises(ValueError, match="steps"):
        fit_tracks(x, LAYER_Y, 1.0, 0.005, **MATERIAL, steps=0)


# ---- the JAX fit -----------------------------------------------------------------------------------------------


@jax.jit
@jax.vmap
def _jax_fit(x, w, sigma):
    return scattering_fit(x, LAYER_Y, w, sigma, **MATERIAL)


def _simulated_measurements(n, seed, sigma=0.005):
    """float32-rounded truth crossings plus noise, with some removed (NaN) and half-weighted layers, as
    float64 arrays (x, w, sigma [n, L]) and the truth q/pT."""
    _, events = generate_events(SimConfig(background=NO_BACKGROUND), seed, 0, n)
    rng = np.random.default_rng(seed)
    x_true = events["x_true"].astype(np.float64)
    x = (x_true + rng.normal(0, sigma, x_true.shape)).astype(np.float32).astype(np.float64)
    w = np.isfinite(x).astype(np.float64)
    w[rng.random(w.shape) < 0.1] = 0.0
    w[rng.random(w.shape) < 0.1] *= 0.5
    x = np.where(w > 0, x, np.nan)
    sigmas = np.broadcast_to(rng.uniform(0.8, 1.2, N_LAYERS) * sigma, x.shape).copy()
    return x, w, sigmas, events["q"] / events["pt"].astype(np.float64)


@pytest.mark.slow
def test_jax_fit_agrees_with_the_float64_fit():
    x, w, sigma, _ = _simulated_measurements(300, 12)
    reference = fit_tracks(x, LAYER_Y, w, sigma, **MATERIAL)
    assert np.all(reference.status == STATUS_OK)
    got = _jax_fit(*(np.asarray(v, np.float32) for v in (x, w, sigma)))
    assert np.all(np.asarray(got.status) == STATUS_OK)
    # float32: x itself is rounded to 3e-5 mm, 0.6 % of the point error
    assert_allclose(np.asarray(got.q_over_pt), reference.q_over_pt, rtol=1e-3)
    assert np.median(np.abs(np.asarray(got.q_over_pt) / reference.q_over_pt - 1)) < 2e-5
    assert_allclose(np.asarray(got.var_q_over_pt), reference.var_q_over_pt, rtol=1e-2)
    assert_allclose(np.asarray(got.chi2), reference.chi2, rtol=1e-2, atol=1e-2)
    assert_allclose(np.asarray(got.x_fit), reference.x_fit, atol=2e-4)
    assert_allclose(np.asarray(got.pull), reference.pull, atol=0.05)
    # float64 under x64: the same numbers to rounding
    with jax.enable_x64(True):
        got64 = _jax_fit(x, w, sigma)
        for name in ("q_over_pt", "var_q_over_pt", "chi2", "x_fit", "x_circle", "pull", "kink", "theta0"):
            expected = getattr(reference, name)
            assert_allclose(np.asarray(getattr(got64, name)), expected, rtol=1e-8, atol=1e-9 * np.abs(expected).max())
        assert np.asarray(got64.q_over_pt).dtype == np.float64


def _objective(x, w, sigma):
    """Every output at once: q/pT, its variance, chi2, the crossings and the pulls (weighted to O(1))."""
    fit = scattering_fit(x, LAYER_Y, w, sigma, **MATERIAL)
    ramp = jnp.linspace(0.5, 1.5, N_LAYERS)
    return (
        fit.q_over_pt * 30
        + fit.var_q_over_pt * 1e5
        + fit.chi2 * 1e-2
        + jnp.sum(ramp * (fit.x_fit - x[0])) * 1e-2
        + jnp.sum(ramp * fit.pull) * 1e-1
    )


_objective_jit = jax.jit(_objective)
_objective_grad = jax.jit(jax.grad(_objective, argnums=(0, 1, 2)))


def _degenerate(case):
    x, *_ = toy_track(40)
    w = np.ones(N_LAYERS)
    if case == "three_layers":
        w[:] = 0.0
        w[[0, 9, 15]] = 1.0
    elif case == "empty_layers":
        w[[1, 2, 8, 13]] = 0.0
        w[[5, 6]] = 0.3
    elif case == "two_layers":
        w[:] = 0.0
        w[[3, 12]] = 1.0
    elif case == "one_layer":
        w[:] = 0.0
        w[7] = 1.0
    elif case == "all_zero":
        w[:] = 0.0
    return x, w, np.full(N_LAYERS, 0.006)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["normal", "three_layers", "empty_layers"])
def test_gradients_equal_finite_differences_float64(case):
    x, w, sigma = _degenerate(case)
    if case == "normal":
        w[[4, 10]] = 0.6
    with jax.enable_x64(True):
        grads = _objective_grad(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sigma))
        for argnum, (grad, h) in enumerate(zip(grads, (1e-6, 1e-6, 1e-8), strict=True)):
            # w = 0 is the edge of the weights' domain (negative weights count as 0): no central difference there
            skip = w == 0 if argnum == 1 else None
            expected = central_differences(_objective_jit, (x, w, sigma), argnum, h, skip)
            got = np.where(skip, 0.0, np.asarray(grad)) if skip is not None else np.asarray(grad)
            assert np.abs(expected).max() > 0
            assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


_objective_grad_f32 = jax.jit(jax.value_and_grad(_objective, argnums=(0, 1, 2)))
_fit_one = jax.jit(lambda x, w, sigma: scattering_fit(x, LAYER_Y, w, sigma, **MATERIAL))
_q_over_pt_grad_x = jax.jit(jax.grad(lambda x, w, sigma: scattering_fit(x, LAYER_Y, w, sigma, **MATERIAL).q_over_pt))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["three_layers", "empty_layers", "two_layers", "one_layer", "all_zero"])
def test_degenerate_inputs_give_finite_values_and_gradients(case):
    x, w, sigma = _degenerate(case)
    x = np.where(w > 0, x, np.nan)  # removed measurements as NaN
    x32, w32, s32 = (jnp.asarray(v, jnp.float32) for v in (x, w, sigma))
    fit = _fit_one(x32, w32, s32)
    for name, value in fit._asdict().items():
        assert np.all(np.isfinite(np.asarray(value))), name
    expected_status = STATUS_OK if case in ("three_layers", "empty_layers") else STATUS_TOO_FEW_LAYERS
    assert int(fit.status) == expected_status
    value, grads = _objective_grad_f32(jnp.where(jnp.isnan(x32), 0.0, x32), w32, s32)
    assert np.isfinite(float(value))
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad)))
    # NaN where the weight is 0 gets a zero, not a NaN, gradient
    grad_x = _q_over_pt_grad_x(x32, w32, s32)
    assert np.all(np.isfinite(np.asarray(grad_x)))
    assert np.all(np.asarray(grad_x)[w == 0] == 0)


def test_jax_status_of_non_finite_input():
    x, w, _ = _degenerate("normal")
    x[2] = np.nan
    fit = _fit_one(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.full(N_LAYERS, 0.006, jnp.float32))
    assert int(fit.status) == STATUS_NONFINITE
    assert float(fit.q_over_pt) == 0.0
    with pytest.raises(ValueError, match="steps"):
        scattering_fit(x, LAYER_Y, w, 0.006, **MATERIAL, steps=0)
