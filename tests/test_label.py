"""`regina label`: scores equal scanpy's, thresholds fitted on training cells, errors, real screens."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cli_helpers import assert_user_error, invoke
from regina_cli import keys
from regina_cli.data.dataset import write_dataset
from regina_cli.data.label import (
    CELL_CYCLE_CLASSES,
    STRESS_CLASSES,
    GeneScore,
    cell_cycle_genes,
    compute_labels,
    gene_names,
    load_labels,
    stress_markers,
)
from regina_cli.data.split import conditions_in_order, load_split, make_split, save_split
from regina_cli.errors import ReginaError

sc = pytest.importorskip("scanpy")


@pytest.fixture(scope="module")
def demo_files(demo_adata, tmp_path_factory):
    """The demo plus its simulation_1 split, written once; each test gets a copy."""
    folder = tmp_path_factory.mktemp("demo_data")
    write_dataset(demo_adata, "demo", folder)
    save_split(make_split("demo", conditions_in_order(demo_adata.obs), mode="simulation", seed=1), folder)
    return keys.dataset_dir("demo", folder)


@pytest.fixture
def demo(demo_adata, demo_files):
    shutil.copytree(demo_files, keys.dataset_dir("demo"))
    return demo_adata


def train_mask(adata, split="simulation_1"):
    from regina_cli.data.split import load_split

    return adata.obs["condition"].astype(str).isin(load_split("demo", split).train).to_numpy()




def labels_dir():
    return keys.dataset_dir("demo") / keys.LABELS_DIR


# --- scores equal scanpy's ----------------------------------------------------------------------


@pytest.mark.parametrize("fit_on", ["all", "subset"])
def test_gene_score_equals_scanpy_score_genes(demo_adata, fit_on):
    cells = np.ones(demo_adata.n_obs, bool) if fit_on == "all" else np.random.default_rng(0).random(demo_adata.n_obs) < 0.6
    markers = stress_markers(gene_names(demo_adata))
    subset = demo_adata[cells].copy()
    sc.tl.score_genes(subset, list(gene_names(demo_adata)[markers]), score_name="expected")
    fitted = GeneScore.fit(demo_adata.X[cells], markers)
    np.testing.assert_allclose(fitted.apply(demo_adata.X)[cells], subset.obs["expected"], rtol=0, atol=1e-12)
    dense = GeneScore.fit(demo_adata.X[cells].toarray(), markers)
    np.testing.assert_array_equal(dense.reference, fitted.reference)


def test_stress_on_all_cells_is_the_original_add_binary_state(demo_adata):
    """The method's own code (REGINA_method.md), run on the whole dataset at once."""
    original = demo_adata.copy()
    original.var_names = original.var.gene_name
    markers = [g for g in original.var_names if g.startswith(("HSP", "ATF", "DNAJ", "ERN", "EIF2", "CEBP"))]
    sc.tl.score_genes(original, gene_list=markers, score_name="stress_score")
    threshold = original.obs["stress_score"].quantile(0.70)
    original.obs["cell_state"] = "Homeostasis"
    original.obs.loc[original.obs["stress_score"] > threshold, "cell_state"] = "Stressed"

    labels = compute_labels(demo_adata, "stress")
    assert labels.classes == STRESS_CLASSES
    assert (labels.cell_state.to_numpy() == original.obs["cell_state"].to_numpy()).all()
    assert labels.details["threshold"] == pytest.approx(threshold, abs=1e-12)


def test_cell_cycle_on_all_cells_is_scanpy_score_genes_cell_cycle(demo_adata):
    expected = demo_adata.copy()
    s_genes, g2m_genes = cell_cycle_genes()
    sc.tl.score_genes_cell_cycle(expected, s_genes=s_genes, g2m_genes=g2m_genes)
    labels = compute_labels(demo_adata, "cell-cycle")
    assert labels.classes == CELL_CYCLE_CLASSES
    assert (labels.cell_state.to_numpy() == expected.obs["phase"].to_numpy()).all()


def test_shipped_cell_cycle_lists():
    s_genes, g2m_genes = cell_cycle_genes()
    assert (len(s_genes), len(g2m_genes)) == (43, 54)  # Tirosh et al. 2016, as in scanpy's tutorial
    assert {"MCM5", "PCNA", "E2F8"} <= set(s_genes) and {"CDK1", "TOP2A", "CENPA"} <= set(g2m_genes)
    assert not set(s_genes) & set(g2m_genes)


