"""One exception type for bad input: the CLI prints its message alone, without a traceback."""


class FinegrainError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
