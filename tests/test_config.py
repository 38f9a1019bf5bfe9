"""The config loader (pipeline.config.load_config) and the config file format of ``--config``: sections
``simulation``, ``model`` and ``train`` over a preset's values, one-line errors naming the key, and the
dataset identity (SimConfig's hashes) unchanged by the loader."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from model.hyperparameters import PRESETS, ModelConfig, TrainConfig, configure, get_preset, preset_label
from pipeline.config import BackgroundConfig, DetectorConfig, MuonConfig, SimConfig, read_config_file
from pipeline.errors import ConfigError
from tests.helpers import assert_one_line_error, run_muontrack


def _write_toml(path: Path, sections: dict) -> Path:
    """A minimal TOML writer for the tests (numbers, booleans, strings, lists, nested tables; no None)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    lines: list[str] = []

    def table(name: str, content: dict) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {value(v)}" for k, v in content.items() if not isinstance(v, dict) and v is not None)
        for k, v in content.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for name, content in sections.items():
        table(name, content)
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- dataset identity ----------------------------------------------------------------------------------------


def test_sim_config_hashes_are_unchanged() -> None:
    # The dataset identity of existing datasets: manifests, dataset folder names (`muontrack run`) and the
    # Prefect cache keys are built from these hashes. A change here orphans every dataset already simulated.
    assert SimConfig().config_hash() == "a928091d6e84ead2"
    assert SimConfig().physics_hash() == "ea557ec13a9d5db8"
    # the job presets' dataset configs (test, cpu, paper: shard_events 300, 5000, 50000)
    assert SimConfig(shard_events=300).config_hash() == "ca1a6e1320d0e9f5"
    assert SimConfig(shard_events=5_000).config_hash() == "052b31f1bea7e477"
    assert SimConfig(shard_events=50_000).config_hash() == "d2a2751fbf67d0fc"
    assert SimConfig(shard_events=300).physics_hash() == "ea557ec13a9d5db8"


def test_loaded_sim_config_equals_the_built_one() -> None:
    # integers where floats are expected become the same floats: the canonical JSON and the hash stay equal
    loaded = SimConfig.from_dict({"detector": {"station_y": [0, 750, 1500], "charge_mean": 1, "pitch": 0.5}})
    assert loaded == SimConfig()
    assert loaded.to_json() == SimConfig().to_json()
    assert loaded.config_hash() == "a928091d6e84ead2"
    assert type(loaded.detector.station_y) is tuple
    assert type(loaded.detector.station_y[0]) is float


# ---- the file format ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_round_trips_through_a_json_file(name: str, tmp_path: Path) -> None:
    model, train = get_preset(name)
    path = tmp_path / "preset.json"
    path.write_text(json.dumps({"model": model.to_dict(), "train": train.to_dict()}))
    other = "paper" if name != "paper" else "test"
    assert configure(other, read_config_file(path)) == (model, train)


@pytest.mark.parametrize("name", ["test", "cpu"])  # paper's None values have no TOML spelling (see docs/operations.md)
def test_preset_round_trips_through_a_toml_file(name: str, tmp_path: Path) -> None:
    model, train = get_preset(name)
    path = _write_toml(tmp_path / "preset.toml", {"model": model.to_dict(), "train": train.to_dict()})
    assert configure("paper", read_config_file(path)) == (model, train)


def test_simulation_section_round_trips(tmp_path: Path) -> None:
    config = SimConfig(
        detector=DetectorConfig(pitch=0.4, multiple_scattering=False, station_y=(0.0, 800.0, 1600.0)),
        muon=MuonConfig(pt_min=10.0),
        background=BackgroundConfig(extra_track_layers_max=4),
        shard_events=123,
    )
    for path in (tmp_path / "sim.json", tmp_path / "sim.toml"):
        if path.suffix == ".json":
            path.write_text(json.dumps({"simulation": config.to_dict()}))
        else:
            _write_toml(path, {"simulation": config.to_dict()})
        loaded = SimConfig.from_file(path)
        assert loaded == config
        assert loaded.config_hash() == config.config_hash()


def test_a_partial_section_overrides_only_its_keys(tmp_path: Path) -> None:
    # the example of docs/operations.md ("Config files"): a two-layer attention logit of 8 heads on the cpu preset
    path = tmp_path / "heads.toml"
    path.write_text("[model]\nlogit_mlp = [32, 8]\n\n[train]\nepochs = 3\n")
    cpu_model, cpu_train = get_preset("cpu")
    model, train = configure("cpu", read_config_file(path))
    assert model == dataclasses.replace(cpu_model, logit_mlp=(32, 8))
    assert train == dataclasses.replace(cpu_train, epochs=3)
    assert preset_label("cpu", model, train).startswith("cpu-")
    assert preset_label("cpu", cpu_model, cpu_train) == "cpu"
    assert configure("cpu", {"model": {}, "train": {}}) == get_preset("cpu")


