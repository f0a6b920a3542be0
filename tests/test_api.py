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


def test_a_first_call_that_imports_torch_leaves_it_as_a_fresh_import_would():
    """A notebook's first REGINA call is often what imports torch and numpy: training then seeds
    them and turns on denormal flushing. Restoring only libraries imported before the call left the
    notebook's later torch code on REGINA's fixed seed and flushing tiny floats to zero."""
    code = (
        "import sys\n"
        "from regina_cli.global_state import left_as_found\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
        "with left_as_found():\n"
        "    import torch\n"
        "    torch.manual_seed(0); torch.set_flush_denormal(True); seeded = torch.rand(3)\n"
        "    import numpy\n"
        "    numpy.random.seed(0); numpy.random.rand(3)\n"
        "continued = numpy.random.RandomState(0).rand(6)[3:]  # the seeded stream's next draws\n"
        "print(torch.initial_seed() != 0,  # reseeded from the system's entropy, as a fresh import is\n"
        "      torch.tensor([1e-40]).item() != 0.0, not torch.equal(torch.rand(3), seeded),\n"
        "      not numpy.array_equal(numpy.random.rand(3), continued))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True"] * 4, done.stdout


def test_a_block_puts_back_the_notebooks_own_thread_count_and_denormal_flushing():
    """What the notebook set itself comes back after a call: its torch thread count (scanpy's numba
    layer and training change it) and its choice to flush denormal floats (training turns flushing
    on; a notebook that had turned it on must not find it off, nor the other way round)."""
    import torch

    from regina_cli.global_state import left_as_found

    threads, flushed = torch.get_num_threads(), torch.tensor([1e-40]).item() == 0.0
    if not torch.set_flush_denormal(flushed):
        pytest.skip("this CPU cannot flush denormal floats")
    try:
        for flushing in (True, False):
            torch.set_flush_denormal(flushing)
            with left_as_found():
                torch.set_num_threads(threads + 1)
                torch.set_flush_denormal(not flushing)
            assert torch.get_num_threads() == threads
            assert (torch.tensor([1e-40]).item() == 0.0) is flushing
    finally:
        torch.set_flush_denormal(flushed)
        torch.set_num_threads(threads)


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
    assert gan.config_source == f"phase 1 of {ae.run_dir}"
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
    assert result.out == (workdir / "runs/demo/eval").resolve() and result.report.is_file()
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
    """The appended controls were the few hundred cells the predictions were drawn from, whose mean
    misses the training controls' mean that `gan.match_control_mean` moves every prediction onto:
    rank_genes_groups then ranked the same rare genes first in every condition. They are every
    training control now."""
    ns, workdir, *_ = notebook
    pred = sc.read_h5ad(workdir / "runs" / "demo" / keys.PREDICTIONS_FILE)
    controls = pred[pred.obs[keys.OBS_CONDITION] == "ctrl"]
    assert controls.n_obs > 0 and set(controls.obs[keys.OBS_PROMPT_SOURCE]) == {"control"}
    adata = ns["adata"]
    assert set(controls.obs_names) == set(adata.obs_names[adata.obs[keys.OBS_CONDITION] == "ctrl"])
    assert set(pred.obs[keys.OBS_CONTROL_CELL][pred.obs[keys.OBS_CONDITION] != "ctrl"]) <= set(controls.obs_names)
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
    (lambda: regina.fetch("demo", seed=-1), ["fetch", "demo", "--seed", "-1"]),
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
    (lambda pred, data: regina.label("demo", "stress", split=data / "demo" / "splits" / "simulation_1.json",
                                     data_dir=data), "a name or a result"),  # read as the split 'simulation_1.json'
    (lambda pred, data: regina.predict(3, data_dir=data), "run= takes a run folder"),
    (lambda pred, data: regina.evaluate("demo", [], data_dir=data), "empty list"),
    (lambda pred, data: regina.evaluate("demo", pred, model_name=3, data_dir=data), "model_name takes"),
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


