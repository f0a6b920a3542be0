"""User-facing errors.

A `ReginaError` is something the user can fix (bad path, unknown gene, corrupt file). The CLI
prints its message as one line and exits non-zero; any other exception is a bug and keeps its
traceback.
"""


class ReginaError(Exception):
    """An error caused by input the user controls; its message says what to do."""

    exit_code = 2


WARNING_PREFIX = "warning: "


def warnings_among(notes: list[str]) -> list[str]:
    """The notes that are warnings (they start with "warning: "), without that prefix: what the
    Python API raises as `UserWarning`s and `--json` lists, whether or not the notes were shown."""
    return [note[len(WARNING_PREFIX):] for note in notes if note.startswith(WARNING_PREFIX)]
