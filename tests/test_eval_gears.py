"""The GEARS-named metrics agree with cell-gears' own deeper_analysis / non_dropout_analysis."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from regina_cli.data.demo import simulate_screen
from regina_cli.evaluate.run import de_gene_sets, score_precision
from regina_cli.evaluate.truth import Truth

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