def test_a_split_or_labels_of_another_data_folder_or_fitted_on_all_cells_are_refused(notebook, tmp_path):
    """A SplitResult of another data folder trained on this folder's split of that name, and labels
    fitted on all cells were swapped for the split's, both without a word."""
    ns, workdir, *_ = notebook
    data, elsewhere = workdir / "data", copy_of_notebook(notebook, tmp_path) / "data"
    theirs = regina.split("demo", mode="simulation", seed=1, data_dir=elsewhere)
    with pytest.raises(regina.ReginaError, match=f"was written to .*pass data_dir='{elsewhere.resolve()}'"):
        regina.train_ae("demo", split=theirs, labels="stress", run=tmp_path / "x", data_dir=data)
    all_cells = regina.label("demo", "stress", data_dir=elsewhere)
    with pytest.raises(regina.ReginaError, match="were fitted on all cells, but training on split simulation_1"):
        regina.train_ae("demo", split="simulation_1", labels=all_cells, run=tmp_path / "x", data_dir=elsewhere)
    assert not (tmp_path / "x").exists()


def test_results_hold_absolute_paths(notebook):
    ns, workdir, *_ = notebook
    assert all(path.is_absolute() for path in (ns["split"].path, ns["labels"].path, ns["ae"].run_dir,
                                               ns["gan"].run_dir, ns["result"].out))


def test_reading_a_run_leaves_the_notebooks_state_alone(notebook):
    """Building the networks of `load_run` and drawing control cells in `predict` used the
    notebook's torch random stream."""
    ns, workdir, *_ = notebook
    before = _notebook_state()
    regina.load_run(ns["gan"], device="cpu")
    regina.predict(ns["gan"], n_cells=2, out=workdir / "state.h5ad", data_dir=workdir / "data")
    assert _notebook_state() == before


def test_one_override_may_be_a_plain_string():
    from regina_cli.engine.run_config import ConfigRequest

    assert ConfigRequest(overrides="ae.lr=1e-3").overrides == ["ae.lr=1e-3"]


# --- The command line's options, checks and warnings, and the user's objects left alone ------------
def copy_of_notebook(notebook, tmp_path) -> Path:
    """The notebook's data and run, copied into `tmp_path` (for tests that change them)."""
    import shutil

    _, workdir, *_ = notebook
    for part in ("data", "runs/demo"):
        shutil.copytree(workdir / part, tmp_path / part)
    return tmp_path


def test_every_command_line_option_is_a_keyword():
    """`force` and `allow_stale` were missing while the errors said to pass them."""
    from typer.main import get_command

    from regina_cli.cli import app
    from regina_cli.data.demo import DEMO_OPTIONS

    functions = {"fetch": api.fetch, "split": api.split, "label": api.label, "train-ae": api.train_ae,
                 "train-gan": api.train_gan, "predict": api.predict, "evaluate": api.evaluate}
    renamed = {"cells": "n_cells", "conditions_file": "conditions"}  # predict's; a list replaces the file
    demo_flags = set(DEMO_OPTIONS.values())
    for command, function in functions.items():
        ours = set(inspect.signature(function).parameters)
        for param in get_command(app).commands[command].params:
            if command == "fetch" and set(param.opts) & demo_flags:
                continue  # the demo's options go to **simulation, each named in DEMO_OPTIONS
            assert renamed.get(param.name, param.name) in ours, (command, param.name)


