"""Errors the entry points turn into one line on stderr instead of a traceback."""


class UsageError(Exception):
    """A bad flag value or environment that the user can fix; the message says how."""


class TrainingError(Exception):
    """Training cannot go on (for example a NaN loss); the message names the step."""


def one_line(error: BaseException, limit: int = 240) -> str:
    """An exception's message squeezed onto one short line, for quoting inside a UsageError."""
    return " ".join(str(error).split())[:limit] or type(error).__name__
