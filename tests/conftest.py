"""Shared fixtures: tiny synthetic AnnData in GEARS layout and the real screens in ../shared/data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PAPALEXI = SHARED_DATA / "papalexi21_thp1_crisprko.h5ad"
MCFALINE = SHARED_DATA / "mcfaline23_gbm_crispri.h5ad"


def shared_file(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real screen {path.name} not found in {SHARED_DATA} (shared data absent)")
    return path


@pytest.fixture
def papalexi_path() -> Path:
    return shared_file(PAPALEXI)


@pytest.fixture
def mcfaline_path() -> Path:
    return shared_file(MCFALINE)


@pytest.fixture(scope="session")
def demo_adata():
    """A small simulated screen in GEARS layout (600 cells x 200 genes); treat as read-only."""
    from regina_cli.data.demo import simulate_screen

    return simulate_screen(n_cells=600, n_genes=200, n_singles=12, n_doubles=10, seed=0)


@pytest.fixture
def refetched_after_read(monkeypatch):
    """Every `read_dataset` is followed, before the command goes on, by another job's `fetch
    --force` of another version of that dataset (values doubled), committed meanwhile."""
    from regina_cli.data import dataset

    read = dataset.read_dataset

    def read_then_refetch(name, data_dir=None, **kwargs):
        adata = read(name, data_dir, **kwargs)
        changed = read(name, data_dir)
        changed.X = changed.X * 2
        dataset.write_dataset(changed, name, data_dir)
        return adata

    monkeypatch.setattr(dataset, "read_dataset", read_then_refetch)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session", autouse=True)
def _cache_home():
    """The session's user cache folder (checksum checks remembered by data/fingerprint.py), set
    before any module fixture runs: never ~/.cache, and outside every test's folder, whose
    contents tests compare."""
    folder = tempfile.mkdtemp(prefix="regina-test-cache-")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = folder
    yield folder
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    """Every test writes under its own tmp folder, never into ./data or ./runs."""
    monkeypatch.setenv("REGINA_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