def test_evaluate_warns_what_the_command_line_warns(notebook, tmp_path):
    """Values on another scale, conditions not in the dataset and test conditions left
    unpredicted were scored without a word."""
    ns, workdir, *_ = notebook
    pred, data = ns["pred"], workdir / "data"
    odd = pred.copy()
    odd.X = np.round(np.expm1(np.asarray(odd.X)) * 50)
    first = ns["split"].split.test[0]
    odd.obs[keys.OBS_CONDITION] = odd.obs[keys.OBS_CONDITION].astype(str).replace({first: "ZZZ+ctrl"})
    path = tmp_path / "odd.h5ad"
    odd.copy().write_h5ad(path)  # anndata's writer makes the string columns of what it writes categorical
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        regina.evaluate("demo", odd, plots=False, data_dir=data)
    said = [str(w.message) for w in caught if "genes that every prediction" not in str(w.message)]
    cli = invoke("--json", "evaluate", "demo", "--predictions", path, "--no-plots", "--out", tmp_path / "eval",
                 "--data-dir", data)
    assert cli.exit_code == 0, cli.output
    expected = json.loads(cli.stdout)["warnings"]
    assert len(expected) == 3 and said == [w.replace(str(path), "predictions (an AnnData)") for w in expected]
    assert odd.obs[keys.OBS_CONDITION].dtype == object  # and the AnnData passed in is left as it was


def test_evaluate_refuses_stale_predictions_and_split_mismatches_warn(notebook, tmp_path):
    """A dataset fetched again with other content: evaluate scored the old predictions without a
    word, and split/label/predict asked for --force / --allow-stale, which they did not take."""
    root = copy_of_notebook(notebook, tmp_path)
    data, run = root / "data", root / "runs" / "demo"
    predictions = run / keys.PREDICTIONS_FILE
    with pytest.warns(UserWarning, match="comes from a run trained on split simulation_1; scored on simulation_2") as said:
        other = regina.split("demo", seed=2, data_dir=data)
        regina.evaluate("demo", predictions, split="simulation_2", plots=False, out=root / "e2", data_dir=data)
    # It said "may hold conditions the run trained on" while both splits were there to say which.
    trained = set(regina.split("demo", seed=1, data_dir=data).split.train)
    seen = sorted(c for c in {*other.split.val, *other.split.test} & trained if c != "ctrl")
    text = next(str(w.message) for w in said if "comes from a run" in str(w.message))
    assert (f"hold {len(seen)} condition(s) the run trained on" in text and seen[0] in text) if seen else \
        "none of simulation_2's val and test conditions" in text
    regina.fetch("demo", n_cells=500, n_genes=200, n_singles=10, n_doubles=6, force=True, data_dir=data)
    regina.split("demo", seed=1, data_dir=data)  # the same conditions: the same split
    with pytest.raises(ReginaError, match="pass --force"):
        regina.label("demo", "stress", split="simulation_1", data_dir=data)
    regina.label("demo", "stress", split="simulation_1", force=True, data_dir=data)
    for call in (lambda **kw: regina.evaluate("demo", predictions, plots=False, data_dir=data, **kw),
                 lambda **kw: regina.predict(run, n_cells=5, out=root / "p.h5ad", data_dir=data, **kw)):
        with pytest.raises(ReginaError, match="is stale: the dataset changed.*pass --allow-stale"):
            call()
        with pytest.warns(UserWarning, match="is stale: the dataset changed"):
            call(allow_stale=True)
    regina.fetch("demo", n_cells=500, n_genes=200, n_singles=12, n_doubles=6, force=True, data_dir=data)
    with pytest.raises(ReginaError, match="pass --force"):
        regina.split("demo", seed=1, data_dir=data)
    regina.split("demo", seed=1, force=True, data_dir=data)


def test_evaluate_scores_on_the_split_it_is_given_not_the_one_the_predictions_recorded(notebook, tmp_path):
    """`split=` (--split) chooses the split to score on; the split `predict` recorded is only the
    default. Scoring on simulation_2 must report simulation_2 and place each condition in that
    split's sets, not silently score on simulation_1 under the warning that says simulation_2."""
    from regina_cli.data.split import load_split

    root = copy_of_notebook(notebook, tmp_path)
    data, run = root / "data", root / "runs" / "demo"
    regina.split("demo", seed=2, data_dir=data)
    with pytest.warns(UserWarning, match="scored on simulation_2"):
        result = regina.evaluate("demo", run / keys.PREDICTIONS_FILE, split="simulation_2", plots=False,
                                 out=root / "e2", data_dir=data)
    assert result.summary["split"] == "simulation_2"
    split = load_split("demo", "simulation_2", data)
    table = result.per_condition
    assert list(table["set"]) == [split.set_of(c) or "unsplit" for c in table["condition"]]
    assert set(table["set"]) != {"test"}  # simulation_1's test conditions are not all simulation_2's