def test_a_partial_simulation_section_keeps_the_base(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text("[simulation.detector]\npitch = 0.4\n\n[model]\nhidden = 64\n")
    base = SimConfig(shard_events=300)
    loaded = SimConfig.from_file(path, base=base)
    assert loaded == dataclasses.replace(base, detector=dataclasses.replace(base.detector, pitch=0.4))
    assert loaded.config_hash() != base.config_hash()  # another dataset


def test_a_file_without_simulation_section_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "train-only.json"
    path.write_text(json.dumps({"train": {"epochs": 1}}))
    assert SimConfig.from_file(path) == SimConfig()


# ---- one-line errors naming the key -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # unknown keys, at each level
        ("[simulaton]\n", "unknown config key simulaton in"),
        ("[train]\nepohcs = 3\n", "unknown config key train.epohcs (known: batch_size, epochs,"),
        ("[model]\nhiden = 8\n", "unknown config key model.hiden"),
        ("[simulation]\nshard_event = 8\n", "unknown config key simulation.shard_event"),
        ("[simulation.detector]\npitchh = 0.4\n", "unknown config key simulation.detector.pitchh (known: b_field,"),
        # wrong types
        ('[train]\nepochs = "3"\n', "config key train.epochs must be an integer, got '3'"),
        ("[train]\nepochs = 3.0\n", "config key train.epochs must be an integer, got 3.0"),
        ('[train]\nlearning_rate = "abc"\n', "config key train.learning_rate must be a number, got 'abc'"),
        ("[train]\nlearning_rate = inf\n", "config key train.learning_rate must be a finite number, got inf"),
        ("[train]\nnode_buckets = 128\n", "config key train.node_buckets must be a list, got 128"),
        ("[train]\nestimator = 3\n", "config key train.estimator must be a string, got 3"),
        ("[train]\nmax_train_events = 1979-05-27\n", "config key train.max_train_events must be an integer"),
        ('[model]\nlogit_mlp = [32, "8"]\n', "config key model.logit_mlp[1] must be an integer, got '8'"),
        ("[model]\nresidual = 1\n", "config key model.residual must be true or false, got 1"),
        ('[simulation.detector]\npitch = "abc"\n', "config key simulation.detector.pitch must be a number, got 'abc'"),
        ("[simulation]\ndetector = 3\n", "config section simulation.detector must be a mapping"),
        ("model = 3\n", "config section model must be a mapping"),
        # the former top-level SimConfig form
        ("[detector]\npitch = 0.4\n", "config key detector of"),
        # the dataclasses' own rules still apply
        ("[model]\nhidden = 64\n", "model.query_mlp must end with model.hidden"),
        ("[simulation.muon]\npt_min = 60.0\n", "muon.pt_max must be greater than muon.pt_min"),
    ],
)
def test_bad_keys_give_one_line_naming_the_key(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)

    def load() -> None:
        sections = read_config_file(path)
        SimConfig.from_file(path)
        configure("cpu", {name: section for name, section in sections.items() if name != "simulation"})

    with pytest.raises(ConfigError) as raised:
        load()
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_missing_required_key_is_named() -> None:
    with pytest.raises(ConfigError) as raised:
        ModelConfig.from_dict({"hidden": 8, "query_mlp": [8], "update_mlp": [1]})
    assert str(raised.value) == "config key model.logit_mlp is missing (it has no default)"
    with pytest.raises(ConfigError, match=r"config key train\.learning_rate is missing") as raised:
        TrainConfig.from_dict({"epochs": 1, "batch_size": 1})
    assert "incomplete" not in str(raised.value)


def test_a_config_file_that_does_not_parse(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[model\n")
    with pytest.raises(ConfigError, match=r"config file .*broken.toml is not valid TOML"):
        read_config_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.json")
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        read_config_file(path)


def test_run_job_config_follows_the_simulation_section() -> None:
    from flows.commands import job_preset
    from flows.end_to_end import job_configs

    job = job_preset("test")
    plain, training, label = job_configs(job, None)
    assert plain == SimConfig(shard_events=job.shard_events)
    assert training is None
    assert label == "test"
    changed, training, label = job_configs(
        job, {"simulation": {"muon": {"pt_min": 10.0}}, "model": {"logit_mlp": [8, 4]}}
    )
    assert changed.muon.pt_min == 10.0
    assert changed.shard_events == job.shard_events
    assert changed.config_hash() != plain.config_hash()  # another dataset folder and cache key
    assert training == {"model": {"logit_mlp": [8, 4]}}
    assert label.startswith("test-")  # another run and report folder


# ---- the command line ----------------------------------------------------------------------------------------


def _assert_usage_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result
    assert_one_line_error(result, *fragments)


def test_train_with_a_bad_config_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepohcs = 3\n")
    args = ("train", "--data", tmp_path / "data", "--model", "e2e", "--out", tmp_path / "run", "--config", bad)
    _assert_usage_error(run_muontrack(*args, cwd=tmp_path), "unknown config key train.epohcs")
    bad.write_text("[simulation.muon]\npt_min = 10.0\n")
    _assert_usage_error(run_muontrack(*args, cwd=tmp_path), "simulation section", "--data fixes the simulation")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_applies_the_config_file(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tmp_path / "heads.toml"
    config.write_text("[model]\nlogit_mlp = [8, 4]\n\n[train]\nmax_train_events = 16\nepochs = 2\n")
    out = tmp_path / "run"
    args = ("train", "--data", tiny_dataset, "--model", "baseline", "--preset", "test", "--out", out)
    result = run_muontrack(*args, "--epochs", 1, "--config", config, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["model_config"]["logit_mlp"] == [8, 4]
    assert recorded["train_config"]["max_train_events"] == 16
    assert recorded["train_config"]["epochs"] == 1  # --epochs wins over the file
    model, _ = get_preset("test")
    assert recorded["model_config"] == json.loads(json.dumps(dataclasses.replace(model, logit_mlp=(8, 4)).to_dict()))


def test_run_with_a_bad_config_file_exits_2_before_the_flow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"simulation": {"detector": {"pitch": "abc"}}}))
    result = run_muontrack("run", "--preset", "test", "--out", tmp_path / "out", "--config", bad, cwd=tmp_path)
    _assert_usage_error(result, "config key simulation.detector.pitch must be a number, got 'abc'")
    assert not (tmp_path / "out").exists()
