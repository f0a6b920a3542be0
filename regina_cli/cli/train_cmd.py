"""`regina train-ae` and `regina train-gan` (not built yet)."""

from regina_cli.cli.app import app
from regina_cli.cli.common import user_errors
from regina_cli.errors import ReginaError

_LOOSE = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command("train-ae", context_settings=_LOOSE)
@user_errors
def train_ae_command() -> None:
    """Not built yet."""
    raise ReginaError("'regina train-ae' is not built yet")


@app.command("train-gan", context_settings=_LOOSE)
@user_errors
def train_gan_command() -> None:
    """Not built yet."""
    raise ReginaError("'regina train-gan' is not built yet")
