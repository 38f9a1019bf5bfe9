"""The local Prefect API server that a ``muontrack`` command starts when ``PREFECT_API_URL`` names none.

Prefect's own ephemeral server (``SubprocessASGIServer``) is a child process in the caller's process group that
inherits its stdout and stderr. So Ctrl-C in a terminal killed the server under a running flow (whose client then
retried for minutes, printing tracebacks), and a ``muontrack run`` killed with -9 left the server running,
holding the caller's stdout open (a caller reading to the end hung). Here the server runs:

- in a session of its own: the terminal's Ctrl-C reaches ``muontrack`` alone, which stops the server on its
  way out (Prefect's atexit hook);
- with ``PR_SET_PDEATHSIG`` (Linux): the kernel sends it SIGTERM when ``muontrack`` dies, kill -9 included;
- with stdout and stderr on /dev/null: it never holds the caller's pipes (it logs errors only anyway);
- with a start-up wait of :data:`STARTUP_TIMEOUT_S`, not Prefect's 20 s: a loaded machine waits longer instead
  of failing.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from typing import Any
from unittest import mock

from pipeline.errors import MuontrackError

#: seconds to wait for the local server's health check (10-20 s on a quiet 2-core machine, minutes under load)
STARTUP_TIMEOUT_S = 300

_PR_SET_PDEATHSIG = 1
#: subprocess.Popen itself, for the child's start while the name is patched
_POPEN = subprocess.Popen


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux; elsewhere the atexit hook only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
    return _POPEN(
        *args,
        **kwargs,
        start_new_session=True,
        preexec_fn=_die_with_parent,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@functools.cache
def _server_class() -> type:
    from prefect.server.api.server import SubprocessASGIServer

    class ChildASGIServer(SubprocessASGIServer):
        """Prefect's subprocess server, started as described in the module docstring. It takes the base class's
        singleton place (``SubprocessASGIServer._instances[None]``), so Prefect's client, which reads its settings
        once and would start ``SubprocessASGIServer()`` itself, gets this one."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect builds the uvicorn command line and environment; only the Popen options change. Started
            # from the main thread (PR_SET_PDEATHSIG follows the thread that forked the child).
            with mock.patch.object(subprocess, "Popen", _child_popen):
                return super()._run_uvicorn_command()

    return ChildASGIServer


def ensure_prefect_api(*, export: bool) -> str:
    """The URL of the Prefect API this process uses: the configured one (``PREFECT_API_URL``, a profile, a test
    harness), else a local server started here (:func:`_server_class`; this process's Prefect client finds it
    as its ephemeral server). ``export``: also put the URL in this process's environment, for the worker
    processes it is about to start (Dask), which would otherwise each start a server of their own."""
    import prefect.settings

    url = prefect.settings.PREFECT_API_URL.value()
    if not url:
        server = _server_class()()
        try:
            server.start(timeout=STARTUP_TIMEOUT_S)
        except RuntimeError as err:
            raise MuontrackError(f"the local Prefect server did not start: {str(err).splitlines()[0]}") from None
        url = server.api_url
    if export:
        os.environ["PREFECT_API_URL"] = url
    return url
