"""The GEARS DE fields: a hand-checked case, and identity with cell-gears' own functions."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from regina_cli import keys
from regina_cli.data.dataset import GEARS_UNS
from regina_cli.data.demo import simulate_screen
from regina_cli.data.gears_de import add_gears_de
from regina_cli.data.importer import ImportOptions, import_screen


def test_dropout_rules_by_hand(rng):
    """Gene 0 vanishes under A (drop-out), gene 1 is zero everywhere (a true zero)."""
    X = rng.uniform(0.5, 2.0, (30, 25)).astype(np.float32)
    conditions = np.repeat(["ctrl", "A+ctrl", "A+B"], 10)
    X[conditions == "A+ctrl", 0] = 0.0
    X[:, 1] = 0.0
    X[conditions == "A+ctrl", 2] += 5.0  # the strongest change under A
    obs = pd.DataFrame({"condition": conditions, "cell_type": "K562"}, index=[f"c{i}" for i in range(30)])
    adata = ad.AnnData(sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(25)]))
    add_gears_de(adata)

    name = "K562_A+ctrl_1+1"
    assert set(adata.uns[keys.UNS_RANK_GENES]) == {name, "K562_A+B_1+1"}
    assert list(adata.obs[keys.OBS_CONDITION_NAME].unique()) == ["K562_ctrl_1", name, "K562_A+B_1+1"]
    assert adata.obs[keys.OBS_CONTROL].astype(int).tolist() == [1] * 10 + [0] * 20
    assert adata.uns[keys.UNS_RANK_GENES][name][0] == "g2"
    non_dropout = adata.uns[keys.UNS_NON_DROPOUT_IDX][name]
    non_zero = adata.uns[keys.UNS_NON_ZEROS_IDX][name]
    assert 0 not in non_dropout and 1 in non_dropout  # drop-out excluded, true zero kept
    assert 0 not in non_zero and 1 not in non_zero
    assert "g0" not in adata.uns[keys.UNS_TOP_DE_20][name] and "g1" not in adata.uns[keys.UNS_TOP_NON_ZERO_DE_20][name]
    assert len(adata.uns[keys.UNS_TOP_DE_20][name]) == 20


def test_top_non_zero_de_genes_skip_genes_zero_in_the_condition_and_in_the_controls(rng):
    """`top_non_zero_de_20` (kept in every imported file, as GEARS writes it) skips a gene that is
    zero under the condition even where the controls are zero too, which the non-drop-out list
    keeps: with fewer than 20 genes both lists are the whole ranking less those genes."""
    X = rng.uniform(0.5, 2.0, (20, 6)).astype(np.float32)
    conditions = np.repeat(["ctrl", "A+ctrl"], 10)
    X[conditions == "A+ctrl", 0] = 0.0  # drop-out under A
    X[:, 1] = 0.0  # zero everywhere
    obs = pd.DataFrame({"condition": conditions, "cell_type": "K562"}, index=[f"c{i}" for i in range(20)])
    adata = ad.AnnData(sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(6)]))
    add_gears_de(adata)

    name = "K562_A+ctrl_1+1"
    ranked = list(adata.uns[keys.UNS_RANK_GENES][name])
    assert list(adata.uns[keys.UNS_TOP_DE_20][name]) == [g for g in ranked if g != "g0"]
    assert list(adata.uns[keys.UNS_TOP_NON_ZERO_DE_20][name]) == [g for g in ranked if g not in ("g0", "g1")]


def test_a_cell_type_with_controls_only_has_nothing_to_rank(rng):
    """A cell line screened with controls only (or whose perturbed cells were all dropped) gets
    no DE list, and the other cell types theirs: scanpy is not asked to rank controls alone."""
    X = rng.uniform(0.5, 2.0, (40, 10)).astype(np.float32)
    conditions = ["ctrl"] * 10 + ["A+ctrl"] * 10 + ["ctrl"] * 20
    cell_types = ["K562"] * 20 + ["RPE1"] * 20
    obs = pd.DataFrame({"condition": conditions, "cell_type": cell_types}, index=[f"c{i}" for i in range(40)])
    adata = ad.AnnData(sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(10)]))
    add_gears_de(adata)
    assert set(adata.uns[keys.UNS_RANK_GENES]) == {"K562_A+ctrl_1+1"}


def _gears_reference(adata):
    """Run cell-gears' get_DE_genes + get_dropout_non_zero_genes on a bare copy."""
    from gears.data_utils import get_DE_genes, get_dropout_non_zero_genes

    bare = ad.AnnData(
        adata.X.copy(),
        obs=adata.obs[[keys.OBS_CONDITION, keys.OBS_CELL_TYPE]].astype(str),
        var=pd.DataFrame(index=adata.var_names),
    )
    return get_dropout_non_zero_genes(get_DE_genes(bare, skip_calc_de=False))


def _assert_same(ours, theirs):
    for column in (keys.OBS_CONDITION_NAME, keys.OBS_DOSE, keys.OBS_CONTROL):
        assert (ours.obs[column].astype(str).to_numpy() == theirs.obs[column].astype(str).to_numpy()).all()
    for key in GEARS_UNS:
        assert set(ours.uns[key]) == set(theirs.uns[key]), key
        for group, expected in theirs.uns[key].items():
            np.testing.assert_array_equal(np.asarray(ours.uns[key][group]), np.asarray(expected), err_msg=f"{key} {group}")


@pytest.mark.gears
def test_identical_to_cell_gears(mcfaline_path, tmp_path):
    """Two simulated cell types, and the real three-cell-line McFaline screen after import."""
    demo = simulate_screen(n_cells=1200, n_genes=260, n_singles=8, n_doubles=4, n_cell_types=2, seed=2)
    _assert_same(demo, _gears_reference(demo))
    imported, _ = import_screen(mcfaline_path, "mcfaline", ImportOptions(), scratch_root=tmp_path, log=print)
    _assert_same(imported, _gears_reference(imported))
