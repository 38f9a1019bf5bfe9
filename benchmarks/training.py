"""Training and inference throughput of the GAT tracker on synthetic batches, against the PyTorch peer.

    python -m benchmarks.training [--preset P] [--nodes N] [--batch B] [--steps S]
                                  [--torch-python PYTHON [--pairs K]] [--cpu-job] [--cpu-job-out DIR]

One line per preset (wrapped here):

    preset=.. nodes=.. batch=.. train_events_per_s=.. infer_events_per_s=..
    step_gflops=.. matmul_gflops=.. peak_rss_mb=.. platform=.. device_kind=..

- train_events_per_s: events per second of ``model.steps.train_step`` (e2e objective, lambda > 0, so the
  gradient flows through clustering and fit), the mean over S steps after one compiling step (dispatched back
  to back, one sync at the end).
- infer_events_per_s: events per second of the inference forward pass (GAT, sigmoid, clustering, fit).
- step_gflops: 12 * N^2 * H^2 * B / (train step time) / 1e9, the edge MLP's FLOPs of forward and backward
  of both GAT layers as counted in docs/contracts.md, "Benchmarks" (a preset without a per-edge dense layer,
  like ``cpu``, does fewer real FLOPs than this count).
- matmul_gflops: 2 * 2048^3 / time of a jitted dense 2048 x 2048 float32 product (best of 5), same process.
- peak_rss_mb: peak resident memory of the process (each preset runs in its own fresh process).
- platform, device_kind: ``jax.devices()[0]``'s, the device JAX ran on (``cpu`` here).

Without ``--preset``: ``cpu`` (batch of the preset, N = 160, several steps) and ``paper`` (the paper's network,
H = 512, at N = 128 and batch 2, five steps), each in a fresh process. Batches are synthetic (a random
track-like event per row, all nodes real): no dataset is needed.

``--torch-python PYTHON`` (a Python with PyTorch, e.g. ``/work/venvs/torch/bin/python``) also runs the PyTorch
peer, benchmarks/peers/torch_gat.py (the same network in PyTorch, torch.compile, BCE loss, Adam,
``--threads 2``), at the paper line's H, N and batch, right after the paper line, and prints its line and

    compare=paper_vs_torch H=.. nodes=.. batch=.. ours_events_per_s=.. torch_events_per_s=.. ratio=..
    ratio_per_matmul=.. platform=.. device_kind=..

with ratio = ours / torch (>= 1: ours is at least as fast). Ours does more per step than the peer (the e2e
objective's clustering and fit on top of the BCE), the attention network is the same. On a shared machine the
two runs may see different loads: ratio_per_matmul divides each side's events/s by the 2048^3 matmul GFLOP/s
measured in its own process (ours: matmul_gflops; the peer's matmul2048) before taking the ratio.

``--pairs K`` measures our paper line and the peer K times, in turn (one compare line each, then
``compare=paper_vs_torch pairs=K median_ratio=..``).

``--cpu-job`` also times ``muontrack run --preset cpu`` (the whole job: simulation, training, inference,
report; 5-7 minutes on 2 cores) in a temporary folder, or in ``--cpu-job-out DIR``, kept:
``job=cpu wall_s=.. wall_min=.. peak_rss_mb=..`` (peak_rss_mb: the job process's).
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULTS = {"cpu": {"nodes": 160, "batch": None, "steps": 5}, "paper": {"nodes": 128, "batch": 2, "steps": 5}}
#: the PyTorch peer (a copy of the shared harness, kept verbatim)
TORCH_PEER = Path(__file__).resolve().parent / "peers" / "torch_gat.py"


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
        share=label,
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

    from model.hyperparameters import get_preset
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

    state, metrics = train_step(state, batch, jax.random.key(0), lam)  # compile
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for step in range(steps):  # dispatched back to back: no host sync per step
        state, metrics = train_step(state, batch, jax.random.key(step + 1), lam)
    jax.block_until_ready((state, metrics))
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
        f"preset={preset} nodes={nodes} batch={batch_size} train_events_per_s={batch_size / step_seconds:.3g} "
        f"infer_events_per_s={batch_size / infer_seconds:.3g} step_gflops={step_gflops:.2f} "
        f"matmul_gflops={matmul_gflops():.1f} peak_rss_mb={peak_rss_mb:.0f} {device_fields()}"
    )


def device_fields() -> str:
    """``platform=.. device_kind=..`` of the device JAX runs on."""
    import jax

    device = jax.devices()[0]
    return f"platform={device.platform} device_kind={device.device_kind.replace(' ', '_')}"


def run_preset(preset: str, args: argparse.Namespace) -> str:
    """The line of one preset, measured in a fresh process (echoed as it comes)."""
    command = [sys.executable, "-m", "benchmarks.training", "--preset", preset]
    for name in ("nodes", "batch", "steps"):
        if getattr(args, name) is not None:
            command += [f"--{name}", str(getattr(args, name))]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    print(output, end="", flush=True)
    return output.strip().splitlines()[-1]


def run_torch_peer(python: str, hidden: int, nodes: int, batch_size: int) -> tuple[float, float]:
    """Events per second of the compiled PyTorch peer at these shapes and its process's 2048^3 matmul GFLOP/s
    (its output lines echoed)."""
    command = [python, str(TORCH_PEER), "--H", str(hidden), "--N", str(nodes), "--batch", str(batch_size)]
    command += ["--compile", "--threads", "2"]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    print(result.stdout, end="", flush=True)
    found = re.search(r"^torch .*events/s=([0-9.eE+-]+)", result.stdout, re.MULTILINE)
    matmul = re.search(r"matmul2048 fp32=([0-9.eE+-]+)", result.stdout)
    if found is None or matmul is None:
        raise RuntimeError(f"no events/s in the PyTorch peer's output:\n{result.stdout}\n{result.stderr}")
    return float(found.group(1)), float(matmul.group(1))


def time_cpu_job(out: Path | None) -> str:
    """Wall time and peak memory of ``muontrack run --preset cpu`` into ``out`` (kept) or a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="muontrack-bench-") as folder:
        target = out if out is not None else Path(folder) / "out"
        start = time.perf_counter()
        command = [str(Path(sys.executable).parent / "muontrack"), "run", "--preset", "cpu"]
        subprocess.run([*command, "--out", str(target)], check=True, cwd=folder)
        wall = time.perf_counter() - start
    # the largest finished child's peak: the job's own process (simulation, training, inference all run in it)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return f"job=cpu wall_s={wall:.0f} wall_min={wall / 60:.2f} peak_rss_mb={peak_rss_mb:.0f}"


