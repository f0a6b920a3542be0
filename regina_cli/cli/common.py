"""What every command shares: the console, output modes, and turning user errors into one line.

Nothing here imports torch, scanpy or gears: `regina --help` must answer instantly.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import typer
from rich.markup import escape

from regina_cli.errors import ReginaError
from regina_cli.io import json_ready
from regina_cli.terminal import ReadableConsole

console = ReadableConsole(stderr=True, highlight=False)  # status lines, warnings and errors
results = ReadableConsole(highlight=False)  # a command's result tables, on stdout
_state = {"quiet": False, "json": False, "rank": 0}


def set_output_mode(*, quiet: bool, json_output: bool, rank: int = 0) -> None:
    """`rank`: this process's place in a torchrun/srun launch; only the first one prints (the
    others would repeat every line, table and JSON document), the others only their errors, marked."""
    _state["quiet"] = quiet or json_output or rank > 0
    _state["json"] = json_output and rank == 0
    _state["rank"] = rank
    if hasattr(sys.stdout, "reconfigure"):  # a table's arrows on a latin-1 stdout: escaped, not a traceback
        sys.stdout.reconfigure(errors="backslashreplace")


def is_quiet() -> bool:
    return _state["quiet"]


def info(message: str) -> None:
    """A human-readable status line on stderr (silenced by --quiet/--json)."""
    if not _state["quiet"]:
        console.print(message)


def show(renderable: Any) -> None:
    """A result table on stdout, so `regina CMD > results.txt` keeps it while status lines stay on
    stderr (silenced by --quiet; --json prints the result document instead)."""
    if not _state["quiet"]:
        results.print(renderable)


def _to_stdout(text: str) -> None:
    """`text` on stdout; nothing where there is no stdout (`regina --json CMD >&-`: Python sets
    sys.stdout to None), as the tables print nothing there."""
    if sys.stdout is not None:
        sys.stdout.write(text)


def emit_result(result: dict, paths: tuple[str, ...] = ()) -> None:
    """With --json, the command's result as one JSON document on stdout (for scripts). The files
    under the keys `paths` (a path or a list of them) are named absolutely there, so a script may
    use them from any folder; the terminal names them as the user gave them."""
    if _state["json"]:
        result = {**result, **{key: _absolute(result[key]) for key in paths if result.get(key)}}
        _to_stdout(json.dumps(json_ready(result), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def _absolute(value):
    return [_absolute(v) for v in value] if isinstance(value, list) else str(Path(value).resolve())


def print_error(message: str) -> None:
    """The one `error: ...` line on stderr (the message is printed as is, never as markup)."""
    rank = f"rank {_state['rank']}: " if _state["rank"] else ""
    console.print(f"{rank}[bold red]error:[/] {escape(message)}", soft_wrap=True)


def emit_error(message: str, exit_code: int) -> None:
    """With --json, the error as one JSON object on stdout (stderr keeps its `error:` line)."""
    _to_stdout(json.dumps({"error": message, "exit_code": exit_code}) + "\n")


def _stop_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or stop signal (`io.Terminated`) that `exc` wraps, if any: numba, which runs
    scanpy's compiled steps, turns one into `SystemError: ... returned a result with an exception set`."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _interrupted(stop: KeyboardInterrupt) -> typer.Exit:
    """Ctrl-C or a stop signal as one error line; exit 130, or 128 + the signal (`io.Terminated`)."""
    message, code = f"interrupted{f' by {stop}' if str(stop) else ''}", getattr(stop, "exit_code", 130)
    print_error(message)
    if _state["json"]:  # a script reading stdout gets its one document here too
        emit_error(message, code)
    return typer.Exit(code)


def user_errors(fn: Callable) -> Callable:
    """Turn a `ReginaError` into `error: <message>` and a non-zero exit; Ctrl-C into exit 130, a
    stop signal into 128 + its number, however it reached here."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from regina_cli.io import exit_cleanly_on_sigterm, raise_pending_stop

        try:
            with exit_cleanly_on_sigterm():  # SIGTERM: temporary outputs removed, exit 128 + 15
                result = fn(*args, **kwargs)
                raise_pending_stop()  # a signal whose exception was lost on the way: not a success
                return result
        except ReginaError as exc:
            print_error(str(exc))
            if _state["json"]:
                emit_error(str(exc), exc.exit_code)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (io.Terminated, with its exit code)
            raise _interrupted(exc) from None
        except Exception as exc:
            stop = _stop_behind(exc)
            if stop is None:
                raise
            raise _interrupted(stop) from None

    return wrapper


# --- Options shared by several commands --------------------------------------------------------
def run_directory(value: str) -> Path:
    """`--run` as a path; an empty value (an unset shell variable) would put the run in the
    current folder, so it is refused."""
    if not str(value).strip():
        raise typer.BadParameter("empty: give a run directory, e.g. runs/<name> (an unset shell variable?)")
    return Path(value)


DataDirOpt = typer.Option(
    None, "--data-dir", help="Data folder (default: $REGINA_DATA, else ./data).", show_default=False
)
RunDataDirOpt = typer.Option(
    None, "--data-dir", show_default=False,
    help="Data folder (default: the one the run was trained on while it holds the dataset, else "
         "$REGINA_DATA, else ./data).")
SetOpt = typer.Option(None, "--set", help="Config override section.key=value (repeatable).")
ConfigOpt = typer.Option(None, "--config", help="YAML config file (see docs/configuration.md).")

