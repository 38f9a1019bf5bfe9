"""Slow, independent pure-Python / NumPy references for the simulation kernels (tests only).

Each reference solves the same problem a different way from the Numba kernel it checks: closed-form circle
and plane intersections instead of stepping, a Lorentz-force ODE integrated with RK4, numerical quadrature
of the Gaussian instead of a tabulated CDF, dense NumPy accumulation instead of the sorted sweep.
Units: mm, GeV, T, rad.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
#: pT [GeV] = C * B [T] * R [m] (speed of light / 1e9)
C_GEV_PER_TESLA_METRE = 0.299792458
MUON_MASS_GEV = 0.1056583755


def splitmix64_mix_ref(z: int) -> int:
    """SplitMix64 finaliser on Python ints (Steele, Lea, Flood 2014; Vigna's reference C code)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def event_seed_ref(seed: int, event_id: int) -> int:
    """mix(mix(seed + G) + (event_id + 1) * G) mod 2**64, as documented in simulation.rng."""
    stream = splitmix64_mix_ref(seed + GOLDEN_GAMMA)
    return splitmix64_mix_ref(stream + (event_id + 1) * GOLDEN_GAMMA)


def radius_mm(pt: float, b_field: float) -> float:
    return 1000.0 * pt / (C_GEV_PER_TESLA_METRE * b_field)


def circle_crossings_ref(x0: float, theta0: float, pt: float, q: int, b_field: float, layer_y) -> np.ndarray:
    """x where a track without scattering meets each plane y = layer_y[l], from the circle through
    (x0, layer_y[0]) with direction (sin theta0, cos theta0) bending towards +x for q > 0.

    The centre lies at distance R perpendicular to the direction, on the +x side for q > 0:
    (xc, yc) = (x0 + q R cos theta0, y0 - q R sin theta0). The track runs on the branch facing away from
    the centre in x; a plane beyond the circle's top (|y - yc| > R) is never reached, nor is any later one.
    """
    r = radius_mm(pt, b_field)
    y0 = float(layer_y[0])
    xc = x0 + q * r * math.cos(theta0)
    yc = y0 - q * r * math.sin(theta0)
    out = np.full(len(layer_y), np.nan)
    for i, y in enumerate(layer_y):
        dy = float(y) - yc
        if dy * dy >= r * r:
            break
        out[i] = xc - q * math.sqrt(r * r - dy * dy)
    return out


def lorentz_rk4_crossings(x0: float, theta0: float, pt: float, q: int, b_field: float, layer_y, steps_per_mm=1.0):
    """Integrate dp/dt = q v x B (B along +z) with RK4, using y as the integration variable:
    dx/dy = px/py, dpx/dy = k q B, dpy/dy = -k q B px/py, with k = 0.299792458e-3 GeV/(T mm).
    Returns x on each plane (valid while py stays positive)."""
    k = C_GEV_PER_TESLA_METRE * 1e-3 * q * b_field

    def deriv(state):
        _, px, py = state
        return (px / py, k, -k * px / py)

    state = (x0, pt * math.sin(theta0), pt * math.cos(theta0))
    out = [x0]
    for y_prev, y_next in itertools.pairwise(layer_y):
        n = max(1, round((y_next - y_prev) * steps_per_mm))
        h = (y_next - y_prev) / n
        for _ in range(n):
            k1 = deriv(state)
            k2 = deriv(tuple(s + 0.5 * h * d for s, d in zip(state, k1, strict=True)))
            k3 = deriv(tuple(s + 0.5 * h * d for s, d in zip(state, k2, strict=True)))
            k4 = deriv(tuple(s + h * d for s, d in zip(state, k3, strict=True)))
            state = tuple(
                s + h / 6.0 * (a + 2.0 * b + 2.0 * c + d) for s, a, b, c, d in zip(state, k1, k2, k3, k4, strict=True)
            )
        out.append(state[0])
    return np.array(out)


def highland_ref(p: float, x_over_x0: float, mass: float = MUON_MASS_GEV) -> float:
    """PDG (Review of Particle Physics, passage of particles through matter, eq. 34.16):
    theta0 = 13.6 MeV / (beta c p) * z * sqrt(x/X0) * (1 + 0.038 ln(x z^2 / (X0 beta^2))), z = 1."""
    energy = math.hypot(p, mass)
    beta = p / energy
    return 13.6e-3 / (beta * p) * math.sqrt(x_over_x0) * (1.0 + 0.038 * math.log(x_over_x0 / beta**2))


def gaussian_strip_fraction_quad(x_lo: float, x_hi: float, x_center: float, sigma: float, n: int = 400) -> float:
    """Integral of the normal density over [x_lo, x_hi] by composite Simpson quadrature (n even)."""
    h = (x_hi - x_lo) / n
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))

    def pdf(x: float) -> float:
        return norm * math.exp(-0.5 * ((x - x_center) / sigma) ** 2)

    total = pdf(x_lo) + pdf(x_hi)
    for i in range(1, n):
        total += (4.0 if i % 2 else 2.0) * pdf(x_lo + i * h)
    return total * h / 3.0


