"""One exception type for every user-facing error.

The CLI prints ``error: <message>`` on one line and exits with code 2. Messages name the problem
and the fix.
"""


class BnadaptError(ValueError):
    """Bad input (argument, file, model, data). Its message is one line: the problem and the fix."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`BnadaptError` with ``message`` when ``condition`` is false."""
    if not condition:
        raise BnadaptError(message)
