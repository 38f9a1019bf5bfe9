"""The project's cache folders under ``$MUONTRACK_CACHE``, and JAX's persistent compilation cache among them.

``$MUONTRACK_CACHE`` (default ``$XDG_CACHE_HOME/muontrack`` or ``~/.cache/muontrack``) holds the records of
verified dataset files (``verified/``, pipeline.dataset) and JAX's compiled programs (``jax/``). The compilation
cache is global JAX configuration, so no library function turns it on: the entry points do (the ``muontrack``
command, the Prefect deployments, the benchmarks), and a Python user calls :func:`enable_compilation_cache` once.

No JAX import here: the ``muontrack`` command configures the cache before JAX loads, at no cost to its start.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

#: the folder of JAX's compilation cache when set (an empty value turns the cache off), instead of
#: ``$MUONTRACK_CACHE/jax``
JAX_CACHE_VARIABLE = "MUONTRACK_JAX_CACHE"
#: JAX's own variable for its cache folder, read when JAX loads (and by the processes started from this one)
_JAX_VARIABLE = "JAX_COMPILATION_CACHE_DIR"


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """``$MUONTRACK_CACHE``, default ``$XDG_CACHE_HOME/muontrack`` (``~/.cache/muontrack``)."""
    root = environ.get("MUONTRACK_CACHE")
    if root:
        return Path(root)
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "muontrack"


def compilation_cache_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The folder of JAX's compilation cache: ``$MUONTRACK_JAX_CACHE`` when set (None, no cache, when it is
    empty), else ``$MUONTRACK_CACHE/jax`` (:func:`cache_root`)."""
    folder = environ.get(JAX_CACHE_VARIABLE)
    if folder is not None:
        return Path(folder) if folder else None
    return cache_root(environ) / "jax"


def enable_compilation_cache() -> str | None:
    """Keep compiled XLA programs on disk (JAX's persistent cache) in :func:`compilation_cache_dir`, unless one is
    configured already (``JAX_COMPILATION_CACHE_DIR``, or ``jax.config``); returns the folder in use (None: off).

    Each node bucket costs a compilation of the train and eval steps (seconds to minutes on a CPU); with the cache
    a second run (the other model, inference, a resume, the tests) loads them instead. Sets JAX's variable
    ``JAX_COMPILATION_CACHE_DIR`` (read when JAX loads, and by the worker processes this one starts: Dask's) and,
    when JAX is loaded already, its configuration. Global: for entry points and users, never called by a library
    function. Programs that compile in under a second are not kept (JAX's
    ``jax_persistent_cache_min_compile_time_secs``)."""
    jax = sys.modules.get("jax")
    configured = jax.config.jax_compilation_cache_dir if jax is not None else os.environ.get(_JAX_VARIABLE)
    if configured:
        return configured
    folder = compilation_cache_dir()
    if folder is None:
        return None
    os.environ[_JAX_VARIABLE] = str(folder)
    if jax is not None:
        jax.config.update("jax_compilation_cache_dir", str(folder))
    return str(folder)
