"""docs/contracts.md stays in step with the code: every column of every table, every command and option."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from analysis.catalog import RESOLUTION_SCHEMA, SUMMARY_SCHEMA
from flows.cli import app
from pipeline import schema
from pipeline.models import SUMMARY_ROWS

CONTRACTS = Path(__file__).resolve().parent.parent / "docs" / "contracts.md"


def _documented_names() -> set[str]:
    """Every `name` written in backticks in the contracts page (a cell may hold several, `a`, `b`)."""
    return set(re.findall(r"`([^`\s]+)`", CONTRACTS.read_text()))


@pytest.mark.parametrize(
    ("table", "columns"),
    [
        ("hits", schema.HITS_SCHEMA.names),
        ("events", schema.EVENTS_SCHEMA.names),
        ("predictions/hits", schema.PRED_HITS_SCHEMA.names),
        ("predictions/clusters", schema.PRED_CLUSTERS_SCHEMA.names),
        ("predictions/tracks", schema.PRED_TRACKS_SCHEMA.names),
        ("RUN/metrics", schema.TRAIN_METRICS_SCHEMA.names),
        ("summary.parquet", SUMMARY_SCHEMA.names()),
        ("resolution.parquet", RESOLUTION_SCHEMA.names()),
    ],
)
def test_every_column_is_documented(table: str, columns: list[str]) -> None:
    missing = [column for column in columns if column not in _documented_names()]
    assert not missing, f"{table}: columns missing from docs/contracts.md: {missing}"


def test_every_model_row_is_documented() -> None:
    # the model rows and the limit row (pipeline.models.SUMMARY_ROWS)
    missing = [row for row in SUMMARY_ROWS if row not in _documented_names()]
    assert not missing, missing


def test_every_command_and_option_is_documented() -> None:
    text = CONTRACTS.read_text()
    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        assert f"muontrack {name}" in text, name
        for param in sub.params:
            for option in param.opts:
                if option.startswith("--") and option != "--help":
                    assert option in text, f"muontrack {name} {option}"
