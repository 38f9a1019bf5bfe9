"""Run by tests/test_train.py in a process of its own: 30 `assignment` train steps per estimator on one batch.

    python -m tests.assignment_steps DATASET ESTIMATOR [ESTIMATOR ...]

Prints one JSON line per estimator: per step the BCE + Hamming, the loss, selected_layers, solver_grad_nonzero and
solver_grad. In the long test process, compiling these steps left XLA crashing at later compilations
(SIGSEGV / SIGABRT inside backend_compile, 3 of 3 full-suite runs), so they compile here instead.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

from model.config import get_preset
from model.steps import create_train_state, device_batch, train_step
from pipeline.batches import Geometry, iter_batches
from pipeline.dataset import open_dataset


def main(data: str, estimator: str) -> None:
    dataset = open_dataset(data)
    model_config, train_config = get_preset("test")
    train_config = dataclasses.replace(train_config, learning_rate=1e-2, estimator=estimator)
    batch = device_batch(next(iter_batches(dataset, "train", train_config.batch_size, train_config.node_buckets)))
    geometry = Geometry.from_detector(dataset.config.detector)
    state = create_train_state(
        jax.random.key(0), model_config, train_config, batch, geometry=geometry, objective="assignment"
    )
    steps = []
    for step in range(30):  # the warm-up (Hamming and BCE), then the pT term as well
        lam = jnp.float32(0.0 if step < 15 else 0.5)
        state, metrics = train_step(state, batch, jax.random.key(step), lam)
        metrics = {key: float(value) for key, value in metrics.items()}
        steps.append({"bce_hamming": metrics["bce"] + metrics["hamming"], **metrics})
    print(json.dumps({"estimator": state.estimator.kind, "steps": steps}))


if __name__ == "__main__":
    for name in sys.argv[2:]:
        main(sys.argv[1], name)
