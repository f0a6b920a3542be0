"""Baselines matched to each condition's cell-type mix (evaluate/cell_type_baselines.py).

McFaline holds three cell lines: `regina predict` draws each condition's controls in that
condition's own mix, so its predictions carried the mix (0.32 pearson_delta from the mix alone),
while pooled baselines did not, and REGINA's lead over pooled train_mean was that credit.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cli_helpers import assert_user_error, invoke
from regina_cli import keys
from regina_cli.evaluate.baselines import training_data
from regina_cli.evaluate.cell_type_baselines import condition_mix, matched_baselines, screen_cell_types
from regina_cli.evaluate.truth import Truth

NAME = "lines"


def _screen(groups: list[tuple[str, str, list[float], int]], seed: int = 0) -> ad.AnnData:
    """AnnData from (condition, cell type, gene values, cells) groups, a little noise on each cell."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for condition, cell_type, values, n in groups:
        rows.append(np.asarray(values, dtype=np.float32) + rng.uniform(0, 0.01, (n, len(values))).astype(np.float32))
        obs += [(condition, cell_type)] * n
    frame = pd.DataFrame(obs, columns=[keys.OBS_CONDITION, keys.OBS_CELL_TYPE])
    frame.index = [f"cell{i}" for i in range(len(frame))]
    adata = ad.AnnData(sp.csr_matrix(np.vstack(rows)), obs=frame)
    adata.var_names = [f"G{i}" for i in range(adata.n_vars)]
    return adata


def test_matched_baselines_mix_each_cell_types_prediction_as_the_conditions_cells_are_mixed():
    adata = _screen([
        ("ctrl", "A", [1, 0], 4), ("ctrl", "B", [3, 2], 4),
        ("T+ctrl", "A", [2, 0], 3), ("T+ctrl", "B", [3, 4], 3),
        ("U+ctrl", "A", [9, 9], 2), ("U+ctrl", "B", [3, 2], 3),  # 2 A cells: below MIN_CELLS for A
        ("X+ctrl", "A", [5, 5], 6), ("X+ctrl", "B", [5, 5], 2),
        ("Y+ctrl", "C", [5, 5], 3),  # a cell type without controls
    ])
    truth = Truth(adata)
    types = screen_cell_types(truth)
    assert condition_mix(truth, types, "X+ctrl") == {"A": 0.75, "B": 0.25}
    train = training_data(truth, ["ctrl", "T+ctrl", "U+ctrl"])
    matched = matched_baselines(["no_change", "train_mean"], truth, train, ["X+ctrl", "Y+ctrl"], types)

    assert set(matched.profiles["no_change"]) == {"X+ctrl"}  # Y's cell type has no controls
    np.testing.assert_allclose(matched.profiles["no_change"]["X+ctrl"], [1.5, 0.5], atol=0.01)
    # A: T's cells only (U has 2 A cells); B: T's and U's cells pooled, 3 each
    np.testing.assert_allclose(matched.profiles["train_mean"]["X+ctrl"], [0.75 * 2 + 0.25 * 3, 0.25 * 3], atol=0.01)
    changes = matched.changes["train_mean"]["X+ctrl"]
    np.testing.assert_allclose(changes["A"], [1, 0], atol=0.01)
    np.testing.assert_allclose(changes["B"], [0, 1], atol=0.01)
    # Systema's average training perturbation per type (A: T alone; B: T and U), mixed 3:1
    np.testing.assert_allclose(matched.references["X+ctrl"], [0.75 * 2 + 0.25 * 3, 0.25 * 3], atol=0.01)
    assert "Y+ctrl" not in matched.references
    assert set(changes) == {"A", "B", "C"}  # C (no baseline for it) moves by X's mixed change
    np.testing.assert_allclose(changes["C"], 0.75 * changes["A"] + 0.25 * changes["B"])


