"""`regina evaluate` end to end on a small simulated screen: outputs, forms, determinism, bad inputs."""

from __future__ import annotations

import io as text_io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from cli_helpers import invoke
from eval_helpers import NAME, data_dir, screen, write_predictions  # noqa: F401 (fixtures)
from regina_cli import keys
from regina_cli.evaluate.metrics import METRICS
from regina_cli.evaluate.report import headline_rows, summary_tables

@pytest.fixture
def run(data_dir):
    return lambda *args: invoke("evaluate", NAME, "--data-dir", data_dir, *args)


def test_cli_writes_metrics_table_and_plots_deterministically(screen, run, tmp_path):
    adata, split = screen
    write_predictions(adata, split.test, tmp_path / "pred.h5ad")
    # a fixed thread count: the default follows the machine's load, and float sums follow the threads
    first = run("--predictions", tmp_path / "pred.h5ad", "--split", split.name, "--out", tmp_path / "a", "--threads", "1")
    assert first.exit_code == 0, first.output
    assert "no_change" in first.output and "pred wins" in first.output and "…" not in first.output
    assert "pred: 30 predicted cells per condition (median)" in first.output  # its means carry their noise
    again = run("--predictions", tmp_path / "pred.h5ad", "--split", split.name, "--out", tmp_path / "b", "--no-plots",
                "--threads", "1")
    assert again.exit_code == 0, again.output

    for name in (keys.PER_CONDITION_FILE,):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    summary = json.loads((tmp_path / "a" / keys.METRICS_FILE).read_text())
    # without colour (a file), a baseline better than the model still shows: marked *
    lost = json.loads(json.dumps(summary))
    lost["comparison"]["pred"]["no_change"]["metrics"]["pearson_delta"].update(tie=False, model_better=False)
    plain = Console(file=text_io.StringIO(), color_system=None, width=80)
    for table in summary_tables(lost):
        plain.print(table)
    worse = sum(v[1] == "worse" for r in headline_rows(lost) for v in r["values"].values() if isinstance(v, list | tuple))
    assert worse >= 1 and len(re.findall(r"\d\*", plain.file.getvalue())) == worse
    rerun = json.loads((tmp_path / "b" / keys.METRICS_FILE).read_text())
    assert summary["results"] == rerun["results"] and summary["comparison"] == rerun["comparison"]

    table = pd.read_csv(tmp_path / "a" / keys.PER_CONDITION_FILE)
    assert list(table.columns[:5]) == ["condition", "model", "set", "subgroup", "n_cells"]
    assert list(table.columns[5:]) == list(METRICS) and set(summary["metrics"]) == set(METRICS)
    assert set(table["model"]) == {"pred", "no_change", "train_mean", "additive", "linear"}  # the file's stem
    assert set(table.loc[table.model == "additive", "condition"]) <= {c for c in split.test if "ctrl" not in c}
    ours = table[table.model == "pred"]
    assert len(ours) == len(split.test) and ours[list(METRICS)].notna().all().all()

    overall = summary["results"]["pred"]["overall"]
    assert overall["n_conditions"] == len(split.test)
    assert overall["pearson_delta"] == pytest.approx(ours["pearson_delta"].mean(), rel=1e-12)  # exact values
    assert {"unseen_single", "combo_seen2"} <= set(summary["results"]["pred"])
    assert summary["split"] == split.name and summary["versions"]["regina"]
    assert summary["models"][0]["cells_per_condition"] == 30
    assert summary["n_genes_scored"] == summary["n_genes_dataset"] == adata.n_vars and summary["threads"] == 1
    # resampled true cells must beat "no change" on the headline precision metrics
    assert summary["comparison"]["pred"]["no_change"]["metrics"]["pearson_delta"]["model_better"]
    assert summary["comparison"]["pred"]["no_change"]["metrics"]["discrimination_score_l1"]["model_better"]
    for png in summary["plots"]:
        assert (tmp_path / "a" / png).read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "a" / keys.REPORT_FILE).read_text()
    assert page.count("data:image/png;base64,") == len(summary["plots"]) == 4 and "src='http" not in page


