"""Training progress in a Prefect run: the train task logs one line per epoch through Prefect's run logger."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("prefect")

import prefect

import model.train
from flows import tasks
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

    def fake_train_run(data, model, out, preset, seed, resume, on_epoch=None, **options):
        seen.update(data=data, model=model, out=out, preset=preset, seed=seed, resume=resume, options=options)
        for info in epochs:
            on_epoch(info)
        return "2 epochs"

    records = _Records()
    run_logger = logging.getLogger("test-training-progress")
    run_logger.setLevel(logging.INFO)
    run_logger.addHandler(records)
    monkeypatch.setattr(model.train, "train_run", fake_train_run)
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
    assert records.messages == [format_epoch(info) for info in epochs]
    assert records.messages[0].startswith("e2e epoch 1/2: train loss 0.7000, val loss 0.6500, lr 0.003")
    assert "val sigma68(q/pT) 0.0123" in records.messages[1]
    assert records.messages[1].endswith("2.5 s")


def test_train_task_outside_a_prefect_run_logs_to_its_module_logger(monkeypatch, tmp_path, caplog):
    # train_run's parameter names: the task calls it with keywords
    def fake_train_run(data, model, out, preset, seed, resume, on_epoch=None, **options):  # noqa: ARG001
        on_epoch(_info(1, 0.01))
        return "1 epoch"

    monkeypatch.setattr(model.train, "train_run", fake_train_run)
    with caplog.at_level(logging.INFO, logger=tasks.__name__):
        tasks.train_model.fn("data", "e2e", str(tmp_path / "run"), "test", 0, "hash")
    assert [r.getMessage() for r in caplog.records if r.name == tasks.__name__] == [format_epoch(_info(1, 0.01))]
