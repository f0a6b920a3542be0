"""Atomic output: every file (and every multi-file folder) is written under a temporary name and
renamed when complete, so an interrupted command never leaves an output that looks finished.

Temporary names carry `.part` and their owner (host and process id): the next command that
writes the same output removes what a killed process of this host left behind. I/O failures
(read-only folder, full disk, a path that is a file) become one `ReginaError` naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from regina_cli.keys import PART_MARK
from regina_cli.errors import ReginaError

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EACCES: "permission denied: choose a writable folder",
    errno.EPERM: "permission denied: choose a writable folder",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: give a file path",
    errno.EFBIG: "the file size limit is reached (`ulimit -f`, or the file system's largest file): free space "
                 "or choose another folder",
}
WRITE_ERRNOS = frozenset(_FIXES)  # OSErrors that are about where we write (not, say, the network)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _owner() -> str:
    """Who writes a temporary output: host and process id (see `remove_leftovers`)."""
    return f"{_HOST}-{os.getpid()}~"


def _errno_of(exc: Exception) -> int | None:
    """The errno, also when HDF5 only names it in its message (`errno = 28`)."""
    if getattr(exc, "errno", None) is not None:
        return exc.errno
    found = re.search(r"errno = (\d+)", str(exc))
    return int(found.group(1)) if found else None


def output_error(path: str | Path, exc: OSError) -> ReginaError:
    """One line naming the path and the fix for an OSError met while writing it."""
    code = _errno_of(exc)
    reason = _FIXES.get(code) or (os.strerror(code) if code else str(exc).splitlines()[0])
    return ReginaError(f"cannot write {path}: {reason}")


def check_free_space(path: str | Path, need_bytes: int) -> None:
    """Refuse to start writing `path` when its disk lacks `need_bytes` (HDF5 crashes on a full disk)."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise ReginaError(f"cannot write {path}: it needs about {need_bytes / 2**20:,.0f} MiB and the disk has "
                          f"{free / 2**20:,.0f} MiB free; free some space or write elsewhere")


def check_writable_folder(folder: str | Path) -> None:
    """Create `folder` and write (then remove) a temporary file in it, so a place that cannot be
    written (a read-only file system, a path through a file) is one line before any work starts,
    not a failure after it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".probe.{_owner()}", suffix=PART_MARK, dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise output_error(folder, exc) from None


def _make_parent(path: Path) -> None:
    """Create the folder `path` goes into, and clear what killed writers left there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(path, exc) from None
    remove_leftovers(path.parent)


_LEFTOVER = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)~[^/]*" + re.escape(PART_MARK))


