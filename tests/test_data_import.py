"""`regina fetch NAME --from PATH`: real screens, label spellings, GEARS files, and bad inputs."""

from __future__ import annotations

import json
import zipfile

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cli_helpers import invoke
from regina_cli import keys
from regina_cli.data.dataset import GEARS_UNS, read_dataset, write_dataset
from regina_cli.data.demo import simulate_screen
from regina_cli.data.conditions import CONTROL_LABELS
from regina_cli.data.importer import normalise_label


def fetch_cli(*args: str):
    return invoke("fetch", *args)


def tiny_screen(rng, labels=("NT", "A", "B", "A_B"), n_per=12, counts=True, key="perturbation") -> ad.AnnData:
    """Raw counts, 40 genes named A, B, G2.., labels in a user's spelling under obs[key]."""
    n = n_per * len(labels)
    X = rng.poisson(3.0, (n, 40)).astype(np.float32)
    if not counts:
        X = np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32)
    genes = ["A", "B"] + [f"G{i}" for i in range(2, 40)]
    obs = pd.DataFrame({key: np.repeat(labels, n_per)}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes))


@pytest.mark.parametrize(
    "label, separator, expected",
    [
        ("ctrl", "+", "ctrl"),
        ("control", "+", "ctrl"),
        ("Non-Targeting", "+", "ctrl"),
        ("non_targeting", "_", "ctrl"),
        ("Non_Targeting", "_", "ctrl"),  # a control label holding the separator, in any case
        ("KLF1", "+", "KLF1+ctrl"),
        ("KLF1+ctrl", "+", "KLF1+ctrl"),
        ("ctrl+KLF1", "+", "KLF1+ctrl"),
        ("KLF1+CEBPA", "+", "KLF1+CEBPA"),
        ("KLF1_CEBPA", "_", "KLF1+CEBPA"),
        ("KLF1_ctrl", "_", "KLF1+ctrl"),
        ("KLF1_KLF1", "_", "KLF1+ctrl"),  # one gene named twice is a single
    ],
)
def test_label_spellings(label, separator, expected):
    controls = {c.lower() for c in CONTROL_LABELS}
    assert normalise_label(label, controls, separator) == expected


def test_a_pair_spelled_both_ways_keeps_the_spelling_of_more_cells_else_the_first_sorted():
    """One condition per pair of targets: the spelling more cells carry, and on a tie the first in
    sort order, so the same file always gives the same label."""
    from regina_cli.data.importer import merge_spellings

    assert merge_spellings(pd.Series(["B+A"] * 3 + ["A+B"] * 2 + ["C+ctrl"])) == {"A+B": "B+A"}
    assert merge_spellings(pd.Series(["B+A"] * 3 + ["A+B"] * 3)) == {"B+A": "A+B"}
    assert merge_spellings(pd.Series(["A+B", "C+ctrl"])) == {}


def test_papalexi_raw_counts_are_normalised(papalexi_path):
    result = fetch_cli("papalexi", "--from", papalexi_path)
    assert result.exit_code == 0, result.output
    assert "raw counts detected" in result.output
    assert "9 of 25 targets measured; not measured: " in result.output
    adata = read_dataset("papalexi")
    assert adata.shape == (20729, 299)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert not np.allclose(adata.X.data, np.round(adata.X.data))  # log1p, not counts
    totals = np.expm1(adata.X[:50].toarray()).sum(1)
    np.testing.assert_allclose(totals, 1e4, rtol=1e-3)
    assert adata.uns[keys.UNS_REGINA]["normalisation"].startswith("raw counts detected")
    conditions = set(adata.obs[keys.OBS_CONDITION])
    assert keys.CTRL in conditions and len(conditions) == 26
    assert (adata.obs[keys.OBS_CONTROL].astype(int) == 1).sum() == 2386
    provenance = adata.uns[keys.UNS_REGINA]
    assert provenance["targets"] == 25 and provenance["targets_measured"] == 9
    assert len(provenance["unmeasured_targets"]) == 16 and provenance["gene_filter"] == "none"
    assert len(adata.uns[keys.UNS_RANK_GENES]) == 25
    assert all(len(top) == 20 for top in adata.uns[keys.UNS_TOP_DE_20].values())