def test_one_cell_type_leaves_the_baselines_pooled():
    adata = _screen([("ctrl", "A", [1, 0], 4), ("T+ctrl", "A", [2, 0], 3)])
    assert screen_cell_types(Truth(adata)) is None
    del adata.obs[keys.OBS_CELL_TYPE]
    assert screen_cell_types(Truth(adata)) is None


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    """Two cell lines with very different expression; the test conditions lean towards line A (6 A
    cells, 2 B) and raise genes 4-7 a little, and predictions are exactly their controls in that mix."""
    from regina_cli.data.dataset import write_dataset
    from regina_cli.data.gears_de import add_gears_de
    from regina_cli.data.split import make_split, save_split

    rng = np.random.default_rng(1)
    line_a, line_b = rng.uniform(0, 2, 12), rng.uniform(2, 4, 12)
    effect = np.where(np.arange(12) < 4, 1.0, 0.0)
    groups = [("ctrl", "A", line_a, 8), ("ctrl", "B", line_b, 8)]
    for gene in ("T1", "T2", "T3"):
        groups += [(f"{gene}+ctrl", "A", line_a + effect, 4), (f"{gene}+ctrl", "B", line_b + 2 * effect, 4)]
    bump = np.where((np.arange(12) >= 4) & (np.arange(12) < 8), 0.5, 0.0)  # what no model here predicts
    for gene in ("X1", "X2"):
        groups += [(f"{gene}+ctrl", "A", line_a + bump, 6), (f"{gene}+ctrl", "B", line_b + bump, 2)]
    adata = _screen(groups)
    adata.var["gene_name"] = adata.var_names
    add_gears_de(adata)
    data_dir = tmp_path_factory.mktemp("data")
    write_dataset(adata, NAME, data_dir)
    split = make_split(NAME, sorted(set(adata.obs[keys.OBS_CONDITION])),
                       user_split={"train": ["ctrl", "T1+ctrl", "T2+ctrl"], "val": ["T3+ctrl"],
                                   "test": ["X1+ctrl", "X2+ctrl"]})
    save_split(split, data_dir)

    controls = adata.obs_names[adata.obs[keys.OBS_CONDITION] == "ctrl"]
    drawn = list(controls[:8]) * 3 + list(controls[8:])  # 24 A, 8 B: the test conditions' mix
    cells = np.vstack([adata[drawn].X.toarray()] * 2)
    pred = ad.AnnData(cells, obs=pd.DataFrame({keys.OBS_CONDITION: ["X1+ctrl"] * 32 + ["X2+ctrl"] * 32,
                                               keys.OBS_CONTROL_CELL: drawn * 2},
                                              index=[f"p{i}" for i in range(64)]))
    pred.var_names = adata.var_names.copy()
    path = data_dir / "pred.h5ad"
    pred.write_h5ad(path)
    return adata, data_dir, path


def _evaluate(lines, out, *extra, plots: bool = False):
    adata, data_dir, path = lines
    result = invoke("evaluate", NAME, "--data-dir", data_dir, "--predictions", path, "--out", out,
                    "--plots" if plots else "--no-plots", "--threads", "1", "--baselines", "no_change,train_mean", *extra)
    table = pd.read_csv(out / keys.PER_CONDITION_FILE).set_index(["model", "condition"]) \
        if result.exit_code == 0 else None
    return result, table


