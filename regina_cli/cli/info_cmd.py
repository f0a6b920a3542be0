"""`regina info` (not built yet)."""

from regina_cli.cli.app import app
from regina_cli.cli.common import user_errors
from regina_cli.errors import ReginaError


@app.command("info")
@user_errors
def info_command() -> None:
    """Not built yet."""
    raise ReginaError("'regina info' is not built yet")
