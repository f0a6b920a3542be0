"""Private cache folders where the default ones cannot be written (a read-only HOME, a shared
read-only install, as on HPC nodes and in containers run by any user). Run before matplotlib or
numba is first imported (`import regina_cli` does); a user's own settings are kept.

* Matplotlib, imported by scanpy and by `regina evaluate`'s figures, would make a temporary config
  folder itself but warn about it on stderr: noise in a user's shell pipeline (MPLCONFIGDIR).
* Numba, which compiles scanpy's functions with `cache=True`, fails with a traceback ("cannot cache
  function ...: no locator available") when neither the package's own folder nor the user's
  cache folder can be written (NUMBA_CACHE_DIR).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_MPLCONFIGDIR = "MPLCONFIGDIR"
ENV_NUMBA_CACHE_DIR = "NUMBA_CACHE_DIR"


def _user_cache() -> Path:
    """The user's cache folder ($XDG_CACHE_HOME, else ~/.cache); RuntimeError without a home."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_dirs() -> tuple[Path, Path]:
    """(config, cache): the folders matplotlib picks without MPLCONFIGDIR (XDG ones on Linux)."""
    if sys.platform.startswith(("linux", "freebsd")):
        return (Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "matplotlib",
                _user_cache() / "matplotlib")
    return Path.home() / ".matplotlib", Path.home() / ".matplotlib"


def holds_settings(folder: Path) -> bool:
    """A user's matplotlibrc or styles are there, which MPLCONFIGDIR would hide."""
    return (folder / "matplotlibrc").is_file() or (folder / "stylelib").is_dir()


def can_make(folder: Path) -> bool:
    """`folder` is, or `mkdir -p` could make it, a writable folder; checked without making it, so
    `regina --help` leaves HOME as it was."""
    folder = folder.resolve()
    for path in (folder, *folder.parents):
        if path.exists():
            return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
    return False


def use_private_config_dir() -> None:
    """Point an unset MPLCONFIGDIR at a private temporary folder, removed at exit, when matplotlib
    cannot write its default folders (what matplotlib does then too, minus the warning). Not where
    only the cache folder is unwritable and the config folder holds the user's settings: keeping
    them is worth matplotlib's warning."""
    if os.environ.get(ENV_MPLCONFIGDIR):
        return
    try:
        config, cache = default_dirs()
        if can_make(config) and (can_make(cache) or holds_settings(config)):
            return
    except (OSError, RuntimeError):  # a folder that cannot be looked at, or no home at all
        pass
    _use_temporary_folder(ENV_MPLCONFIGDIR, "regina-matplotlib-")


def _use_temporary_folder(variable: str, prefix: str) -> None:
    """Set `variable` to a new private temporary folder, removed at exit."""
    import atexit
    import shutil
    import tempfile

    try:
        folder = tempfile.mkdtemp(prefix=prefix)
    except OSError:  # no usable temporary folder either: the library's own fallback says so
        return
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ[variable] = folder


def use_private_numba_cache() -> None:
    """Point an unset NUMBA_CACHE_DIR at a private temporary folder when numba could cache neither
    beside scanpy's code (`__pycache__` in its package folder) nor in the user's cache folder."""
    import importlib.util

    if os.environ.get(ENV_NUMBA_CACHE_DIR):
        return
    try:
        spec = importlib.util.find_spec("scanpy")
        if spec is None or spec.origin is None or can_make(Path(spec.origin).parent / "__pycache__"):
            return
        if can_make(_user_cache() / "numba"):
            return
    except (OSError, RuntimeError, ValueError):  # a folder that cannot be looked at, or no home at all
        pass
    _use_temporary_folder(ENV_NUMBA_CACHE_DIR, "regina-numba-")