def test_an_evaluation_is_replaced_only_when_the_folder_holds_nothing_else(screen, run, tmp_path):
    """--out over a previous evaluation swaps the folder whole: files the user put there would go
    with it, so they are named and refused; the evaluation's own outputs are replaced."""
    adata, split = screen
    write_predictions(adata, split.test, tmp_path / "pred.h5ad")
    args = ["--predictions", tmp_path / "pred.h5ad", "--split", split.name, "--out", tmp_path / "eval", "--threads", "1"]
    first = run(*args)
    assert first.exit_code == 0, first.output
    written = {p.relative_to(tmp_path / "eval").as_posix() for p in (tmp_path / "eval").rglob("*") if p.is_file()}
    assert written == keys.EVAL_OUTPUTS  # every name an evaluation writes is known (cell-level: pca_cells too)
    mine = tmp_path / "eval" / keys.PLOTS_DIR / "mine.svg"
    mine.write_text("<svg/>")
    refused = run(*args, "--no-plots")
    assert refused.exit_code == 2 and "holds plots/mine.svg, which this command does not write" in refused.output
    assert mine.is_file() and (tmp_path / "eval" / keys.REPORT_FILE).is_file()
    mine.unlink()
    again = run(*args, "--no-plots")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [keys.METRICS_FILE, keys.PER_CONDITION_FILE]


def test_mean_profiles_in_another_gene_order_give_the_same_precision(screen, run, tmp_path):
    adata, split = screen
    cells = write_predictions(adata, split.test, tmp_path / "cells.h5ad")
    means = cells.to_df().groupby(cells.obs[keys.OBS_CONDITION].to_numpy()).mean()
    profiles = ad.AnnData(means.iloc[:, ::-1].to_numpy(np.float32))  # GEARS form, genes reversed
    profiles.var_names = list(means.columns[::-1])
    profiles.obs_names = [f"m{i}" for i in range(len(means))]
    profiles.obs["perturbation"] = ["ctrl+" + c.split("+")[0] if c.endswith("+ctrl") else c for c in means.index]
    profiles.write_h5ad(tmp_path / "means.h5ad")

    for name, extra in (("cells", []), ("means", ["--condition-key", "perturbation"])):
        result = run("--predictions", tmp_path / f"{name}.h5ad", "--split", split.name, "--out", tmp_path / name,
                      "--no-plots", "--baselines", "none", *extra)
        assert result.exit_code == 0, result.output
    cell_form = pd.read_csv(tmp_path / "cells" / keys.PER_CONDITION_FILE).set_index("condition")
    mean_form = pd.read_csv(tmp_path / "means" / keys.PER_CONDITION_FILE).set_index("condition").loc[cell_form.index]
    precision = [m for m, i in METRICS.items() if i.kind == "precision"]
    np.testing.assert_allclose(mean_form[precision], cell_form[precision], rtol=1e-5, atol=1e-7)
    with_cells = [m for m, i in METRICS.items() if i.kind in ("distribution", "de")]
    assert mean_form[with_cells].isna().all().all() and (mean_form["n_cells"] == 0).all()
    assert cell_form[with_cells].notna().all().all()
    assert json.loads((tmp_path / "means" / keys.METRICS_FILE).read_text())["models"][0]["form"] == "means"


def _in_memory(path, split, data_dir, baselines: list[str]):
    """(truth, evaluation) of the prediction file at `path`, scored without writing anything."""
    from regina_cli.data.dataset import read_dataset
    from regina_cli.evaluate.predictions import align, shared_genes
    from regina_cli.evaluate.readers import name_columns, read_predictions
    from regina_cli.evaluate.run import evaluate_loaded
    from regina_cli.evaluate.truth import Truth

    real = read_dataset(NAME, data_dir)
    raw = name_columns(read_predictions(path, condition_key=keys.OBS_CONDITION, separator=keys.GENE_SEPARATOR),
                       list(real.var_names))
    truth = Truth(real, shared_genes([raw], list(real.var_names)))
    return truth, evaluate_loaded(truth, split, [align(raw, truth, "pred")], baselines=baselines)


