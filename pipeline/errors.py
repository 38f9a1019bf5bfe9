"""User-facing errors.

Every problem a user can cause (bad config value, missing or foreign dataset, an output path that would
overwrite something) raises a :class:`MuontrackError`. The CLI turns it into a one-line message and a
non-zero exit; library callers can catch it like any exception.

Exit statuses follow click's convention: 2 for a usage error (a value the command line or a config file
should not have given), 1 for a failure at run time (a missing or corrupt dataset, a folder held by another
writer, a full disk).
"""


class MuontrackError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""

    #: the CLI's exit status for this kind of error
    exit_code = 1


class ConfigError(MuontrackError):
    """A configuration value (an option, a preset, a config file's key) is unknown, of the wrong type or out of
    range: a usage error."""

    exit_code = 2


class DatasetError(MuontrackError):
    """A dataset is missing, incomplete, corrupt or does not match what was asked for."""


class RunError(MuontrackError):
    """A training run folder is missing, incomplete or holds another run."""
