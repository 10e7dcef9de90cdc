"""User-facing errors.

Anything a user can cause (a missing file, a bad config, a corrupt checkpoint) raises ``SentcodeError``
with one line that says what is wrong and what to do. The CLI prints that line and exits non-zero;
everything else is a bug and keeps its traceback.
"""


class SentcodeError(Exception):
    """An error caused by input, with a message meant for the user."""


class ConfigError(SentcodeError):
    """A configuration that cannot be used."""


class CheckpointError(SentcodeError):
    """A checkpoint that is missing, corrupt or belongs to another model."""


class DataError(SentcodeError):
    """A corpus or data directory that cannot be used."""
