"""User-facing errors.

A `ReginaError` is something the user can fix (bad path, unknown gene, corrupt file). The CLI
prints its message as one line and exits non-zero; any other exception is a bug and keeps its
traceback.
"""


class ReginaError(Exception):
    """An error caused by input the user controls; its message says what to do."""

    exit_code = 2
