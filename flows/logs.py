"""Prefect's console logging, made to keep the CLI's promise of one line per user error.

A flow or task that raises a :class:`~pipeline.errors.MuontrackError` makes Prefect log the error with its
traceback, once for the task and once for every enclosing flow, and then a "Finished in state Failed" line
for each. The CLI already prints the error as one line; these records only repeat it. The filter drops them
and lets every other record through (an unexpected exception keeps its traceback).
"""

from __future__ import annotations

import logging

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
