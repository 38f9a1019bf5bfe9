"""Inference throughput of the ``cpu`` preset against its training throughput, on the batches of a real dataset.

    python -m benchmarks.inference [--data D] [--events N] [--batch B] [--buckets 128,256]

One line (wrapped here):

    events=.. train_batch=.. train_buckets=.. infer_batch=.. infer_buckets=.. train_events_per_s=..
    infer_events_per_s=.. ratio=.. train_compile_s=.. infer_compile_s=.. train_peak_rss_mb=..
    infer_peak_rss_mb=.. peak_rss_mb=..

- train_events_per_s: events per second of ``model.steps.train_step`` (e2e objective, lambda = 0.5, so the
  gradient flows through clustering and fit) of a fresh ``cpu``-preset state on real batches of the train split
  (the preset's batch size and node buckets, an epoch's shuffled order, at most ``TRAIN_EVENTS`` events), read
  before the clock starts and after one compiling step per bucket: the step alone, data loading excluded.
- infer_events_per_s: events per second of the whole inference path of a run, ``model.inference.predict_params``
  (what ``predict_run`` does after loading the checkpoint) with fresh ``cpu``-preset parameters on every event
  of the dataset: reading and packing the shards, GAT, sigmoid, clustering, circle fit, copying the results to
  the host and building the three prediction tables. Its batch size and node buckets are the inference
  defaults (``model.inference.INFERENCE_BATCH_SIZE``, ``inference_node_buckets``) unless ``--batch`` and
  ``--buckets`` say otherwise; the forward is compiled for each bucket before the clock starts.
- ratio: infer_events_per_s / train_events_per_s.
- *_compile_s: the compilations before the clocks start (from JAX's persistent cache when warm).
- *_peak_rss_mb: peak resident memory of each measurement, each run in its own fresh process;
  peak_rss_mb is the larger of the two.

Without ``--data`` it simulates ``--events`` events (default 5000, shards of 1000) into a temporary folder first.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: training steps are timed over at most this many events of the train split (a whole number of batches)
TRAIN_EVENTS = 1024
PRESET = "cpu"
OBJECTIVE = "e2e"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _preset_on(data: Path):
    """The dataset, the preset's model and train configs and the detector geometry (JAX's compilation cache on)."""
    from model.hyperparameters import get_preset
    from pipeline.batches import Geometry
    from pipeline.cache import enable_compilation_cache
    from pipeline.dataset import open_dataset

    enable_compilation_cache()
    dataset = open_dataset(data)
    model_config, train_config = get_preset(PRESET)
    return dataset, model_config, train_config, Geometry.from_detector(dataset.config.detector)


def measure_train(data: Path) -> dict[str, str]:
    import jax
    import jax.numpy as jnp

    from model.steps import (
        create_train_state,
        device_batch,
        epoch_shuffle_seed,
        example_batch,
        train_step,
    )
    from pipeline.batches import iter_batches

    dataset, model_config, train_config, geometry = _preset_on(data)
    batches = [
        device_batch(batch)
        for batch in iter_batches(
            dataset,
            "train",
            train_config.batch_size,
            train_config.node_buckets,
            shuffle_seed=epoch_shuffle_seed(0, 1),
            max_events=TRAIN_EVENTS,
        )
    ]
    state = create_train_state(
        jax.random.key(0),
        model_config,
        train_config,
        example_batch(1, min(train_config.node_buckets), geometry.n_layers),
        geometry=geometry,
        objective=OBJECTIVE,
    )
    lam = jnp.float32(0.5)
    start = time.perf_counter()
    warm = state
    for nodes in sorted({batch.mask.shape[1] for batch in batches}):
        example = next(batch for batch in batches if batch.mask.shape[1] == nodes)
        warm, metrics = train_step(warm, example, jax.random.key(0), lam)
        jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        state, metrics = train_step(state, batch, jax.random.key(step), lam)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    events = sum(int(batch.event_mask.sum()) for batch in batches)
    return {
        "train_batch": str(train_config.batch_size),
        "train_buckets": ",".join(map(str, train_config.node_buckets)),
        "train_events_per_s": f"{events / seconds:.1f}",
        "train_compile_s": f"{compile_seconds:.1f}",
        "train_peak_rss_mb": f"{_peak_rss_mb():.0f}",
    }


def measure_infer(data: Path, batch_size: int | None, buckets: tuple[int, ...] | None) -> dict[str, str]:
    import jax

    from model.inference import (
        INFERENCE_BATCH_SIZE,
        forward_fn,
        inference_buckets,
        inference_node_buckets,
        predict_params,
    )
    from model.steps import device_batch, example_batch, init_params
    from pipeline.batches import split_summary

    dataset, model_config, train_config, geometry = _preset_on(data)
    batch_size = batch_size or INFERENCE_BATCH_SIZE
    buckets = buckets or inference_node_buckets(train_config.node_buckets)
    params = init_params(jax.random.key(0), model_config, example_batch(1, min(buckets), geometry.n_layers))
    n_events, max_hits = split_summary(dataset, None)
    forward = forward_fn(model_config, OBJECTIVE, geometry)
    start = time.perf_counter()
    for nodes in inference_buckets(buckets, max_hits):
        jax.block_until_ready(forward(params, device_batch(example_batch(batch_size, nodes, geometry.n_layers))))
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tables = predict_params(
        dataset, params, model_config, OBJECTIVE, split=None, batch_size=batch_size, buckets=tuple(buckets)
    )
    seconds = time.perf_counter() - start
    if tables["tracks"].height != n_events:
        raise AssertionError(f"{tables['tracks'].height} track rows for {n_events} events")
    return {
        "events": str(n_events),
        "infer_batch": str(batch_size),
        "infer_buckets": ",".join(map(str, inference_buckets(buckets, max_hits))),
        "infer_events_per_s": f"{n_events / seconds:.1f}",
        "infer_compile_s": f"{compile_seconds:.1f}",
        "infer_peak_rss_mb": f"{_peak_rss_mb():.0f}",
    }


def _subprocess(arguments: list[str]) -> dict[str, str]:
    """Run one measurement in a fresh process (its own peak memory and caches); its key=value line as a dict."""
    command = [sys.executable, "-m", "benchmarks.inference", *arguments]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in output.strip().splitlines()[-1].split())


def _buckets(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: simulate one)")
    parser.add_argument("--events", type=int, default=5000, help="events to simulate without --data")
    parser.add_argument("--batch", type=int, default=None, help="inference batch size (default: the inference's)")
    parser.add_argument("--buckets", type=_buckets, default=None, help="inference node buckets, e.g. 128,256")
    parser.add_argument("--measure", choices=["train", "infer"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.events < 1 or (args.batch is not None and args.batch < 1):
        parser.error("--events and --batch must be >= 1")
    if args.measure == "train":
        print(" ".join(f"{k}={v}" for k, v in measure_train(args.data).items()), flush=True)
        return
    if args.measure == "infer":
        print(" ".join(f"{k}={v}" for k, v in measure_infer(args.data, args.batch, args.buckets).items()), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="muontrack-bench-") as scratch:
        data = args.data
        if data is None:
            from pipeline.config import SimConfig
            from simulation.shards import simulate_dataset

            data = Path(scratch) / "data"
            simulate_dataset(data, n_events=args.events, seed=0, config=SimConfig(shard_events=1000))
        infer_options = ["--data", str(data)]
        if args.batch is not None:
            infer_options += ["--batch", str(args.batch)]
        if args.buckets is not None:
            infer_options += ["--buckets", ",".join(map(str, args.buckets))]
        train = _subprocess(["--measure", "train", "--data", str(data)])
        infer = _subprocess(["--measure", "infer", *infer_options])
    ratio = float(infer["infer_events_per_s"]) / float(train["train_events_per_s"])
    peak = max(float(train["train_peak_rss_mb"]), float(infer["infer_peak_rss_mb"]))
    line = {
        "events": infer["events"],
        **{k: v for k, v in train.items() if k not in ("train_compile_s", "train_peak_rss_mb")},
        **{k: v for k, v in infer.items() if k not in ("events", "infer_compile_s", "infer_peak_rss_mb")},
        "ratio": f"{ratio:.2f}",
        "train_compile_s": train["train_compile_s"],
        "infer_compile_s": infer["infer_compile_s"],
        "train_peak_rss_mb": train["train_peak_rss_mb"],
        "infer_peak_rss_mb": infer["infer_peak_rss_mb"],
        "peak_rss_mb": f"{peak:.0f}",
    }
    print(" ".join(f"{k}={v}" for k, v in line.items()), flush=True)


if __name__ == "__main__":
    main()
