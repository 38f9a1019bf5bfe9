"""Progress in a Prefect run: the train task logs one line per epoch and the compilations and events between them
through Prefect's run logger, the predict and report tasks theirs, and a heartbeat fills any silence."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect")

import prefect

import model.train
from flows import commands, logs, tasks
from model.train import format_epoch


def _info(epoch: int, sigma: float | None) -> dict:
    return {
        "model": "e2e",
        "epoch": epoch,
        "epochs": 2,
        "step": 30 * epoch,
        "lambda": 0.5,
        "learning_rate": 3e-3,
        "grad_norm": 0.25,
        "train_loss": 0.7,
        "train_bce": 0.6,
        "train_pt_loss": 0.2,
        "val_loss": 0.65,
        "val_bce": 0.55,
        "val_pt_loss": 0.2,
        "val_sigma68": sigma,
        "train_seconds": 2.0,
        "val_seconds": 0.5,
        "seconds": 2.5,
    }


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_train_task_logs_each_epoch_to_the_prefect_run_logger(monkeypatch, tmp_path):
    epochs = [_info(1, None), _info(2, 0.0123)]
    seen: dict = {}

    def fake_train_run(data, model, out, preset, seed, resume, on_epoch=None, on_message=None, **options):
        seen.update(data=data, model=model, out=out, preset=preset, seed=seed, resume=resume, options=options)
        on_message("e2e: compiling the train step for 256-node events (batches of 8)")
        for info in epochs:
            on_epoch(info)
        return "2 epochs"

    records = _Records()
    run_logger = logging.getLogger("test-training-progress")
    run_logger.setLevel(logging.INFO)
    run_logger.addHandler(records)
    monkeypatch.setattr(model.train, "train_run", fake_train_run)
    monkeypatch.setattr(commands, "write_training_curves", lambda run: run)
    monkeypatch.setattr(prefect, "get_run_logger", lambda: run_logger)
    try:
        out = str(tmp_path / "run")
        assert tasks.train_model.fn("data", "e2e", out, "test", 3, "hash") == out
    finally:
        run_logger.removeHandler(records)
    assert seen["model"] == "e2e"
    assert seen["preset"] == "test"
    assert seen["seed"] == 3
    assert seen["resume"] is False
    assert records.messages == [
        f"e2e: training into {out}",
        "e2e: compiling the train step for 256-node events (batches of 8)",
        *(format_epoch(info) for info in epochs),
    ]
    assert records.messages[2].startswith("e2e epoch 1/2: train loss 0.7000, val loss 0.6500, lr 0.003")
    assert "val sigma68(q/pT) 0.0123" in records.messages[3]
    assert records.messages[3].endswith("2.5 s")


def test_train_task_outside_a_prefect_run_logs_to_its_module_logger(monkeypatch, tmp_path, caplog):
    # train_run's parameter names: the task calls it with keywords
    def fake_train_run(data, model, out, preset, seed, resume, on_epoch=None, **options):  # noqa: ARG001
        on_epoch(_info(1, 0.01))
        return "1 epoch"

    monkeypatch.setattr(model.train, "train_run", fake_train_run)
    monkeypatch.setattr(commands, "write_training_curves", lambda run: run)
    with caplog.at_level(logging.INFO, logger=tasks.__name__):
        tasks.train_model.fn("data", "e2e", str(tmp_path / "run"), "test", 0, "hash")
    assert [r.getMessage() for r in caplog.records if r.name == tasks.__name__] == [
        f"e2e: training into {tmp_path / 'run'}",
        format_epoch(_info(1, 0.01)),
    ]


class _Lines:
    """A thread-safe list of logged lines with the time of each."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lines: list[tuple[float, str]] = []

    def __call__(self, line: str) -> None:
        with self.lock:
            self.lines.append((time.monotonic(), line))

    def texts(self) -> list[str]:
        with self.lock:
            return [line for _, line in self.lines]


