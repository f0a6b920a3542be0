"""Checks of option values that typer cannot express, shared by the commands and the Python API.

Each failure is a `ReginaError` (one `error:` line, exit status 2) raised before the command
reads or writes anything. Nothing heavy is imported here: `regina --help` stays instant.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

from regina_cli import keys
from regina_cli.errors import ReginaError

SEED_MAX = 2**32 - 1  # NumPy's legacy generator (GEARS' splits, the demo) takes seeds up to this


def is_whole(value) -> bool:
    """A whole number (Python's or NumPy's), not a bool, a float or a string."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number (Python's or NumPy's), not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_seed(seed: int) -> None:
    if not is_whole(seed) or not 0 <= seed <= SEED_MAX:
        raise ReginaError(f"--seed takes a whole number from 0 to {SEED_MAX:,}, not {seed!r}")


def check_share(value: float, option: str) -> None:
    """A share strictly between 0 and 1 (from Python it may come as anything, a string say)."""
    if not is_number(value) or not 0.0 < value < 1.0:
        raise ReginaError(f"{option} must lie strictly between 0 and 1, got {value!r}")


def check_data_dir(data_dir: str | Path | None, *, writes: bool) -> None:
    """The data folder (--data-dir or $REGINA_DATA) must be a folder, and writable when the
    command writes into it."""
    root = keys.data_root(data_dir)
    where = f"--data-dir {root}" if data_dir is not None else f"data folder {root} (${keys.ENV_DATA_DIR} or ./data)"
    if root.exists() and not root.is_dir():
        raise ReginaError(f"{where} is a file, not a folder: give a folder with --data-dir")
    if writes and root.is_dir() and not os.access(root, os.W_OK | os.X_OK):
        raise ReginaError(f"{where} is not writable: choose a writable folder with --data-dir")


def in_dataset_folder(path: Path) -> bool:
    """Whether `path` is a dataset folder or lies inside one (`regina fetch` wrote its checksum there)."""
    path = Path(path).absolute()
    return any((folder / (keys.DATA_FILE + keys.CHECKSUM_SUFFIX)).exists() for folder in (path, *path.parents))


def check_input_file(path: Path, what: str, missing: str = "does not exist", *, stream: bool = False) -> None:
    """An input file must be a file: a folder gets its own message, not "not found". `stream`:
    the reader reads it once from the start, so a pipe will do (`<(...)`, `/dev/stdin`);
    otherwise a pipe or device is named as such."""
    if path.is_dir():
        raise ReginaError(f"{what} {path} is a folder, not a file")
    if not path.exists():
        raise ReginaError(f"{what} {path} {missing}")
    if not stream and not path.is_file():
        raise ReginaError(f"{what} {path} is not a regular file (a pipe or a device): save it to a file first")


def check_out_file(out: Path | None) -> None:
    """`--out` names an h5ad file to write: not an existing folder, inside a folder, and not a
    dataset (a dataset folder's files are what every other step reads)."""
    if out is None:
        return
    if out.is_dir():
        raise ReginaError(f"--out {out} is a folder: give a file path, e.g. {out / keys.PREDICTIONS_FILE}")
    if out.suffix != ".h5ad":
        raise ReginaError(f"--out {out}: predictions are written as h5ad; give a path ending in .h5ad")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ReginaError(f"--out {out}: {parent} is a file, not a folder; choose another path")
    if out.name == keys.DATA_FILE or in_dataset_folder(out.parent):
        raise ReginaError(f"--out {out} is in a dataset folder, whose files other steps read; write the "
                          "predictions elsewhere (default: <run>/predictions.h5ad)")


def check_out_folder(out: Path, marker: str, outputs: frozenset[str]) -> None:
    """The output folder (`--out`) is replaced as a whole: it must not be a file, nor a folder of
    other files (one without the command's `marker` file), nor a previous output beside which
    the user put files of their own (`outputs`: every path the command writes), which replacing
    it would delete."""
    if out.exists() and not out.is_dir():
        raise ReginaError(f"output folder {out} is a file: give a folder with --out")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise ReginaError(f"output folder {out} holds other files and no {marker}: it would be replaced as a "
                          "whole, so give a new or empty folder with --out")
    if out.is_dir() and (foreign := _not_written_by(out, outputs)) is not None:
        raise ReginaError(f"output folder {out} holds {foreign}, which this command does not write: the folder "
                          f"is replaced as a whole, which would delete it; move it out, or give another --out")


def _not_written_by(out: Path, outputs: frozenset[str]) -> str | None:
    """The first path under `out` that is neither one of `outputs` nor a folder holding them."""
    folders = {str(Path(p).parent) for p in outputs} - {"."}
    for item in sorted(out.rglob("*")):  # a folder comes before what it holds
        name = item.relative_to(out).as_posix()
        ours = name in folders if item.is_dir() and not item.is_symlink() else name in outputs
        if not ours:
            return name + ("/" if item.is_dir() else "")
    return None