def test_an_evaluation_folder_of_other_files_is_not_replaced(notebook, tmp_path):
    """The API skipped the command's check: `out` holding the user's files was replaced whole."""
    ns, workdir, *_ = notebook
    (tmp_path / "mine.txt").write_text("keep me\n")
    with pytest.raises(ReginaError, match="holds other files and no metrics.json"):
        regina.evaluate("demo", ns["pred"], out=tmp_path, plots=False, data_dir=workdir / "data")
    assert (tmp_path / "mine.txt").read_text() == "keep me\n"


def _screen(adata) -> anndata.AnnData:
    """The demo as a user's own screen: string obs columns, A_B labels, no GEARS fields."""
    obs = pd.DataFrame({"perturbation": adata.obs[keys.OBS_CONDITION].astype(str).str.replace("+", "_").to_numpy(),
                        "cell_type": adata.obs[keys.OBS_CELL_TYPE].astype(str).to_numpy()}, index=adata.obs_names)
    return anndata.AnnData(adata.X.copy(), obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))


def test_the_anndata_passed_in_comes_back_unchanged(notebook):
    """Writing it turned its string columns categorical (the user's next edit then failed), and
    made a view an actual AnnData."""
    ns, workdir, *_ = notebook
    mine = _screen(ns["adata"])
    view = mine[mine.obs["perturbation"] != "nothing"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # anndata's ImplicitModificationWarning included
        regina.fetch("unchanged", view, condition_key="perturbation", separator="_", data_dir=workdir / "data")
        regina.fetch("unchanged2", mine, condition_key="perturbation", separator="_", data_dir=workdir / "data")
    assert view.is_view and (mine.obs.dtypes == object).all()
    mine.obs.loc[mine.obs["perturbation"] == "ctrl", "perturbation"] = "NTC"  # failed on a categorical


def test_fetch_reads_only_what_it_imports_and_names_what_it_cannot_store(notebook):
    ns, workdir, *_ = notebook
    data = workdir / "data"
    other = ns["adata"].copy()
    other.uns["params"] = {"when": pd.Timestamp("2024-01-01")}  # not read: not staged
    other.obsm["X_umap"] = np.zeros((other.n_obs, 2))
    regina.fetch("with_uns", other, data_dir=data)
    mixed = ns["adata"].copy()
    mixed.obs["mixed"] = [1 if i % 2 else "x" for i in range(mixed.n_obs)]
    with pytest.raises(ReginaError, match=r"adata: obs\['mixed'\] cannot be stored in an h5ad file"):
        regina.fetch("mixed", mixed, data_dir=data)
    numbered = ns["adata"].copy()
    numbered.obs[1] = 0
    with pytest.raises(ReginaError, match=r"adata: obs\[1\] cannot be stored"):
        regina.fetch("numbered", numbered, data_dir=data)


def test_one_control_label_is_a_string(notebook):
    """`control="SCR"` became the controls S, C and R, and no control was found."""
    from regina_cli.data.importer import ImportOptions

    assert ImportOptions(control="SCR").control == ("SCR",) and ImportOptions(control=None).control == ()
    ns, workdir, *_ = notebook
    screen = _screen(ns["adata"])
    screen.obs["perturbation"] = screen.obs["perturbation"].str.replace("ctrl", "SCR")
    found = regina.fetch("scr", screen, condition_key="perturbation", separator="_", control="SCR",
                         data_dir=workdir / "data")
    assert (found.obs[keys.OBS_CONDITION] == "ctrl").sum() == (ns["adata"].obs[keys.OBS_CONDITION] == "ctrl").sum()


def test_duplicate_gene_names_are_made_unique_without_anndatas_advice(notebook):
    """anndata's "call .var_names_make_unique" warning came twice for what the importer does
    itself; a GEARS-layout file with a gene named twice ended in a pandas ValueError."""
    ns, workdir, *_ = notebook
    genes = list(ns["adata"].var_names)
    twice = genes[4]
    for name, adata in (("dup_plain", _screen(ns["adata"])), ("dup_gears", ns["adata"].copy())):
        adata.var_names = [*genes[:5], twice, *genes[6:]]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            found = regina.fetch(name, adata, condition_key="perturbation" if name == "dup_plain" else None,
                                 separator="_" if name == "dup_plain" else None, data_dir=workdir / "data")
        assert found.var_names.is_unique and found.n_vars == len(genes)  # none dropped
        if name == "dup_plain":  # named by var_names: the second one gets anndata's suffix
            assert list(found.var_names) == [*genes[:5], f"{twice}-1", *genes[6:]]
        else:  # a GEARS file is named by var['gene_name'], which still names each gene once
            assert list(found.var_names) == genes


def _notebook_state() -> tuple:
    """What a notebook's own code depends on: its next random draws, torch's thread count and
    whether torch flushes denormal floats."""
    import random

    import torch

    state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(1).item(), torch.get_num_threads(),
             torch.tensor([1e-40]).item() == 0.0)
    random.setstate(state[0]), np.random.set_state(state[1]), torch.random.set_rng_state(state[2])
    return draws


