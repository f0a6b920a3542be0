"""`regina evaluate` on other tools' outputs: GEARS pickles and tables, several files, gene subsets,
the validation set, shipped baselines, prompt sources and predicted control cells."""

from __future__ import annotations

import json
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cli_helpers import assert_user_error, invoke
from eval_helpers import NAME, data_dir, screen, write_predictions  # noqa: F401 (fixtures)
from regina_cli import keys
from regina_cli.evaluate.metrics import METRICS, PRECISION_METRICS
from regina_cli.evaluate.truth import Truth

PRECISION = PRECISION_METRICS + ["discrimination_score_l1"]


@pytest.fixture
def run(data_dir, tmp_path):
    def evaluate(*args, out="out"):
        result = invoke("evaluate", NAME, "--data-dir", data_dir, "--out", tmp_path / out, *args)
        assert result.exit_code == 0, result.output
        table = pd.read_csv(tmp_path / out / keys.PER_CONDITION_FILE)
        return result, json.loads((tmp_path / out / keys.METRICS_FILE).read_text()), table
    return evaluate


def _means(pred) -> pd.DataFrame:
    return pred.to_df().groupby(pred.obs[keys.OBS_CONDITION].to_numpy()).mean()


def _gears_label(condition: str) -> str:
    """GEARS' own spelling: A_B for a combination, A for a single."""
    return condition.replace("+ctrl", "").replace("+", "_")


def test_gears_pickle_and_csv_score_like_the_h5ad_and_carry_the_model_name(screen, run, tmp_path):
    adata, split = screen
    means = _means(write_predictions(adata, split.test, tmp_path / "cells.h5ad"))
    with open(tmp_path / "gears.pkl", "wb") as handle:  # GEARS predict(): {"A_B": mean over all genes}
        pickle.dump({_gears_label(c): means.loc[c].to_numpy(np.float32) for c in means.index}, handle)
    table = means.iloc[:, ::-1].copy()  # another gene order
    table.insert(0, "perturbation", [_gears_label(c) for c in table.index])
    table.to_csv(tmp_path / "gears.csv", index=False)

    _, _, reference = run("--predictions", tmp_path / "cells.h5ad", "--baselines", "none", "--no-plots", out="cells")
    reference = reference.set_index("condition")
    _, summary, scored = run("--predictions", tmp_path / "gears.pkl", "--separator", "_", "--model-name", "gears",
                             "--baselines", "no_change", out="pkl")
    _, _, from_csv = run("--predictions", tmp_path / "gears.csv", "--separator", "_", "--model-name", "gears",
                         "--condition-key", "perturbation", "--baselines", "none", "--no-plots", out="csv")
    for frame in (scored[scored.model == "gears"], from_csv):
        frame = frame.set_index("condition").loc[reference.index]
        np.testing.assert_allclose(frame[PRECISION], reference[PRECISION], rtol=1e-5, atol=1e-6)
    assert set(scored.model) == {"gears", "no_change"} and summary["models"][0]["name"] == "gears"
    assert summary["models"][0]["n_skipped_not_in_dataset"] == 0 and "gears" in summary["results"]
    page = (tmp_path / "pkl" / keys.REPORT_FILE).read_text()
    assert "gears" in page and "regina" not in page.split("<h1>")[1].split("</h1>")[0]


def test_a_pickle_that_would_run_code_is_refused(screen, data_dir, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"A": Evil()}, handle)
    result = invoke("evaluate", NAME, "--data-dir", data_dir, "--predictions", tmp_path / "evil.pkl")
    assert_user_error(result, "is not allowed")
    assert "pwned" not in result.output


