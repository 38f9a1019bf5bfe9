"""Training and inference throughput of the GAT tracker on synthetic batches, and the machine's matmul speed.

    python -m benchmarks.training [--preset P] [--nodes N] [--batch B] [--steps S]

One line per preset (wrapped here):

    preset=.. nodes=.. batch=.. train_events_per_s=.. infer_events_per_s=..
    step_gflops=.. matmul_gflops=.. peak_rss_mb=..

- train_events_per_s: events per second of ``model.steps.train_step`` (e2e objective, lambda > 0, so the
  gradient flows through clustering and fit), the mean over S steps after one compiling step.
- infer_events_per_s: events per second of the inference forward pass (GAT, sigmoid, clustering, fit).
- step_gflops: 12 * N^2 * H^2 * B / (train step time) / 1e9, the edge MLP's FLOPs of forward and backward
  of both GAT layers as counted in docs/contracts.md, "Benchmarks" (a preset without a per-edge dense layer,
  like ``cpu``, does fewer real FLOPs than this count).
- matmul_gflops: 2 * 2048^3 / time of a jitted dense 2048 x 2048 float32 product (best of 5), same process.
- peak_rss_mb: peak resident memory of the process (each preset runs in its own fresh process).

Without ``--preset``: ``cpu`` (batch of the preset, N = 160, several steps) and ``paper`` (one step, batch 1,
N = 200). Batches are synthetic (a random track-like event per row, all nodes real): no dataset is needed.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

DEFAULTS = {"cpu": {"nodes": 160, "batch": None, "steps": 5}, "paper": {"nodes": 200, "batch": 1, "steps": 1}}


def synthetic_batch(batch_size: int, n_nodes: int, seed: int = 0):
    """A batch of random events: half the nodes near a straight track, the rest uniform noise."""
    import numpy as np

    from pipeline.batches import Batch, node_features
    from pipeline.config import DetectorConfig

    detector = DetectorConfig()
    layer_y = detector.layer_y().astype(np.float32)
    rng = np.random.default_rng(seed)
    shape = (batch_size, n_nodes)
    layer = rng.integers(0, detector.n_layers, size=shape).astype(np.int32)
    y = layer_y[layer]
    x0 = rng.normal(0, 100, size=(batch_size, 1))
    slope = rng.normal(0, 0.05, size=(batch_size, 1))
    label = (rng.random(shape) < 0.5).astype(np.float32)
    x = np.where(label > 0, x0 + slope * y + rng.normal(0, 1, shape), rng.uniform(-500, 500, shape))
    x = x.astype(np.float32)
    charge = rng.uniform(0.01, 0.5, shape).astype(np.float32)
    mask = np.ones(shape, bool)
    return Batch(
        features=node_features(x, y, charge, layer, detector),
        x=x,
        y=y.astype(np.float32),
        layer=layer,
        charge=charge,
        mask=mask,
        label=label,
        hit_id=np.broadcast_to(np.arange(n_nodes, dtype=np.int32), shape).copy(),
        event_id=np.arange(batch_size, dtype=np.int32),
        pt=rng.uniform(20, 50, batch_size).astype(np.float32),
        q=rng.choice([-1.0, 1.0], batch_size).astype(np.float32),
        x_true=(x0 + slope * layer_y[None, :]).astype(np.float32),
        event_mask=np.ones(batch_size, bool),
    )


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (size, size), jnp.float32)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    best = min(_timed(lambda: product(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(preset: str, nodes: int, batch_size: int | None, steps: int) -> str:
    import jax
    import jax.numpy as jnp

    from model.config import get_preset
    from model.inference import forward_fn
    from model.steps import create_train_state, train_step
    from pipeline.batches import Geometry
    from pipeline.config import DetectorConfig

    model_config, train_config = get_preset(preset)
    batch_size = batch_size or train_config.batch_size
    geometry = Geometry.from_detector(DetectorConfig())
    batch = synthetic_batch(batch_size, nodes)
    state = create_train_state(jax.random.key(0), model_config, train_config, batch, geometry=geometry, objective="e2e")
    lam = jnp.float32(0.5)

    def train_once(s, step):
        s, metrics = train_step(s, batch, jax.random.key(step), lam)
        jax.block_until_ready(metrics)
        return s

    state = train_once(state, 0)  # compile
    start = time.perf_counter()
    for step in range(steps):
        state = train_once(state, step + 1)
    step_seconds = (time.perf_counter() - start) / steps

    forward = forward_fn(model_config, "e2e", geometry)
    jax.block_until_ready(forward(state.params, batch))  # compile
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(forward(state.params, batch))
    infer_seconds = (time.perf_counter() - start) / steps

    hidden = model_config.hidden
    step_gflops = 12 * nodes**2 * hidden**2 * batch_size / step_seconds / 1e9
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return (
        f"preset={preset} nodes={nodes} batch={batch_size} train_events_per_s={batch_size / step_seconds:.1f} "
        f"infer_events_per_s={batch_size / infer_seconds:.1f} step_gflops={step_gflops:.2f} "
        f"matmul_gflops={matmul_gflops():.1f} peak_rss_mb={peak_rss_mb:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["test", "cpu", "paper"], default=None)
    parser.add_argument("--nodes", type=int, default=None, help="node budget N per event")
    parser.add_argument("--batch", type=int, default=None, help="events per batch (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after one compiling step")
    args = parser.parse_args()
    for name, value in (("nodes", args.nodes), ("batch", args.batch), ("steps", args.steps)):
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    if args.preset is not None:
        defaults = DEFAULTS.get(args.preset, DEFAULTS["cpu"])
        print(
            measure(
                args.preset,
                args.nodes or defaults["nodes"],
                args.batch or defaults["batch"],
                args.steps or defaults["steps"],
            ),
            flush=True,
        )
        return
    # each preset in a fresh process: its peak memory and compile caches are its own
    for preset in ("cpu", "paper"):
        command = [sys.executable, "-m", "benchmarks.training", "--preset", preset]
        for name in ("nodes", "batch", "steps"):
            if getattr(args, name) is not None:
                command += [f"--{name}", str(getattr(args, name))]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
