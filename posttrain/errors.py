"""User-facing errors.

Anything the user can fix (a config key, a data line, a path, a plugin) raises
`UserError`; the CLI prints its message on one line and exits non-zero without a
traceback. Bugs in posttrain itself stay ordinary exceptions with tracebacks.
"""


class UserError(Exception):
    """An error caused by user input; its message names the culprit and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A bad config key, type or value."""


class DataError(UserError):
    """A bad dataset: missing file, malformed line, unknown field value."""


class ModelError(UserError):
    """A model path or hub name that cannot be loaded."""


class RewardError(UserError):
    """A reward plugin that cannot be imported, raises, or returns bad values."""


class AudioError(DataError):
    """An audio file that is missing, unreadable, empty, silent or out of range."""


class RolloutTimeoutError(RuntimeError):
    """A rollout engine or reward worker (a Ray actor) did not answer in time. Not the user's
    input, but not a posttrain bug either: the CLI prints it on one line and says how to go on."""
