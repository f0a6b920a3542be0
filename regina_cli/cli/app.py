"""The Typer application and its global options.

Global options (`--quiet`, `--json`) work before or after the command (`regina info --json`).
Usage errors end like every other user error: one `error: ...` line on stderr, exit status 2, and
with `--json` also `{"error": ..., "exit_code": 2}` on stdout. Help is plain text (it reads well in
80-column batch logs, and flags show as flags, without a value placeholder).
"""

from __future__ import annotations

import json
import sys

import typer
from typer.core import TyperGroup

try:  # typer >= 0.22 ships its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import ClickException, NoArgsIsHelpError

from regina_cli import __version__
from regina_cli.cli.common import console, emit_error, print_error, set_output_mode

GLOBAL_FLAGS = ("--quiet", "-q", "--json")
# The commands whose processes under `srun -n N` are one data-parallel launch, where only the first
# prints; under srun any other command is a process of its own (a task farm's). torchrun's
# processes are one launch whatever the command.
TRAINING_COMMANDS = ("train-ae", "train-gan")


def hoist_global_flags(args: list[str]) -> list[str]:
    """Move global flags given after the command in front of it (up to a bare `--`)."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in args[:end] if a not in GLOBAL_FLAGS] + args[end:]


class ReginaGroup(TyperGroup):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = hoist_global_flags(list(sys.argv[1:] if args is None else args))
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except typer.Abort:
            console.print("[bold red]aborted[/]")
            code = 1
        except NoArgsIsHelpError as exc:
            exc.show()
            code = exc.exit_code
        except ClickException as exc:  # usage errors: non-standalone mode raises them
            command = getattr(getattr(exc, "ctx", None), "command_path", "regina")
            message = f"{exc.format_message()} (see `{command} --help`)"
            print_error(message)
            if "--json" in args[: args.index("--") if "--" in args else len(args)]:
                emit_error(message, exc.exit_code)
            code = exc.exit_code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="regina",
    cls=ReginaGroup,
    help="REGINA: learn perturbation responses from Perturb-seq screens and predict unseen ones.\n\n"
    "Pipeline: fetch -> split -> label -> train-ae -> train-gan -> predict -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(ctx: typer.Context, value: bool) -> None:
    if value:
        json_output = ctx.params.get("json_output")  # eager too, and hoisted in front: already read
        typer.echo(json.dumps({"version": __version__}) if json_output else f"regina {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print errors only (also after the command)."),
    json_output: bool = typer.Option(False, "--json", is_eager=True, help="Print the result, or the error, as JSON "
                                     "on stdout (also after the command)."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    from regina_cli.launch import scheduler_place

    place = scheduler_place()
    if place is not None and place.launcher == "srun" and ctx.invoked_subcommand not in TRAINING_COMMANDS:
        place = None
    set_output_mode(quiet=quiet, json_output=json_output, rank=place.rank if place else 0)