def test_evaluate_loaded_in_memory_scores_as_the_command_does(screen, run, tmp_path, data_dir):
    """The notebook path (`evaluate_loaded`, no files written) gives the command's table."""
    adata, split = screen
    write_predictions(adata, split.test, tmp_path / "pred.h5ad")
    result = run("--predictions", tmp_path / "pred.h5ad", "--split", split.name, "--out", tmp_path / "cli",
                 "--no-plots", "--baselines", "train_mean", "--threads", "1")
    assert result.exit_code == 0, result.output
    _, loaded = _in_memory(tmp_path / "pred.h5ad", split, data_dir, ["train_mean"])

    assert [m.name for m in loaded.models] == ["pred"] and set(loaded.profiles) == {"train_mean"}
    assert set(loaded.profiles["train_mean"]) == set(split.test)
    cli = pd.read_csv(tmp_path / "cli" / keys.PER_CONDITION_FILE).set_index(["condition", "model"]).sort_index()
    memory = loaded.table.set_index(["condition", "model"]).sort_index()
    assert list(memory.index) == list(cli.index) and set(memory.index.get_level_values("model")) == {"pred", "train_mean"}
    np.testing.assert_allclose(memory[list(METRICS)].to_numpy(float), cli[list(METRICS)].to_numpy(float),
                               rtol=1e-5, atol=1e-7)


def test_scatter_legend_gives_no_change_the_tables_pearson_delta(screen, tmp_path, data_dir):
    """no_change predicts a constant (no change), whose Pearson is undefined: the tables count it
    as 0 (GEARS), and delta_scatter.png's legend showed r=nan beside them."""
    from matplotlib.figure import Figure

    from regina_cli.evaluate import figures

    adata, split = screen
    condition = split.test[0]
    write_predictions(adata, [condition], tmp_path / "pred.h5ad")
    truth, loaded = _in_memory(tmp_path / "pred.h5ad", split, data_dir, ["no_change"])
    ax = Figure().subplots()
    figures._delta_scatter(ax, loaded, truth, condition, "test", figures.colours(["pred", "no_change"]), {"pred"})
    table = loaded.table.set_index(["model", "condition"])["pearson_delta"]
    assert table["no_change", condition] == 0.0
    assert f"no_change (r={table['no_change', condition]:.2f})" in ax.get_legend_handles_labels()[1]


def test_report_overall_table_says_how_many_conditions_each_column_is_over(screen, run, tmp_path):
    """additive predicts only the combinations of trained singles: its column in report.html's
    Overall table sat beside the model's with no count, as if both were means over the same set."""
    adata, split = screen
    write_predictions(adata, split.test, tmp_path / "pred.h5ad")
    result = run("--predictions", tmp_path / "pred.h5ad", "--split", split.name, "--out", tmp_path / "e",
                 "--baselines", "no_change,additive")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "e" / keys.PER_CONDITION_FILE)
    n = table[table["set"] == "test"].groupby("model")["condition"].nunique()
    assert n["pred"] == n["no_change"] == len(split.test) > n["additive"] > 0
    page = (tmp_path / "e" / keys.REPORT_FILE).read_text()
    overall = page.split("<h2>Overall</h2>")[1].split("</table>")[0]
    for name in ("pred", "no_change", "additive"):
        assert f"<th>{name}\nn={n[name]}</th>" in overall


def test_unknown_conditions_are_skipped_and_counted(screen, run, tmp_path):
    adata, split = screen
    pred = write_predictions(adata, split.test[:2], tmp_path / "pred.h5ad")
    extra = pred[:5].copy()
    extra.obs_names = [f"x{i}" for i in range(5)]
    extra.obs[keys.OBS_CONDITION] = "NOPE+ctrl"
    ad.concat([pred, extra]).write_h5ad(tmp_path / "pred.h5ad")
    result = run("--predictions", tmp_path / "pred.h5ad", "--split", split.name, "--out", tmp_path / "e", "--no-plots")
    assert result.exit_code == 0, result.output
    assert "NOPE+ctrl" in result.output
    model = json.loads((tmp_path / "e" / keys.METRICS_FILE).read_text())["models"][0]
    assert model["n_skipped_not_in_dataset"] == 1 and model["skipped_not_in_dataset"] == ["NOPE+ctrl"]
    assert model["n_target_conditions_not_predicted"] == len(split.test) - 2


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _renamed_genes(p), "shares no gene with the dataset"),
        (lambda p: _with_nan(p), "NaN"),
        (lambda p: _renamed_obs(p), "no obs column 'condition'"),
    ],
)
def test_bad_predictions_fail_in_one_line_and_write_nothing(screen, run, tmp_path, damage, message):
    adata, split = screen
    damage(write_predictions(adata, split.test, tmp_path / "pred.h5ad")).write_h5ad(tmp_path / "bad.h5ad")
    result = run("--predictions", tmp_path / "bad.h5ad", "--split", split.name, "--out", tmp_path / "out")
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def _renamed_genes(pred):
    pred.var_names = [f"x{g}" for g in pred.var_names]
    return pred


