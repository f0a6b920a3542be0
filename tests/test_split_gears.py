"""Our splits equal cell-gears' own, list for list, for every mode and several seeds.

The reference calls `gears.data_utils.DataSplitter` with exactly the arguments
`PertData.prepare_split(split=mode, seed=seed)` passes, and reads the sets back from the `split`
column as prepare_split does. prepare_split itself is also run where it can run: it cannot for
`simulation_single` (it unpacks the single AnnData that mode returns into two names), and with
current pandas its `groupby(...).agg(lambda x: x)` read-back crashes on some screens.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from regina_cli.data.split import MODES, SUBGROUP_KEYS, conditions_in_order, gears_split, make_split
from regina_cli.errors import ReginaError

pytestmark = pytest.mark.gears

SEEDS = (1, 2, 3)


@pytest.fixture(scope="module", autouse=True)
def cell_gears():
    pytest.importorskip("torch_geometric", reason="cell-gears needs torch_geometric")
    return pytest.importorskip("gears", reason="cell-gears is not installed")


def toy_obs(n_genes: int, n_combos: int, seed: int) -> pd.DataFrame:
    """Cells whose conditions appear in a shuffled order (GEARS draws depend on that order)."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    singles = [f"{g}+ctrl" if i % 4 else f"ctrl+{g}" for i, g in enumerate(genes)]
    combos = sorted({"+".join(rng.choice(genes, 2, replace=False)) for _ in range(n_combos)})
    cells = rng.permutation(["ctrl"] * 5 + singles * 3 + combos * 2)
    return pd.DataFrame({"condition": pd.Categorical(cells), "cell_type": "K562"},
                        index=[f"cell{i}" for i in range(len(cells))])


def real_obs(path, rename_controls: bool) -> pd.DataFrame:
    import anndata

    adata = anndata.read_h5ad(path, backed="r")
    obs = adata.obs[["condition"]].copy()
    adata.file.close()
    if rename_controls:  # McFaline: `control` / bare gene symbols -> GEARS labels
        obs["condition"] = [("ctrl" if c == "control" else f"{c}+ctrl") for c in obs["condition"].astype(str)]
    obs["cell_type"] = "any"
    return obs


def gears_sets(obs: pd.DataFrame, mode: str, seed: int):
    """({set: sorted conditions}, subgroup dict or None) as cell-gears computes them."""
    import anndata
    from gears.data_utils import DataSplitter

    adata = anndata.AnnData(sp.csr_matrix((len(obs), 2), dtype=np.float32), obs=obs.copy())
    subgroups = None
    if mode == "simulation":
        adata, subgroups = DataSplitter(adata, split_type=mode).split_data(
            train_gene_set_size=0.75, combo_seen2_train_frac=0.75, seed=seed, test_perts=None,
            only_test_set_perts=False)
    elif mode == "simulation_single":
        adata = DataSplitter(adata, split_type=mode).split_data(
            train_gene_set_size=0.75, combo_seen2_train_frac=0.75, seed=seed, test_perts=None,
            only_test_set_perts=False)
    elif mode.startswith("combo"):
        adata = DataSplitter(adata, split_type="combo", seen=int(mode[-1])).split_data(
            test_size=0.1, test_perts=None, test_pert_genes=None, seed=seed)
    elif mode == "single":
        adata = DataSplitter(adata, split_type=mode).split_data(test_size=0.1, seed=seed)
    else:
        adata = DataSplitter(adata, split_type=mode).split_data(seed=seed)
    split = adata.obs.dropna(subset=["split"])
    sets = {s: sorted(set(split.loc[split["split"] == s, "condition"].astype(str))) for s in ("train", "val", "test")}
    return {s: v for s, v in sets.items() if v}, subgroups


def prepare_split_sets(obs: pd.DataFrame, mode: str, seed: int, folder):
    """cell-gears' own entry point, PertData.prepare_split (constructor skipped: it downloads)."""
    import anndata
    from gears.pertdata import PertData

    pert_data = PertData.__new__(PertData)
    pert_data.adata = anndata.AnnData(sp.csr_matrix((len(obs), 2), dtype=np.float32), obs=obs.copy())
    pert_data.dataset_name, pert_data.dataset_path = "toy", str(folder)
    folder.mkdir()
    pert_data.prepare_split(split=mode, seed=seed)
    return {s: sorted(map(str, v)) for s, v in pert_data.set2conditions.items() if len(v)}, pert_data.subgroup


def compare(obs, modes=MODES):
    conditions = conditions_in_order(obs)
    compared = 0
    for mode in modes:
        for seed in SEEDS:
            ours, our_groups = gears_split(conditions, mode, seed)
            theirs, their_groups = gears_sets(obs, mode, seed)
            assert {s: sorted(v) for s, v in ours.items() if v} == theirs, (mode, seed)
            if their_groups is not None:
                for key in SUBGROUP_KEYS:
                    assert {g: sorted(v) for g, v in our_groups[key].items()} == {
                        g: sorted(map(str, v)) for g, v in their_groups[key].items()
                    }, (mode, seed, key)
            compared += 1
    return compared


def test_toy_screen_with_combinations_every_mode():
    obs = toy_obs(n_genes=26, n_combos=70, seed=0)
    modes = [m for m in MODES if m != "simulation_single"]  # GEARS asserts singles-only there
    assert compare(obs, modes) == len(modes) * len(SEEDS)
    with pytest.raises(ReginaError):
        gears_split(conditions_in_order(obs), "simulation_single", 1)


def test_toy_screen_of_singles_every_mode():
    obs = toy_obs(n_genes=30, n_combos=0, seed=1)
    assert compare(obs) == len(MODES) * len(SEEDS)


def test_prepare_split_itself_agrees(tmp_path):
    obs = toy_obs(n_genes=20, n_combos=80, seed=2)
    conditions = conditions_in_order(obs)
    for mode in ("simulation", "combo_seen0", "combo_seen2", "single", "no_test"):
        theirs, their_groups = prepare_split_sets(obs, mode, 2, tmp_path / mode)
        ours, _ = gears_split(conditions, mode, 2)
        assert {s: sorted(v) for s, v in ours.items() if v} == theirs, mode
        if mode == "simulation":
            split = make_split("toy", conditions, mode=mode, seed=2)  # what `regina split` writes
            assert (split.train, split.val, split.test) == (theirs["train"], theirs["val"], theirs["test"])
            for key in SUBGROUP_KEYS:
                assert split.subgroups[key] == {g: sorted(v) for g, v in their_groups[key].items()}


def test_demo_screen():
    from regina_cli.data.demo import simulate_screen

    obs = simulate_screen(n_cells=1500, n_genes=200, n_singles=20, n_doubles=25, seed=3).obs
    modes = ("simulation", "combo_seen1", "combo_seen2", "single")
    assert compare(obs[["condition", "cell_type"]], modes) == len(modes) * len(SEEDS)


def test_real_screens(papalexi_path, mcfaline_path):
    for obs in (real_obs(papalexi_path, False), real_obs(mcfaline_path, True)):
        assert compare(obs) == len(MODES) * len(SEEDS)