def test_evaluate_matches_baselines_to_the_mix_by_default_and_pooled_on_request(lines, tmp_path):
    adata, _, _ = lines
    result, table = _evaluate(lines, tmp_path / "matched")
    assert result.exit_code == 0, result.output
    assert "fitted per cell type (A, B)" in result.output and "warning" not in result.output
    summary = json.loads((tmp_path / "matched" / keys.METRICS_FILE).read_text())
    assert summary["baselines_matched_to_cell_types"] == ["A", "B"] and summary["warnings"] == []
    # no_change in the mix is what the model predicts: the same mean, and the same cells
    for metric in ("pearson_delta", "nmse_all", "energy_distance", "variance_pearson", "l1_means"):
        np.testing.assert_allclose(table.loc["no_change", metric].to_numpy(), table.loc["pred", metric].to_numpy(),
                                   rtol=1e-5, atol=1e-6)
    assert (table.loc["no_change", "pearson_delta"] > 0.5).all()  # the mix is most of the change
    # train_mean moves each borrowed control by its own line's change: A +1, B +2 on genes 0-3
    x = adata.X.toarray()
    of = adata.obs
    truth_x1 = x[(of[keys.OBS_CONDITION] == "X1+ctrl").to_numpy()].mean(0)
    ctrl = {t: x[((of[keys.OBS_CONDITION] == "ctrl") & (of[keys.OBS_CELL_TYPE] == t)).to_numpy()].mean(0) for t in "AB"}
    trained = of[keys.OBS_CONDITION].isin(["T1+ctrl", "T2+ctrl"])
    change = {t: x[(trained & (of[keys.OBS_CELL_TYPE] == t)).to_numpy()].mean(0) - ctrl[t] for t in "AB"}
    expected = 0.75 * (ctrl["A"] + change["A"]) + 0.25 * (ctrl["B"] + change["B"])
    assert table.loc[("train_mean", "X1+ctrl"), "l1_means"] == pytest.approx(np.abs(expected - truth_x1).mean(), abs=1e-4)
    # Systema's reference, the average training perturbation, is mixed as the condition's cells are
    reference = sum(share * np.mean([x[((of[keys.OBS_CONDITION] == c) & (of[keys.OBS_CELL_TYPE] == t)).to_numpy()]
                                     .mean(0) for c in ("T1+ctrl", "T2+ctrl")], axis=0)
                    for t, share in (("A", 0.75), ("B", 0.25)))
    predicted = 0.75 * ctrl["A"] + 0.25 * ctrl["B"]
    assert table.loc[("pred", "X1+ctrl"), "pearson_delta_pert"] == pytest.approx(
        np.corrcoef(predicted - reference, truth_x1 - reference)[0, 1], abs=1e-4)

    result, pooled = _evaluate(lines, tmp_path / "pooled", "--baseline-cell-types", "pooled", plots=True)
    assert result.exit_code == 0, result.output
    assert "holds 2 cell types" in result.output and "fitted per cell type" not in result.output
    summary = json.loads((tmp_path / "pooled" / keys.METRICS_FILE).read_text())
    assert summary["baselines_matched_to_cell_types"] == []
    # the warning stays with the files, for whoever reads them after the terminal is gone
    (warning,) = summary["warnings"]
    assert warning.startswith(f"{NAME} holds 2 cell types")
    assert "<b>warning:</b> " + warning[:40] in (tmp_path / "pooled" / keys.REPORT_FILE).read_text()
    assert (pooled.loc["no_change", "pearson_delta"] == 0).all()
    # pooled, Systema's reference is the pooled average perturbation (the lines 1:1, not 3:1)
    assert (np.abs(pooled.loc["pred", "pearson_delta_pert"] - table.loc["pred", "pearson_delta_pert"]) > 0.01).all()


def test_an_unknown_baseline_cell_types_value_is_one_error(lines, tmp_path):
    result, _ = _evaluate(lines, tmp_path / "bad", "--baseline-cell-types", "mixed")
    assert_user_error(result, "--baseline-cell-types must be one of matched, pooled", only_line=False)
    assert not (tmp_path / "bad").exists()


def test_a_cell_type_too_small_for_a_baseline_of_its_own_takes_the_pooled_change():
    """A cell type with no training condition of 3 or more cells left train_mean (and additive,
    linear) without a prediction for every condition holding it, and the baseline disappeared."""
    from regina_cli.evaluate.run import borrowed_warnings

    adata = _screen([("ctrl", "A", [1, 0], 4), ("ctrl", "B", [3, 2], 4),
                     ("T+ctrl", "A", [2, 0], 3), ("T+ctrl", "B", [5, 2], 1),  # one B cell: too few for B
                     ("X+ctrl", "A", [5, 5], 2), ("X+ctrl", "B", [5, 5], 2)])
    truth = Truth(adata)
    train = training_data(truth, ["ctrl", "T+ctrl"])
    matched = matched_baselines(["no_change", "train_mean"], truth, train, ["X+ctrl"], screen_cell_types(truth))
    pooled_change = np.array([(3 * 2 + 5) / 4, 2 / 4]) - np.array([2.0, 1.0])  # T's 4 cells minus all controls
    changes = matched.changes["train_mean"]["X+ctrl"]
    np.testing.assert_allclose(changes["A"], [1, 0], atol=0.01)
    np.testing.assert_allclose(changes["B"], pooled_change, atol=0.01)
    np.testing.assert_allclose(matched.profiles["train_mean"]["X+ctrl"],
                               0.5 * np.array([2, 0]) + 0.5 * (np.array([3, 2]) + pooled_change), atol=0.01)
    assert matched.borrowed == {"train_mean": ["B"]}
    (warning,) = borrowed_warnings(matched.borrowed)
    assert warning.startswith("too few training cells of cell type(s) B for train_mean of their own")


