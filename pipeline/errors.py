"""User-facing errors.

Every problem a user can cause (bad config value, missing or foreign dataset, an output path that would
overwrite something) raises a :class:`MuontrackError`. The CLI turns it into a one-line message and a
non-zero exit; library callers can catch it like any exception.
"""


class MuontrackError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(MuontrackError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DatasetError(MuontrackError):
    """A dataset is missing, incomplete, corrupt or does not match what was asked for."""


class RunError(MuontrackError):
    """A training run folder is missing, incomplete or holds another run."""
