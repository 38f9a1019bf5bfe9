"""Data-parallel training (model.steps.DataParallel): two devices train as one does.

The device count of a JAX process is fixed when JAX starts (``XLA_FLAGS=--xla_force_host_platform_device_count``
must be set before), so each training runs in a process of its own: one with one CPU device, one with two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from numpy.testing import assert_allclose

from model.inference import load_run
from model.losses import bce_loss, pt_loss
from model.run_folder import read_metrics
from model.steps import DataParallel, device_batch, example_batch, pad_events
from pipeline.batches import iter_batches
from pipeline.dataset import open_dataset

REPO = Path(__file__).resolve().parent.parent
#: relative and absolute tolerance between the one- and the two-device training (why: in the test)
TOLERANCE = 1e-5

#: a training in a process of its own: it records, for every train step, the loss, the number of devices the
#: batch was placed on and the batch's number of events (padding included), and prints them as JSON
_TRAIN = """
import json, sys
import model.train
from model.train import train_run

data, out = sys.argv[1:3]
losses, devices, events = [], [], []
step = model.train.train_step


def spy(state, batch, key, lam):
    # the steps' input: NumPy arrays with one device (the single-device code path), a split jax.Array with more
    sharding = getattr(batch.features, "sharding", None)
    devices.append(len(sharding.device_set) if sharding is not None else 1)
    events.append(batch.features.shape[0])
    state, metrics = step(state, batch, key, lam)
    losses.append(metrics["loss"])
    return state, metrics


