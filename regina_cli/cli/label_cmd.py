"""`regina label` (not built yet)."""

from regina_cli.cli.app import app
from regina_cli.cli.common import user_errors
from regina_cli.errors import ReginaError


@app.command("label", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def label_command() -> None:
    """Not built yet."""
    raise ReginaError("'regina label' is not built yet")
