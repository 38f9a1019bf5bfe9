"""Numba simulation kernels against slow independent references, and the contract of generate_events."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from pipeline.config import BackgroundConfig, DetectorConfig, MuonConfig, SimConfig
from pipeline.errors import ConfigError
from pipeline.schema import EVENTS_SCHEMA, HITS_SCHEMA
from simulation import digitisation, physics, rng
from simulation.generate import EVENT_DTYPES, HIT_DTYPES, event_seed, generate_events
from simulation.rng import rng_normal
from tests.sim_reference import (
    circle_crossings_ref,
    digitise_ref,
    event_seed_ref,
    gaussian_strip_fraction_quad,
    highland_ref,
    splitmix64_mix_ref,
    strip_fraction_erf,
)

LAYER_Y = DetectorConfig().layer_y()


# ---- random numbers ------------------------------------------------------------------------------------


def test_splitmix64_reproduces_reference_sequence():
    # first outputs of SplitMix64 seeded with 0 (Vigna's splitmix64.c), via the kernel generator
    state = np.zeros(1, dtype=np.uint64)
    got = [int(rng.rng_next(state)) for _ in range(3)]
    assert got == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    # and the pure-Python reference agrees on arbitrary inputs
    for z in (0, 1, 12345, 2**63 + 7, 2**64 - 1):
        assert int(rng.splitmix64_mix(np.uint64(z))) == splitmix64_mix_ref(z)


def test_event_seed_matches_reference():
    for seed, event_id in [(0, 0), (0, 1), (1, 0), (42, 123_456), (2**64 - 1, 2**62), (7, 2**63 - 2)]:
        assert event_seed(seed, event_id) == event_seed_ref(seed, event_id)
    seeds = {event_seed(3, i) for i in range(5000)}
    assert len(seeds) == 5000  # a bijection of event_id for a fixed seed
    assert event_seed(3, 10) != event_seed(4, 10)


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True])
def test_event_seed_rejects_bad_seed(bad):
    with pytest.raises(ConfigError, match="seed"):
        event_seed(bad, 0)


@numba.njit
def _draw(kind, param, n, seed):
    state = np.full(1, seed, dtype=np.uint64)
    out = np.empty(n)
    for i in range(n):
        if kind == 0:
            out[i] = rng.rng_uniform(state)
        elif kind == 1:
            out[i] = rng.rng_normal(state)
        elif kind == 2:
            out[i] = rng.rng_exponential(state)
        elif kind == 3:
            out[i] = rng.rng_gamma(state, param)
        elif kind == 4:
            out[i] = rng.rng_poisson(state, param)
        else:
            out[i] = rng.rng_integer(state, int(param))
    return out


@pytest.mark.parametrize(
    ("kind", "param", "mean", "var"),
    [
        (0, 0.0, 0.5, 1.0 / 12.0),
        (1, 0.0, 0.0, 1.0),
        (2, 0.0, 1.0, 1.0),
        (3, 1.0 / 0.3**2, 1.0 / 0.3**2, 1.0 / 0.3**2),  # gamma: mean = var = shape
        (3, 0.5, 0.5, 0.5),  # the shape < 1 branch
        (4, 0.25, 0.25, 0.25),
        (4, 3.0, 3.0, 3.0),
        (4, 40.0, 40.0, 40.0),  # the PTRS branch
        (5, 7.0, 3.0, (49.0 - 1.0) / 12.0),  # uniform integer in [0, 7)
    ],
)
def test_random_distributions_have_their_moments(kind, param, mean, var):
    n = 200_000
    x = _draw(kind, param, n, 12345)
    # 5 standard errors of the sample mean and (roughly) of the sample variance
    assert abs(x.mean() - mean) < 5.0 * math.sqrt(var / n)
    assert abs(x.var() - var) < 5.0 * var * math.sqrt(3.0 / n) + 0.02 * var
    if kind in (4, 5):
        assert_array_equal(x, np.round(x))
        assert x.min() >= 0
    if kind == 5:
        assert x.max() == param - 1


# ---- scalar physics kernels ----------------------------------------------------------------------------


def test_curvature_sign_and_radius():
    # R = pT / (0.3 B): 30 GeV in 1 T -> 100.07 m; positive charges bend towards +x (kappa > 0)
    kappa = physics.curvature(30.0, 1, 1.0)
    assert_allclose(1.0 / kappa, 1000.0 * 30.0 / 0.299792458, rtol=1e-14)
    assert physics.curvature(30.0, -1, 1.0) == -kappa


def test_step_to_plane_is_the_straight_line_without_field():
    x, theta, reached = physics.step_to_plane(3.0, 0.2, 0.0, 100.0)
    assert reached
    assert_allclose(x, 3.0 + 100.0 * math.tan(0.2), rtol=1e-14)
    assert_allclose(theta, 0.2, rtol=1e-14)


def test_step_to_plane_stops_curlers_and_backward_tracks():
    # R = 1 m: a plane 1.5 m further is beyond the circle's top
    _, _, reached = physics.step_to_plane(0.0, 0.0, 1e-3, 1500.0)
    assert not reached
    _, _, reached = physics.step_to_plane(0.0, 2.0, 0.0, 10.0)  # moving towards -y
    assert not reached


def test_track_crossings_match_closed_form_circle():
    rng = np.random.default_rng(7)
    n_curlers = 0
    for _ in range(200):
        pt = float(np.exp(rng.uniform(math.log(0.2), math.log(60.0))))  # log-uniform: curlers and stiff tracks
        q = int(rng.choice([-1, 1]))
        x0 = float(rng.normal(0.0, 200.0))
        theta0 = float(rng.uniform(-0.3, 0.3))
        b = float(rng.uniform(0.5, 2.0))
        got = physics.track_crossings(x0, theta0, pt, q, b, LAYER_Y)
        want = circle_crossings_ref(x0, theta0, pt, q, b, LAYER_Y)
        assert_array_equal(np.isnan(got), np.isnan(want))
        assert_allclose(got, want, rtol=0, atol=1e-7, equal_nan=True)
        n_curlers += int(np.isnan(want).any())
    assert n_curlers > 0  # low-pT tracks that curl inside the detector were exercised


def test_highland_sigma_matches_pdg_formula():
    for p in (0.3, 1.0, 20.0, 50.0):
        for x in (0.001, 0.01, 0.05):
            assert_allclose(physics.highland_sigma(p, physics.MUON_MASS, x), highland_ref(p, x), rtol=1e-12)
    assert physics.highland_sigma(20.0, physics.MUON_MASS, 0.0) == 0.0


def test_gaussian_cdf_matches_erfc():
    z = np.concatenate([np.linspace(-9.0, 9.0, 20_001), np.random.default_rng(3).uniform(-8.5, 8.5, 20_000)])
    got = np.array([digitisation.gaussian_cdf(v) for v in z])
    want = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in z])
    assert_allclose(got, want, rtol=0, atol=1e-9)
    assert np.all(np.diff(got[:20_001]) >= -2e-16)  # monotonic up to rounding


def test_strip_charge_fraction_matches_quadrature():
    rng = np.random.default_rng(11)
    for _ in range(200):
        lo = float(rng.uniform(-2.0, 2.0))
        hi = lo + float(rng.uniform(0.01, 1.0))
        centre = float(rng.uniform(-2.0, 2.0))
        sigma = float(rng.uniform(0.1, 1.0))
        got = digitisation.strip_charge_fraction(lo, hi, centre, sigma)
        assert_allclose(got, gaussian_strip_fraction_quad(lo, hi, centre, sigma), rtol=0, atol=1e-9)


def test_cluster_strip_charges_match_erf_reference():
    det = DetectorConfig()
    sigma, pitch = det.charge_sigma, det.pitch
    half = digitisation.charge_half_window(sigma, pitch)
    assert half * pitch >= digitisation.CHARGE_WINDOW_SIGMAS * sigma - 1e-9
    rng = np.random.default_rng(5)
    centres = np.concatenate([rng.uniform(det.x_min, det.x_max, 300), [det.x_min + 0.1, det.x_max - 0.01, 0.0]])
    out = np.empty(2 * half + 1)
    for xc in centres:
        total = float(rng.uniform(0.5, 2.0))
        first, n = digitisation.cluster_strip_charges(xc, total, det.x_min, pitch, det.n_strips, sigma, half, out)
        centre_strip = math.floor((xc - det.x_min) / pitch)
        want_first = max(centre_strip - half, 0)
        want_last = min(centre_strip + half, det.n_strips - 1)
        assert (first, n) == (want_first, want_last - want_first + 1)
        want = [
            total * strip_fraction_erf(det.x_min + s * pitch, det.x_min + (s + 1) * pitch, xc, sigma)
            for s in range(want_first, want_last + 1)
        ]
        assert_allclose(out[:n], want, rtol=0, atol=1e-9 * total)
        if want_first > 0 and want_last < det.n_strips - 1:
            # the window holds everything but the tails beyond CHARGE_WINDOW_SIGMAS
            assert_allclose(out[:n].sum(), total, rtol=1e-5)


# ---- digitisation --------------------------------------------------------------------------------------


def _random_sources(rng, n_layers, n_strips, sigma, pitch):
    """Overlapping clusters (muon, extra tracks: at most one per layer each; noise: any number) plus noise
    strips, in a deliberately shuffled order."""
    half = digitisation.charge_half_window(sigma, pitch)
    buf = np.empty(2 * half + 1)
    sources = []
    for layer in range(n_layers):
        base = float(rng.uniform(1.0, n_strips * pitch - 1.0))
        particles = [0, *[k for k in (1, 2, 3) if rng.random() < 0.6], *[-1] * int(rng.integers(0, 3))]
        for particle in particles:
            xc = base + float(rng.normal(0.0, 1.0))
            first, n = digitisation.cluster_strip_charges(
                xc, float(rng.gamma(11.0) / 11.0), 0.0, pitch, n_strips, sigma, half, buf
            )
            if n:
                sources.append((layer, first, buf[:n].copy(), particle))
        for _ in range(int(rng.integers(0, 3))):
            strip = int(rng.integers(0, n_strips))
            sources.append((layer, strip, np.array([0.02 + rng.exponential(0.1)]), -1))
    order = rng.permutation(len(sources))
    return [sources[i] for i in order]


def _digitise(sources, n_strips, threshold, noise_sigma=0.0, crosstalk=0.0, state=None):
    """digitise_sources on ``sources`` ((layer, first strip, charges, particle) tuples): the hit columns."""
    layers, firsts, charges, particles = zip(*sources, strict=True)
    lengths = np.array([len(c) for c in charges])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    capacity = int(lengths.sum())
    hits = {
        "layer": np.empty(capacity, np.int16),
        "strip": np.empty(capacity, np.int32),
        "charge": np.empty(capacity, np.float64),
        "charge_muon": np.empty(capacity, np.float64),
        "is_signal": np.empty(capacity, np.bool_),
        "particle_id": np.empty(capacity, np.int32),
    }
    n_hits = digitisation.digitise_sources(
        digitisation.Sources(
            key=np.array(layers, dtype=np.int64) * n_strips + np.array(firsts, dtype=np.int64),
            length=lengths.astype(np.int64),
            particle=np.array(particles, dtype=np.int64),
            offset=offsets.astype(np.int64),
            deposit=np.concatenate(charges),
            order=np.empty(len(sources), dtype=np.int64),
        ),
        len(sources),
        n_strips,
        threshold,
        noise_sigma,
        crosstalk,
        np.zeros(1, np.uint64) if state is None else state,
        digitisation.new_strip_sums(capacity),
        digitisation.HitColumns(**hits),
    )
    return {name: column[:n_hits] for name, column in hits.items()}


def _assert_hits_equal(got, want, rtol=1e-12):
    assert len(got["layer"]) == len(want["layer"])
    for name in ("layer", "strip", "is_signal", "particle_id"):
        assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("charge", "charge_muon"):
        assert_allclose(got[name], want[name], rtol=rtol, atol=1e-15, err_msg=name)


def test_digitise_sources_matches_dense_accumulation():
    rng = np.random.default_rng(2024)
    n_layers, n_strips, sigma, pitch, threshold = 6, 40, 1.0 / 3.0, 0.5, 0.0115
    for _ in range(30):
        sources = _random_sources(rng, n_layers, n_strips, sigma, pitch)
        got = _digitise(sources, n_strips, threshold)
        want = digitise_ref(*zip(*sources, strict=True), n_layers, n_strips, threshold)
        _assert_hits_equal(got, want)
        # the sample must exercise overlaps between different particles, and merged strips the muon shares
        assert len(set(want["particle_id"].tolist())) >= 3
        assert np.any((want["particle_id"] != 0) & (want["charge_muon"] > 0))
        # charge_muon: the muon's whole charge on a strip only it touched, 0 where it gave none
        assert np.all(want["charge_muon"] <= want["charge"] + 1e-15)


def test_digitise_sources_with_crosstalk_and_noise_matches_the_dense_reference():
    """Cross-talk, electronic noise drawn strip by strip from the event's generator and tail sources (-2),
    against the dense reference fed with the same draws in the same (layer, strip) order."""
    rng = np.random.default_rng(77)
    n_layers, n_strips, sigma, pitch = 6, 40, 1.0 / 3.0, 0.5
    noise_sigma, crosstalk, threshold = 0.05, 0.05, 0.15
    fired_noise_only = 0
    for trial in range(30):
        sources = _random_sources(rng, n_layers, n_strips, sigma, pitch)
        for _ in range(3):  # tail strips: their charge is their noise, above threshold
            sources.append((int(rng.integers(0, n_layers)), int(rng.integers(0, n_strips)), np.array([0.2]), -2))
        state = np.array([event_seed(5, trial)], np.uint64)
        got = _digitise(sources, n_strips, threshold, noise_sigma, crosstalk, state)
        replay = np.array([event_seed(5, trial)], np.uint64)
        want = digitise_ref(
            *zip(*sources, strict=True),
            n_layers,
            n_strips,
            threshold,
            crosstalk=crosstalk,
            noise=lambda replay=replay: noise_sigma * rng_normal(replay),
        )
        _assert_hits_equal(got, want, rtol=1e-9)
        assert state[0] == replay[0]  # the same number of draws
        fired_noise_only += int(np.sum((want["particle_id"] == -1) & (want["charge_muon"] == 0)))
    assert fired_noise_only > 0


def test_zero_noise_and_crosstalk_leave_the_generator_untouched():
    rng = np.random.default_rng(3)
    sources = _random_sources(rng, 4, 40, 1.0 / 3.0, 0.5)
    state = np.array([12345], np.uint64)
    _digitise(sources, 40, 0.0115, 0.0, 0.0, state)
    assert state[0] == 12345


def test_crosstalk_keeps_the_charge_of_a_run_and_spreads_it():
    """Inside a run the cross-talk moves charge to the neighbours and keeps the sum (the edge strips of a
    window hold ~1e-6 of the charge, so little leaves the run)."""
    buf = np.empty(9)
    first, n = digitisation.cluster_strip_charges(10.1, 1.0, 0.0, 0.5, 40, 1.0 / 3.0, 4, buf)
    source = [(0, first, buf[:n].copy(), 0)]
    plain = _digitise(source, 40, 1e-3)
    shared = _digitise(source, 40, 1e-3, crosstalk=0.1)
    assert_allclose(shared["charge"].sum(), plain["charge"].sum(), rtol=1e-4)
    assert len(shared["strip"]) > len(plain["strip"])  # the neighbours of the edge strips now fire
    assert shared["charge"].max() < plain["charge"].max()


# ---- generate_events -----------------------------------------------------------------------------------


SMALL = SimConfig()


def test_generate_events_columns_and_dtypes_follow_the_schemas():
    hits, events = generate_events(SMALL, 1, 0, 50)
    assert list(hits) == HITS_SCHEMA.names
    assert list(events) == EVENTS_SCHEMA.names
    for field in HITS_SCHEMA:
        assert hits[field.name].dtype == np.dtype(field.type.to_pandas_dtype()) == HIT_DTYPES[field.name]
    for field in EVENTS_SCHEMA:
        if field.name == "x_true":
            assert events["x_true"].dtype == np.float32
            assert events["x_true"].shape == (50, SMALL.detector.n_layers)
        else:
            assert events[field.name].dtype == np.dtype(field.type.to_pandas_dtype()) == EVENT_DTYPES[field.name]


def test_generate_events_row_order_and_derived_columns():
    hits, events = generate_events(SMALL, 9, 100, 200)
    assert_array_equal(events["event_id"], np.arange(100, 300))
    # rows sorted by (event_id, hit_id), hit_id = index within the event, (layer, strip) order inside
    counts = np.bincount(hits["event_id"] - 100, minlength=200)
    assert_array_equal(counts, events["n_hits"])
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    assert_array_equal(hits["hit_id"], np.arange(len(hits["hit_id"])) - starts)
    key = (hits["event_id"] * SMALL.detector.n_layers + hits["layer"]) * SMALL.detector.n_strips + hits["strip"]
    assert np.all(np.diff(key) > 0)
    assert_array_equal(hits["x"], SMALL.detector.strip_center(hits["strip"]).astype(np.float32))
    assert_array_equal(hits["y"], SMALL.detector.layer_y()[hits["layer"]].astype(np.float32))
    assert np.all(hits["charge"] > SMALL.detector.threshold * SMALL.detector.charge_mean)
    # is_signal as documented (docs/contracts.md): the muon gave more than half of the strip's charge (away from
    # the float32 rounding of the columns), so a signal strip's main contributor is the muon
    clear = np.abs(hits["charge_muon"] - 0.5 * hits["charge"]) > 1e-5 * hits["charge"]
    assert_array_equal(hits["is_signal"][clear], (hits["charge_muon"] > 0.5 * hits["charge"])[clear])
    assert hits["is_signal"].any()
    assert not np.any(hits["is_signal"] & (hits["particle_id"] != 0))
    assert set(np.unique(events["q"]).tolist()) == {-1, 1}
    assert np.all((events["pt"] >= SMALL.muon.pt_min) & (events["pt"] <= SMALL.muon.pt_max))


def test_generate_events_empty_range():
    hits, events = generate_events(SMALL, 1, 5, 0)
    assert all(len(v) == 0 for v in hits.values())
    assert events["x_true"].shape == (0, SMALL.detector.n_layers)
    assert hits["layer"].dtype == np.int16


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert_array_equal(a[name], b[name], err_msg=name)


def _rows_of_events(hits, events, lo, hi):
    first = int(events["event_id"][0])
    hit_mask = (hits["event_id"] >= first + lo) & (hits["event_id"] < first + hi)
    return {k: v[hit_mask] for k, v in hits.items()}, {k: v[lo:hi] for k, v in events.items()}


def test_generate_events_prefix_and_offset_property():
    # 2500 events span several prange chunks and two simulation blocks
    hits, events = generate_events(SMALL, 4, 0, 2500)
    short_hits, short_events = generate_events(SMALL, 4, 0, 10)
    ref_hits, ref_events = _rows_of_events(hits, events, 0, 10)
    _assert_same(short_hits, ref_hits)
    _assert_same(short_events, ref_events)
    tail_hits, tail_events = generate_events(SMALL, 4, 2000, 500)
    ref_hits, ref_events = _rows_of_events(hits, events, 2000, 2500)
    _assert_same(tail_hits, ref_hits)
    _assert_same(tail_events, ref_events)


def test_generate_events_does_not_depend_on_thread_count():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs at least 2 numba threads")
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = generate_events(SMALL, 11, 0, 700)
        numba.set_num_threads(2)
        two = generate_events(SMALL, 11, 0, 700)
    finally:
        numba.set_num_threads(before)
    _assert_same(one[0], two[0])
    _assert_same(one[1], two[1])


def test_different_seeds_give_different_events():
    _, a = generate_events(SMALL, 1, 0, 20)
    _, b = generate_events(SMALL, 2, 0, 20)
    assert not np.any(a["pt"] == b["pt"])


def test_x_true_is_nan_off_the_active_width():
    config = SimConfig(muon=MuonConfig(x0_sigma=600.0), background=BackgroundConfig(0.0, 0.0, 0.0))
    hits, events = generate_events(config, 3, 0, 300)
    x_true = events["x_true"]
    outside = np.isnan(x_true)
    assert 0 < outside.mean() < 1
    assert np.all(np.abs(x_true[~outside]) <= 500.0)
    # with no background every fired strip is the muon's, and only on layers it crossed inside
    assert np.all(hits["particle_id"] == 0)
    assert not np.any(outside[hits["event_id"], hits["layer"]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"seed": -1}, "seed"), ({"n_events": -3}, "n_events"), ({"first_event_id": -1}, "first_event_id")],
)
def test_generate_events_rejects_bad_arguments(kwargs, match):
    args = {"config": SMALL, "seed": 0, "first_event_id": 0, "n_events": 1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        generate_events(**args)
