"""Curvature bias of the Kasa and Hyper circle fits (model.fit) on short noisy arcs of our detector.

For every (sigma, pT) the script draws N tracks through the 16 layer planes (pipeline.config.DetectorConfig),
exactly on their circle (the transverse projection of a helix in a uniform field), with a random charge, a
random start x0 in [-20, 20] mm and a random direction theta0 in [-0.05, 0.05] rad from +y, adds Gaussian
noise of width sigma to the x of every crossing, and fits each track with ``fit_track`` (unit layer
weights, cluster spread sigma; vmapped and jitted, float32 unless ``--x64``). For each method it prints one
line

    method=kasa sigma_mm=0.1 pt=50 bias=... bias_err=... rms=... n=... not_ok=...

with r = (q/pT_fit - q/pT_true) / (q/pT_true) per track: bias = mean(r), bias_err = std(r) / sqrt(n) (its
statistical error), rms = sqrt(mean(r^2)), n the number of tracks, not_ok the number with a fit status != 0
(all tracks enter the averages). The same tracks go through both methods.

    python -m benchmarks.circle_fit_bias [--trials 20000] [--sigmas 0.005 0.1 0.3] [--pts 20 30 40 50]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from model.fit import FIT_METHODS, fit_track
from pipeline.config import PT_PER_TESLA_METRE, DetectorConfig


def circle_crossings(pt, q, x0, theta0, y, b_field):
    """x [mm] where tracks of pT [GeV] and charge q (arrays [N]) starting at (x0, 0) with direction
    (sin theta0, cos theta0) cross the planes y [L] (float64, [N, L]); q > 0 bends towards +x for B > 0."""
    kappa = (q * PT_PER_TESLA_METRE * b_field / (1000.0 * pt))[:, None]
    sin_theta = np.sin(theta0)[:, None] + kappa * y[None, :]
    # (cos theta0 - cos theta) / kappa, written without the cancellation of the difference of cosines
    cos_theta0 = np.cos(theta0)[:, None]
    cos_theta = np.sqrt(1.0 - sin_theta**2)
    return x0[:, None] + (sin_theta**2 - np.sin(theta0)[:, None] ** 2) / (kappa * (cos_theta0 + cos_theta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20_000)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.005, 0.1, 0.3], help="point noise [mm]")
    parser.add_argument("--pts", type=float, nargs="+", default=[20.0, 30.0, 40.0, 50.0], help="pT [GeV]")
    parser.add_argument("--b-field", type=float, default=1.0, help="[T]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--x64", action="store_true", help="fit in float64 (the float32 precision reference)")
    args = parser.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = np.float64 if args.x64 else np.float32

    layer_y = DetectorConfig().layer_y()
    n_layers = layer_y.size
    fits = {
        method: jax.jit(
            jax.vmap(
                lambda x, y, w, s, method=method: fit_track(x, y, w, s, args.b_field, method=method),
                in_axes=(0, None, None, None),
            )
        )
        for method in FIT_METHODS
    }
    rng = np.random.default_rng(args.seed)
    for sigma in args.sigmas:
        for pt in args.pts:
            n = args.trials
            q = rng.choice([-1.0, 1.0], n)
            x0 = rng.uniform(-20.0, 20.0, n)
            theta0 = rng.uniform(-0.05, 0.05, n)
            x = circle_crossings(np.full(n, pt), q, x0, theta0, layer_y, args.b_field)
            x = x + rng.normal(0.0, sigma, x.shape)
            q_over_pt_true = q / pt
            inputs = (
                jnp.asarray(x, dtype),
                jnp.asarray(layer_y, dtype),
                jnp.ones(n_layers, dtype),
                jnp.full(n_layers, sigma, dtype),
            )
            for method, fit in fits.items():
                result = fit(*inputs)
                r = np.asarray(result.q_over_pt, np.float64) / q_over_pt_true - 1.0
                not_ok = int(np.sum(np.asarray(result.status) != 0))
                print(
                    f"method={method} sigma_mm={sigma:g} pt={pt:g} bias={r.mean():.3e} "
                    f"bias_err={r.std(ddof=1) / np.sqrt(n):.1e} rms={np.sqrt(np.mean(r * r)):.3e} n={n} "
                    f"not_ok={not_ok}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
