"""Errors a user can act on. The CLI prints them as one line and exits non-zero, without a traceback."""


class RaylmError(Exception):
    """A problem with the user's input, config or environment, stated in one line: what and where."""

    exit_code = 1


class ConfigError(RaylmError):
    """An invalid config file, key or value."""

    exit_code = 2


class InputError(RaylmError):
    """A missing, unreadable or malformed input path or record."""
