"""regina_cli.io: atomic files and folders, leftovers of killed writers, one-line I/O errors, signals."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from regina_cli import io
from regina_cli.errors import ReginaError


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_atomic_dir_replaces_the_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(out) as staging:
            (staging / "metrics.json").write_text("{}")
            raise RuntimeError("killed half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"] and (out / "old.txt").read_text() == "old"
    with io.atomic_dir(out) as staging:
        (staging / "metrics.json").write_text("{}")
        (staging / "plots").mkdir()
        assert not (out / "metrics.json").exists()  # nothing visible before the block ends
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "plots"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # the old folder is gone too


def test_atomic_dir_without_an_atomic_exchange_still_swaps(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # a file system without renameat2
    out = tmp_path / "eval"
    for text in ("first", "second"):
        with io.atomic_dir(out) as staging:
            (staging / "metrics.json").write_text(text)
    assert (out / "metrics.json").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["eval"]


def test_leftovers_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    host = io._HOST
    dead = [tmp_path / f".predictions.{host}-{dead_pid()}~abc{io.PART_MARK}.h5ad",
            tmp_path / f".eval.{host}-{dead_pid()}~xyz{io.PART_MARK}"]
    alive = tmp_path / f".meta.{host}-{os.getpid()}~def{io.PART_MARK}.json"  # a writer still running
    foreign = tmp_path / f".meta.otherhost-{dead_pid()}~ghi{io.PART_MARK}.json"  # another node's: not ours to judge
    download = tmp_path / f"norman.download{io.PART_MARK}"  # a resumable download
    dead[0].write_text("half")
    dead[1].mkdir()
    (dead[1] / "metrics.json").write_text("{}")
    for path in (alive, foreign, download):
        path.write_text("x")
    io.write_text(tmp_path / "predictions.txt", "new")  # any write into the folder cleans it
    assert not any(p.exists() for p in dead)
    assert all(p.exists() for p in (alive, foreign, download))


@pytest.mark.parametrize("exc, fragment", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (OSError("Can't write data (file write failed: errno = 28, error message = 'No space')"), "the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory"), "is a file, not a folder"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    (OSError("something HDF5 says"), "something HDF5 says"),
])
def test_os_errors_become_one_line_naming_the_path(exc, fragment, tmp_path):
    message = str(io.output_error(tmp_path / "x.h5ad", exc))
    assert message.startswith(f"cannot write {tmp_path / 'x.h5ad'}: ") and fragment in message
    assert "\n" not in message


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "split.json"
    target.write_text("old")
    with pytest.raises(ReginaError, match="cannot write .*split.json: the disk is full"):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["split.json"]


def test_errors_inside_an_atomic_folder_name_the_folder_not_its_temporary(tmp_path):
    """evaluate --out DIR: the temporary folder is gone when the user reads the message."""
    out = tmp_path / "eval"
    with pytest.raises(ReginaError) as failed:
        with io.atomic_dir(out) as staging:
            (staging / "plots").write_text("a file where a folder goes")
            io.write_text(staging / "plots" / "a.png", "x")
    assert str(failed.value).startswith(f"cannot write {out / 'plots' / 'a.png'}: ")
    assert io.PART_MARK not in str(failed.value) and list(tmp_path.iterdir()) == []


FETCH_TINY = ["fetch", "demo", "--cells", "400", "--genes", "200", "--singles", "4", "--doubles", "2"]


def file_size_limit(size: int):
    """`ulimit -f`: a write past `size` bytes fails with EFBIG (SIGXFSZ ignored, as Python does)."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return limit


def test_a_file_size_limit_met_by_hdf5_is_one_line_without_a_crash(tmp_path):
    """HDF5 fails inside h5py's close (RuntimeError), prints a traceback for every object it
    cannot close, and segfaulted at exit closing them again: now one line, exit 2, nothing left."""
    done = subprocess.run([sys.executable, "-m", "regina_cli", *FETCH_TINY, "--data-dir", str(tmp_path)],
                          preexec_fn=file_size_limit(100_000), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[-1] == (f"error: cannot write {tmp_path / 'demo' / 'perturb_processed.h5ad'}: the file size "
                         "limit is reached (`ulimit -f`, or the file system's largest file): free space or "
                         "choose another folder")
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []


def test_a_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ReginaError, match="is a file, not a folder"):
        io.write_text(tmp_path / "afile" / "out.json", "{}")


def test_a_run_lock_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """train-ae/train-gan take the lock after their own checks: a traceback there was exit 1."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ReginaError, match="afile/run: a part of the path is a file"):
        with io.run_lock(tmp_path / "afile" / "run"):
            pass

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(io, "open", read_only, raising=False)
    with pytest.raises(ReginaError, match=r"\.regina\.lock: the file system is read-only"):
        with io.run_lock(tmp_path / "run"):
            pass


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: SimpleNamespace(total=10, used=10, free=3 * 2**20))
    io.check_free_space(tmp_path / "new" / "x.h5ad", 2 * 2**20)  # a missing folder: its parent's disk
    with pytest.raises(ReginaError, match=r"needs about 4 MiB and the disk has 3 MiB free"):
        io.check_free_space(tmp_path / "x.h5ad", 4 * 2**20)


def test_sigterm_removes_the_temporary_output_and_exits_143(tmp_path):
    target = tmp_path / "predictions.h5ad"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(io.Terminated) as stopped:
        with io.exit_cleanly_on_sigterm(), io.atomic_path(target) as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode
                pass
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_held_signals_wait_until_the_commit_is_complete(tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # native (OpenMP) threads: the kernel may hand them the signal
    torch.ones(1000, 1000) @ torch.ones(1000, 1000)
    steps = []
    with pytest.raises(io.Terminated):
        with io.exit_cleanly_on_sigterm():
            with io.SignalsHeld() as held:
                held.hold()
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("file renamed")
                steps.append("checksum written")
            steps.append("after")  # never reached: the signal that waited is handled here
    torch.set_num_threads(before)
    assert steps == ["file renamed", "checksum written"]


def test_outputs_get_the_permissions_of_the_umask_not_mkstemps_0600(tmp_path):
    """Atomic outputs start as mkstemp's private 0600 temporary: left so, a dataset, split or run
    written on a shared cluster folder could not be read by the group it was made for."""
    before = os.umask(0o022)
    try:
        io.write_json(tmp_path / "record.json", {"a": 1})
        with io.atomic_dir(tmp_path / "folder") as staging:
            (staging / "x.txt").write_text("x")
    finally:
        os.umask(before)
    assert (tmp_path / "record.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755


def test_a_stop_signal_whose_exception_was_lost_keeps_the_output_from_appearing(tmp_path):
    """The handler's exception can be lost (raised inside a garbage-collector callback): the
    signal is remembered, and the commit of an output raises it instead of renaming a file the
    killed command might not have finished into place."""
    target = tmp_path / "predictions.h5ad"
    with pytest.raises(io.Terminated):
        with io.exit_cleanly_on_sigterm(), io.atomic_path(target) as tmp:
            tmp.write_text("half")
            io._stop["signum"] = signal.SIGTERM  # what the handler recorded before its exception was lost
    assert list(tmp_path.iterdir()) == []