def strip_fraction_erf(x_lo: float, x_hi: float, x_center: float, sigma: float) -> float:
    """The same integral from math.erf."""
    s = sigma * math.sqrt(2.0)
    return 0.5 * (math.erf((x_hi - x_center) / s) - math.erf((x_lo - x_center) / s))


def digitise_ref(
    layers, first_strips, charges_per_source, particles, n_layers, n_strips, threshold, crosstalk=0.0, noise=None
):
    """Dense reference of the strip digitisation: np.add.at into a (layer, strip, particle) grid.

    ``charges_per_source[s]`` holds the charges of strips first_strips[s], first_strips[s] + 1, ...; particle
    -2 is an electronic-noise tail source (its charge is the strip's noise). Cross-talk acts inside each run
    of overlapping source windows (the kernel's documented unit); ``noise()``, when given, returns the next
    noise value of a strip inside a window, called strip by strip in (layer, strip) order except on tail
    strips. Returns a dict of hit columns in (layer, strip) order: layer, strip, charge, charge_muon,
    is_signal, particle_id.
    """
    particles = [int(p) for p in particles]
    particle_ids = np.unique([p for p in particles if p != -2] or [-1])  # sorted: argmax ties go to the lower id
    column = {int(p): i for i, p in enumerate(particle_ids)}
    grid = np.zeros((n_layers, n_strips, len(particle_ids)))
    tail = np.zeros((n_layers, n_strips))
    for layer, first, charges, particle in zip(layers, first_strips, charges_per_source, particles, strict=True):
        strips = first + np.arange(len(charges))
        if particle == -2:
            np.add.at(tail, (np.full(len(charges), layer), strips), charges)
        else:
            np.add.at(grid, (np.full(len(charges), layer), strips, np.full(len(charges), column[particle])), charges)
    # runs of overlapping windows, as strip keys [start, end)
    windows = sorted(
        (layer * n_strips + first, layer * n_strips + first + len(charges))
        for layer, first, charges in zip(layers, first_strips, charges_per_source, strict=True)
    )
    runs: list[list[int]] = []
    for start, end in windows:
        if runs and start < runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    deposits = grid.copy()  # who gave most of a strip's charge is judged on the deposits before the cross-talk
    flat = grid.reshape(n_layers * n_strips, len(particle_ids))
    if crosstalk > 0:
        for start, end in runs:
            block = flat[start:end].copy()
            shared = (1 - 2 * crosstalk) * block
            shared[1:] += crosstalk * block[:-1]
            shared[:-1] += crosstalk * block[1:]
            flat[start:end] = shared
    electronic = np.zeros(n_layers * n_strips)
    tail_flat = tail.reshape(-1)
    for start, end in runs:
        for key in range(start, end):
            if tail_flat[key] != 0:
                electronic[key] = tail_flat[key]
            elif noise is not None:
                electronic[key] = noise()
    electronic = electronic.reshape(n_layers, n_strips)
    measured = grid.sum(axis=2) + electronic
    layer_idx, strip_idx = np.nonzero(measured > threshold)  # row-major: (layer, strip) order
    muon = grid[:, :, column[0]] if 0 in column else np.zeros_like(measured)
    if -1 in column:
        deposits[:, :, column[-1]] += np.maximum(electronic, 0.0)
    best = particle_ids[np.argmax(deposits, axis=2)]
    if -1 not in column:  # a strip with electronic noise only
        best = np.where(deposits.max(axis=2) <= np.maximum(electronic, 0.0), -1, best)
    return {
        "layer": layer_idx,
        "strip": strip_idx,
        "charge": measured[layer_idx, strip_idx],
        "charge_muon": muon[layer_idx, strip_idx],
        "is_signal": muon[layer_idx, strip_idx] > 0.5 * measured[layer_idx, strip_idx],
        "particle_id": best[layer_idx, strip_idx],
    }


def kasa_circle_fit_ref(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kasa) least-squares circle through points, NumPy lstsq on centred coordinates:
    x^2 + y^2 + D x + E y + F = 0. Returns (xc, yc, r)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mx, my = x.mean(), y.mean()
    u, v = x - mx, y - my
    design = np.stack([u, v, np.ones_like(u)], axis=1)
    rhs = -(u * u + v * v)
    (d, e, f), *_ = np.linalg.lstsq(design, rhs, rcond=None)
    uc, vc = -d / 2.0, -e / 2.0
    return uc + mx, vc + my, math.sqrt(uc * uc + vc * vc - f)
