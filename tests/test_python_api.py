"""docs/python-api.md cannot rot: its runnable example runs as the page shows it, in an empty folder, and prints
and writes what the page says; every other Python block of the page parses, and every name it tells a reader to
import or edit exists."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "python-api.md"
#: the heading whose (only) Python block is the runnable example
EXAMPLE_HEADING = "## A whole job in a few lines"


def python_blocks(text: str) -> list[str]:
    """Every fenced ```python block of ``text``, dedented (blocks inside list items are indented)."""
    return [
        textwrap.dedent(match[1])
        for match in re.finditer(r"^[ \t]*```python\n(.*?)^[ \t]*```$", text, flags=re.MULTILINE | re.DOTALL)
    ]


def example_block(text: str) -> str:
    """The Python block of the section :data:`EXAMPLE_HEADING` (exactly one)."""
    start = text.index(EXAMPLE_HEADING + "\n")
    end = text.find("\n## ", start + 1)
    blocks = python_blocks(text[start : end if end != -1 else None])
    assert len(blocks) == 1, f"{EXAMPLE_HEADING!r} must hold exactly one python block, found {len(blocks)}"
    return blocks[0]


def test_every_python_block_of_the_page_parses() -> None:
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) >= 8
    for block in blocks:
        ast.parse(block)


def test_the_example_is_found_and_a_broken_one_would_be_caught() -> None:
    example = example_block(PAGE.read_text())
    assert "simulate_dataset(" in example
    assert "train_run(" in example
    assert "evaluate_runs(" in example
    with pytest.raises(AssertionError, match="exactly one python block"):
        example_block(f"{EXAMPLE_HEADING}\n\ntext\n\n## next\n")
    with pytest.raises(SyntaxError):
        ast.parse(example.replace("print(", "print((", 1))


#: ``module.name`` pairs the page tells a reader to import, call or edit
NAMES = {
    "simulation.shards": ["simulate_dataset"],
    "simulation.generate": ["generate_events"],
    "pipeline.dataset": ["open_dataset"],
    "pipeline.config": ["SimConfig", "DetectorConfig", "DETECTORS", "POINT_RESOLUTION", "read_config_file"],
    "pipeline.errors": ["MuontrackError", "ConfigError", "DatasetError", "RunError"],
    "pipeline.cache": ["enable_compilation_cache"],
    "pipeline.registry": ["ModelSpec", "MODELS", "REPORT_ROWS", "TRAINED_MODELS"],
    "pipeline.batches": ["Batch"],
    "model.train": ["train_run", "format_epoch", "train", "TrainRequest", "resolve_configs"],
    "model.hyperparameters": ["configure"],
    "model.objectives": ["register_objective", "network_objective", "Objective"],
    "model.tracker": ["ROBUST_CHAIN", "PAPER_CHAIN"],
    "model.inference": ["predict_run", "predict_truth", "load_run"],
    "classical": ["predict_classical"],
    "flows.commands": ["evaluate_runs", "write_training_curves"],
    "flows.end_to_end": ["run_end_to_end"],
    "analysis.figures": ["MODEL_STYLE"],
    "analysis.catalog": ["read_catalog"],
    "analysis.statistics": ["sigma68"],
}


@pytest.mark.parametrize("module", sorted(NAMES))
def test_every_name_the_page_gives_exists(module: str) -> None:
    text = PAGE.read_text()
    loaded = importlib.import_module(module)
    for name in NAMES[module]:
        assert name in text, f"{name} is no longer on the page: drop it here"
        assert hasattr(loaded, name), f"docs/python-api.md names {module}.{name}, which does not exist"


@pytest.mark.slow
def test_the_example_runs_and_prints_what_the_page_says(tmp_path: Path) -> None:
    """The block as it stands, in a process of its own in an empty folder (about a minute on 2 cores)."""
    example = example_block(PAGE.read_text())
    result = subprocess.run(
        [sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^simulated 400 events, \d+ hits$", out, re.MULTILINE), out
    assert re.search(r"^trained: 1 epochs, val loss \d", out, re.MULTILINE), out
    assert "report: api-example/report/report.md" in out
    # the summary table: one row per model of the report, the limit row included
    for model in ("baseline", "baseline_paper", "classical", "truth", "truth_charge", "truth_share", "limit"):
        assert re.search(rf"^│ {model} +┆", out, re.MULTILINE), (model, out)
    fitted = re.search(r"^baseline fitted (\d+) of (\d+) test events$", out, re.MULTILINE)
    assert fitted, out
    assert 0 < int(fitted[1]) <= int(fitted[2])
    # it wrote under its own folder only, and what it says it wrote is there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api-example"]
    work = tmp_path / "api-example"
    assert (work / "data" / "manifest.json").is_file()
    assert (work / "runs" / "baseline" / "config.json").is_file()
    for name in ("report.md", "summary.json", "summary.parquet", "predictions/tracks.parquet"):
        assert (work / "report" / name).is_file(), name