def test_renamed_cell_cycle_symbols_are_found(demo_adata):
    renamed = demo_adata.copy()
    names = renamed.var["gene_name"].replace({"MLF1IP": "CENPU", "FAM64A": "PIMREG"})
    renamed.var["gene_name"] = names.to_numpy()
    renamed.var_names = names.to_numpy()
    details = compute_labels(renamed, "cell-cycle").details
    assert "CENPU" in details["S_markers"] and "PIMREG" in details["G2M_markers"]


# --- fitted on training cells, applied to all ---------------------------------------------------


def test_threshold_and_references_come_from_training_cells_only(demo_adata):
    train = np.random.default_rng(1).random(demo_adata.n_obs) < 0.5
    labels = compute_labels(demo_adata, "stress", train=train, quantile=0.8)
    subset = demo_adata[train].copy()
    sc.tl.score_genes(subset, labels.details["markers"], score_name="expected")
    assert labels.details["threshold"] == pytest.approx(np.quantile(subset.obs["expected"], 0.8), abs=1e-12)
    assert (labels.cell_state[train] == "Stressed").mean() == pytest.approx(0.2, abs=0.01)
    # held-out cells do not influence anyone's label: drop half of them, nothing changes
    keep = train | (np.arange(demo_adata.n_obs) % 2 == 0)
    fewer = compute_labels(demo_adata[keep].copy(), "stress", train=train[keep], quantile=0.8)
    assert (fewer.cell_state.to_numpy() == labels.cell_state[keep].to_numpy()).all()


# --- obs columns and refusals -------------------------------------------------------------------


def with_obs(adata, **columns):
    out = adata.copy()
    for name, values in columns.items():
        out.obs[name] = values
    return out


def test_obs_column_labels(demo_adata):
    batch = np.where(np.arange(demo_adata.n_obs) % 3 == 0, "b1", "b2")
    labels = compute_labels(with_obs(demo_adata, batch=pd.Categorical(batch)), "obs:batch")
    assert labels.classes == ("b1", "b2")
    assert (labels.cell_state.to_numpy() == batch).all()