def fields(line: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in line.split() if "=" in pair)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["test", "cpu", "paper"], default=None)
    parser.add_argument("--nodes", type=int, default=None, help="node budget N per event")
    parser.add_argument("--batch", type=int, default=None, help="events per batch (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after one compiling step")
    parser.add_argument("--torch-python", default=None, help="a Python with PyTorch: also run the PyTorch peer")
    parser.add_argument("--cpu-job", action="store_true", help="also time `muontrack run --preset cpu`")
    parser.add_argument("--cpu-job-out", type=Path, default=None, help="keep the cpu job's outputs in this folder")
    parser.add_argument(
        "--pairs", type=int, default=1, help="with --torch-python: ours and the peer measured this many times, in turn"
    )
    args = parser.parse_args()
    for name, value in (("nodes", args.nodes), ("batch", args.batch), ("steps", args.steps), ("pairs", args.pairs)):
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    if args.preset is not None and args.torch_python is None and not args.cpu_job:
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
    lines = {preset: run_preset(preset, args) for preset in ([args.preset] if args.preset else ["cpu", "paper"])}
    if args.torch_python is not None and "paper" in lines:
        compare_with_torch(lines["paper"], args)
    if args.cpu_job or args.cpu_job_out is not None:
        print(time_cpu_job(args.cpu_job_out), flush=True)


def compare_with_torch(paper_line: str, args: argparse.Namespace) -> None:
    """``--pairs`` alternations of the PyTorch peer and our paper line at the same shapes, one compare line each,
    and with more than one pair the median ratio: load on a shared machine moves either side by itself."""
    import statistics

    from model.hyperparameters import get_preset

    hidden = get_preset("paper")[0].hidden
    ratios = []
    for pair in range(args.pairs):
        ours = fields(paper_line if pair == 0 else run_preset("paper", args))
        nodes, batch_size = int(ours["nodes"]), int(ours["batch"])
        torch_rate, torch_matmul = run_torch_peer(args.torch_python, hidden, nodes, batch_size)
        ours_rate, ours_matmul = float(ours["train_events_per_s"]), float(ours["matmul_gflops"])
        normalised = (ours_rate / ours_matmul) / (torch_rate / torch_matmul)
        ratios.append(ours_rate / torch_rate)
        print(
            f"compare=paper_vs_torch H={hidden} nodes={nodes} batch={batch_size} ours_events_per_s={ours_rate:.3g} "
            f"torch_events_per_s={torch_rate:.3g} ratio={ours_rate / torch_rate:.2f} "
            f"ratio_per_matmul={normalised:.2f} platform={ours['platform']} device_kind={ours['device_kind']}",
            flush=True,
        )
    if len(ratios) > 1:
        print(f"compare=paper_vs_torch pairs={len(ratios)} median_ratio={statistics.median(ratios):.2f}", flush=True)


if __name__ == "__main__":
    main()
