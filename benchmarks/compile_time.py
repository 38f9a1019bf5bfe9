"""Compile time of the jitted steps: what a model's first batch of each shape costs before it trains.

    python -m benchmarks.compile_time [--preset cpu] [--model M ...] [--step train eval] [--nodes 128]

One line per (model, step), each measured in a fresh Python process with JAX's persistent compilation cache off
(what a first run on a new machine pays):

    model=.. step=.. preset=.. nodes=.. batch=.. trace_s=.. lower_s=.. compile_s=.. hlo_lines=..

- trace_s: JAX turning the Python of the step (network, loss, the objective's reconstruction chain and its custom
  gradient) into a jaxpr (``jax.jit(...).trace``); paid by every new process even with a warm persistent cache.
- lower_s: the jaxpr lowered to StableHLO.
- compile_s: XLA's compilation of it (HLO passes, then LLVM code generation for every fused kernel); a warm
  persistent cache replaces this by loading the program.
- hlo_lines: lines of the optimised HLO (the program's size: the compile time grows with it).

The steps are model.steps' ``train_step`` (lambda = 0.5: the gradient runs through the chain) and ``eval_step``,
on an all-padding batch of the preset's batch size and ``--nodes`` nodes (the values do not change the program).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

MODELS = ("baseline", "e2e", "e2e_paper")
STEPS = ("train", "eval")


def measure(preset: str, model: str, step: str, nodes: int) -> str:
    """The figures of one step, in this process (JAX's persistent cache must be off)."""
    import jax
    import jax.numpy as jnp

    from model.hyperparameters import get_preset
    from model.steps import create_train_state, device_batch, eval_step, example_batch, train_step
    from pipeline.batches import Geometry
    from pipeline.config import SimConfig

    model_config, train_config = get_preset(preset)
    geometry = Geometry.from_detector(SimConfig().detector)
    batch = device_batch(example_batch(train_config.batch_size, nodes, geometry.n_layers))
    state = create_train_state(jax.random.key(0), model_config, train_config, batch, geometry=geometry, objective=model)
    lam = jnp.float32(0.5)
    start = time.perf_counter()
    if step == "train":
        traced = train_step.trace(state, batch, jax.random.key(1), lam)
    else:
        traced = eval_step.trace(state, batch, lam)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    return (
        f"model={model} step={step} preset={preset} nodes={nodes} batch={train_config.batch_size} "
        f"trace_s={traced_at - start:.1f} lower_s={lowered_at - traced_at:.1f} "
        f"compile_s={compiled_at - lowered_at:.1f} hlo_lines={compiled.as_text().count(chr(10))}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--model", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--step", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--nodes", type=int, default=128)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single measurement, this process
    args = parser.parse_args(argv)
    if args.one:
        print(measure(args.preset, args.model[0], args.step[0], args.nodes), flush=True)
        return
    # no persistent cache: the compilation itself is measured (the cache would load the program instead)
    environ = {**os.environ, "MUONTRACK_JAX_CACHE": "", "JAX_ENABLE_COMPILATION_CACHE": "false"}
    environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    for model in args.model:
        for step in args.step:
            command = [sys.executable, "-m", "benchmarks.compile_time", "--one", "--preset", args.preset]
            command += ["--model", model, "--step", step, "--nodes", str(args.nodes)]
            result = subprocess.run(command, env=environ, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                sys.exit(f"error: {model} {step}: {(result.stderr.strip().splitlines() or ['failed'])[-1]}")
            print(result.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
