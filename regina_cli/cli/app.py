"""The Typer application and its global options."""

from __future__ import annotations

import typer

from regina_cli import __version__
from regina_cli.cli.common import set_output_mode

app = typer.Typer(
    name="regina",
    help="REGINA: learn perturbation responses from Perturb-seq screens and predict unseen ones.\n\n"
    "Pipeline: fetch -> split -> label -> train-ae -> train-gan -> predict -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"regina {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print errors only."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    set_output_mode(quiet=quiet, json_output=json_output)