def _with_nan(pred):
    pred.X[3, 7] = np.nan
    return pred


def _renamed_obs(pred):
    pred.obs = pred.obs.rename(columns={keys.OBS_CONDITION: "perturbation"})
    return pred


def test_missing_split_and_unknown_baseline_are_user_errors(screen, run, tmp_path):
    adata, split = screen
    write_predictions(adata, split.test, tmp_path / "pred.h5ad")
    result = run("--predictions", tmp_path / "pred.h5ad", "--split", "simulation_9")
    assert result.exit_code != 0 and "regina split" in result.output
    result = run("--predictions", tmp_path / "pred.h5ad", "--baselines", "mean")
    assert result.exit_code != 0 and "unknown baseline" in result.output
    result = run("--predictions", tmp_path / "missing.h5ad", "--split", split.name)
    assert result.exit_code != 0 and "not found" in result.output


def test_split_defaults_to_the_one_recorded_by_predict(screen, run, tmp_path, data_dir):
    adata, split = screen
    splits = keys.dataset_dir(NAME, data_dir) / keys.SPLITS_DIR
    (splits / "other_7.json").write_text((splits / f"{split.name}.json").read_text())  # two splits on disk
    pred = write_predictions(adata, split.test[:1], tmp_path / "pred.h5ad")
    pred.uns[keys.UNS_REGINA] = {"split": split.name, "dataset": NAME, "seed": 0}
    pred.write_h5ad(tmp_path / "pred.h5ad")
    result = run("--predictions", tmp_path / "pred.h5ad", "--no-plots", "--baselines", "none", "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "e" / keys.METRICS_FILE).read_text())
    assert summary["split"] == split.name and summary["models"][0]["provenance"]["seed"] == 0
    assert summary["models"][0]["name"] == "regina"  # a file written by `regina predict`


def test_thread_pools_get_the_idle_cores_and_are_restored(monkeypatch):
    import torch

    from regina_cli.evaluate import threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert threads.free_cpus() == 1
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert threads.free_cpus() == 1  # never fewer than one
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.free_cpus() == 4
    before = torch.get_num_threads()
    with threads.cpu_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_small_pages_switches_numpy_huge_pages_off_and_back():
    from regina_cli.evaluate import pages

    switch = pages._setter()
    before = switch(True)
    try:
        with pages.small_pages():
            assert switch(False) is False  # off inside the block
        assert switch(True) is True  # restored afterwards
    finally:
        switch(before)


FIGURE = ("from pathlib import Path; import numpy as np; from regina_cli.evaluate import figures; "
          "from matplotlib.figure import Figure; fig = Figure(); "
          "figures._boxes(fig.subplots(), [np.arange(5.0)], [0.0], 0.8, '#1f77b4'); "
          "figures._savefig(fig, Path('box.png')); import os; print(os.environ.get('MPLCONFIGDIR', ''))")


def test_figures_under_an_unwritable_home_print_nothing_on_stderr(tmp_path):
    """With a read-only HOME (HPC nodes), matplotlib warned on stderr that it made a temporary
    config folder and that MPLCONFIGDIR should be set: noise in a user's pipeline."""
    (tmp_path / "file").write_text("")  # a HOME under a file: unwritable even for root, who ignores modes
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path / "file" / "home")
    done = subprocess.run([sys.executable, "-c", FIGURE], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "matplotlib" not in done.stderr.lower(), done.stderr
    assert (tmp_path / "box.png").stat().st_size > 0
    assert done.stdout.strip() and not Path(done.stdout.strip()).exists()  # a private folder, gone at exit
    env["MPLCONFIGDIR"] = str(tmp_path / "mine")
    kept = subprocess.run([sys.executable, "-c", FIGURE], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert kept.stdout.strip() == str(tmp_path / "mine"), kept.stderr  # the user's own is never replaced


def test_a_users_matplotlib_settings_are_kept_when_only_the_cache_is_unwritable(tmp_path, monkeypatch):
    """A writable config folder with the user's matplotlibrc beside an unwritable cache folder:
    MPLCONFIGDIR, which moves both, would hide the settings; matplotlib's own warning is the lesser harm."""
    from regina_cli.private_dirs import ENV_MPLCONFIGDIR, use_private_config_dir

    (tmp_path / "file").write_text("")
    (tmp_path / "config" / "matplotlib").mkdir(parents=True)
    monkeypatch.delenv(ENV_MPLCONFIGDIR, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    use_private_config_dir()
    assert ENV_MPLCONFIGDIR in os.environ  # no settings to keep: the private folder
    monkeypatch.delenv(ENV_MPLCONFIGDIR)
    (tmp_path / "config" / "matplotlib" / "matplotlibrc").write_text("lines.linewidth: 7\n")
    use_private_config_dir()
    assert ENV_MPLCONFIGDIR not in os.environ


def test_numba_caches_privately_where_neither_scanpys_folder_nor_the_users_cache_is_writable(tmp_path,
                                                                                               monkeypatch):
    """A shared read-only install and a read-only HOME: `fetch --n-top-genes` ended in numba's
    "cannot cache function ...: no locator available" traceback."""
    import importlib.util
    from types import SimpleNamespace

    from regina_cli.private_dirs import ENV_NUMBA_CACHE_DIR, use_private_numba_cache

    (tmp_path / "file").write_text("")  # nothing can be made below a file
    monkeypatch.delenv(ENV_NUMBA_CACHE_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: SimpleNamespace(origin=str(tmp_path / "file" / "scanpy" / "__init__.py")))
    use_private_numba_cache()
    assert Path(os.environ[ENV_NUMBA_CACHE_DIR]).is_dir()
    monkeypatch.delenv(ENV_NUMBA_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the user's cache can be made: numba's own
    use_private_numba_cache()
    assert ENV_NUMBA_CACHE_DIR not in os.environ


def test_threads_above_the_cores_run_and_absurd_counts_are_refused():
    """A fixed --threads must rerun on a smaller allocation (bit-identical reruns want it fixed:
    docs/evaluate.md), so more threads than cores is allowed; only counts whose thread pools
    cannot be allocated are refused."""
    from regina_cli.devices import available_cpus
    from regina_cli.errors import ReginaError
    from regina_cli.evaluate.run import MAX_THREADS, check_options

    check_options(seed=0, max_true_cells=100, threads=available_cpus() + 1, model_name=None)
    with pytest.raises(ReginaError, match="is more than 1024"):
        check_options(seed=0, max_true_cells=100, threads=MAX_THREADS + 1, model_name=None)


def test_a_screen_of_several_cell_types_warns_that_the_mix_is_credited():
    """McFaline (three cell lines): predictions drawn in each condition's own cell-line mix scored
    0.32 from the mix alone against the pooled control mean, which the pooled baselines do not
    have, and REGINA's lead over train_mean (0.06) looked like a win without a word."""
    import anndata as ad
    import scipy.sparse as sp

    from regina_cli.evaluate.run import cell_type_mix_warning
    from regina_cli.evaluate.truth import Truth

    obs = pd.DataFrame({keys.OBS_CONDITION: ["ctrl", "ctrl", "A+ctrl", "A+ctrl"],
                        keys.OBS_CELL_TYPE: ["K562", "A549", "K562", "A549"]}, index=list("abcd"))
    several = Truth(ad.AnnData(sp.csr_matrix(np.ones((4, 3), dtype=np.float32)), obs=obs))
    (warning,) = cell_type_mix_warning(several, "screen", ["no_change", "train_mean", "linear"])
    assert "holds 2 cell types" in warning and "train_mean, linear, pooled, do not have" in warning
    obs[keys.OBS_CELL_TYPE] = "K562"
    one = Truth(ad.AnnData(sp.csr_matrix(np.ones((4, 3), dtype=np.float32)), obs=obs))
    assert cell_type_mix_warning(one, "screen", ["no_change"]) == []