def _is_stale(name: str) -> bool:
    """A temporary output of a process of this host that no longer runs."""
    found = _LEFTOVER.search(name)
    if not name.startswith(".") or found is None or found.group("host") != _HOST:
        return False
    try:
        os.kill(int(found.group("pid")), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders that killed writers left in `folder`."""
    folder = Path(folder)
    stale = [item for item in folder.glob(f".*~*{PART_MARK}*") if _is_stale(item.name)] if folder.is_dir() else []
    for item in stale:
        shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def _temporary(path: Path, make: Callable[[], Path], remove: Callable[[Path], None]) -> Iterator[Path]:
    """A temporary sibling of `path` from `make`, removed with `remove` when the block ends (the
    block renames it away on success). It is made with SIGTERM held, so no signal can fall
    between its creation and the cleanup knowing it; OSErrors become one line naming `path`."""
    tmp = None
    try:
        with SignalsHeld() as held:
            held.hold()
            tmp = make()
        yield tmp  # a signal that waited is raised above, once `tmp` is known
    except OSError as exc:
        raise output_error(path, exc) from None
    finally:
        if tmp is not None:
            remove(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    _make_parent(path)

    def make() -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.{_owner()}", suffix=f"{PART_MARK}{path.suffix}",
                                    dir=path.parent)
        os.close(fd)
        return Path(name)

    with _temporary(path, make, lambda tmp: tmp.unlink(missing_ok=True)) as tmp:
        yield tmp
        raise_pending_stop()  # a stop signal whose exception was lost: no output appears after it
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; outputs are shared
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block succeeds it takes the place
    of `path` (and of the folder there before) in one step, so readers never see a mix."""
    path = Path(path)
    _make_parent(path)

    def make() -> Path:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}", suffix=PART_MARK, dir=path.parent))

    # removing the temporary folder also removes the old folder after an exchange
    with _temporary(path, make, lambda tmp: shutil.rmtree(tmp, ignore_errors=True)) as tmp:
        with _errors_naming(path, instead_of=tmp):
            yield tmp
        raise_pending_stop()
        os.chmod(tmp, 0o777 & ~_current_umask())
        if not path.is_dir():
            os.rename(tmp, path)
        elif not _exchange(tmp, path):
            old = tmp.with_name(tmp.name + "-old")  # no atomic exchange here: two renames, never cut by
            with SignalsHeld() as held:  # SIGTERM; only a SIGKILL between them leaves no folder
                held.hold()
                os.rename(path, old)
                os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _errors_naming(path: Path, *, instead_of: Path) -> Iterator[None]:
    """Errors met while the block fills the temporary folder name `path`, the folder the user gave
    (`--out`): the temporary one is gone by the time they read the message."""
    try:
        yield
    except ReginaError as exc:
        raise ReginaError(str(exc).replace(str(instead_of), str(path))) from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_ready(obj: Any) -> Any:
    """`obj` with every non-finite float as None (null): JSON has no NaN or Infinity, which Python
    writes but strict parsers refuse and jq turns into a huge number."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_ready(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(value) for value in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Stable JSON (sorted keys, fixed indent) so the same content gives the same bytes."""
    write_text(path, json.dumps(json_ready(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def h5ad_bytes(adata) -> int:
    """About what `adata` takes on disk uncompressed (X, layers, obs and var)."""
    import numpy as np
    import scipy.sparse as sp

    def size(matrix) -> int:
        if sp.issparse(matrix):
            return int(matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)
        return int(np.asarray(matrix).nbytes) if matrix is not None else 0

    frames = int(adata.obs.memory_usage(deep=True).sum() + adata.var.memory_usage(deep=True).sum())
    return size(adata.X) + sum(size(adata.layers[k]) for k in adata.layers) + frames


# Set once an HDF5 write failed: HDF5 could not close what it was writing, and its exit handler
# would crash (SIGSEGV in H5D_close) closing it again; see `skip_hdf5_shutdown`.
_hdf5 = {"write_failed": False}


def _ignore(*args) -> None:
    return None


def _failed_write(write: Callable[[], None]) -> OSError | None:
    """Run `write`; None on success, else the OSError that a full disk, a quota or a file size
    limit raised in HDF5 (h5py raises RuntimeError, or an OSError whose errno is only named in
    the message). Other errors propagate. Returning (not raising) releases h5py's objects here."""
    try:
        write()
    except (OSError, RuntimeError) as exc:
        code = _errno_of(exc)
        if code is None:
            raise
        return OSError(code, os.strerror(code))
    return None


def _write_hdf5(write: Callable[[], None]) -> None:
    """Run `write` (an HDF5 write); a write that fails for lack of room raises one OSError. h5py
    then reports each object it cannot close as a traceback (1,500 lines for one dataset):
    those are silenced, and the objects collected while they are."""
    hooks = sys.excepthook, sys.unraisablehook
    sys.excepthook = sys.unraisablehook = _ignore  # Cython prints through both
    try:
        failure = _failed_write(write)
        gc.collect()
    finally:
        sys.excepthook, sys.unraisablehook = hooks
    if failure is not None:
        _hdf5["write_failed"] = True
        raise failure


def skip_hdf5_shutdown(code: int) -> None:
    """After a failed HDF5 write, end the process now with `code` (its output already removed):
    HDF5's exit handler would segfault closing again the objects it could not close."""
    if _hdf5["write_failed"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@contextlib.contextmanager
def staged_h5ad(adata, path: str | Path) -> Iterator[Path]:
    """Write `adata` to a temporary file beside `path` and yield it (to hash it, say); it is
    renamed onto `path` when the block succeeds. Refused up front when the disk is too full;
    filled up during the write (another job, a quota), one error line naming `path`."""
    check_free_space(path, int(1.1 * h5ad_bytes(adata)) + 2**20)
    with atomic_path(path) as tmp:
        _write_hdf5(lambda: adata.write_h5ad(tmp))
        yield tmp


def write_h5ad(adata, path: str | Path) -> None:
    with staged_h5ad(adata, path):
        pass


@contextlib.contextmanager
def folder_locked(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` itself, waiting while another process holds it, so two
    commits of several files into it (two `fetch --force` of one dataset) never interleave. The
    folder is locked, not a file in it: a dataset folder holds only the dataset's own files. Where
    the file system cannot lock a folder (some NFS mounts) the commit goes on unguarded."""
    import fcntl

    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


# --- One writer per run --------------------------------------------------------------------------
RUN_LOCK = ".regina.lock"


def _in_use(run_dir: Path, holder: str) -> ReginaError:
    return ReginaError(f"{run_dir} is in use by another regina process{f' ({holder})' if holder else ''}: "
                       "wait for it to end, or choose another --run")


def check_not_in_use(run_dir: str | Path) -> None:
    """Refuse, without creating anything, a run another process is training (`run_lock`). A
    shared lock is enough to find an exclusive holder, and needs no write access."""
    import fcntl

    try:
        handle = open(Path(run_dir) / RUN_LOCK)
    except OSError:  # no lock file, or one this user cannot read: `run_lock` decides
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(Path(run_dir), handle.read().strip()) from None
        except OSError:  # a file system without locks: `run_lock` says so
            return


def _unlocked(path: Path, exc: OSError) -> None:
    sys.stderr.write(f"warning: cannot lock {path} ({os.strerror(exc.errno) if exc.errno else exc}): a second "
                     "regina process training this run at the same time would not be refused\n")


LOCK_TRIES = 3  # a `check_not_in_use` probe holds the lock for an instant: try again before refusing


def _locked_handle(path: Path):
    """`path` opened and exclusively locked (closing it unlocks); None, after a warning, where the
    file or the file system cannot be locked. Another holder: refused."""
    import fcntl
    import time

    try:
        handle, writable = open(path, "a+"), True
    except PermissionError:  # another user's lock file in a shared run folder: a read handle can lock too
        try:
            handle, writable = open(path), False
        except OSError as exc:
            _unlocked(path, exc)
            return None
    except OSError as exc:  # a read-only file system, a full disk: training could not write either
        raise output_error(path, exc) from None
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == LOCK_TRIES - 1:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()
                raise _in_use(path.parent, holder) from None
            time.sleep(0.1)
        except OSError as exc:
            handle.close()
            _unlocked(path, exc)
            return None
    if writable:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
    return handle


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold `run_dir`'s lock while training writes it: two writers would interleave one history and
    leave one config beside the other's weights (two jobs of one array, a requeued job whose first
    try still runs). The kernel drops the lock when the process ends, however it ends, so a killed
    run never blocks the next. The lock file stays (removing it could let two writers in). Where
    the file system cannot lock (Lustre without `flock`, some NFS mounts), training goes on with
    a warning: the lock guards against a mistake, it is not needed to train."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(run_dir, exc) from None
    handle = _locked_handle(run_dir / RUN_LOCK)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


# Signals that stop a command the way Ctrl-C does: Slurm's time limit and pre-emption (SIGTERM),
# and the warning a job asks for ahead of its limit (`#SBATCH --signal=USR1@120`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals() -> None:
    """For the rest of a process whose command succeeded: its outputs are complete, and a stop
    signal during the interpreter's shutdown (about a second with torch loaded) would only turn
    exit 0 into 128 + the signal, with no message, for work that is done."""
    for signum in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


class Terminated(KeyboardInterrupt):
    """A stop signal (`STOP_SIGNALS`), raised like Ctrl-C's KeyboardInterrupt so that no `except
    Exception` swallows it; temporary outputs are removed on the way out and the exit code says
    which signal."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}: run the same command again")
        self.exit_code = 128 + signum


# The stop signal `exit_cleanly_on_sigterm` received, kept until the command ends: Python drops
# an exception raised inside a garbage-collector callback or a finalizer (it only prints
# "Exception ignored in ..."), so the handler's exception alone could be lost and the command
# carry on. `held`: how many `SignalsHeld` blocks hold the signals now.
_stop: dict = {"signum": None, "held": 0}


def _stop_exception(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def raise_pending_stop() -> None:
    """At a safe point (an output about to appear, a command about to succeed): raise the stop
    signal received earlier, whose exception may have been lost; nothing when none came, or
    while signals are held (their block raises it when it ends)."""
    if _stop["signum"] is not None and not _stop["held"]:
        raise _stop_exception(_stop["signum"])


def take_pending_stop() -> int | None:
    """The stop signal received so far (None: none), handed to a caller that handles it itself
    (training saves `last.pt` first, `engine.preemption`)."""
    signum, _stop["signum"] = _stop["signum"], None
    return signum


@contextlib.contextmanager
def exit_cleanly_on_sigterm() -> Iterator[None]:
    """While active, SIGTERM or SIGUSR1 (`STOP_SIGNALS`), and Ctrl-C unless it is ignored, raise
    `Terminated` (KeyboardInterrupt) in the main thread, so the `finally` blocks above remove
    temporary outputs before the process ends. The signal is also remembered: if its exception is
    lost in a garbage-collector callback, `raise_pending_stop` raises it at the next safe point
    (and the "Exception ignored" traceback is not printed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        _stop["signum"] = signum
        raise _stop_exception(signum)

    def quiet_lost_stop(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _stop["signum"] is not None):
            previous_hook(unraisable)

    signals = [*STOP_SIGNALS, *([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler
                                else [])]
    previous = {signum: signal.signal(signum, handle) for signum in signals}
    previous_hook, sys.unraisablehook = sys.unraisablehook, quiet_lost_stop
    _stop["signum"] = None
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = previous_hook
        _stop["signum"] = None


class SignalsHeld:
    """Context manager: after `hold()`, the stop signals and SIGINT wait until the block ends, so a
    commit of several steps (a file and its checksum) is never cut in the middle by them. They are held at
    the Python level (a mask would not do: another thread may receive the signal)."""

    SIGNALS = (*STOP_SIGNALS, signal.SIGINT)

    def __init__(self) -> None:
        self._previous: dict | None = None
        self._pending: list[int] = []

    def hold(self) -> None:
        if threading.current_thread() is threading.main_thread() and self._previous is None:
            self._previous = {signum: signal.signal(signum, self._record) for signum in self.SIGNALS}
            _stop["held"] += 1

    def _record(self, signum, frame) -> None:
        if signum not in self._pending:
            self._pending.append(signum)

    def __enter__(self) -> "SignalsHeld":
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is None:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = None
        _stop["held"] -= 1
        for signum in self._pending:  # handled now, as it would have been
            signal.raise_signal(signum)
        raise_pending_stop()