def test_baseline_controls_drawn_in_the_mix_and_apart_from_the_true_cells_sample():
    """A file without obs control_cell: the baselines' controls were drawn from all controls, not in
    the condition's cell-type mix, and from the stream that samples the true cells, so the model's
    own distribution metrics changed with --baselines."""
    from regina_cli.evaluate.run import _control_rows

    adata = _screen([("ctrl", "A", [1, 0], 50), ("ctrl", "B", [3, 2], 50), ("X+ctrl", "A", [1, 0], 3)])
    truth = Truth(adata)
    types = screen_cell_types(truth)
    rows = _control_rows(truth, None, 400, np.random.default_rng(0), {"A": 0.75, "B": 0.25}, types)
    assert set(rows) <= set(truth.control_rows) and (types[rows] == "A").mean() == pytest.approx(0.75, abs=0.06)
    assert (types[_control_rows(truth, None, 400, np.random.default_rng(0))] == "A").mean() == pytest.approx(0.5, abs=0.06)


def test_a_models_scores_do_not_depend_on_the_baselines_scored_beside_it(lines, tmp_path):
    adata, data_dir, path = lines
    pred = ad.read_h5ad(path)
    del pred.obs[keys.OBS_CONTROL_CELL]
    pred.write_h5ad(tmp_path / "no_sources.h5ad")
    tables = []
    for baselines in ("none", "no_change,train_mean"):
        out = tmp_path / baselines.replace(",", "_")
        result = invoke("evaluate", NAME, "--data-dir", data_dir, "--predictions", tmp_path / "no_sources.h5ad",
                        "--out", out, "--no-plots", "--threads", "1", "--baselines", baselines, "--true-cells", "3")
        assert result.exit_code == 0, result.output
        table = pd.read_csv(out / keys.PER_CONDITION_FILE)
        tables.append(table[table.model == "no_sources"].set_index("condition"))
    for metric in ("energy_distance", "mmd_rbf", "sliced_wasserstein"):
        np.testing.assert_array_equal(tables[0][metric].to_numpy(), tables[1][metric].to_numpy())


def test_only_the_controls_cell_types_count():
    """Controls of one type (other types only among perturbed cells) leave the baselines pooled,
    and the mix warning counts the controls' types."""
    from regina_cli.evaluate.run import cell_type_mix_warning

    adata = _screen([("ctrl", "A", [1, 0], 4), ("T+ctrl", "A", [2, 0], 3), ("T+ctrl", "B", [3, 0], 3)])
    assert screen_cell_types(Truth(adata)) is None
    adata = _screen([("ctrl", "A", [1, 0], 4), ("ctrl", "B", [3, 2], 4), ("T+ctrl", "C", [2, 0], 3)])
    (warning,) = cell_type_mix_warning(Truth(adata), "screen", ["no_change"])
    assert "holds 2 cell types" in warning


def test_matched_train_mean_weights_each_training_condition_by_its_cells_of_the_type():
    adata = _screen([
        ("ctrl", "A", [1, 0], 4), ("ctrl", "B", [3, 2], 4),
        ("T+ctrl", "B", [4, 2], 3), ("U+ctrl", "B", [3, 6], 5),  # B changes: T [1, 0] (3 cells), U [0, 4] (5)
        ("T+ctrl", "A", [2, 0], 3), ("U+ctrl", "A", [2, 0], 3),
        ("X+ctrl", "B", [5, 5], 4),
    ])
    truth = Truth(adata)
    types = screen_cell_types(truth)
    train = training_data(truth, ["ctrl", "T+ctrl", "U+ctrl"])
    matched = matched_baselines(["train_mean"], truth, train, ["X+ctrl"], types)
    np.testing.assert_allclose(matched.changes["train_mean"]["X+ctrl"]["B"], [3 / 8, 20 / 8], atol=0.01)


def test_a_condition_with_cells_of_a_type_without_controls_gets_no_matched_baseline():
    adata = _screen([
        ("ctrl", "A", [1, 0], 4), ("ctrl", "B", [3, 2], 4),
        ("T+ctrl", "A", [2, 0], 3), ("T+ctrl", "B", [3, 4], 3),
        ("X+ctrl", "A", [5, 5], 3), ("X+ctrl", "C", [5, 5], 3),  # C has no controls to fit on
        ("Y+ctrl", "A", [5, 5], 3),
    ])
    truth = Truth(adata)
    train = training_data(truth, ["ctrl", "T+ctrl"])
    matched = matched_baselines(["no_change", "train_mean"], truth, train, ["X+ctrl", "Y+ctrl"],
                                screen_cell_types(truth))
    assert set(matched.profiles["train_mean"]) == set(matched.changes["train_mean"]) == {"Y+ctrl"}