def test_train_result_carries_its_data_folder_and_run(notebook, tmp_path):
    """train_gan(ae) and predict(gan) read ./data (or $REGINA_DATA) again, not the data_dir
    phase 1 was trained on; a run given by a relative path was another folder's after os.chdir.
    Training also left the notebook's random streams re-seeded at 0 and torch flushing denormals."""
    import random

    import torch

    ns, workdir, *_ = notebook
    root = copy_of_notebook(notebook, tmp_path / "elsewhere")
    data = (root / "data").resolve()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    before = _notebook_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        ae = regina.train_ae("demo", split="simulation_1", labels="stress", run="run", preset="demo",
                             overrides=ns["tiny"], max_epochs=1, data_dir="data")  # both relative to this folder
    assert _notebook_state() == before
    assert ae.run_dir == (root / "run").resolve()
    assert ae.data_dir == data and not keys.dataset_file("demo").exists()  # nothing at the default
    elsewhere = tmp_path / "another_folder"
    elsewhere.mkdir()
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")  # phase 2's diagnostics of a one-epoch model
        mp.chdir(elsewhere)  # a notebook that changed folder (the result's path was relative)
        gan = regina.train_gan(ae, max_epochs=0)
    assert gan.data_dir == data
    assert regina.predict(gan, n_cells=5).n_obs > 0


