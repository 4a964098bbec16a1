"""The one exception type that detrq raises for bad user input.

The CLI turns a ``DetrqError`` into a single ``error: ...`` line and exit status 2 instead of a traceback;
library callers can catch it like any ``ValueError``.
"""


class DetrqError(ValueError):
    """Bad input a user can fix: a missing file, a wrong checkpoint, corrupt JSON, an infeasible budget."""
