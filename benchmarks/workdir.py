"""The folder layout the benchmarks share: `quality.py` fetches and splits each screen into
`<workdir>/<dataset>/seed<S>/data` (split `simulation_<S>`) and trains its runs under
`<workdir>/<dataset>/seed<S>/runs/<tag>`; the other scripts read what it left there."""

from __future__ import annotations

import os
from pathlib import Path

from regina_cli import keys


def seed_folder(workdir: str | Path, dataset: str, seed: int) -> Path:
    return Path(workdir) / dataset / f"seed{seed}"


def seed_data(workdir: str | Path, dataset: str, seed: int) -> Path:
    """The data folder (`--data-dir`) of one dataset and split seed."""
    return seed_folder(workdir, dataset, seed) / "data"


def split_of(seed: int) -> str:
    return f"simulation_{seed}"


def read_screen(data: str | Path, dataset: str, **kwargs):
    """The fetched screen of a data folder as AnnData (`kwargs`: `anndata.read_h5ad`'s, e.g. backed)."""
    import anndata

    return anndata.read_h5ad(keys.dataset_file(dataset, data), **kwargs)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, printed beside timings on a shared machine."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
