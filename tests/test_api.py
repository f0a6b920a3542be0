"""The Python API (`import regina_cli as regina`): docs/api.md's example runs, and the API keeps
the command line's behaviour (messages, defaults, files) while taking and returning AnnData."""

from __future__ import annotations

import inspect
import io
import json
import re
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import regina_cli as regina
from cli_helpers import invoke
from regina_cli import api, keys
from regina_cli.errors import ReginaError

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
HEAVY = ("torch", "scanpy", "anndata")


def doc_blocks() -> list[str]:
    """The ```python blocks of docs/api.md, in order."""
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """docs/api.md's python blocks run as one notebook, in a folder of their own, with every
    output of the process captured: (the notebook's variables, its folder, what it printed)."""
    workdir = tmp_path_factory.mktemp("notebook")
    namespace: dict = {}
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(printed), redirect_stderr(printed):
        mp.chdir(workdir)
        mp.setenv(keys.ENV_DATA_DIR, str(workdir / "data"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for block in doc_blocks():
                exec(compile(block, str(DOC), "exec"), namespace)
    return namespace, workdir, caught, printed.getvalue()


def test_doc_has_the_whole_pipeline():
    code = "\n".join(doc_blocks())
    for step in ("fetch", "split", "label", "train_ae", "train_gan", "predict", "evaluate"):
        assert f"regina.{step}(" in code
    assert "sc.tl.rank_genes_groups(" in code


def test_doc_example_runs_and_returns_scverse_objects(notebook):
    ns, workdir, *_ = notebook
    adata, pred, result = ns["adata"], ns["pred"], ns["result"]
    assert isinstance(adata, anndata.AnnData) and adata.n_obs == 600 and adata.n_vars == 200
    assert ns["split"].name == "simulation_1"
    assert ns["labels"].labels.index.equals(adata.obs_names)
    assert set(ns["labels"].balance["class"]) == {"Homeostasis", "Stressed"}
    ae, gan = ns["ae"], ns["gan"]
    assert (ae.phase, gan.phase, ae.epochs, gan.epochs) == ("ae", "gan", 2, 2)
    assert list(ae.history["epoch"]) == [1, 2] and ae.config.model.d_model == 16
    assert ae.config.ae.max_epochs == 2 and gan.config.gan.max_epochs == 2
    assert gan.config_source == "phase 1 of runs/demo"
    # Predictions: every test condition (30 cells each), the real controls appended, clipped.
    conditions = pred.obs[keys.OBS_CONDITION].astype(str)
    assert set(conditions) == set(ns["split"].split.test) | {"ctrl"}
    assert (conditions != "ctrl").sum() == 30 * len(ns["split"].split.test)
    assert float(pred.X.min()) >= 0
    # scanpy ran against the controls: one ranking per test condition, ctrl as the reference.
    assert set(ns["top"]["group"]) == set(ns["split"].split.test)
    assert pred.uns["rank_genes_groups"]["params"]["reference"] == "ctrl"
    assert ns["top"]["logfoldchanges"].notna().all()
    # Evaluation: tables as DataFrames, files where `out` said.
    assert {"regina", "no_change", "train_mean"} <= set(result.per_condition["model"])
    overall = result.metrics.loc[("regina", "overall")]
    assert overall["n_conditions"] == len(ns["split"].split.test)
    assert np.isfinite(overall["pearson_delta"])
    assert result.out == Path("runs/demo/eval") and (workdir / result.report).is_file()
    both = ns["both"]
    assert set(both.per_condition["model"]) >= {"regina", "gears"} and both.out is None
    assert ns["screen"].uns["regina"]["condition_key"] == "perturbation"
    assert set(ns["screen"].obs[keys.OBS_CONDITION]) == set(adata.obs[keys.OBS_CONDITION])


def test_doc_example_prints_nothing_and_scanpy_has_nothing_to_warn(notebook):
    """Nothing printed, and no warning from scanpy or numpy on the clipped predictions."""
    _, _, caught, printed = notebook
    assert printed == ""
    noisy = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not noisy, [str(w.message) for w in noisy]


def test_predictions_file_opens_in_scanpy_with_controls(notebook):
    _, workdir, *_ = notebook
    pred = sc.read_h5ad(workdir / "runs" / "demo" / keys.PREDICTIONS_FILE)
    controls = pred[pred.obs[keys.OBS_CONDITION] == "ctrl"]
    assert controls.n_obs > 0 and set(controls.obs[keys.OBS_PROMPT_SOURCE]) == {"control"}
    assert set(controls.obs_names) == set(pred.obs[keys.OBS_CONTROL_CELL][pred.obs[keys.OBS_CONDITION] != "ctrl"])
    assert pred.uns["regina"]["with_controls"] and pred.uns["regina"]["clip"]


def _gears_like(adata, split) -> anndata.AnnData:
    """Another tool's cells: the measured test cells, labelled A_B, with no REGINA provenance."""
    test = adata[adata.obs[keys.OBS_CONDITION].isin(split.test)]
    labels = test.obs[keys.OBS_CONDITION].astype(str).str.replace("+", "_").to_numpy()
    return anndata.AnnData(X=test.X.toarray(), obs=pd.DataFrame({"condition": labels}, index=test.obs_names),
                           var=pd.DataFrame(index=test.var_names))


def test_evaluate_an_anndata_names_the_model_everywhere(notebook, tmp_path):
    ns, workdir, *_ = notebook
    gears = _gears_like(ns["adata"], ns["split"].split)
    out = tmp_path / "gears_eval"
    result = regina.evaluate("demo", gears, model_name="gears", separator="_", out=out, baselines="no_change",
                             data_dir=workdir / "data")
    assert result.out == out
    assert set(result.per_condition["model"]) == {"gears", "no_change"}
    written = pd.read_csv(out / keys.PER_CONDITION_FILE)
    assert set(written["model"]) == {"gears", "no_change"}
    summary = json.loads((out / keys.METRICS_FILE).read_text())
    assert [m["name"] for m in summary["models"]] == ["gears"] and "gears" in summary["results"]
    report = (out / keys.REPORT_FILE).read_text()
    assert "gears" in report and ">regina<" not in report
    assert not any("regina" in p for p in summary["plots"])
    # The real cells scored as predictions reproduce themselves (up to the 100-cell subsample).
    assert result.metrics.loc[("gears", "overall"), "pearson_delta"] > 0.9


def test_evaluate_dataframe_and_dict_forms_keep_nothing_by_default(notebook, tmp_path):
    ns, workdir, *_ = notebook
    adata, split = ns["adata"], ns["split"].split
    test = adata[adata.obs[keys.OBS_CONDITION].isin(split.test)]
    means = pd.DataFrame(test.X.toarray(), columns=test.var_names).groupby(
        test.obs[keys.OBS_CONDITION].astype(str).to_numpy()).mean()
    means.index.name = "condition"
    as_dict = {c: row.to_numpy() for c, row in means.iterrows()}
    result = regina.evaluate("demo", [means, as_dict], model_name=["table", "pickle"], baselines="none",
                             data_dir=workdir / "data")
    assert result.out is None and not (tmp_path / keys.EVAL_DIR).exists()
    assert [m["form"] for m in result.summary["models"]] == ["means", "means"]
    table = result.per_condition.set_index(["model", "condition"])["pearson_delta"]
    assert np.allclose(table["table"].sort_index(), table["pickle"].sort_index())


def test_fetch_imports_an_in_memory_anndata_as_from_does_a_file(demo_adata, tmp_path, capsys):
    screen = demo_adata.copy()
    screen.obs = pd.DataFrame({"guide": screen.obs[keys.OBS_CONDITION].astype(str).str.replace("+", "_")
                               .replace("ctrl", "non-targeting").to_numpy(),
                               "cell_type": screen.obs[keys.OBS_CELL_TYPE].to_numpy()}, index=screen.obs_names)
    screen.uns = {}
    path = tmp_path / "screen.h5ad"
    screen.write_h5ad(path)
    from_file = regina.fetch("from_file", source=path, condition_key="guide", separator="_", verbose=True)
    assert "relabelled" in capsys.readouterr().out  # the import notes, printed because asked
    in_memory = regina.fetch("in_memory", screen, condition_key="guide", separator="_")
    assert capsys.readouterr() == ("", "")
    assert isinstance(in_memory, anndata.AnnData)
    assert (in_memory.X != from_file.X).nnz == 0
    assert in_memory.obs[keys.OBS_CONDITION].equals(from_file.obs[keys.OBS_CONDITION])
    assert set(in_memory.obs[keys.OBS_CONDITION]) == set(demo_adata.obs[keys.OBS_CONDITION])
    de_memory, de_file = in_memory.uns[keys.UNS_RANK_GENES], from_file.uns[keys.UNS_RANK_GENES]
    assert de_memory.keys() == de_file.keys() and all(list(de_memory[k]) == list(de_file[k]) for k in de_file)
    assert not (keys.data_root() / ".downloads").exists()  # the staged copy is gone
    with pytest.warns(UserWarning, match="already present"):
        regina.fetch("in_memory", screen, condition_key="guide", separator="_")


@pytest.mark.parametrize("call, command", [
    (lambda: regina.fetch("bad name!"), ["fetch", "bad name!"]),
    (lambda: regina.fetch("nosuch"), ["fetch", "nosuch"]),
    (lambda: regina.fetch("demo", n_cells=300, source="x.h5ad"),
     ["fetch", "demo", "--cells", "300", "--from", "x.h5ad"]),
    (lambda: regina.split("nosuch"), ["split", "nosuch"]),
    (lambda: regina.label("nosuch", "stress"), ["label", "nosuch", "--method", "stress"]),
    (lambda: regina.predict("runs/none"), ["predict", "--run", "runs/none"]),
    (lambda: regina.evaluate("nosuch", "p.h5ad"), ["evaluate", "nosuch", "--predictions", "p.h5ad"]),
])
def test_errors_carry_the_command_line_message(call, command):
    with pytest.raises(ReginaError) as raised:
        call()
    result = invoke(*command)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"error: {raised.value}"


def test_config_rule_is_the_command_line_one(notebook):
    ns, workdir, *_ = notebook
    data = workdir / "data"
    with pytest.raises(ReginaError, match="unknown config key ae.nope"):
        regina.train_ae("demo", split="simulation_1", labels="stress", run=workdir / "runs" / "x",
                        overrides=["ae.nope=1"], data_dir=data)
    with pytest.raises(ReginaError, match=r"--preset applies to a new run"):
        regina.train_ae("demo", split="simulation_1", labels="stress", run=workdir / "runs" / "demo",
                        preset="demo", resume=True, data_dir=data)
    with pytest.raises(ReginaError, match="unknown option.*n_cell\\b"):
        regina.fetch("demo", n_cell=10)


def test_load_run_gives_the_trained_networks(notebook):
    ns, workdir, *_ = notebook
    trained = regina.load_run(workdir / "runs" / "demo", device="cpu")
    assert trained.gan is not None and trained.meta.dataset == "demo"
    assert trained.config.model.d_model == ns["gan"].config.model.d_model


def test_defaults_match_the_engine():
    """Options the API shares with the engine function it calls have the engine's defaults."""
    from regina_cli.data.label import label_dataset
    from regina_cli.data.split import split_dataset
    from regina_cli.engine.predict import run_prediction
    from regina_cli.engine.train_ae import train_autoencoder
    from regina_cli.engine.train_gan import train_gan
    from regina_cli.evaluate.run import MAX_TRUE_CELLS, evaluate

    pairs = [(api.split, split_dataset), (api.label, label_dataset), (api.predict, run_prediction),
             (api.train_ae, train_autoencoder), (api.train_gan, train_gan), (api.evaluate, evaluate)]
    for ours, engine in pairs:
        theirs = inspect.signature(engine).parameters
        for name, param in inspect.signature(ours).parameters.items():
            if name in theirs and theirs[name].default is not inspect.Parameter.empty:
                assert param.default == theirs[name].default, (ours.__name__, name)
    assert inspect.signature(api.evaluate).parameters["true_cells"].default == MAX_TRUE_CELLS


def test_evaluate_stays_the_function_after_the_subpackage_is_imported():
    import regina_cli.evaluate.run  # noqa: F401  (the subpackage of the same name)

    assert regina.evaluate is api.evaluate
    assert set(regina.__all__) >= {"fetch", "split", "label", "train_ae", "train_gan", "predict", "evaluate",
                                   "load_run", "ReginaError"}


@pytest.mark.parametrize("args", [["-c", "import regina_cli as regina; regina.fetch; regina.evaluate"],
                                  ["-m", "regina_cli", "--help"]])
def test_import_and_help_load_no_heavy_library(args):
    """`python -X importtime` lists every module imported; none of torch, scanpy, anndata."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "regina_cli" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"out": "p.csv"}, "ending in .h5ad"),
    ({"out": "data/demo/p.h5ad"}, "in a dataset folder"),
    ({"clip": "no"}, "clip takes True, False or None"),
    ({"sparsify": True, "clip": False}, "drop --no-clip or --sparsify"),
    ({"seed": -1}, "--seed takes a whole number"),
    ({"n_cells": 2.5}, "--cells must be at least 1"),
])
def test_predict_checks_its_arguments_as_the_command_line_does(notebook, kwargs, fragment):
    namespace, workdir, _, _ = notebook
    before = sorted(p for p in workdir.rglob("*"))
    if "out" in kwargs:
        kwargs = {**kwargs, "out": workdir / kwargs["out"]}
    with pytest.raises(ReginaError, match=fragment):
        regina.predict(namespace["gan"], "test", data_dir=workdir / "data", **kwargs)
    assert sorted(p for p in workdir.rglob("*")) == before


@pytest.mark.parametrize("call, fragment", [
    (lambda pred, data: regina.evaluate("demo", pred, true_cells=0, data_dir=data), "--true-cells must be"),
    (lambda pred, data: regina.evaluate("demo", pred, threads=-1, data_dir=data), "--threads must be"),
    (lambda pred, data: regina.evaluate("demo", pred, seed=-1, data_dir=data), "--seed takes"),
    (lambda pred, data: regina.evaluate("demo", pred, model_name=" ", data_dir=data), "--model-name must not"),
    (lambda pred, data: regina.split("demo", seed=1.5, data_dir=data), "--seed takes"),
    (lambda pred, data: regina.label("demo", "stress", split=123, data_dir=data), "a name or a result"),
])
def test_api_argument_errors_are_regina_errors(notebook, call, fragment):
    namespace, workdir, _, _ = notebook
    with pytest.raises(ReginaError, match=fragment):
        call(namespace["pred"], workdir / "data")


def test_profiles_and_tables_are_matched_by_gene_name(notebook):
    """A dict of gene-indexed Series was read by position (true profiles sorted by gene: 0.16
    instead of 1.0); a table indexed by condition without an index name was refused; a table of
    some genes was scored on them without a word."""
    ns, workdir, *_ = notebook
    adata, split = ns["adata"], ns["split"].split
    test = adata[adata.obs[keys.OBS_CONDITION].isin(split.test)]
    means = pd.DataFrame(test.X.toarray(), columns=test.var_names).groupby(
        test.obs[keys.OBS_CONDITION].astype(str).to_numpy()).mean()
    arrays = {c: row.to_numpy() for c, row in means.iterrows()}
    series = {c: row.sort_index() for c, row in means.iterrows()}  # another gene order, named
    result = regina.evaluate("demo", [arrays, series, means], model_name=["arrays", "series", "table"],
                             baselines="none", data_dir=workdir / "data")
    table = result.per_condition.set_index(["model", "condition"])["pearson_delta"]
    for other in ("series", "table"):  # `means` has no index name: its index is taken as the conditions
        assert np.allclose(table[other].sort_index(), table["arrays"].sort_index())
    with pytest.warns(UserWarning, match=r"scored on the 10 of \d+ genes"):
        regina.evaluate("demo", means.iloc[:, :10], baselines="none", data_dir=workdir / "data")


def test_a_split_or_labels_of_another_dataset_are_refused(notebook):
    """Only the name was read, so another dataset's split picked this dataset's split of that name."""
    ns, workdir, *_ = notebook
    data = workdir / "data"
    from regina_cli.data.demo import simulate_screen

    regina.fetch("demo2", simulate_screen(n_cells=300, n_genes=150, n_singles=6, n_doubles=3, seed=4), data_dir=data)
    other = regina.split("demo2", mode="simulation", seed=1, data_dir=data)
    other_labels = regina.label("demo2", "stress", split=other, data_dir=data)
    with pytest.raises(regina.ReginaError, match="was made for dataset 'demo2', not 'demo'"):
        regina.label("demo", "stress", split=other, data_dir=data)
    with pytest.raises(regina.ReginaError, match="are not demo's stress labels for split simulation_1"):
        regina.train_ae("demo", split=ns["split"], labels=other_labels, run=workdir / "runs" / "x", data_dir=data)
    assert not (workdir / "runs" / "x").exists()


def test_one_override_may_be_a_plain_string():
    from regina_cli.engine.run_config import ConfigRequest

    assert ConfigRequest(overrides="ae.lr=1e-3").overrides == ["ae.lr=1e-3"]
