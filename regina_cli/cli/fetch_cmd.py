"""`regina fetch` (not built yet)."""

from regina_cli.cli.app import app
from regina_cli.cli.common import user_errors
from regina_cli.errors import ReginaError


@app.command("fetch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def fetch_command() -> None:
    """Not built yet."""
    raise ReginaError("'regina fetch' is not built yet")
