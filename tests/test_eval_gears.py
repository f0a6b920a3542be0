"""The GEARS-named metrics agree with cell-gears' own deeper_analysis / non_dropout_analysis."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from regina_cli.data.demo import simulate_screen
from regina_cli.evaluate.run import de_gene_sets, score_precision
from regina_cli import keys
from regina_cli.evaluate.truth import Truth, group_statistics

DEEPER = ["pearson_delta", "pearson_delta_top20_de", "mse_top20_de", "frac_correct_direction_20",
          "frac_correct_direction_all"]
NON_DROPOUT = ["pearson_delta_top20_de_non_dropout", "mse_top20_de_non_dropout",
               "frac_correct_direction_top20_non_dropout", "frac_opposite_direction_top20_non_dropout",
               "frac_correct_direction_non_dropout", "frac_correct_direction_non_zero",
               "frac_sigma_below_1_non_dropout"]


@pytest.mark.gears
def test_matches_gears_deeper_and_non_dropout_analysis():
    from gears.inference import deeper_analysis, non_dropout_analysis

    adata = simulate_screen(n_cells=900, n_genes=160, n_singles=8, n_doubles=6, seed=3)
    truth = Truth(adata)
    conditions = truth.conditions
    rng = np.random.default_rng(0)

    # Predicted cells, one per true cell (GEARS pairs them), around a designed mean profile: a good
    # prediction, an unrelated one, and a sign-flipped one. (An exact "no change" cannot be built
    # here: float32 rounding of the control mean would leave deltas of pure rounding noise; the
    # undefined-Pearson-counts-as-0 rule is checked in test_eval_metrics.py.)
    pert_cat, pred_rows, true_rows, profiles = [], [], [], []
    for i, condition in enumerate(conditions):
        true_cells = adata.X[truth.rows(condition)].toarray()
        true_mean = true_cells.mean(0)
        profile = [true_mean + rng.normal(0, 0.05, true_mean.shape),
                   truth.control_mean + rng.normal(0, 0.3, true_mean.shape),
                   2 * truth.control_mean - true_mean][i % 3].astype(np.float32)
        noise = rng.normal(0, 0.2, true_cells.shape).astype(np.float32)
        pred_cells = profile + (noise - noise.mean(0))
        pert_cat += [condition] * len(true_cells)
        pred_rows.append(pred_cells)
        true_rows.append(true_cells)
        profiles.append(pred_cells.astype(np.float64).mean(0))
    pred, real = np.vstack(pred_rows), np.vstack(true_rows)
    test_res = {"pert_cat": np.array(pert_cat), "pred": pred, "truth": real,
                "pred_de": pred[:, :20], "truth_de": real[:, :20]}  # *_de only feed metrics not compared here

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GEARS divides by zero in fold changes and warns on constant input
        deeper = deeper_analysis(adata, test_res)
        non_dropout = non_dropout_analysis(adata, test_res)

    ours = score_precision(np.stack(profiles), truth, conditions, de_gene_sets(truth, conditions, "cpu"), torch.device("cpu"))
    for i, condition in enumerate(conditions):
        for name, gears_out in [(m, deeper) for m in DEEPER] + [(m, non_dropout) for m in NON_DROPOUT]:
            expected = gears_out[condition].get(name, np.nan)
            assert ours[name][i] == pytest.approx(expected, rel=2e-4, abs=2e-5, nan_ok=True), (condition, name)


def test_a_constant_gene_has_no_spread_despite_rounding():
    """E[x^2] - E[x]^2 of 999 equal values leaves ~1e-13 of rounding: a constant gene's standard
    deviation must be exactly 0 ("no spread" decides the sigma and direction metrics)."""
    import scipy.sparse as sp

    value = np.float32(3.0725152492523193)
    x = sp.csr_matrix(np.stack([np.full(999, value), np.arange(999) % 3], axis=1).astype(np.float32))
    stats = group_statistics(x, [np.arange(999)], None)[0]
    assert stats.std[0] == 0.0 and stats.std[1] > 0


def _two_cell_type_screen():
    """A+ctrl in cell types K then R (R's cells last), each with its own non-drop-out genes."""
    import anndata as ad
    import pandas as pd

    condition = ["ctrl", "ctrl", "A+ctrl", "A+ctrl", "ctrl", "ctrl", "A+ctrl", "A+ctrl"]
    cell_type = ["K"] * 4 + ["R"] * 4
    names = [f"{t}_{c}_{'1+1' if c != 'ctrl' else '1'}" for t, c in zip(cell_type, condition)]
    obs = pd.DataFrame({keys.OBS_CONDITION: condition, keys.OBS_CELL_TYPE: cell_type, keys.OBS_CONDITION_NAME: names},
                       index=[f"c{i}" for i in range(8)])
    adata = ad.AnnData(np.random.default_rng(0).random((8, 4)).astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=["g0", "g1", "g2", "g3"]))
    adata.uns[keys.UNS_NON_DROPOUT_IDX] = {"K_A+ctrl_1+1": np.array([0, 1]), "R_A+ctrl_1+1": np.array([2, 3])}
    return adata


def test_a_condition_in_several_cell_types_takes_its_last_cells_de_lists_as_gears():
    """GEARS maps condition -> condition_name with dict(zip(...)), so the last cell's name wins:
    the DE lists and masks of A+ctrl are R's here, or GEARS' numbers are not reproduced."""
    truth = Truth(_two_cell_type_screen())
    assert truth.condition_name["A+ctrl"] == "R_A+ctrl_1+1"
    assert truth.gene_mask(keys.UNS_NON_DROPOUT_IDX, "A+ctrl").tolist() == [False, False, True, True]


def test_gene_masks_follow_the_genes_scored():
    """A truth restricted to some genes (predictions on highly variable genes) gives each mask
    over those genes, in their order."""
    truth = Truth(_two_cell_type_screen(), genes=["g3", "g0", "g2"])
    assert truth.gene_mask(keys.UNS_NON_DROPOUT_IDX, "A+ctrl").tolist() == [True, False, True]
