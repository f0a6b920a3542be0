"""A dataset's full SHA-256 check is remembered by file identity: an unchanged file is not hashed
again, and a changed or replaced one is still refused (data/fingerprint.py)."""

from __future__ import annotations

import os
import time

import pytest

from cli_helpers import invoke
from regina_cli import keys
from regina_cli.data import dataset as dataset_module
from regina_cli.data import fingerprint
from regina_cli.data.dataset import read_dataset, write_dataset
from regina_cli.data.demo import simulate_screen
from regina_cli.errors import ReginaError

def screen():
    return simulate_screen(n_cells=300, n_genes=140, n_singles=4, n_doubles=1, seed=0)


MARGIN_NS = 50_000_000  # 50 ms: above ext4/xfs/tmpfs timestamp ticks, so the test needs no 2 s wait


@pytest.fixture
def hashes(monkeypatch) -> list:
    """Every full hash of a data file, in order."""
    seen = []
    real = dataset_module.sha256_of

    def counting(path):
        seen.append(path)
        return real(path)

    monkeypatch.setattr(dataset_module, "sha256_of", counting)
    return seen


@pytest.fixture
def aged(monkeypatch):
    """A dataset written, then left until its ctime is older than the (shortened) racy margin."""
    monkeypatch.setattr(fingerprint, "RACY_MARGIN_NS", MARGIN_NS)
    data_file, _ = write_dataset(screen(), "fp")
    time.sleep(3 * MARGIN_NS / 1e9)
    return data_file


def test_unchanged_dataset_is_hashed_once(aged, hashes):
    read_dataset("fp")
    assert len(hashes) == 1 and fingerprint._entry(aged).is_file()
    read_dataset("fp")
    read_dataset("fp", backed=True).file.close()
    assert len(hashes) == 1  # identity unchanged: the earlier check stands


def test_same_size_change_in_place_is_still_refused(aged, hashes):
    read_dataset("fp")
    stat = os.stat(aged)
    with open(aged, "r+b") as handle:  # one byte flipped inside, size kept ...
        handle.seek(stat.st_size - 100)
        byte = handle.read(1)
        handle.seek(stat.st_size - 100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(aged, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the modification time put back
    with pytest.raises(ReginaError, match="changed after it was verified"):
        read_dataset("fp")
    assert len(hashes) == 2  # ctime moved, so the file was hashed again


def test_replaced_file_with_same_size_and_mtime_is_still_refused(aged, hashes):
    read_dataset("fp")
    raw = bytearray(aged.read_bytes())
    raw[-100] ^= 0xFF
    other = aged.with_name("other.h5ad")
    other.write_bytes(bytes(raw))
    stat = os.stat(aged)
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, aged)
    with pytest.raises(ReginaError, match="changed after it was verified"):
        read_dataset("fp")
    result = invoke("fetch", "fp")  # fetch of a present dataset always hashes in full
    assert result.exit_code == 2 and "--force" in result.output


def test_fresh_file_is_not_remembered(hashes):
    """A file changed less than RACY_MARGIN_NS before its check could change again in the same
    timestamp tick unseen: its check is not kept, so every read hashes it."""
    data_file, _ = write_dataset(screen(), "fresh")
    read_dataset("fresh")
    read_dataset("fresh")
    assert hashes.count(data_file) == 2 and not fingerprint._entry(data_file).exists()


def test_new_checksum_invalidates_the_remembered_check(aged, hashes):
    read_dataset("fp")
    dataset_module.record_checksum(aged, "0" * 64)  # another fetch's checksum beside the same bytes
    with pytest.raises(ReginaError, match="changed after it was verified"):
        read_dataset("fp")


def test_unwritable_cache_only_costs_a_hash(aged, hashes, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go\n")
    monkeypatch.setenv(keys.ENV_CACHE_HOME, str(blocker))
    read_dataset("fp")
    read_dataset("fp")
    assert len(hashes) == 2


def test_data_folder_is_left_as_it_was(aged):
    before = sorted(p.name for p in aged.parent.iterdir())
    read_dataset("fp")
    assert sorted(p.name for p in aged.parent.iterdir()) == before
    assert fingerprint._entry(aged).parent == keys.verified_dir()


def test_the_fix_for_a_changed_file_names_a_command_that_works():
    """`regina fetch NAME --force` only knows the demo and GEARS' datasets: an imported one needs its source."""
    from regina_cli.data.dataset import refetch_command

    assert refetch_command("norman") == "`regina fetch norman --force`"
    assert refetch_command("demo") == "`regina fetch demo --force`"
    assert "`regina fetch fp --from SOURCE --force`" in refetch_command("fp")


def test_a_missing_home_is_not_created_for_the_cache(tmp_path, monkeypatch):
    """HOME=/nonexistent (as root) made /nonexistent/.cache/regina/...: no home, no cache."""
    monkeypatch.delenv(keys.ENV_CACHE_HOME, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nonexistent"))
    monkeypatch.setattr(fingerprint, "RACY_MARGIN_NS", MARGIN_NS)
    write_dataset(screen(), "fp")
    time.sleep(3 * MARGIN_NS / 1e9)
    read_dataset("fp")
    assert not (tmp_path / "nonexistent").exists()


def test_no_home_at_all_still_reads_the_dataset(tmp_path, monkeypatch):
    """$HOME unset for a user with no passwd entry (a container run as any uid): every command
    reading a dataset ended in "RuntimeError: Could not determine home directory."."""
    from pathlib import Path

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv(keys.ENV_CACHE_HOME, raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setattr(fingerprint, "RACY_MARGIN_NS", MARGIN_NS)
    assert keys.verified_dir() is None
    write_dataset(screen(), "fp")
    time.sleep(3 * MARGIN_NS / 1e9)
    assert read_dataset("fp").n_obs == screen().n_obs
