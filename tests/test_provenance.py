"""pipeline.provenance.code_version: one hash helper for simulation, training and cache keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline import provenance


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny project tree standing in for the real one: provenance.ROOT points at it."""
    for name, text in {
        "pkg/__init__.py": "",
        "pkg/core.py": "VALUE = 1\n",
        "pkg/notes.txt": "not code\n",
        "other/named.py": "NAMED = 1\n",
        "other/unnamed.py": "UNNAMED = 1\n",
    }.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    return tmp_path


def _version() -> str:
    return provenance.code_version("pkg", "other/named.py")


@pytest.mark.usefixtures("tree")
def test_code_version_is_the_package_version_plus_12_hex_digits() -> None:
    version = _version()
    assert re.fullmatch(r".+\+[0-9a-f]{12}", version)
    assert version == _version()


@pytest.mark.parametrize(
    "change",
    [
        "edit a file of a named package",
        "add a file to a named package",
        "rename a file of a named package",
        "edit a named file",
    ],
)
def test_code_version_changes_with_the_named_sources(tree: Path, change: str) -> None:
    before = _version()
    if change == "edit a file of a named package":
        (tree / "pkg" / "core.py").write_text("VALUE = 2\n")
    elif change == "add a file to a named package":
        (tree / "pkg" / "extra.py").write_text("")
    elif change == "rename a file of a named package":
        (tree / "pkg" / "core.py").rename(tree / "pkg" / "kernel.py")
    else:
        (tree / "other" / "named.py").write_text("NAMED = 2\n")
    assert _version() != before


def test_code_version_ignores_other_files(tree: Path) -> None:
    before = _version()
    (tree / "other" / "unnamed.py").write_text("UNNAMED = 2\n")
    (tree / "pkg" / "notes.txt").write_text("edited\n")
    (tree / "README.md").write_text("docs\n")
    assert _version() == before


@pytest.mark.usefixtures("tree")
def test_code_version_depends_on_which_sources() -> None:
    assert provenance.code_version("pkg") != provenance.code_version("other/named.py")
    assert provenance.code_version("pkg") != _version()


def test_root_is_the_project_root() -> None:
    """The real ROOT holds the packages the hash is taken over."""
    assert (provenance.ROOT / "pyproject.toml").is_file()
    assert (provenance.ROOT / "pipeline" / "provenance.py").is_file()


# pipeline modules model/ imports that cannot change a trained weight or a measured figure
_NOT_TRAINING_CODE = {
    "errors": "error messages",
    "provenance": "the hash itself",
    "locks": "one writer per folder",
    "atomic": "how files are replaced",
    "schema": "file layout; a changed column fails loudly on reading",
    "dataset": "reading shards, checked against their checksums",
    "registry": "the registry of names, checked against the objectives at import",
}


def test_training_version_covers_every_pipeline_module_model_takes_numbers_from() -> None:
    """A pipeline module that model/ imports is either hashed into RUN code_version or named above with why."""
    import ast

    from model.run_folder import TRAINING_SOURCES

    imported: set[str] = set()
    for file in (provenance.ROOT / "model").glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                imported.add(node.module.split(".")[1])
    hashed = {Path(source).stem for source in TRAINING_SOURCES if source.startswith("pipeline/")}
    assert "batches" in imported
    unaccounted = imported - hashed - set(_NOT_TRAINING_CODE)
    assert not unaccounted, f"model/ imports pipeline modules {unaccounted}: add them to TRAINING_SOURCES"