def test_heartbeat_repeats_the_newest_line_while_nothing_else_comes():
    lines = _Lines()
    with logs.Heartbeat(lines, "compiling", every=0.2) as heartbeat:
        time.sleep(0.75)
        heartbeat.beat("epoch 1")
        time.sleep(0.1)
    stopped = len(lines.texts())
    time.sleep(0.5)
    texts = lines.texts()
    assert len(texts) == stopped, "the heartbeat went on after its block"
    assert texts[0] == "compiling"
    stills = texts[1 : texts.index("epoch 1")]
    assert 2 <= len(stills) <= 4, texts
    assert all(line.startswith("still: compiling (") and line.endswith(" s)") for line in stills)
    assert texts[-1] == "epoch 1"  # 0.1 s after it: no "still" yet
    gaps = [b - a for (a, _), (b, _) in zip(lines.lines, lines.lines[1:], strict=False)]
    assert max(gaps) < 0.2 + 0.15


def test_heartbeat_stays_quiet_while_lines_come_often():
    lines = _Lines()
    with logs.Heartbeat(lines, "start", every=0.3) as heartbeat:
        for k in range(8):
            time.sleep(0.08)
            heartbeat.beat(f"step {k}")
    assert lines.texts() == ["start", *(f"step {k}" for k in range(8))]


def test_predict_and_report_tasks_log_their_progress(monkeypatch, tmp_path):
    records = _Records()
    run_logger = logging.getLogger("test-prediction-progress")
    run_logger.setLevel(logging.INFO)
    run_logger.addHandler(records)

    def fake_predict_all(data, runs, out, checkpoint, on_message):  # noqa: ARG001
        on_message("predict baseline: 40 test events")
        on_message("predict baseline: 40 events, 1.0 s")
        return Path(out)

    monkeypatch.setattr(commands, "predict_all", fake_predict_all)
    monkeypatch.setattr(prefect, "get_run_logger", lambda: run_logger)
    try:
        tasks.predict.fn(object(), ["run"], str(tmp_path / "report"), ["key"])
    finally:
        run_logger.removeHandler(records)
    assert records.messages == [
        "predicting the test split with 1 runs",
        "predict baseline: 40 test events",
        "predict baseline: 40 events, 1.0 s",
    ]


@pytest.mark.slow
def test_train_run_announces_each_compilation_and_the_events_between(monkeypatch, tiny_dataset, tmp_path):
    """A real (tiny) training: one "compiling" line per step and batch shape, before its first step and not in
    the second epoch, its time after it, and (PROGRESS_SECONDS = 0) a line of events trained after each step."""
    monkeypatch.setattr(model.train, "PROGRESS_SECONDS", 0.0)
    lines: list[str] = []
    epochs: list[int] = []
    model.train.train_run(
        tiny_dataset,
        "baseline",
        tmp_path / "run",
        preset="test",
        epochs=2,
        on_message=lines.append,
        on_epoch=lambda info: (epochs.append(info["epoch"]), lines.append(f"EPOCH {info['epoch']}")),
    )
    assert lines[0].startswith("baseline: training on 1 cpu device")
    compile_train = "baseline: compiling the train step for 256-node events (batches of 8)"
    compile_val = "baseline: compiling the validation step for 256-node events (batches of 8)"
    assert lines.count(compile_train) == 1
    assert lines.count(compile_val) == 1
    first = lines.index(compile_train)
    assert lines[first + 1].startswith("baseline: train step for 256-node events ready in ")
    trained = [k for k, line in enumerate(lines) if " events trained" in line]
    assert trained
    assert trained[0] > first + 1
    assert lines.index(compile_val) < lines.index("EPOCH 1") < max(trained)
    assert all(
        line.startswith(("baseline epoch 1/2: ", "baseline epoch 2/2: ")) for line in map(lines.__getitem__, trained)
    )
    assert any(line.startswith("baseline epoch 2/2: ") for line in map(lines.__getitem__, trained))
    assert epochs == [1, 2]