model.train.train_step = spy
# 7 events a batch: two devices get it padded to 8 (one padding event), one device gets it as it is.
# e2e_paper: its pT loss runs through the paper chain, whose arithmetic is smooth in the weights. The robust
# chain gates layers on float32 pulls, good to ~0.02: an ulp of difference between the two layouts can move a
# layer across a gate's edge in the first epochs of a 56-event training (one event's loss by ~0.8, measured)
overrides = {"train": {"batch_size": 7, "max_train_events": 56}}
train_run(data, "e2e_paper", out, preset="test", epochs=2, seed=5, overrides=overrides, progress=True)
print(json.dumps({"losses": [float(loss) for loss in losses], "devices": devices, "events": events}))
"""


def _train(data: Path, out: Path, n_devices: int) -> subprocess.Popen[str]:
    """The training of :data:`_TRAIN` into ``out`` on ``n_devices`` CPU devices, started."""
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in flag]
    env = {
        **os.environ,
        # CPU devices on any machine: on one with a GPU, JAX would otherwise train on it, not on the host devices
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={n_devices}"]),
    }
    command = [sys.executable, "-c", _TRAIN, str(data), str(out)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_devices_train_as_one(tiny_dataset, tmp_path):
    processes = {n: _train(tiny_dataset, tmp_path / f"devices{n}", n) for n in (1, 2)}
    results = {}
    for n, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        lines = stdout.splitlines()
        results[n] = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
        results[n]["printed"] = " ".join(stdout.split())  # the console wraps long lines
    one, two = results[1], results[2]

    # the two-device run split every batch over both devices, padded to 8 events; the run folder says so
    assert set(two["devices"]) == {2}
    assert set(two["events"]) == {8}
    assert set(one["devices"]) == {1}
    assert set(one["events"]) == {7}
    split = "e2e_paper: training on 2 cpu devices (cpu), each batch of 7 events (padded to 8) split 2 ways"
    assert split in two["printed"]
    assert "e2e_paper: training on 1 cpu device (cpu)" in one["printed"]
    for n in (1, 2):
        devices = json.loads((tmp_path / f"devices{n}" / "config.json").read_text())["devices"]
        assert devices["count"] == n
        assert devices["platform"] == "cpu"

    # the same loss at every step (8 steps of 7 events an epoch, 2 epochs) and the same epoch means, to rounding.
    # Not bit for bit: XLA compiles another program for 4 events a device than for 7 on one, and with two devices
    # each sums its half of the events and the halves are added across devices, so float32 sums (of the loss, of
    # the gradients) and per-event arithmetic round differently, by an ulp or so (2^-24 ~ 6e-8 relative), and
    # Adam carries that into the weights (measured: losses within 1.2e-6 relative over the 16 steps, weights
    # within 1e-7). The pT loss and sigma68 are functions of the residual r = (q/pT)_pred * pT * q - 1, a
    # difference of numbers near 1 whose rounding is absolute (~1e-7), and Huber's slope is at most
    # delta / scale = 10, so they differ by up to ~1e-6 absolute (measured: 7e-7 on a train pT loss of 4e-3, which
    # is 1.6e-4 relative). Hence 1e-5 absolute and relative: 10 times the rounding seen, while a padding event
    # counted or a batch split wrongly moves a loss by a share of an event in 7, more than 1e-2
    assert len(one["losses"]) == len(two["losses"]) == 16
    assert_allclose(two["losses"], one["losses"], rtol=TOLERANCE, atol=TOLERANCE)
    metrics = {n: read_metrics(tmp_path / f"devices{n}").drop("seconds") for n in (1, 2)}
    assert metrics[1]["epoch", "split", "step", "lambda"].equals(metrics[2]["epoch", "split", "step", "lambda"])
    for column in ("loss", "bce", "pt_loss", "grad_norm", "sigma68"):
        assert_allclose(
            metrics[2][column].to_numpy(), metrics[1][column].to_numpy(), rtol=TOLERANCE, atol=TOLERANCE, err_msg=column
        )

    # the two-device checkpoint restores in this one-device process, with the same weights
    _, params_one = load_run(tmp_path / "devices1")
    _, params_two = load_run(tmp_path / "devices2")
    for a, b in zip(jax.tree.leaves(params_two), jax.tree.leaves(params_one), strict=True):
        assert_allclose(np.asarray(a), np.asarray(b), rtol=TOLERANCE, atol=TOLERANCE)


def test_padding_events_count_in_no_mean_and_one_device_changes_nothing(tiny_dataset):
    batch = next(iter_batches(open_dataset(tiny_dataset), "train", 7, (256,)))
    padded = pad_events(batch, 8)
    padding = example_batch(1, 256, batch.x_true.shape[1])
    for name, original, extended, extra in zip(batch._fields, batch, padded, padding, strict=True):
        assert extended.dtype == original.dtype, name
        np.testing.assert_array_equal(extended[:7], original, err_msg=name)
        np.testing.assert_array_equal(extended[7:], extra, err_msg=name)
    assert batch.event_mask.all()
    assert not padded.event_mask[7]
    assert not padded.mask[7].any()
    assert pad_events(batch, 7) is batch

    # the loss terms are means over real hits and events, whatever the network says about a padding event (to
    # rounding: XLA may sum 8 rows in another order than 7)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=padded.mask.shape).astype(np.float32)
    q_over_pt = (padded.q / padded.pt * (1 + 0.05 * rng.normal(size=8))).astype(np.float32)
    assert_allclose(
        bce_loss(logits, padded.label, padded.mask), bce_loss(logits[:7], batch.label, batch.mask), rtol=1e-6
    )
    assert_allclose(
        pt_loss(q_over_pt, padded.q, padded.pt, padded.event_mask),
        pt_loss(q_over_pt[:7], batch.q, batch.pt, batch.event_mask),
        rtol=1e-6,
    )

    # one device (this process): the steps get what they always got, NumPy arrays, no padding
    parallel = DataParallel.over(jax.local_devices()[:1])
    assert parallel.n_devices == 1
    assert parallel.batch_size(7) == 7
    for original, placed in zip(device_batch(batch), parallel.batch(batch), strict=True):
        assert isinstance(placed, np.ndarray)
        np.testing.assert_array_equal(placed, original)


_SAVE_ON_SECOND_DEVICE = """
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from model.hyperparameters import get_preset
from model.run_folder import checkpoint_manager
from model.steps import example_batch, init_params

params = init_params(jax.random.key(0), get_preset("test")[0], example_batch(1, 16, 16))
params = jax.device_put(params, jax.devices()[1])
with checkpoint_manager(Path(sys.argv[1])) as manager:
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    manager.wait_until_finished()
"""


def test_a_checkpoint_from_other_devices_restores_on_this_one(tmp_path):
    """A checkpoint records the devices it was saved from (here the second of two, as a GPU's would be a
    GPU): restore_params places it on this process's device instead of refusing a topology mismatch."""
    from model.hyperparameters import get_preset
    from model.run_folder import restore_params
    from model.steps import abstract_params, example_batch, init_params

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    subprocess.run([sys.executable, "-c", _SAVE_ON_SECOND_DEVICE, str(tmp_path)], cwd=REPO, env=env, check=True)
    model_config = get_preset("test")[0]
    restored = restore_params(tmp_path, abstract_params(model_config), 1)
    expected = init_params(jax.random.key(0), model_config, example_batch(1, 16, 16))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        assert a.sharding.device_set == {jax.local_devices()[0]}
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
