"""`regina predict` (not built yet)."""

from regina_cli.cli.app import app
from regina_cli.cli.common import user_errors
from regina_cli.errors import ReginaError


@app.command("predict", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def predict_command() -> None:
    """Not built yet."""
    raise ReginaError("'regina predict' is not built yet")
