"""`evaluate` checks every --run before it predicts anything: a folder that is no run fails at once, in one line,
instead of after the truth references' and classical's inference, and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import classical
import model.inference
from flows import commands
from pipeline.errors import RunError
from tests.helpers import assert_one_line_error, run_muontrack, snapshot


def _refuse_to_predict(*_args, **_kwargs):
    raise AssertionError("predicted before every run was checked")


@pytest.mark.parametrize("kind", ["empty", "missing", "dataset", "no checkpoint"])
def test_predict_all_checks_every_run_before_predicting(kind, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(model.inference, "predict_truth", _refuse_to_predict)
    monkeypatch.setattr(model.inference, "predict_run", _refuse_to_predict)
    monkeypatch.setattr(classical, "predict_classical", _refuse_to_predict)
    run = tmp_path / "run"
    expected = {
        "empty": "not a training run",
        "missing": "does not exist",
        "dataset": "not a training run",
        "no checkpoint": "no checkpoint",
    }[kind]
    if kind == "empty":
        run.mkdir()
    elif kind == "dataset":
        shutil.copytree(tiny_dataset, run)
    elif kind == "no checkpoint":
        run.mkdir()
        config = {"format": "muontrack-run", "model": "baseline", "model_config": {}, "train_config": {"epochs": 1}}
        (run / "config.json").write_text(json.dumps({**config, "dataset": {}}))
    with pytest.raises(RunError, match=expected):
        commands.predict_all(tiny_dataset, [run], tmp_path / "report")
    with pytest.raises(RunError, match=expected):
        commands.plan_prediction_shards(tiny_dataset, [run], tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_evaluate_refuses_a_folder_that_is_no_run_in_one_line(tiny_dataset, tmp_path):
    (tmp_path / "empty").mkdir()
    before = snapshot(tmp_path)
    result = run_muontrack(
        "evaluate", "--data", tiny_dataset, "--run", tmp_path / "empty", "--out", tmp_path / "report", cwd=tmp_path
    )
    assert_one_line_error(result, "not a training run")
    assert "predict" not in result.stderr.split("error:")[0]  # no model was predicted before the error
    assert snapshot(tmp_path) == before
    assert not Path(tmp_path / "report").exists()
