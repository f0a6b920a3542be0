"""Evaluation test helpers (imported as `eval_helpers`: tests/ is on sys.path): a small screen with
a split, and noisy predictions written as an h5ad."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from regina_cli import keys
from regina_cli.data.dataset import write_dataset
from regina_cli.data.demo import simulate_screen
from regina_cli.data.split import make_split, save_split

NAME = "tiny"


def write_screen(data_dir):
    """A dataset and a split whose test set holds unseen singles and doubles of trained singles."""
    adata = simulate_screen(n_cells=1200, n_genes=160, n_singles=8, n_doubles=8, seed=5)
    write_dataset(adata, NAME, data_dir)
    conditions = sorted(set(adata.obs[keys.OBS_CONDITION]))
    singles = [c for c in conditions if c.endswith("+ctrl")]
    doubles = [c for c in conditions if "ctrl" not in c]
    train_singles, test_singles = singles[:-2], singles[-2:]
    trained = {c.split("+")[0] for c in train_singles}
    seen = [d for d in doubles if set(d.split("+")) <= trained]
    test_doubles = seen[:2] + [d for d in doubles if not set(d.split("+")) <= trained][:1]
    held_out = {c.split("+")[0] for c in test_singles}  # unseen singles: in no training double either
    train_doubles = [d for d in doubles if d not in test_doubles and not held_out & set(d.split("+"))]
    user = {"train": ["ctrl"] + train_singles + train_doubles[:-2], "val": train_doubles[-2:],
            "test": test_singles + test_doubles}
    split = make_split(NAME, conditions, user_split=user)
    save_split(split, data_dir)
    return adata, split


def write_predictions(adata, conditions, path, *, n=30, seed=0):
    """Noisy resampled true cells, with the control cells they 'came from'."""
    rng = np.random.default_rng(seed)
    controls = np.flatnonzero(adata.obs[keys.OBS_CONDITION] == "ctrl")
    blocks, labels, sources = [], [], []
    for c in conditions:
        rows = rng.choice(np.flatnonzero(adata.obs[keys.OBS_CONDITION] == c), n)
        blocks.append(adata.X[rows].toarray() + rng.normal(0, 0.1, (n, adata.n_vars)))
        labels += [c] * n
        sources += list(adata.obs_names[rng.choice(controls, n)])
    pred = ad.AnnData(np.vstack(blocks).astype(np.float32))
    pred.obs_names = [f"p{i}" for i in range(pred.n_obs)]
    pred.var_names = adata.var_names.copy()
    pred.obs[keys.OBS_CONDITION] = labels
    pred.obs[keys.OBS_CELL_TYPE] = "simulated"
    pred.obs[keys.OBS_CONTROL_CELL] = sources
    pred.write_h5ad(path)
    return pred


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def screen(data_dir):
    return write_screen(data_dir)
