"""One exception type for bad input: the CLI prints its message alone, without a traceback."""


class FinegrainError(ValueError):
    """A problem the user can fix; the message names the problem and the fix.

    A ValueError, so that library users catch bad input the usual way.
    """