@pytest.mark.parametrize("call, fragment", [
    (lambda ns, data: regina.predict(ns["gan"], None, data_dir=data), "--conditions takes test, val, all"),
    (lambda ns, data: regina.predict(ns["gan"], [1, 2], data_dir=data), "--conditions takes test, val, all"),
    (lambda ns, data: regina.predict(data.parent / "runs" / "demo", "train", data_dir=data), "sets test, val and all"),
    (lambda ns, data: regina.predict(ns["gan"], seed=None, data_dir=data), "--seed takes"),
    (lambda ns, data: regina.fetch("demo", force=True, seed=-1, data_dir=data), "--seed takes"),
    (lambda ns, data: regina.fetch("demo", force=True, seed=None, data_dir=data), "--seed takes"),
    (lambda ns, data: regina.fetch("demo", force=True, n_cells=300.0, data_dir=data), "--cells takes a whole"),
    (lambda ns, data: regina.fetch("demo", force=True, n_cells="300", data_dir=data), "--cells takes a whole"),
    (lambda ns, data: regina.fetch("demo", force=True, n_doubles=-1, data_dir=data), "--doubles takes a whole"),
    (lambda ns, data: regina.fetch("demo", force=True, drop_targets="0.1", data_dir=data), "--drop-targets takes"),
    (lambda ns, data: regina.fetch("demo", force=True, log=print, data_dir=data), "unknown option.*log"),
    (lambda ns, data: regina.fetch("x", source="x.h5ad", n_top_genes="50", data_dir=data), "--n-top-genes must"),
    (lambda ns, data: regina.fetch("x", ns["adata"], control=[1], data_dir=data), "--control takes labels"),
    (lambda ns, data: regina.split("demo", train_gene_frac="0.5", data_dir=data), "--train-gene-frac must"),
    (lambda ns, data: regina.label("demo", "stress", quantile="0.5", data_dir=data), "--quantile must"),
    (lambda ns, data: regina.evaluate("demo", ns["pred"], baselines=1, data_dir=data), "--baselines takes"),
    (lambda ns, data: regina.evaluate("demo", ns["pred"], baselines=["nope"], data_dir=data), "unknown baseline"),
])
def test_wrong_types_are_regina_errors_with_the_command_lines_words(notebook, call, fragment):
    """Each ended in a TypeError, ValueError or AttributeError from deep inside."""
    ns, workdir, *_ = notebook
    before = sorted(workdir.rglob("*"))
    with pytest.raises(ReginaError, match=fragment):
        call(ns, workdir / "data")
    assert sorted(workdir.rglob("*")) == before


def test_baselines_and_a_split_come_as_python_lists_and_dicts(notebook, tmp_path):
    ns, workdir, *_ = notebook
    data = copy_of_notebook(notebook, tmp_path) / "data"
    as_list = regina.evaluate("demo", ns["pred"], baselines=["train_mean", "linear"], plots=False, data_dir=data)
    as_text = regina.evaluate("demo", ns["pred"], baselines="train_mean,linear", plots=False, data_dir=data)
    assert as_list.per_condition.equals(as_text.per_condition)
    sets = ns["split"].split
    mine = {"train": list(sets.train), "val": list(sets.val), "test": list(sets.test)}
    from_dict = regina.split("demo", split_file=mine, data_dir=data)
    (tmp_path / "mine.json").write_text(json.dumps(mine))
    assert regina.split("demo", split_file=tmp_path / "mine.json", data_dir=data).name == from_dict.name


@pytest.mark.parametrize("predictions, called", [
    (lambda cond: {cond: np.ones(10)}, r"predictions \(a dict\) holds 10 values per condition"),
    (lambda cond: [{cond: np.zeros(200)}, {cond: np.ones(10)}], r"predictions\[1\] \(a dict\) holds 10 values"),
    (lambda cond: pd.DataFrame({"condition": [cond], "NOGENE": [1.0]}), r"predictions \(a DataFrame\) shares no gene"),
    (lambda cond: anndata.AnnData(np.ones((1, 3)), obs=pd.DataFrame({"guide": [cond]}, index=["c1"])),
     r"predictions \(an AnnData\) has no obs column 'condition' \(columns: guide\)"),
])
def test_errors_name_in_memory_predictions_as_passed(notebook, predictions, called):
    """They named a temporary file, already deleted when the user read the message."""
    ns, workdir, *_ = notebook
    with pytest.raises(ReginaError, match=called) as raised:
        regina.evaluate("demo", predictions(ns["split"].split.test[0]), split="simulation_1",
                        data_dir=workdir / "data")
    assert "in-memory" not in str(raised.value)