def test_mcfaline_bare_names_and_three_cell_lines(mcfaline_path):
    result = fetch_cli("mcfaline", "--from", mcfaline_path)
    assert result.exit_code == 0, result.output
    assert "relabelled" in result.output and "raw counts" not in result.output
    adata = read_dataset("mcfaline")
    conditions = set(adata.obs[keys.OBS_CONDITION])
    assert keys.CTRL in conditions and all(c == keys.CTRL or c.endswith("+ctrl") for c in conditions)
    assert set(adata.obs[keys.OBS_CELL_TYPE]) == {"A172", "T98G", "U87MG"}
    ranked = adata.uns[keys.UNS_RANK_GENES]
    assert len(ranked) == 9 * 3  # every target, in every cell line, against that line's controls
    assert "U87MG_SGK1+ctrl_1+1" in ranked
    source = ad.read_h5ad(mcfaline_path)
    np.testing.assert_array_equal(adata.X.toarray(), source.X.toarray())  # log-normalised: untouched


def test_options_relabel_a_users_screen(tmp_path, rng):
    screen = tiny_screen(rng)
    screen.obs["line"] = np.tile(["K562", "RPE1"], screen.n_obs // 2)
    screen.write_h5ad(tmp_path / "screen.h5ad")
    result = fetch_cli(
        "mine", "--from", tmp_path / "screen.h5ad", "--condition-key", "perturbation",
        "--control", "NT", "--separator", "_",
    )
    assert result.exit_code == 0, result.output
    adata = read_dataset("mine")
    assert set(adata.obs[keys.OBS_CONDITION]) == {"ctrl", "A+ctrl", "B+ctrl", "A+B"}
    assert set(adata.obs[keys.OBS_CELL_TYPE]) == {"mine"}  # no cell-type column: named after the dataset
    assert adata.uns[keys.UNS_REGINA]["condition_key"] == "perturbation"
    by_line = fetch_cli(
        "lines", "--from", tmp_path / "screen.h5ad", "--condition-key", "perturbation",
        "--control", "NT", "--separator", "_", "--cell-type-key", "line",
    )
    assert by_line.exit_code == 0, by_line.output
    assert "RPE1_A+B_1+1" in read_dataset("lines").uns[keys.UNS_RANK_GENES]


def test_a_control_label_matching_no_cell_warns_and_a_missing_cell_type_column_lists_the_columns(tmp_path, rng):
    """`--control NT` on a screen whose controls are `ctrl` (found by the default labels) was taken
    without a word; `--cell-type-key celltype` said the column was missing but not which exist."""
    screen = tiny_screen(rng, labels=("ctrl", "A", "B", "A_B"))
    screen.obs["line"] = "K562"
    screen.write_h5ad(tmp_path / "screen.h5ad")
    typo = fetch_cli("typo", "--from", tmp_path / "screen.h5ad", "--condition-key", "perturbation",
                     "--control", "NT", "--separator", "_")
    assert typo.exit_code == 0 and "warning: --control 'NT' matches no cell's obs['perturbation']" in typo.output
    missing = fetch_cli("missing", "--from", tmp_path / "screen.h5ad", "--condition-key", "perturbation",
                        "--separator", "_", "--cell-type-key", "celltype")
    assert missing.exit_code == 2 and "(columns: perturbation, line)" in missing.output


def test_normalised_values_without_log_get_log1p_and_say_so(tmp_path, rng):
    """A CPM-style export (normalize_total, no log1p) was taken for log data and kept as it was."""
    screen, logged = tiny_screen(rng), tiny_screen(np.random.default_rng(0))
    X = screen.X.toarray()
    screen.X = sp.csr_matrix((X / X.sum(1, keepdims=True) * 1e4).astype(np.float32))
    screen.write_h5ad(tmp_path / "cpm.h5ad")
    logged.write_h5ad(tmp_path / "counts.h5ad")
    args = ("--condition-key", "perturbation", "--control", "NT", "--separator", "_")
    assert fetch_cli("cpm", "--from", tmp_path / "cpm.h5ad", *args).exit_code == 0
    assert fetch_cli("counts", "--from", tmp_path / "counts.h5ad", *args).exit_code == 0
    imported = read_dataset("cpm")
    assert imported.uns[keys.UNS_REGINA]["normalisation"].startswith("normalised values without log detected")
    expected = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(imported.X.toarray(), expected, rtol=1e-5, atol=1e-5)
    assert float(read_dataset("counts").X.max()) < 20


def test_large_values_whose_cells_sum_to_different_totals_are_refused(rng):
    """Only values normalised to one total per cell are taken for normalised-without-log and get
    log1p; cell sums a few per cent apart (normalised, then some genes dropped; scaled data) are
    neither, and are refused rather than trained on at the wrong scale."""
    from regina_cli.data.importer import check_log_scale
    from regina_cli.errors import ReginaError

    X = rng.poisson(3.0, (30, 40)).astype(np.float64) + 1.0
    normalised = X / X.sum(1, keepdims=True) * 1e4
    assert check_log_scale(sp.csr_matrix(normalised.astype(np.float32)))
    uneven = normalised * rng.uniform(0.97, 1.03, (30, 1))
    with pytest.raises(ReginaError, match="neither raw counts"):
        check_log_scale(sp.csr_matrix(uneven.astype(np.float32)))


USER_LABELS = ("--condition-key", "perturbation", "--control", "NT", "--separator", "_")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_log1p_of_counts_is_normalised_like_the_counts(tmp_path, rng, dtype):
    """log1p(counts) without depth normalisation passed for log-normalised data; in float16 still,
    whose rounding moves expm1 of counts near 100 off whole numbers by up to 0.1."""
    screen = tiny_screen(rng)
    screen.X = screen.X * 10
    counts = screen.copy()
    screen.X = np.log1p(screen.X.toarray()).astype(dtype)
    screen.write_h5ad(tmp_path / "log1p.h5ad")
    counts.write_h5ad(tmp_path / "counts.h5ad")
    result = fetch_cli("logged", "--from", tmp_path / "log1p.h5ad", *USER_LABELS)
    assert result.exit_code == 0, result.output
    assert fetch_cli("counts", "--from", tmp_path / "counts.h5ad", *USER_LABELS).exit_code == 0
    assert read_dataset("logged").uns[keys.UNS_REGINA]["normalisation"].startswith("log1p of raw counts detected")
    np.testing.assert_allclose(read_dataset("logged").X.toarray(), read_dataset("counts").X.toarray(), atol=1e-5)


def test_log1p_of_counts_converted_by_another_tool_is_still_recognised():
    """log1p(counts) a unit in the last place off (another tool's log1p, a float64 -> float32 cast)."""
    import scipy.sparse as sp

    from regina_cli.data.importer import is_log1p_counts

    logged = np.log1p(np.arange(1, 200, dtype=np.float32))
    nudged = np.nextafter(logged, np.float32(np.inf))
    assert is_log1p_counts(sp.csr_matrix(nudged[None, :]), np.dtype(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_log_normalised_values_are_not_taken_for_log1p_of_counts(tmp_path, rng, dtype):
    """The rounding allowed for log1p(counts) must not take in log-normalised values, even with
    cells whose normalised values are whole numbers (a cell of 1e4 counts, one of 20)."""
    screen = tiny_screen(rng)
    X = screen.X.toarray()
    X[0] = rng.multinomial(10_000, np.full(X.shape[1], 1 / X.shape[1]))
    X[1] = rng.multinomial(20, np.full(X.shape[1], 1 / X.shape[1]))
    screen.X = np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(dtype)
    screen.write_h5ad(tmp_path / "logged.h5ad")
    result = fetch_cli("logged", "--from", tmp_path / "logged.h5ad", *USER_LABELS)
    assert result.exit_code == 0, result.output
    imported = read_dataset("logged")
    assert imported.uns[keys.UNS_REGINA]["normalisation"] == "none (already log-normalised)"
    np.testing.assert_array_equal(imported.X.toarray(), screen.X.astype(np.float32))


def test_float16_and_binary_counts_import_as_counts(tmp_path, rng):
    """float16 X ended in a traceback; 0/1 counts were taken for log data."""
    screen = tiny_screen(rng)
    dense = screen.copy()
    dense.X = screen.X.toarray().astype(np.float16)
    dense.write_h5ad(tmp_path / "half.h5ad")
    binary = screen.copy()
    binary.X = sp.csr_matrix((screen.X.toarray() > 3).astype(np.float32))
    binary.write_h5ad(tmp_path / "binary.h5ad")
    screen.write_h5ad(tmp_path / "single.h5ad")
    for name in ("half", "binary", "single"):
        result = fetch_cli(name, "--from", tmp_path / f"{name}.h5ad", *USER_LABELS)
        assert result.exit_code == 0, result.output
        assert read_dataset(name).uns[keys.UNS_REGINA]["normalisation"].startswith("raw counts detected")
    np.testing.assert_allclose(read_dataset("half").X.toarray(), read_dataset("single").X.toarray(), atol=1e-5)


def test_gene_symbols_come_from_the_column_that_names_the_targets(tmp_path, rng):
    """Ensembl var_names with symbols in var['gene_symbols'] turned every target unmeasured; a
    missing symbol became a gene called 'nan'."""
    screen = tiny_screen(rng)
    symbols = list(screen.var_names)
    symbols[5] = None
    screen.var = pd.DataFrame({"gene_symbols": symbols}, index=[f"ENSG{i:011d}" for i in range(screen.n_vars)])
    screen.write_h5ad(tmp_path / "ensembl.h5ad")
    result = fetch_cli("ens", "--from", tmp_path / "ensembl.h5ad", *USER_LABELS)
    assert result.exit_code == 0, result.output
    genes = list(read_dataset("ens").var_names)
    assert genes[:2] == ["A", "B"] and genes[5] == "ENSG00000000005"
    assert "gene names from var['gene_symbols']: it names 2 of 2 targets, var_names 0" in result.output
    assert read_dataset("ens").uns[keys.UNS_REGINA]["targets_measured"] == 2


def test_a_combination_spelled_both_ways_is_one_condition(tmp_path, rng):
    """'A+B' and 'B+A' stayed two conditions: a split could train on one and test on the other."""
    screen = tiny_screen(rng, labels=("control", "A", "B", "B+A", "A+B"), key="condition")
    screen.obs["condition"] = screen.obs["condition"].to_numpy()
    screen.obs.loc[screen.obs_names[36:40], "condition"] = "A+B"  # 16 cells 'A+B', 8 'B+A': 'A+B' is kept
    screen.write_h5ad(tmp_path / "both.h5ad")
    result = fetch_cli("both", "--from", tmp_path / "both.h5ad")
    assert result.exit_code == 0, result.output
    conditions = read_dataset("both").obs[keys.OBS_CONDITION].astype(str)
    assert "A+B" in set(conditions) and "B+A" not in set(conditions)
    assert "'B+A' counted as 'A+B'" in result.output


def test_import_keeps_the_files_own_condition_column_and_names_dropped_conditions(tmp_path, rng):
    screen = tiny_screen(rng)
    screen.obs["condition"] = np.tile(["stim", "unstim"], screen.n_obs // 2)
    keep = np.ones(screen.n_obs, dtype=bool)
    keep[np.flatnonzero(screen.obs["perturbation"] == "B")[1:]] = False  # B: 1 cell
    screen = screen[keep].copy()
    X = screen.X.toarray()
    X[0] = 0  # a control cell with no counts
    screen.X = sp.csr_matrix(X)
    screen.write_h5ad(tmp_path / "screen.h5ad")
    result = fetch_cli("mine", "--from", tmp_path / "screen.h5ad", *USER_LABELS)
    assert result.exit_code == 0, result.output
    adata = read_dataset("mine")
    assert set(adata.obs["condition_input"]) == {"stim", "unstim"}
    assert "dropped 1 cells with no expression at all" in result.output
    assert "fewer than 2 cells in their cell type: B+ctrl" in " ".join(result.output.split())
    assert adata.uns[keys.UNS_REGINA]["dropped_cells"] == 2


def test_the_files_own_condition_column_never_overwrites_another(tmp_path, rng):
    """The file's obs['condition'] was kept as obs['condition_input'] (or, relabelled in place, as
    obs['condition_original']) over the file's own column of that name."""
    screen = tiny_screen(rng)
    screen.obs["condition"] = np.tile(["stim", "unstim"], screen.n_obs // 2)
    screen.obs["condition_input"] = np.tile(["lane1", "lane2", "lane3"], screen.n_obs // 3)
    screen.write_h5ad(tmp_path / "screen.h5ad")
    result = fetch_cli("mine", "--from", tmp_path / "screen.h5ad", *USER_LABELS)
    assert result.exit_code == 0, result.output
    obs = read_dataset("mine").obs
    assert set(obs["condition_input"]) == {"lane1", "lane2", "lane3"}
    assert set(obs["condition_input_2"]) == {"stim", "unstim"}
    assert "the file's obs['condition'] is kept as obs['condition_input_2']" in " ".join(result.output.split())
    relabelled = tiny_screen(rng, labels=("control", "A", "B"), key="condition")
    relabelled.obs["condition_original"] = "lane1"
    relabelled.write_h5ad(tmp_path / "relabelled.h5ad")
    assert fetch_cli("relabelled", "--from", tmp_path / "relabelled.h5ad").exit_code == 0
    obs = read_dataset("relabelled").obs
    assert set(obs["condition_original"]) == {"lane1"} and set(obs["condition_original_2"]) == {"control", "A", "B"}


def test_the_files_own_cell_type_column_is_kept_beside(tmp_path, rng):
    """--cell-type-key K overwrote the file's own obs['cell_type'] without a word."""
    screen = tiny_screen(rng)
    screen.obs["cell_type"] = np.tile(["batch1", "batch2"], screen.n_obs // 2)
    screen.obs["line"] = "K562"
    screen.write_h5ad(tmp_path / "screen.h5ad")
    result = fetch_cli("mine", "--from", tmp_path / "screen.h5ad", *USER_LABELS, "--cell-type-key", "line")
    assert result.exit_code == 0, result.output
    obs = read_dataset("mine").obs
    assert set(obs["cell_type"]) == {"K562"} and set(obs["cell_type_input"]) == {"batch1", "batch2"}
    assert "the file's obs['cell_type'] is kept as obs['cell_type_input']" in " ".join(result.output.split())


def test_labels_joined_by_another_separator_get_a_hint(tmp_path, rng):
    screen = tiny_screen(rng, labels=("NT", "A", "B", "A|B"))
    screen.write_h5ad(tmp_path / "pipe.h5ad")
    result = fetch_cli("pipe", "--from", tmp_path / "pipe.h5ad", "--condition-key", "perturbation", "--control", "NT")
    assert result.exit_code == 0, result.output
    assert "'A|B' looks like a combination: pass --separator '|'" in " ".join(result.output.split())


def test_zip_and_folder_sources(tmp_path, rng):
    folder = tmp_path / "copy" / "screen"
    folder.mkdir(parents=True)
    tiny_screen(rng, labels=("control", "A", "B"), key="condition").write_h5ad(folder / keys.DATA_FILE)
    with zipfile.ZipFile(tmp_path / "copy.zip", "w") as zf:
        zf.write(folder / keys.DATA_FILE, f"screen/{keys.DATA_FILE}")
    assert fetch_cli("from_folder", "--from", tmp_path / "copy").exit_code == 0
    assert fetch_cli("from_zip", "--from", tmp_path / "copy.zip").exit_code == 0
    a, b = read_dataset("from_folder"), read_dataset("from_zip")
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert set(a.obs[keys.OBS_CONDITION]) == {"ctrl", "A+ctrl", "B+ctrl"}


def test_cell_type_key_is_read_from_a_gears_layout_file(tmp_path):
    """A GEARS-layout file was kept as it was, so --cell-type-key was ignored without a word, even
    one naming no column."""
    demo = simulate_screen(n_cells=300, n_genes=140, n_singles=3, n_doubles=1, seed=2)
    demo.obs["line"] = "K562"
    source, _ = write_dataset(demo, "gears_copy", tmp_path)
    result = fetch_cli("gears_copy", "--from", source, "--cell-type-key", "line")
    assert result.exit_code == 0, result.output
    obs = read_dataset("gears_copy").obs
    assert set(obs[keys.OBS_CELL_TYPE]) == {"K562"} and "cell_type_input" in obs
    assert "GEARS layout found, but labels read as given" in " ".join(result.output.split())
    assert fetch_cli("other", "--from", source, "--cell-type-key", "nosuch").exit_code == 2


def test_gears_file_is_kept_verbatim(tmp_path):
    """GEARS' own files index var by Ensembl ID and name DE genes by that ID; we use symbols."""
    demo = simulate_screen(n_cells=400, n_genes=180, n_singles=5, n_doubles=2, seed=5)
    gears = demo.copy()
    ensembl = {g: f"ENSG{i:011d}" for i, g in enumerate(demo.var_names)}
    gears.var_names = [ensembl[g] for g in demo.var_names]
    for key in (keys.UNS_RANK_GENES, keys.UNS_TOP_DE_20, keys.UNS_TOP_NON_ZERO_DE_20):
        gears.uns[key] = {k: np.array([ensembl[g] for g in v]) for k, v in demo.uns[key].items()}
    source, _ = write_dataset(gears, "gears_copy", tmp_path)
    result = fetch_cli("gears_copy", "--from", source)
    assert result.exit_code == 0, result.output
    assert "GEARS layout found" in result.output and "DE gene lists renamed" in result.output
    adata = read_dataset("gears_copy")
    assert list(adata.var_names) == list(demo.var_names)
    # the file's own IDs are kept, and predictions named by them are read through them
    assert list(adata.var["gene_id"]) == [ensembl[g] for g in demo.var_names]
    from regina_cli.evaluate.readers import RawPredictions, with_dataset_ids
    raw = RawPredictions(source, np.zeros((1, 3), np.float32), [[ensembl[g] for g in demo.var_names[:3]]],
                         np.array(["ctrl"], dtype=object), pd.DataFrame(index=[0]))
    assert with_dataset_ids(raw, adata).gene_names[-1] == list(demo.var_names[:3])
    for key in GEARS_UNS:
        assert set(adata.uns[key]) == set(demo.uns[key])
        for group, value in demo.uns[key].items():
            np.testing.assert_array_equal(np.asarray(adata.uns[key][group]), np.asarray(value))


def test_a_files_own_gene_id_column_is_kept_when_symbols_replace_its_var_names(tmp_path):
    demo = simulate_screen(n_cells=300, n_genes=140, n_singles=3, n_doubles=1, seed=5)
    symbols = list(demo.var_names)
    demo.var["gene_id"] = [f"ENSG{i:011d}" for i in range(demo.n_vars)]
    demo.var[keys.VAR_GENE_NAME] = symbols
    probe = {g: f"probe{i}" for i, g in enumerate(symbols)}  # neither symbols nor the IDs
    demo.var_names = [probe[g] for g in symbols]
    for key in (keys.UNS_RANK_GENES, keys.UNS_TOP_DE_20, keys.UNS_TOP_NON_ZERO_DE_20):
        demo.uns[key] = {k: np.array([probe[g] for g in v]) for k, v in demo.uns[key].items()}
    source, _ = write_dataset(demo, "with_ids", tmp_path)
    result = fetch_cli("with_ids", "--from", source)
    assert result.exit_code == 0, result.output
    adata = read_dataset("with_ids")
    assert list(adata.var_names) == symbols and list(adata.var["gene_id"]) == list(demo.var["gene_id"])


@pytest.mark.parametrize("change", ["raw counts", "gene filter"])
def test_a_gears_layout_file_with_counts_or_a_gene_filter_is_not_kept_verbatim(tmp_path, change):
    """A file with GEARS' obs and uns fields is kept as it is only when nothing needs doing: raw
    counts in X must still be normalised, and --n-top-genes must still filter the genes (with the
    DE fields computed again over the genes kept)."""
    demo = simulate_screen(n_cells=400, n_genes=180, n_singles=5, n_doubles=2, seed=5)
    args = []
    if change == "raw counts":
        demo.X = sp.csr_matrix(np.round(np.expm1(demo.X.toarray()) * 3).astype(np.float32))
    else:
        args = ["--n-top-genes", "50"]
    source, _ = write_dataset(demo, "gears_copy", tmp_path)
    result = fetch_cli("changed", "--from", source, *args)
    assert result.exit_code == 0, result.output
    assert "GEARS layout found, but" in " ".join(result.output.split())
    adata = read_dataset("changed")
    if change == "raw counts":
        assert adata.uns[keys.UNS_REGINA]["normalisation"].startswith("raw counts detected")
        assert float(adata.X.max()) < 20
    else:
        assert adata.n_vars < demo.n_vars
        assert all(set(genes) <= set(adata.var_names) for genes in adata.uns[keys.UNS_TOP_DE_20].values())


def test_a_gears_layout_file_naming_a_gene_twice_gets_its_de_fields_computed_again(tmp_path):
    """Two var_names alike make the file's DE gene lists ambiguous: the genes are made unique and
    the DE fields computed again over them, not kept (nor renamed through a name of two genes)."""
    demo = simulate_screen(n_cells=400, n_genes=180, n_singles=5, n_doubles=2, seed=5)
    names = list(demo.var_names)
    names[-1] = names[-2]
    demo.var_names = names
    source, _ = write_dataset(demo, "twice", tmp_path)
    result = fetch_cli("twice", "--from", source)
    assert result.exit_code == 0, result.output
    assert "GEARS layout found, but var_names name a gene twice" in " ".join(result.output.split())
    adata = read_dataset("twice")
    assert adata.var_names.is_unique and not adata.uns[keys.UNS_REGINA]["kept_gears_fields"]


def test_conditions_of_two_cells_are_kept_and_of_one_dropped(rng):
    """Two cells in a cell type are enough for the DE test (`MIN_CELLS`): only a condition with a
    single cell there is dropped, and the notes count exactly that cell."""
    from regina_cli.data.importer import ImportOptions, to_gears_layout

    screen = tiny_screen(rng, labels=("NT", "A", "B", "A_B"))
    labels = screen.obs["perturbation"].astype(str).to_numpy()
    keep = (labels != "B") | (np.cumsum(labels == "B") <= 2)  # B: 2 cells
    keep &= (labels != "A_B") | (np.cumsum(labels == "A_B") <= 1)  # A_B: 1 cell
    screen = screen[keep].copy()
    adata, notes = to_gears_layout(screen, "two", ImportOptions(control="NT", condition_key="perturbation",
                                                                separator="_"), log=lambda _: None)
    counts = adata.obs[keys.OBS_CONDITION].astype(str).value_counts()
    assert counts["B+ctrl"] == 2 and "A+B" not in counts and notes.dropped_cells == 1


def test_a_gears_file_with_a_combination_in_both_orders_is_relabelled(tmp_path):
    """Kept verbatim, a GEARS-layout file's `A+B` and `B+A` stayed two conditions."""
    demo = simulate_screen(n_cells=400, n_genes=180, n_singles=5, n_doubles=2, seed=5)
    double = next(c for c in demo.obs[keys.OBS_CONDITION].astype(str).unique() if "ctrl" not in c)
    a, b = double.split("+")
    rows = np.flatnonzero(demo.obs[keys.OBS_CONDITION].astype(str) == double)
    conditions = demo.obs[keys.OBS_CONDITION].astype(str).to_numpy()
    conditions[rows[: len(rows) // 3]] = f"{b}+{a}"
    demo.obs[keys.OBS_CONDITION] = conditions
    source, _ = write_dataset(demo, "both_orders", tmp_path)
    result = fetch_cli("both", "--from", source)
    assert result.exit_code == 0, result.output
    assert "labelled in both orders" in " ".join(result.output.split())
    found = set(read_dataset("both").obs[keys.OBS_CONDITION].astype(str))
    assert double in found and f"{b}+{a}" not in found


def test_symbols_in_var_names_stay_when_no_column_names_more_targets(tmp_path, rng):
    screen = tiny_screen(rng, labels=("NT", "X1", "X2"))  # no target is measured
    screen.var["gene_symbols"] = [f"ENSG{i:011d}" for i in range(screen.n_vars)]
    screen.write_h5ad(tmp_path / "ids.h5ad")
    result = fetch_cli("ids", "--from", tmp_path / "ids.h5ad", *USER_LABELS)
    assert result.exit_code == 0, result.output
    assert list(read_dataset("ids").var_names[:2]) == ["A", "B"] and "gene names from" not in result.output


def test_var_gene_name_is_the_default_naming_when_no_naming_names_more_targets(tmp_path, rng):
    """A GEARS-style file (Ensembl var_names, symbols in var['gene_name']) whose targets are not
    measured: no naming names more targets, so the genes keep GEARS' own var['gene_name'] symbols
    and the summary says nothing about switching naming."""
    screen = tiny_screen(rng, labels=("NT", "X1", "X2"))  # no target is measured
    screen.var = pd.DataFrame({"gene_name": list(screen.var_names)},
                              index=[f"ENSG{i:011d}" for i in range(screen.n_vars)])
    screen.write_h5ad(tmp_path / "named.h5ad")
    result = fetch_cli("named", "--from", tmp_path / "named.h5ad", *USER_LABELS)
    assert result.exit_code == 0, result.output
    assert list(read_dataset("named").var_names[:2]) == ["A", "B"] and "gene names from" not in result.output


def _bad(tmp_path, rng, case: str):
    path = tmp_path / "bad.h5ad"
    args = []
    if case == "missing file":
        return tmp_path / "absent.h5ad", args, "does not exist"
    if case == "not an h5ad":
        path.write_text("gene,value\nA,1\n")
        return path, args, "neither an h5ad"
    screen = tiny_screen(rng, key="condition", labels=("control", "A", "B"))
    message = {
        "no control cells": "no control cells",
        "unknown condition column": "no column 'guide'",
        "duplicate cell names": "duplicate cell names",
        "NaN in X": "NaN",
        "cell type without controls": "have no control cells",
        "three genes in one label": "more than two genes",
        "counts that are not whole numbers": "neither raw counts (whole numbers) nor log-normalised",
        "empty labels": "5 cells have no perturbation label (missing or empty)",
        "no cell type": "3 cells have no cell type in obs['cell_type']",
        "one control cell": "has 1 control cell",
        "no X": "the file has no X (layers: counts",
    }[case]
    if case == "no control cells":
        screen.obs["condition"] = np.repeat(["A", "B", "A+B"], 12)
    elif case == "unknown condition column":
        args = ["--condition-key", "guide"]
    elif case == "duplicate cell names":
        screen.obs_names = ["same"] + list(screen.obs_names[1:-1]) + ["same"]
    elif case == "NaN in X":
        screen.X = screen.X.toarray()
        screen.X[3, 4] = np.nan
    elif case == "three genes in one label":
        screen.obs["condition"] = screen.obs["condition"].replace({"B": "A+B+G2"})
    elif case == "counts that are not whole numbers":  # ambient-corrected counts, say
        screen.X = screen.X * 30.7
    elif case == "cell type without controls":
        screen.obs["cell_type"] = np.where(screen.obs["condition"] == "B", "other", "main")
    elif case == "empty labels":  # '' and whitespace read as controls before
        screen.obs["condition"] = np.where(np.arange(screen.n_obs) % 7 == 3, " ", screen.obs["condition"])
    elif case == "no cell type":
        screen.obs["cell_type"] = pd.Categorical(np.where(np.arange(screen.n_obs) % 11 == 4, None, "main"))
    elif case == "one control cell":
        screen = screen[(screen.obs["condition"] != "control").to_numpy() | (np.arange(screen.n_obs) == 0)].copy()
    elif case == "no X":
        screen.layers["counts"] = screen.X
        screen.X = None
    screen.write_h5ad(path)
    return path, args, message


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "not an h5ad",
        "no control cells",
        "unknown condition column",
        "duplicate cell names",
        "NaN in X",
        "cell type without controls",
        "three genes in one label",
        "counts that are not whole numbers",
        "empty labels",
        "no cell type",
        "one control cell",
        "no X",
    ],
)
def test_bad_inputs_give_one_line_error_and_no_output(tmp_path, rng, case):
    path, args, message = _bad(tmp_path, rng, case)
    result = fetch_cli("bad", "--from", path, *args)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not keys.dataset_dir("bad").exists()


def test_gene_filters_keep_every_measured_target(tmp_path, rng):
    screen = tiny_screen(rng, labels=("NT", "A", "B", "Z", "A_B"))
    screen.write_h5ad(tmp_path / "screen.h5ad")
    common = ["--from", tmp_path / "screen.h5ad", "--condition-key", "perturbation", "--control", "NT",
              "--separator", "_"]
    listed = tmp_path / "genes.txt"
    listed.write_text("# my panel\nG2\nG3\nNOPE\n\n")
    result = invoke("--json", "fetch", "panel", *common, "--gene-list", listed)
    assert result.exit_code == 0, result.output
    notes = json.loads(result.output)["notes"]
    assert "1 of 3 listed genes are not measured (e.g. NOPE)" in notes
    assert any(n.startswith("kept 2 of 40 genes") and "plus 2 targeted genes the filter would drop" in n for n in notes)
    assert any(n.startswith("2 of 3 targets measured; not measured: Z (kept") for n in notes)
    adata = read_dataset("panel")
    assert sorted(adata.var_names) == ["A", "B", "G2", "G3"]
    provenance = adata.uns[keys.UNS_REGINA]
    assert provenance["targets_measured"] == 2 and list(provenance["unmeasured_targets"]) == ["Z"]
    assert provenance["gene_filter"].endswith("+ 2 measured targets")
    assert set(adata.uns[keys.UNS_RANK_GENES]["panel_A+ctrl_1+1"]) <= set(adata.var_names)  # DE on kept genes

    hvg = invoke("--json", "fetch", "hvg", *common, "--n-top-genes", "5")
    assert hvg.exit_code == 0, hvg.output
    kept = read_dataset("hvg").var_names
    note = next(n for n in json.loads(hvg.output)["notes"] if "n_top_genes=5" in n)
    picked, rescued = int(note.split()[1]), int(note.split("plus ")[1].split(" targeted")[0])
    assert {"A", "B"} <= set(kept) and len(kept) == picked + rescued and picked < 40


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n-top-genes", "0"], "--n-top-genes must be at least 1"),
        (["--n-top-genes", "5", "--gene-list", "genes.txt"], "not both"),
        (["--gene-list", "absent.txt"], "cannot read the gene list"),
        (["--gene-list", "empty.txt"], "names no gene"),
    ],
)
def test_gene_filter_errors(tmp_path, rng, args, message):
    tiny_screen(rng, labels=("control", "A", "B"), key="condition").write_h5ad(tmp_path / "screen.h5ad")
    (tmp_path / "genes.txt").write_text("A\n")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    result = fetch_cli("bad", "--from", tmp_path / "screen.h5ad", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not keys.dataset_dir("bad").exists()


def test_gene_filter_needs_from():
    assert "only apply with --from" in fetch_cli("demo", "--n-top-genes", "50").output


def test_a_cell_type_with_a_slash_is_renamed_so_its_de_fields_survive_hdf5(tmp_path, rng):
    """'RPE1/β' made DE field names HDF5 read back as nested folders: the conditions whose last
    cell was of that type lost their top-20 DE metrics without a word."""
    screen = tiny_screen(rng, n_per=24)
    screen.obs["line"] = np.tile(["K562", "RPE1/β"], screen.n_obs // 2)
    screen.write_h5ad(tmp_path / "screen.h5ad")
    result = fetch_cli("lines", "--from", tmp_path / "screen.h5ad", "--condition-key", "perturbation",
                       "--control", "NT", "--separator", "_", "--cell-type-key", "line")
    assert result.exit_code == 0, result.output
    assert "cell types renamed with _ for / ('RPE1/β' -> 'RPE1_β')" in " ".join(result.output.split())
    adata = read_dataset("lines")
    assert set(adata.obs[keys.OBS_CELL_TYPE]) == {"K562", "RPE1_β"}
    assert set(adata.obs["line_original"]) == {"K562", "RPE1/β"}
    ranked = adata.uns[keys.UNS_RANK_GENES]
    assert all(not isinstance(v, dict) for v in ranked.values()) and any(k.startswith("RPE1_β_") for k in ranked)