@pytest.mark.parametrize(
    "method, columns, fragment",
    [
        ("obs:nothing", {}, "obs has no column 'nothing'"),
        ("obs:depth", {"depth": "float"}, "numeric, not categorical"),
        ("obs:lonely", {"lonely": "one"}, "single class"),
        ("obs:holes", {"holes": "nan"}, "without a value"),
        ("obs:", {}, "unknown label method"),
        ("pca", {}, "unknown label method"),
    ],
)
def test_obs_and_method_errors(demo_adata, method, columns, fragment):
    n = demo_adata.n_obs
    values = {"float": np.linspace(0, 1, n), "one": ["x"] * n, "nan": [None] + ["a", "b"] * ((n - 1) // 2) + ["a"] * ((n - 1) % 2)}
    adata = with_obs(demo_adata, **{k: values[v] for k, v in columns.items()})
    with pytest.raises(ReginaError, match=fragment):
        compute_labels(adata, method)


def test_no_marker_gene_is_refused(demo_adata):
    renamed = demo_adata.copy()
    renamed.var["gene_name"] = [f"X{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ReginaError, match="no stress marker gene"):
        compute_labels(renamed, "stress")
    with pytest.raises(ReginaError, match="S-phase marker genes"):
        compute_labels(renamed, "cell-cycle")


def test_an_empty_class_is_refused(demo_adata):
    silent = demo_adata.copy()
    silent.X = sp.csr_matrix(silent.shape, dtype=np.float32)  # every score 0: nobody above the threshold
    with pytest.raises(ReginaError, match="class 'Stressed' of stress would be empty"):
        compute_labels(silent, "stress")


def test_quantile_checks(demo_adata):
    with pytest.raises(ReginaError, match="strictly between 0 and 1"):
        compute_labels(demo_adata, "stress", quantile=1.5)
    with pytest.raises(ReginaError, match="stress only"):
        compute_labels(demo_adata, "cell-cycle", quantile=0.5)


# --- the command ------------------------------------------------------------------------------


def test_cli_stress_with_split_writes_csv_and_record(demo):
    result = invoke("label", "demo", "--method", "stress", "--split", "simulation_1")
    assert result.exit_code == 0, result.output
    assert "training cells of split simulation_1" in result.output and "Stressed" in result.output
    path = keys.labels_file("demo", "stress", split="simulation_1")
    assert path.name == "stress@simulation_1.csv"  # per split: two splits never share one file
    table = pd.read_csv(path)
    assert list(table.columns) == ["cell", "cell_state"]
    assert list(table["cell"]) == list(demo.obs_names)
    labels = load_labels("demo", "stress", split="simulation_1")
    expected = compute_labels(demo, "stress", train=train_mask(demo))
    assert (labels.to_numpy() == expected.cell_state.to_numpy()).all()
    assert (labels.index == demo.obs_names).all()
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["split"] == "simulation_1" and record["quantile"] == 0.7
    assert record["labels_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["split_sha256"] == load_split("demo", "simulation_1").sha256()
    train_row = {r["class"]: r["train"] for r in record["balance"]}
    assert train_row["Stressed"] == int((expected.cell_state[train_mask(demo)] == "Stressed").sum())
    first = path.read_bytes()
    assert invoke("label", "demo", "--method", "stress", "--split", "simulation_1").exit_code == 0
    assert path.read_bytes() == first


def test_cli_without_split_says_so(demo):
    result = invoke("label", "demo", "--method", "cell-cycle")
    assert result.exit_code == 0, result.output
    assert "no --split given" in result.output
    assert set(load_labels("demo", "cell-cycle")) <= set(CELL_CYCLE_CLASSES)


def test_cli_obs_column_json_output(demo):
    result = invoke("--json", "label", "demo", "--method", "obs:condition")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert sum(row["cells"] for row in out["balance"]) == demo.n_obs
    assert keys.labels_file("demo", "obs:condition").name == "obs_condition.csv"
    assert load_labels("demo", "obs:condition").nunique() == demo.obs["condition"].nunique()


def test_labels_of_another_method_with_the_same_file_name_are_refused(demo_adata, tmp_path):
    """`obs:grp:x` and `obs:grp_x` are both written to obs_grp_x.csv: train-ae loaded the other
    column's labels without a word."""
    cells = np.arange(demo_adata.n_obs)
    write_dataset(with_obs(demo_adata, **{"grp:x": np.where(cells % 2, "a", "b"), "grp_x": np.where(cells % 3, "c", "d")}),
                  "demo")
    save_split(make_split("demo", conditions_in_order(demo_adata.obs), mode="simulation", seed=1))
    assert invoke("label", "demo", "--method", "obs:grp:x", "--split", "simulation_1").exit_code == 0
    assert set(load_labels("demo", "obs:grp:x", split="simulation_1")) == {"a", "b"}
    with pytest.raises(ReginaError, match="holds the labels of method 'obs:grp:x', not 'obs:grp_x'"):
        load_labels("demo", "obs:grp_x", split="simulation_1")
    result = invoke("train-ae", "demo", "--split", "simulation_1", "--labels", "obs:grp_x", "--run", str(tmp_path / "run"),
                    "--device", "cpu")
    assert_user_error(result, "not 'obs:grp_x'", "regina label demo --method obs:grp_x --split simulation_1 --force")
    assert not (tmp_path / "run").exists()


def test_labels_of_an_older_version_of_the_dataset_are_refused(demo):
    """Labels fitted on all cells (no --split), then the dataset fetched again with other values:
    the labels file and its record are untouched and no split ties them to the dataset, so only
    the record's dataset hash says that train-ae would learn classes scored on the old cells."""
    assert invoke("label", "demo", "--method", "stress").exit_code == 0
    assert load_labels("demo", "stress").index.equals(demo.obs_names)
    changed = demo.copy()
    changed.X = changed.X * 2
    write_dataset(changed, "demo")  # `regina fetch --force` of a re-processed screen: same cells and genes
    with pytest.raises(ReginaError, match="fitted on another version of dataset demo.*regina label demo --method "
                                          "stress --force"):
        load_labels("demo", "stress")


@pytest.mark.parametrize("args", [["--method", "stress", "--split", "simulation_1"], ["--method", "obs:condition"]])
def test_a_dataset_fetched_again_while_labelling_leaves_no_labels(demo, refetched_after_read, args):
    """The record named the dataset as it was after the labels were computed: a `fetch --force`
    committed in between gave labels of the old cells under the new dataset's hash."""
    result = invoke("label", "demo", *args)
    assert_user_error(result, "dataset demo changed while labelling", "run the command again")
    assert not labels_dir().exists() or list(labels_dir().iterdir()) == []


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["label", "missing", "--method", "stress"], ["regina fetch missing"]),
        (["label", "demo", "--method", "umap"], ["unknown label method"]),
        (["label", "demo", "--method", "obs:nope"], ["no column 'nope'"]),
        (["label", "demo", "--method", "stress", "--split", "simulation_9"], ["regina split demo --mode simulation --seed 9"]),
        (["label", "demo", "--method", "stress", "--quantile", "0"], ["--quantile"]),
    ],
)
def test_cli_bad_inputs_give_one_line_and_no_file(demo, args, fragments):
    assert_user_error(invoke(*args), *fragments)
    assert not labels_dir().exists()


def test_load_labels_missing():
    with pytest.raises(ReginaError, match="regina label demo --method stress"):
        load_labels("demo", "stress")


# --- real screens -------------------------------------------------------------------------------


def test_mcfaline_labels_from_the_cli(mcfaline_path):
    from regina_cli.data.fetch import fetch

    fetch("mcfaline", source=str(mcfaline_path), log=lambda message: None)
    assert invoke("split", "mcfaline").exit_code == 0
    result = invoke("label", "mcfaline", "--method", "stress", "--split", "simulation_1")
    assert result.exit_code == 0, result.output
    record = json.loads(keys.labels_file("mcfaline", "stress", split="simulation_1").with_suffix(".json").read_text())
    assert record["markers"] == ["HSPA5", "HSPA6"]  # the only stress genes among its 500 HVGs
    train = {r["class"]: r["train"] for r in record["balance"]}
    assert train["Stressed"] / (train["Stressed"] + train["Homeostasis"]) == pytest.approx(0.3, abs=0.01)
    # its 500 highly variable genes hold no S-phase marker: refused, nothing written
    assert_user_error(invoke("label", "mcfaline", "--method", "cell-cycle"), "S-phase marker")
    assert not keys.labels_file("mcfaline", "cell-cycle").exists()
    assert invoke("label", "mcfaline", "--method", "obs:cell_type").exit_code == 0
    assert load_labels("mcfaline", "obs:cell_type").nunique() == 3


def test_papalexi_labels_fitted_on_its_split(papalexi_path):
    import anndata

    adata = anndata.read_h5ad(papalexi_path)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    split = make_split("papalexi", conditions_in_order(adata.obs), mode="simulation", seed=1)
    train = adata.obs["condition"].astype(str).isin(split.train).to_numpy()
    stress = compute_labels(adata, "stress", train=train)
    assert stress.details["markers"] == ["DNAJA2"]  # its one stress gene among 299 measured
    assert (stress.cell_state[train] == "Stressed").mean() == pytest.approx(0.3, abs=0.02)
    phase = compute_labels(adata, "cell-cycle", train=train)
    expected = adata[train].copy()
    s_genes, g2m_genes = cell_cycle_genes()
    sc.tl.score_genes_cell_cycle(expected, s_genes=s_genes, g2m_genes=g2m_genes)
    assert (phase.cell_state[train].to_numpy() == expected.obs["phase"].to_numpy()).all()


def test_stress_labels_on_one_or_two_marker_genes_warn():
    """Papalexi's 299 genes hold one stress marker (DNAJA2): 31 % of cells were labelled Stressed
    on that one gene's expression without a word."""
    import pandas as pd

    from regina_cli.data.label import Labels, label_warnings

    def labels(markers):
        return Labels(pd.Series(["Homeostasis"]), ("Homeostasis", "Stressed"), {"markers": markers})

    (warning,) = label_warnings(labels(["DNAJA2"]))
    assert "rests on 1 marker gene(s) (DNAJA2)" in warning
    assert label_warnings(labels(["ATF3", "DNAJA2", "HSPA5"])) == ()
    assert label_warnings(Labels(pd.Series(["G1"]), ("G1",), {"column": "phase"})) == ()
