"""docs/contracts.md stays in step with the code: every column of every table, documented in that table's own
section and nothing more, every model row, every command and option."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import typer.main

from analysis.catalog import RESOLUTION_SCHEMA, SUMMARY_SCHEMA
from analysis.results import SUMMARY_KEYS
from flows.cli import app
from pipeline import schema
from pipeline.registry import REPORT_ROWS, SUMMARY_ROWS

CONTRACTS = Path(__file__).resolve().parent.parent / "docs" / "contracts.md"

_HEADING = re.compile(r"^(#{1,6}) (.+)$")
_CELL_SEPARATOR = re.compile(r"(?<!\\)\|")  # a `|` not escaped as `\|` (meanings hold \|r − median\|)


def _cut(text: str) -> list[tuple[str, list[str]]]:
    """A Markdown page cut at every heading of any level, outside code blocks: (heading text, its lines up to the
    next heading), in page order."""
    sections: list[tuple[str, list[str]]] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else _HEADING.match(line)
        if match:
            sections.append((match.group(2).strip(), []))
        elif sections:
            sections[-1][1].append(line)
    return sections


def _sections(text: str) -> dict[str, list[str]]:
    """The contracts page by section: {heading text: its lines}; each heading names one section."""
    sections: dict[str, list[str]] = {}
    for heading, lines in _cut(text):
        assert heading not in sections, f"docs/contracts.md: two sections named {heading!r}"
        sections[heading] = lines
    return sections


def _table_names(lines: list[str]) -> list[str]:
    """The names in backticks in the first cell of every body row of the section's Markdown tables (a cell may
    hold several, `a`, `b`); the header row (no backticks in its first cell) and the |---| rule hold none."""
    names: list[str] = []
    for line in lines:
        if not line.startswith("|"):
            continue
        first_cell = _CELL_SEPARATOR.split(line)[1]
        names += re.findall(r"`([^`\s]+)`", first_cell)
    return names


def _documented(*headings: str) -> list[str]:
    sections = _sections(CONTRACTS.read_text())
    names: list[str] = []
    for heading in headings:
        assert heading in sections, f"docs/contracts.md has no section {heading!r}"
        found = _table_names(sections[heading])
        assert found, f"docs/contracts.md, {heading!r}: no table of columns"
        names += found
    return names


def _documented_names() -> set[str]:
    """Every `name` written in backticks anywhere in the contracts page."""
    return set(re.findall(r"`([^`\s]+)`", CONTRACTS.read_text()))


#: each written table, the contracts sections that together document its columns (in their tables), its columns
_IDENTITY = "Identity columns (first in both files)"
_TABLES = [
    ("hits", ("`hits` (one row per fired strip)",), schema.HITS_SCHEMA.names),
    ("events", ("`events` (one row per event, truth)",), schema.EVENTS_SCHEMA.names),
    ("predictions/hits", ("`predictions/hits.parquet`",), schema.PRED_HITS_SCHEMA.names),
    ("predictions/clusters", ("`predictions/clusters.parquet`",), schema.PRED_CLUSTERS_SCHEMA.names),
    ("predictions/tracks", ("`predictions/tracks.parquet`",), schema.PRED_TRACKS_SCHEMA.names),
    ("RUN/metrics", ("`metrics.parquet`",), schema.TRAIN_METRICS_SCHEMA.names),
    ("summary.json", ("`summary.json`",), list(SUMMARY_KEYS)),
    ("summary.parquet", (_IDENTITY, "`summary.parquet`"), SUMMARY_SCHEMA.names()),
    ("resolution.parquet", (_IDENTITY, "`resolution.parquet`"), RESOLUTION_SCHEMA.names()),
]


@pytest.mark.parametrize(("table", "headings", "columns"), _TABLES, ids=[table for table, _, _ in _TABLES])
def test_every_column_is_documented_in_its_own_table(table: str, headings: tuple[str, ...], columns: list[str]) -> None:
    documented = _documented(*headings)
    missing = [column for column in columns if column not in documented]
    extra = [name for name in documented if name not in columns]
    repeated = sorted({name for name in documented if documented.count(name) > 1})
    assert not missing, f"{table}: columns missing from its table in docs/contracts.md: {missing}"
    assert not extra, f"{table}: docs/contracts.md documents columns the schema does not have: {extra}"
    assert not repeated, f"{table}: columns documented twice in docs/contracts.md: {repeated}"


def test_a_column_missing_from_its_own_table_is_caught(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The check reads each table's own section: `layer` is documented for `hits`, but a contracts page without
    its row in `predictions/clusters.parquet` fails, and so does one with a column the schema lacks."""
    text = CONTRACTS.read_text()
    row = "| `layer` | int16 | every layer of every event has a row |\n"
    assert row in text
    for edited in (text.replace(row, ""), text.replace(row, row + "| `layer_2` | int16 | |\n")):
        page = tmp_path / "contracts.md"
        page.write_text(edited)
        monkeypatch.setattr(sys.modules[__name__], "CONTRACTS", page)
        with pytest.raises(AssertionError):
            test_every_column_is_documented_in_its_own_table(
                "predictions/clusters", ("`predictions/clusters.parquet`",), schema.PRED_CLUSTERS_SCHEMA.names
            )


def test_every_model_row_is_documented() -> None:
    # the model rows in report order in the `model` column's table; the limit row (SUMMARY_ROWS) in the text
    assert tuple(_documented("The `model` column")) == REPORT_ROWS
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


ROOT = CONTRACTS.parent.parent
#: the pages a user who clones the repository reads: the README and every page of docs/
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation (backticks, colons, parentheses) dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading, _ in _cut(page.read_text()):
        base = _anchor(heading)
        anchors.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return anchors


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # code blocks hold no links
    return _LINK.findall(text)


def _broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links (and images) of a page that name no file under root, or no heading of their page."""
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        exists = target.is_relative_to(root.resolve()) and target.exists()
        if not exists or (anchor and target.suffix == ".md" and anchor not in _anchors(target)):
            broken.append(link)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_every_link_resolves_inside_the_repository(page: Path) -> None:
    """The README and docs/ stand on their own: every relative link (and image) names a file of the repository,
    and every #anchor a heading of its page."""
    broken = _broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: links that resolve to nothing: {broken}"


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## The `cpu` job (as measured)\n\n## A page\n")
    (tmp_path / "outside.md").write_text("# Outside\n")
    page = tmp_path / "docs" / "b.md"
    page.write_text(
        "[ok](a.md#the-cpu-job-as-measured) [again](a.md#a-page-1) [file](c.md) [anchor](a.md#no-such)\n"
        "![image](scan/x.png) [out](../outside.md) [web](https://example.org/x.md)\n"
        "```\n[in code](nowhere.md)\n```\n"
    )
    assert _broken_links(page, root=tmp_path / "docs") == ["c.md", "a.md#no-such", "scan/x.png", "../outside.md"]


def test_ci_lints_then_runs_the_readmes_test_command() -> None:
    """`.ci/run` runs ruff (lint, then format) and then exactly the test command of the README's second line."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert block, "README.md: no bash block with the two commands"
    test_line = block.group(1).splitlines()[1]
    readme_command = test_line.rsplit(" && ", 1)[1]
    commands = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert commands[-3:] == ["ruff check .", "ruff format --check .", readme_command]
