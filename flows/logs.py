"""Prefect's console logging, made to keep the CLI's promise of one line per user error.

A flow or task that raises a :class:`~pipeline.errors.MuontrackError` makes Prefect log the error with its
traceback, once for the task and once for every enclosing flow, and then a "Finished in state Failed" line
for each. The CLI already prints the error as one line; these records only repeat it. The filter drops them
and lets every other record through (an unexpected exception keeps its traceback).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pipeline.errors import MuontrackError

#: the loggers of Prefect's flow and task run engines (what `get_run_logger` and the engines log to)
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def _error_names() -> set[str]:
    names: set[str] = set()
    pending = [MuontrackError]
    while pending:
        cls = pending.pop()
        names.add(cls.__name__)
        pending.extend(cls.__subclasses__())
    return names


class UserErrorFilter(logging.Filter):
    """Drop Prefect's records about a MuontrackError: its traceback and its "Finished in state Failed" line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], MuontrackError):
            return False
        if record.levelno >= logging.INFO and "Failed(" in str(record.msg):
            message = record.getMessage()
            return not any(f"{name}: " in message for name in _error_names())
        return True


def quiet_user_errors() -> None:
    """Install :class:`UserErrorFilter` on Prefect's run loggers (once per process)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorFilter) for f in logger.filters):
            logger.addFilter(UserErrorFilter())


#: the longest a Prefect job stays silent: a line at least this often (seconds) while a task works
HEARTBEAT_SECONDS = 20.0


class Heartbeat:
    """Progress lines of a long task, and a line whenever none came for ``every`` seconds.

    ``beat(message)`` logs ``message`` at once and remembers it; a daemon thread logs the newest message again
    with the time since it ("still: <message> (45 s)") when ``every`` seconds passed without a line, so a step
    that blocks the task's thread (an XLA compilation, a slow figure) still shows that the job lives. Use as a
    context manager; the thread stops at its exit.
    """

    def __init__(self, log: Callable[[str], None], first: str, every: float = HEARTBEAT_SECONDS) -> None:
        self._log = log
        self._every = every
        self._lock = threading.Lock()
        self._message = first
        self._since = self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="muontrack-heartbeat", daemon=True)

    def beat(self, message: str) -> None:
        """Log ``message`` now; the heartbeat repeats it while nothing newer comes."""
        with self._lock:
            self._message = message
            self._since = self._last = time.monotonic()
        self._log(message)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self._every / 4)):
            with self._lock:
                now = time.monotonic()
                if now - self._last < self._every:
                    continue
                self._last = now
                line = f"still: {self._message} ({now - self._since:.0f} s)"
            self._log(line)

    def __enter__(self) -> Heartbeat:
        self.beat(self._message)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