def test_two_files_one_on_a_gene_subset_are_scored_on_the_shared_genes(screen, run, data_dir, tmp_path):
    adata, split = screen
    write_predictions(adata, split.test, tmp_path / "full.h5ad", seed=1)
    keep = np.sort(np.random.default_rng(0).choice(adata.n_vars, int(0.6 * adata.n_vars), replace=False))
    subset = write_predictions(adata, split.test, tmp_path / "hvg.h5ad", seed=2)[:, keep].copy()
    subset.write_h5ad(tmp_path / "hvg.h5ad")

    result, summary, table = run("--predictions", tmp_path / "hvg.h5ad", "--baselines", "none", out="one")
    assert summary["n_genes_scored"] == len(keep) and summary["n_genes_dataset"] == adata.n_vars
    assert f"{len(keep)} of {adata.n_vars} genes" in result.output
    assert table[list(METRICS)].notna().all().all()

    result, summary, table = run("--predictions", tmp_path / "full.h5ad", "--predictions", tmp_path / "hvg.h5ad",
                                 "--baselines", "linear", out="two")
    assert [m["name"] for m in summary["models"]] == ["full", "hvg"] and summary["n_genes_scored"] == len(keep)
    assert set(table.model) == {"full", "hvg", "linear"}
    assert set(summary["comparison"]) == {"full", "hvg"} and "linear" in summary["comparison"]["hvg"]
    assert "full wins" in result.output and "hvg wins" in result.output
    assert (tmp_path / "two" / keys.PLOTS_DIR / "pca_cells.png").is_file()

    bad = invoke("evaluate", NAME, "--data-dir", data_dir, "--predictions", tmp_path / "full.h5ad",
                 "--predictions", tmp_path / "hvg.h5ad", "--model-name", "only-one")
    assert_user_error(bad, "one --model-name per --predictions file")


def test_on_val_scores_the_validation_conditions(screen, run, tmp_path):
    adata, split = screen
    write_predictions(adata, split.val + split.test, tmp_path / "pred.h5ad")
    _, summary, table = run("--predictions", tmp_path / "pred.h5ad", "--on", "val", "--no-plots")
    ours = summary["results"]["pred"]
    assert summary["on"] == "val" and ours["overall"]["n_conditions"] == len(split.val)
    scored = table[(table.model == "pred") & (table.set == "val")]
    assert ours["overall"]["pearson_delta"] == pytest.approx(scored["pearson_delta"].mean(), rel=1e-6)
    assert set(scored.subgroup) <= set(split.subgroups["val_subgroup"]) | {"val"}
    assert ours["test"]["n_conditions"] == len(split.test)  # the other set is reported as one group
    assert summary["models"][0]["n_target_conditions_not_predicted"] == 0


