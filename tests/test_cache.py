"""The cache folders under $MUONTRACK_CACHE, and JAX's compilation cache turned on by the entry points only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache import cache_root, compilation_cache_dir
from pipeline.dataset import verified_record_path


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HOME": "/home/u"}, "/home/u/.cache/muontrack/jax"),
        ({"HOME": "/home/u", "XDG_CACHE_HOME": "/xdg"}, "/xdg/muontrack/jax"),
        ({"XDG_CACHE_HOME": "/xdg", "MUONTRACK_CACHE": "/c"}, "/c/jax"),
        ({"XDG_CACHE_HOME": "/xdg", "MUONTRACK_CACHE": ""}, "/xdg/muontrack/jax"),  # empty: the default
        ({"MUONTRACK_CACHE": "/c", "MUONTRACK_JAX_CACHE": "/j"}, "/j"),  # the override
        ({"MUONTRACK_CACHE": "/c", "MUONTRACK_JAX_CACHE": ""}, None),  # empty: no cache
    ],
)
def test_the_jax_cache_folder_follows_muontrack_cache(monkeypatch, environ, expected):
    monkeypatch.setattr(Path, "home", lambda: Path(environ.get("HOME", "/nohome")))
    assert compilation_cache_dir(environ) == (Path(expected) if expected is not None else None)


def test_verified_records_and_the_jax_cache_share_the_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MUONTRACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MUONTRACK_JAX_CACHE", raising=False)
    assert cache_root() == tmp_path / "cache"
    assert verified_record_path(tmp_path / "data").parent == tmp_path / "cache" / "verified"
    assert compilation_cache_dir() == tmp_path / "cache" / "jax"


#: enable_compilation_cache() before or after JAX loads, in a fresh process: the folder JAX then uses and the
#: variable the processes it starts inherit
_ENABLE = """
import json, os, sys
from pipeline.cache import enable_compilation_cache
if sys.argv[1] == "after":
    import jax
returned = enable_compilation_cache()
import jax
print(json.dumps([returned, jax.config.jax_compilation_cache_dir, os.environ.get("JAX_COMPILATION_CACHE_DIR")]))
"""


def _enable(when: str, **environ: str) -> list[str | None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUONTRACK_", "JAX_COMPILATION_CACHE"))}
    output = subprocess.run(
        [sys.executable, "-c", _ENABLE, when], env={**env, **environ}, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output.splitlines()[-1])


@pytest.mark.parametrize("when", ["before", "after"])
def test_enable_compilation_cache_configures_jax_and_the_processes_it_starts(tmp_path, when):
    """Before JAX loads (the ``muontrack`` command) through JAX's variable, after it through its configuration."""
    folder = str(tmp_path / "c" / "jax")
    assert _enable(when, MUONTRACK_CACHE=str(tmp_path / "c")) == [folder, folder, folder]


def test_enable_compilation_cache_keeps_a_configured_folder_and_can_be_turned_off(monkeypatch, tmp_path):
    import jax

    from pipeline.cache import enable_compilation_cache

    configured = jax.config.jax_compilation_cache_dir  # tests/conftest.py's
    monkeypatch.setenv("MUONTRACK_CACHE", str(tmp_path / "elsewhere"))
    if configured:
        assert enable_compilation_cache() == configured
        assert jax.config.jax_compilation_cache_dir == configured
    monkeypatch.setenv("MUONTRACK_JAX_CACHE", "")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert enable_compilation_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
        assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    finally:
        jax.config.update("jax_compilation_cache_dir", configured)
