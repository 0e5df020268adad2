"""Errors a user can act on. The CLI prints them as one line and exits non-zero, without a traceback."""


class RaylmError(Exception):
    """A problem with the user's input, config or environment, stated in one line: what and where."""

    exit_code = 1


class ConfigError(RaylmError):
    """An invalid config file, key or value."""

    exit_code = 2


class InputError(RaylmError):
    """A missing, unreadable or malformed input path or record."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name if it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