def test_results_print_in_a_line_or_two(notebook):
    """A notebook cell showing a result printed 70,000 characters (the whole summary), a loaded
    run 14,000 (every torch module), a TrainResult 4,500."""
    ns, workdir, *_ = notebook
    shown = {"result": repr(ns["result"]), "ae": repr(ns["ae"]), "split": repr(ns["split"]),
             "labels": repr(ns["labels"]), "run": repr(regina.load_run(workdir / "runs" / "demo", device="cpu"))}
    assert all(len(text) < 400 for text in shown.values()), {k: len(v) for k, v in shown.items()}
    assert "models=['regina']" in shown["result"] and "n_conditions=" in shown["result"]
    assert "phase='ae'" in shown["ae"] and "dataset='demo'" in shown["run"]
    assert "name='simulation_1'" in shown["split"] and "method='stress'" in shown["labels"]


def test_fetch_documents_every_demo_option():
    from regina_cli.data.demo import DEMO_OPTIONS

    assert all(option in api.fetch.__doc__ for option in DEMO_OPTIONS)


def test_fetch_and_train_ae_warn_what_the_command_line_warns(notebook, tmp_path):
    """Two warnings the commands print reached a notebook only with verbose=True, as plain text:
    a screen of control cells only, and gene knowledge that names none of the screen's genes."""
    ns, workdir, *_ = notebook
    adata = ns["adata"]
    controls = adata[adata.obs[keys.OBS_CONDITION] == keys.CTRL].copy()
    with pytest.warns(UserWarning, match="holds only control cells") as fetched:
        regina.fetch("allctrl", controls, data_dir=tmp_path / "data")
    assert fetched[0].filename == __file__  # the user's line, not REGINA's
    knowledge = tmp_path / "ensembl.tsv"
    knowledge.write_text("ENSG0001\tGO:1\nENSG0002\tGO:1\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ae = regina.train_ae("demo", split=ns["split"], labels=ns["labels"], run=tmp_path / "run", preset="demo",
                             overrides=ns["tiny"], max_epochs=1,
                             gene_knowledge=str(knowledge), device="cpu", data_dir=workdir / "data")
    said = [str(w.message) for w in caught]
    assert any("names none of the dataset's 200 genes" in s for s in said)
    assert ae.warnings and all(warning in said for warning in ae.warnings)
    assert {w.filename for w in caught} == {__file__}


def _test_means(notebook) -> pd.DataFrame:
    """Mean real expression of each test condition, indexed by condition: a perfect model's table."""
    ns, *_ = notebook
    adata, split = ns["adata"], ns["split"].split
    test = adata[adata.obs[keys.OBS_CONDITION].isin(split.test)]
    means = pd.DataFrame(test.X.toarray(), columns=test.var_names).groupby(
        test.obs[keys.OBS_CONDITION].astype(str).to_numpy()).mean()
    means.index.name = "condition"
    return means


def test_parts_of_one_model_in_memory_are_all_scored(notebook):
    """Predictions of one model made in parts (a job array) and passed as a list under one name are
    scored together: parts staged to one file would be read as the last part twice (the first part's
    conditions lost, and the user told the parts overlap)."""
    ns, workdir, *_ = notebook
    means = _test_means(notebook)
    half = len(means) // 2
    result = regina.evaluate("demo", [means.iloc[:half], means.iloc[half:]], model_name=["m", "m"],
                             baselines="none", data_dir=workdir / "data")
    scored = result.per_condition.loc[result.per_condition["model"] == "m", "condition"]
    assert sorted(scored) == sorted(means.index)


def test_evaluating_a_file_keeps_the_results_in_eval_beside_it(notebook, tmp_path):
    """Predictions given as a file path are scored as `regina evaluate FILE` scores them: the results
    are kept in eval/ beside the file (only in-memory predictions keep nothing by default)."""
    ns, workdir, *_ = notebook
    path = tmp_path / "means.csv"
    _test_means(notebook).reset_index().to_csv(path, index=False)
    result = regina.evaluate("demo", path, baselines="none", plots=False, data_dir=workdir / "data")
    assert result.out == (tmp_path / keys.EVAL_DIR).resolve()
    assert (result.out / keys.METRICS_FILE).is_file()