def test_shipped_reconstruction_is_a_baseline_and_prompt_sources_are_grouped(screen, run, tmp_path):
    adata, split = screen
    pred = write_predictions(adata, split.test, tmp_path / "pred.h5ad")
    control_mean = Truth(adata).control_mean  # bit for bit what no_change predicts
    pred.varm[keys.VARM_RECONSTRUCTION] = pd.DataFrame(np.repeat(control_mean[:, None], len(split.test), 1),
                                                      index=pred.var_names, columns=split.test)
    sources = {c: "measured" if c.endswith("+ctrl") else "learned" for c in split.test}
    pred.obs[keys.OBS_PROMPT_SOURCE] = pred.obs[keys.OBS_CONDITION].map(sources).astype(str)
    pred.write_h5ad(tmp_path / "pred.h5ad")

    result, summary, table = run("--predictions", tmp_path / "pred.h5ad", "--baselines", "no_change")
    recon = table[table.model == "reconstruction"].set_index("condition")
    no_change = table[table.model == "no_change"].set_index("condition").loc[recon.index]
    assert len(recon) == len(split.test)
    # the decoded controls equal the control mean here: scored exactly like "no change"
    np.testing.assert_allclose(recon[list(METRICS)], no_change[list(METRICS)], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert "reconstruction" in summary["comparison"]["pred"]

    by_source = summary["results"]["pred"]["by_prompt_source"]
    ours = table[table.model == "pred"]
    for source in ("measured", "learned"):
        rows = ours[ours.prompt_source == source]
        assert by_source[source]["n_conditions"] == len(rows) > 0
        assert by_source[source]["pearson_delta"] == pytest.approx(rows["pearson_delta"].mean(), rel=1e-6)
    assert "by prompt source" in result.output and "measured (2)" in result.output


@pytest.mark.filterwarnings("ignore:invalid value encountered in log2:RuntimeWarning")  # scanpy, negative means
def test_control_rows_are_not_scored_but_are_the_predicted_controls(screen, run, tmp_path):
    """rank_genes_groups runs on a file with controls; evaluate ignores them for the GEARS metrics
    and measures the cell-eval metrics' predicted changes from them."""
    import scanpy as sc

    adata, split = screen
    pred = write_predictions(adata, split.test, tmp_path / "plain.h5ad")
    controls = adata[adata.obs[keys.OBS_CONDITION] == "ctrl"]
    shifted = ad.AnnData(np.asarray(controls.X.toarray() + 1.0, dtype=np.float32), obs=controls.obs[[keys.OBS_CONDITION]],
                         var=pd.DataFrame(index=adata.var_names))
    with_controls = ad.concat([pred, shifted], join="outer")
    with_controls.write_h5ad(tmp_path / "with.h5ad")
    moved = pred.copy()
    moved.X = moved.X - 1.0  # the same changes, measured from the real controls
    moved.write_h5ad(tmp_path / "moved.h5ad")

    sc.tl.rank_genes_groups(with_controls, groupby=keys.OBS_CONDITION, reference="ctrl", method="t-test")
    assert set(with_controls.uns["rank_genes_groups"]["names"].dtype.names) == set(split.test)

    _, summary, table = run("--predictions", tmp_path / "with.h5ad", "--baselines", "none", "--no-plots", out="w")
    _, _, plain = run("--predictions", tmp_path / "plain.h5ad", "--baselines", "none", "--no-plots", out="p")
    _, _, moved = run("--predictions", tmp_path / "moved.h5ad", "--baselines", "none", "--no-plots", out="m")
    assert summary["models"][0]["n_control_rows"] == controls.n_obs and len(table) == len(split.test)
    np.testing.assert_allclose(table[PRECISION_METRICS], plain[PRECISION_METRICS], rtol=1e-6)
    np.testing.assert_allclose(table["discrimination_score_l1"], moved["discrimination_score_l1"])

    # Another tool's control label, as `regina fetch` reads it: the same predicted controls, not a skipped condition
    with_controls.obs[keys.OBS_CONDITION] = with_controls.obs[keys.OBS_CONDITION].astype(str).replace(
        {"ctrl": "Non-Targeting"})
    with_controls.write_h5ad(tmp_path / "labelled.h5ad")
    result, labelled, table = run("--predictions", tmp_path / "labelled.h5ad", "--baselines", "none", "--no-plots",
                                  out="l")
    assert labelled["models"][0]["n_control_rows"] == controls.n_obs and "skipped" not in result.output
    np.testing.assert_allclose(table["discrimination_score_l1"], moved["discrimination_score_l1"])


def test_predictions_off_the_log_scale_are_scored_with_a_warning(screen, run, tmp_path):
    """Counts from another tool score near 0 against log-normalised truth: say why."""
    adata, split = screen
    pred = write_predictions(adata, split.test, tmp_path / "log.h5ad")
    counts = pred.copy()
    counts.X = np.round(np.expm1(np.clip(pred.X, 0, None)) * 30).astype(np.float32)
    counts.write_h5ad(tmp_path / "counts.h5ad")
    result, summary, _ = run("--predictions", tmp_path / "counts.h5ad", "--baselines", "none", "--no-plots", out="c")
    assert "where log1p of normalised counts stays below 20" in summary["models"][0]["scale_warning"]
    assert "convert them first" in " ".join(result.output.split())
    _, summary, _ = run("--predictions", tmp_path / "log.h5ad", "--baselines", "none", "--no-plots", out="l")
    assert summary["models"][0]["scale_warning"] == ""


def test_a_condition_spelled_twice_names_both_spellings(screen, data_dir, tmp_path):
    adata, split = screen
    single = next(c for c in split.test if c.endswith("+ctrl"))
    pred = write_predictions(adata, [single, single], tmp_path / "two.h5ad")
    pred.obs[keys.OBS_CONDITION] = [single] * 30 + [single.replace("+ctrl", "")] * 30
    pred.write_h5ad(tmp_path / "two.h5ad")
    result = invoke("evaluate", NAME, "--data-dir", data_dir, "--predictions", tmp_path / "two.h5ad",
                    "--out", tmp_path / "out")
    gene = single.replace("+ctrl", "")
    assert_user_error(result, f"names condition {single} twice (as '{gene}' and '{single}')")


def test_a_gene_column_with_text_is_refused_but_a_label_column_is_set_aside(tmp_path):
    """A typo in one cell must not drop a gene from the score unnoticed; a column of labels is not a gene."""
    from regina_cli.errors import ReginaError
    from regina_cli.evaluate.readers import read_predictions

    frame = pd.DataFrame({"condition": ["A+ctrl", "B+ctrl"], "G1": [1.0, 2.0], "G2": [0.5, 3.0], "note": ["x", "y"]})
    frame.to_csv(tmp_path / "ok.csv", index=False)
    raw = read_predictions(tmp_path / "ok.csv", condition_key="condition", separator="+")
    assert raw.gene_names == [["G1", "G2"]] and raw.x.shape == (2, 2)
    frame["G1"] = ["1.0", "oops"]
    frame.to_csv(tmp_path / "typo.csv", index=False)
    with pytest.raises(ReginaError, match=r"column 'G1' holds numbers and text \('oops' in data row 2\)"):
        read_predictions(tmp_path / "typo.csv", condition_key="condition", separator="+")


def test_a_missing_condition_column_names_a_few_columns_not_every_gene(tmp_path):
    from regina_cli.errors import ReginaError
    from regina_cli.evaluate.readers import read_predictions

    frame = pd.DataFrame(np.ones((2, 1000)), columns=[f"G{i}" for i in range(1000)])
    frame.to_csv(tmp_path / "no_condition.csv")  # the index is an unnamed column, as pandas writes it
    with pytest.raises(ReginaError) as raised:
        read_predictions(tmp_path / "no_condition.csv", condition_key="condition", separator="+")
    message = str(raised.value)
    assert "column 'condition'" in message and "(1,001 in all)" in message and len(message) < 300


def test_table_files_by_suffix_compressed_ones_read_and_other_types_refused(tmp_path):
    """A .csv.gz and a .parquet were both opened as .h5ad ("file signature not found"), and a
    comma-separated .txt (read tab-separated) dumped its whole header as one column name."""
    from regina_cli.errors import ReginaError
    from regina_cli.evaluate.readers import read_predictions

    frame = pd.DataFrame({"condition": ["A+ctrl", "B+ctrl"], "G1": [1.0, 2.0], "G2": [0.5, 3.0]})
    frame.to_csv(tmp_path / "means.csv.gz", index=False)
    frame.to_csv(tmp_path / "means.tsv.gz", index=False, sep="\t")
    for name in ("means.csv.gz", "means.tsv.gz"):
        raw = read_predictions(tmp_path / name, condition_key="condition", separator="+")
        assert raw.gene_names == [["G1", "G2"]] and raw.x.tolist() == [[1.0, 0.5], [2.0, 3.0]]
    (tmp_path / "means.parquet").write_bytes(b"PAR1")
    with pytest.raises(ReginaError, match=r"unsupported file type '\.parquet'; give \.h5ad, \.csv or \.tsv"):
        read_predictions(tmp_path / "means.parquet", condition_key="condition", separator="+")
    wide = pd.DataFrame(np.ones((2, 500)), columns=[f"GENE{i}" for i in range(500)])
    wide.insert(0, "condition", ["A+ctrl", "B+ctrl"])
    wide.to_csv(tmp_path / "comma.txt", index=False)
    with pytest.raises(ReginaError) as raised:
        read_predictions(tmp_path / "comma.txt", condition_key="condition", separator="+")
    message = str(raised.value)
    assert "read as tab-separated, which gave one column" in message and len(message) < 400


def test_an_h5ad_without_x_is_one_error(screen, data_dir, tmp_path):
    """X=None (values only in a layer) crashed with numpy's AxisError and a traceback."""
    adata, split = screen
    pred = write_predictions(adata, split.test, tmp_path / "cells.h5ad")
    pred.layers["predicted"] = pred.X.copy()
    pred.X = None
    pred.write_h5ad(tmp_path / "no_x.h5ad")
    result = invoke("evaluate", NAME, "--data-dir", data_dir, "--predictions", tmp_path / "no_x.h5ad",
                    "--out", tmp_path / "out")
    assert_user_error(result, "has no X (layers: predicted)")
    assert not (tmp_path / "out").exists()


def test_labels_missing_are_refused_and_labels_with_spaces_are_read(tmp_path):
    """NaN labels became a condition named "nan"; ' A+ctrl' (a stray space) was skipped as unknown."""
    from regina_cli.errors import ReginaError
    from regina_cli.evaluate.readers import read_predictions

    pd.DataFrame({"condition": [" A+ctrl", "B+ctrl ", " ctrl"], "G1": [1.0, 2.0, 0.0]}).to_csv(
        tmp_path / "spaced.csv", index=False)
    raw = read_predictions(tmp_path / "spaced.csv", condition_key="condition", separator="+")
    assert list(raw.labels) == ["A+ctrl", "B+ctrl", "ctrl"]
    pd.DataFrame({"condition": ["A+ctrl", None, "B+ctrl"], "G1": [1.0, 2.0, 0.0]}).to_csv(
        tmp_path / "unlabelled.csv", index=False)
    with pytest.raises(ReginaError, match=r"1 prediction row\(s\) have no condition label \(the first is row 2\)"):
        read_predictions(tmp_path / "unlabelled.csv", condition_key="condition", separator="+")


def _first_condition_cut_to(n_cells: int, screen, tmp_path):
    """(the first test condition, a predictions file where it keeps only `n_cells` cells)."""
    adata, split = screen
    pred = write_predictions(adata, split.test, tmp_path / "cells.h5ad")
    condition = split.test[0]
    keep = np.ones(pred.n_obs, dtype=bool)
    keep[np.flatnonzero(pred.obs[keys.OBS_CONDITION] == condition)[n_cells:]] = False
    pred[keep].copy().write_h5ad(tmp_path / f"cut{n_cells}.h5ad")
    return condition, tmp_path / f"cut{n_cells}.h5ad"


def test_a_condition_with_one_predicted_cell_gets_no_distribution_or_de_metrics(screen, run, tmp_path):
    """A mean-profile file with one row repeated reads as cells, and each other condition's one
    'cell' got an MMD, an energy distance and a Welch-test DE precision from a single cell."""
    lone, path = _first_condition_cut_to(1, screen, tmp_path)
    result, summary, table = run("--predictions", path, "--baselines", "train_mean", "--no-plots")
    rows = table.set_index(["model", "condition"])
    name = summary["models"][0]["name"]
    for metric in ("mmd_rbf", "energy_distance", "de_precision_at_N", "variance_pearson"):
        assert np.isnan(rows.loc[(name, lone), metric]) and np.isnan(rows.loc[("train_mean", lone), metric])
        others = rows.loc[name].drop(index=lone)[metric]
        assert others.notna().all()
    assert np.isfinite(rows.loc[(name, lone), "pearson_delta"])  # its mean still counts
    assert summary["models"][0]["n_single_cell_conditions"] == 1
    assert "1 condition(s) have one predicted cell" in " ".join(result.output.split())


def test_gears_combinations_without_the_separator_get_a_hint(screen, run, tmp_path):
    adata, split = screen
    means = _means(write_predictions(adata, split.test, tmp_path / "cells.h5ad"))
    with open(tmp_path / "gears.pkl", "wb") as handle:
        pickle.dump({_gears_label(c): means.loc[c].to_numpy(np.float32) for c in means.index}, handle)
    doubles = sum("ctrl" not in c for c in means.index)
    result, summary, _ = run("--predictions", tmp_path / "gears.pkl", "--baselines", "none", "--no-plots")
    assert summary["models"][0]["n_skipped_written_a_b"] == doubles > 0
    assert f"{doubles} of them are dataset genes joined by _" in " ".join(result.output.split())
    assert any("pass --separator _" in w for w in summary["warnings"])


def test_json_evaluate_without_plots_still_has_report_and_plots_keys(screen, data_dir, tmp_path):
    adata, split = screen
    write_predictions(adata, split.test, tmp_path / "cells.h5ad")
    result = invoke("--json", "evaluate", NAME, "--data-dir", data_dir, "--predictions", tmp_path / "cells.h5ad",
                    "--out", tmp_path / "out", "--baselines", "none", "--no-plots")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["report"] is None and document["plots"] == []


def test_table_suffix_is_the_last_one_and_h5_files_read_as_anndata(tmp_path):
    """A name with dots before its suffix (preds.seed0.csv) is still a table; .h5 is an AnnData."""
    from regina_cli.evaluate.readers import read_predictions

    frame = pd.DataFrame({"condition": ["A+ctrl", "B+ctrl"], "G1": [1.0, 2.0]})
    frame.to_csv(tmp_path / "preds.seed0.csv", index=False)
    assert read_predictions(tmp_path / "preds.seed0.csv", condition_key="condition", separator="+").x.tolist() == \
        [[1.0], [2.0]]
    pred = ad.AnnData(np.ones((2, 1), dtype=np.float32), obs=pd.DataFrame({"condition": ["A+ctrl", "B+ctrl"]},
                                                                          index=["a", "b"]))
    pred.var_names = ["G1"]
    pred.write_h5ad(tmp_path / "cells.h5")
    assert list(read_predictions(tmp_path / "cells.h5", condition_key="condition", separator="+").labels) == \
        ["A+ctrl", "B+ctrl"]


def test_dataset_ids_add_a_naming_and_keep_the_files_own():
    """Columns named by the file's IDs gain a naming in symbols (an ID the dataset lacks kept as it
    is); the file's own naming stays a candidate, and a file named by symbols is left alone."""
    from regina_cli.evaluate.readers import RawPredictions, with_dataset_ids

    adata = ad.AnnData(np.zeros((1, 3), np.float32), var=pd.DataFrame({"gene_id": ["E1", "E2", "E3"]},
                                                                     index=["A", "B", "C"]))

    def raw(names):
        return RawPredictions("p", np.zeros((1, len(names)), np.float32), [names], np.array(["ctrl"], dtype=object),
                              pd.DataFrame(index=[0]))

    assert with_dataset_ids(raw(["E2", "E1", "NEW"]), adata).gene_names == [["E2", "E1", "NEW"], ["B", "A", "NEW"]]
    assert with_dataset_ids(raw(["A", "B"]), adata).gene_names == [["A", "B"]]


def test_model_context_counts_a_b_skips_of_dataset_genes_and_conditions_below_two_cells():
    from types import SimpleNamespace

    from regina_cli.evaluate.predictions import CELLS
    from regina_cli.evaluate.run import _model_context

    truth = SimpleNamespace(dataset_genes=["GA", "GB"], resolve=lambda c: c)
    model = SimpleNamespace(name="m", path="p", form=CELLS,
                            conditions=["GA+ctrl", "GB+ctrl", "GA+GB"],
                            cells=[np.zeros((1, 2)), np.zeros((2, 2)), np.zeros((3, 2))],
                            skipped=["GA_GB", "GA_NOPE", "GB", "NOPE"], scale_warning=None, n_control_rows=0,
                            prompt_source=None, provenance={})
    context = _model_context(model, truth, ["GA+ctrl"])
    assert context["n_skipped_written_a_b"] == 1  # GA_GB; not GA_NOPE (not a gene), nor GB (no _)
    assert context["n_single_cell_conditions"] == 1  # GA+ctrl's one cell; two cells are scored


def test_a_condition_with_two_predicted_cells_is_scored(screen, run, tmp_path):
    pair, path = _first_condition_cut_to(2, screen, tmp_path)
    _, summary, table = run("--predictions", path, "--baselines", "none", "--no-plots")
    row = table.set_index(["model", "condition"]).loc[(summary["models"][0]["name"], pair)]
    assert row[["mmd_rbf", "energy_distance", "de_precision_at_N"]].notna().all()


def test_warnings_about_the_prediction_files_run_are_kept_in_metrics_json(screen, run, tmp_path):
    adata, split = screen
    pred = write_predictions(adata, split.test, tmp_path / "cells.h5ad")
    pred.uns[keys.UNS_REGINA] = {"dataset": NAME, "split": "elsewhere"}
    pred.write_h5ad(tmp_path / "other_split.h5ad")
    _, summary, _ = run("--predictions", tmp_path / "other_split.h5ad", "--split", split.name, "--baselines", "none",
                        "--no-plots")
    assert any("comes from a run trained on split elsewhere" in w for w in summary["warnings"])


def test_predictions_named_by_the_datasets_gene_ids_score_as_if_named_by_symbols(tmp_path):
    """A dataset fetched from a file named by Ensembl IDs keeps them in var gene_id; a tool's
    predictions named by those IDs are read through them, end to end."""
    from eval_helpers import write_screen

    data = tmp_path / "data"
    adata, split = write_screen(data)
    ids = {g: f"ENSG{i:011d}" for i, g in enumerate(adata.var_names)}
    stored = ad.read_h5ad(data / NAME / keys.DATA_FILE)
    stored.var["gene_id"] = [ids[g] for g in stored.var_names]
    from regina_cli.data.dataset import write_dataset

    write_dataset(stored, NAME, data)
    from regina_cli.data.split import save_split

    save_split(split, data, force=True)  # the same split of the dataset, now with its IDs
    by_symbol = write_predictions(adata, split.test, tmp_path / "symbols.h5ad")
    by_id = by_symbol.copy()
    by_id.var_names = [ids[g] for g in by_symbol.var_names]
    by_id.write_h5ad(tmp_path / "ids.h5ad")
    tables = []
    for name in ("symbols", "ids"):
        result = invoke("evaluate", NAME, "--data-dir", data, "--predictions", tmp_path / f"{name}.h5ad",
                        "--model-name", "m", "--baselines", "none", "--no-plots", "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        tables.append(pd.read_csv(tmp_path / name / keys.PER_CONDITION_FILE).set_index("condition").sort_index())
    np.testing.assert_allclose(tables[1][PRECISION], tables[0][PRECISION], rtol=1e-6)
