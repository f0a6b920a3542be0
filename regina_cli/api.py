"""The Python API for notebooks: `import regina_cli as regina`, then `regina.fetch(...)` ...

Each function runs the same engine function as its command, with the same options and the same
one-line `ReginaError` messages, and returns what a scverse user works with: AnnData for data and
predictions, result dataclasses whose tables are DataFrames for the rest. Every step still
writes its file (the next step, a later session or a shell script can pick up from there), and
nothing prints unless `verbose=True`; what the command line shows in yellow arrives as a Python
warning. Heavy libraries are imported inside the functions, so `import regina_cli` stays light.
docs/api.md documents every function with a worked example that tests/test_api.py runs.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from regina_cli import keys
from regina_cli.errors import ReginaError

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

    from regina_cli.config import ReginaConfig
    from regina_cli.data.split import Split


def _silent(_: str) -> None:
    """The log of a quiet call."""


def _log(verbose: bool):
    return print if verbose else _silent


def _progress(verbose: bool) -> str:
    return "plain" if verbose else "silent"


def _name_of(value, attribute: str) -> str:
    """A split or label method given as its name or as the result that made it."""
    if value is None or isinstance(value, str):
        return value
    if not hasattr(value, attribute):
        raise ReginaError(f"expected a name or a result with .{attribute}, not {value!r}")
    return getattr(value, attribute)


def _split_of(split, name: str) -> str | None:
    """A split's name; a `SplitResult` of another dataset is refused (its name alone would pick
    this dataset's split of that name, which is another split)."""
    found = _name_of(split, "name")
    made_for = getattr(getattr(split, "split", None), "dataset", name)
    if made_for != name:
        raise ReginaError(f"split {found} was made for dataset {made_for!r}, not {name!r}: "
                          f"pass regina.split({name!r}, ...) or a split name")
    return found


def _labels_of(labels, name: str, split: str | None, data_dir) -> str | None:
    """A label method; a `LabelResult` of another dataset or split is refused, for the same reason."""
    method = _name_of(labels, "method")
    path = getattr(labels, "path", None)
    if path is not None:
        own = {keys.labels_file(name, method, data_dir, split).resolve(), keys.labels_file(name, method, data_dir).resolve()}
        if Path(path).resolve() not in own:
            raise ReginaError(f"labels {path} are not {name}'s {method} labels for split {split}: pass "
                              f"regina.label({name!r}, {method!r}, split={split!r}) or the method's name")
    return method


def _run_dir(run) -> Path:
    """A run given as a path, a `TrainResult` or a `TrainedRun` (both have `run_dir`)."""
    return Path(getattr(run, "run_dir", run))


# --- fetch ---------------------------------------------------------------------------------------
@contextmanager
def _staged_anndata(adata, data_dir):
    """An in-memory AnnData as a temporary h5ad under the data folder, for the file importer."""
    from regina_cli.data.fetch import DOWNLOADS_DIR
    from regina_cli.io import write_h5ad

    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise ReginaError(f"adata must be an AnnData, not {type(adata).__name__}; give a file as source=")
    scratch = keys.data_root(data_dir) / DOWNLOADS_DIR
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="in-memory-anndata-", dir=scratch) as folder:
            path = Path(folder) / "in-memory.h5ad"
            write_h5ad(adata, path)
            yield path
    finally:
        if not any(scratch.iterdir()):
            scratch.rmdir()


def fetch(name: str, adata: AnnData | None = None, *, source: str | Path | None = None, force: bool = False,
          control: Sequence[str] = (), condition_key: str | None = None, cell_type_key: str | None = None,
          separator: str | None = None, n_top_genes: int | None = None, gene_list: str | Path | None = None,
          data_dir: str | Path | None = None, backed: bool = False, verbose: bool = False, **simulation: Any):
    """`regina fetch`: put dataset `name` in the data folder and return it as AnnData (GEARS layout).

    `adata` imports an in-memory AnnData exactly as `source` (`--from`) imports a file; the import
    options (`control`, `condition_key`, ...) apply to either. `simulation` takes the demo's
    sizes (`n_cells`, `n_genes`, `n_singles`, `n_doubles`, `n_cell_types`, `seed`, `drop_targets`).
    `fetch("go")` fetches GEARS' GO annotation and returns its `GoResult` instead.
    """
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.fetch import GO, fetch as fetch_dataset, fetch_go
    from regina_cli.data.importer import ImportOptions

    options = ImportOptions(
        control=tuple(control), condition_key=condition_key, separator=separator, cell_type_key=cell_type_key,
        n_top_genes=n_top_genes, gene_list=None if gene_list is None else str(gene_list),
    )
    log = _log(verbose)
    if name == GO:
        if adata is not None or simulation or options != ImportOptions():
            raise ReginaError("`regina fetch go` takes only --from, --force and --data-dir")
        return fetch_go(data_dir=data_dir, source=None if source is None else str(source), force=force, log=log,
                        progress=verbose)
    if adata is not None and source is not None:
        raise ReginaError("give either adata or source (--from), not both")
    _check_simulation(simulation)
    kwargs = dict(data_dir=data_dir, force=force, options=options, demo=simulation, log=log, progress=verbose)
    if adata is not None:
        with _staged_anndata(adata, data_dir) as path:
            result = fetch_dataset(name, source=str(path), **kwargs)
    else:
        result = fetch_dataset(name, source=None if source is None else str(source), **kwargs)
    if result.action == "already present" and (adata is not None or source is not None or simulation):
        warnings.warn(f"{name} is already present and was not fetched again, so the options given did not "
                      "apply: pass force=True to replace it", stacklevel=2)
    return read_dataset(name, data_dir, backed=backed)


def _check_simulation(simulation: dict) -> None:
    import inspect

    from regina_cli.data.demo import simulate_demo

    known = list(inspect.signature(simulate_demo).parameters)
    unknown = sorted(set(simulation) - set(known))
    if unknown:
        raise ReginaError(f"fetch() got unknown option(s) {', '.join(unknown)}; the demo takes {', '.join(known)}")


# --- split and label -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitResult:
    """What `split` wrote: pass it (or its `name`) as `split=` to the later steps."""

    split: Split  # the condition lists: .train, .val, .test, .subgroups
    summary: pd.DataFrame  # per set and subgroup: conditions, cells, unmeasured, unpredictable
    path: Path  # data/<name>/splits/<split name>.json
    n_unassigned: int  # dataset conditions in no set (GEARS leaves some out in combo/single modes)
    warnings: list[str]

    @property
    def name(self) -> str:
        """`<mode>_<seed>`, e.g. simulation_1 (simulation_1_0.5 at train_gene_frac=0.5)."""
        return self.split.name


def split(name: str, *, mode: str = "simulation", seed: int = 1, train_gene_frac: float = 0.75,
          split_file: str | Path | None = None, gene_knowledge: str | None = None,
          data_dir: str | Path | None = None) -> SplitResult:
    """`regina split`: train/val/test conditions, identical to cell-gears' for a mode and seed."""
    import pandas as pd

    from regina_cli.checks import check_seed
    from regina_cli.data.split import split_dataset

    check_seed(seed)
    outcome = split_dataset(name, mode=mode, seed=seed, train_gene_frac=train_gene_frac, split_file=split_file,
                            data_dir=data_dir, gene_knowledge=gene_knowledge)
    for warning in outcome.warnings:
        warnings.warn(warning, stacklevel=2)
    return SplitResult(outcome.split, pd.DataFrame(outcome.summary), outcome.path, outcome.n_unassigned,
                       list(outcome.warnings))


@dataclass(frozen=True)
class LabelResult:
    """What `label` wrote: pass it (or its `method`) as `labels=` to `train_ae`."""

    method: str
    labels: pd.Series  # cell name -> class, ready for adata.obs["cell_state"]
    balance: pd.DataFrame  # one row per class: cells, share, and cells per split set
    fitted_on: str  # which cells the labels were fitted on, in words
    details: dict  # how they were obtained (stress: threshold, quantile, markers)
    path: Path  # data/<name>/labels/<method>@<split>.csv (<method>.csv without a split)


def label(name: str, method: str, *, split: str | SplitResult | None = None, quantile: float | None = None,
          data_dir: str | Path | None = None) -> LabelResult:
    """`regina label`: one cell-state class per cell (`stress`, `cell-cycle` or `obs:<column>`),
    fitted on the training cells of `split`."""
    import pandas as pd

    from regina_cli.data.label import label_dataset

    outcome = label_dataset(name, method, quantile=quantile, split=_split_of(split, name), data_dir=data_dir)
    return LabelResult(method, outcome.labels.cell_state, pd.DataFrame(outcome.balance), outcome.fitted_on,
                       dict(outcome.labels.details), outcome.path)


# --- training ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainResult:
    """A finished training phase: pass it as the run of `train_gan` and `predict`."""

    run_dir: Path
    phase: str  # "ae" or "gan"
    stop_reason: str
    epochs: int
    best_epoch: int  # the epoch whose weights model.pt holds
    best_metric: str
    best_value: float
    history: pd.DataFrame  # one row per epoch: training losses and validation scores (history.csv)
    config: ReginaConfig  # the configuration the phase ran with
    config_source: str  # where its base came from (preset, phase 1, a resumed run)
    warnings: list[str]
    summary: dict  # everything the engine reported (what `--json` prints)


def _trained(summary: dict, run_dir: Path, phase: str, config, source: str) -> TrainResult:
    import pandas as pd

    for warning in summary.get("warnings", []):
        warnings.warn(warning, stacklevel=3)
    history = pd.read_csv(run_dir / phase / keys.HISTORY_FILE)
    return TrainResult(run_dir, phase, summary["stop_reason"], summary["epochs"], summary["best_epoch"],
                       summary["best_metric"], summary["best_value"], history, config, source,
                       list(summary.get("warnings", [])), summary)


def train_ae(name: str, *, split: str | SplitResult, labels: str | LabelResult, run: str | Path | None = None,
             preset: str | None = None, config_file: str | Path | None = None,
             overrides: list[str] | dict | None = None, max_epochs: int | None = None,
             batch_size: int | None = None, gene_knowledge: str | None = None, resume: bool = False,
             gpus: int = 1, device: str = "auto", data_dir: str | Path | None = None,
             verbose: bool = False) -> TrainResult:
    """`regina train-ae`: phase 1 (autoencoder and latent classifier) into `run`/ae/.

    Configuration as on the command line: the preset, then `config_file`, then `overrides`
    (`["ae.lr=1e-3"]` or `{"ae": {"lr": 1e-3}}`), then `max_epochs`, `batch_size`, `gene_knowledge`.
    """
    from regina_cli.engine.run_config import ConfigRequest, phase_flags, resolve_run_config
    from regina_cli.engine.train_ae import train_autoencoder

    run_dir = Path(run) if run is not None else Path(keys.DEFAULT_RUNS_DIR) / name
    flags = {**phase_flags("ae", max_epochs=max_epochs, batch_size=batch_size),
             **phase_flags("model", gene_knowledge=gene_knowledge)}
    request = ConfigRequest(preset=preset, config_file=config_file, overrides=overrides, flags=flags)
    config, source = resolve_run_config(keys.AE_DIR, run_dir, request, dataset=name, resume=resume,
                                        data_dir=data_dir)
    split_name = _split_of(split, name)
    summary = train_autoencoder(name, split=split_name, labels=_labels_of(labels, name, split_name, data_dir),
                                run_dir=run_dir, config=config, data_dir=data_dir, gpus=gpus, device=device,
                                resume=resume, progress=_progress(verbose))
    return _trained(summary, run_dir, keys.AE_DIR, config, source)


def train_gan(run: str | Path | TrainResult, *, config_file: str | Path | None = None,
              overrides: list[str] | dict | None = None, max_epochs: int | None = None,
              batch_size: int | None = None, resume: bool = False, gpus: int = 1, device: str = "auto",
              data_dir: str | Path | None = None, verbose: bool = False) -> TrainResult:
    """`regina train-gan`: phase 2 (the prompt-conditioned latent cycle-GAN) into `run`/gan/,
    starting from phase 1's configuration."""
    from regina_cli.engine.run_config import ConfigRequest, phase_flags, resolve_run_config
    from regina_cli.engine.train_gan import train_gan as train_phase2

    run_dir = _run_dir(run)
    request = ConfigRequest(config_file=config_file, overrides=overrides,
                            flags=phase_flags("gan", max_epochs=max_epochs, batch_size=batch_size))
    config, source = resolve_run_config(keys.GAN_DIR, run_dir, request, resume=resume)
    summary = train_phase2(run_dir, config=config, data_dir=data_dir, gpus=gpus, device=device, resume=resume,
                           progress=_progress(verbose))
    return _trained(summary, run_dir, keys.GAN_DIR, config, source)


def load_run(run: str | Path | TrainResult, *, device: str = "auto"):
    """A trained run's networks in eval mode (`TrainedRun`: autoencoder, gan, meta, config, device)."""
    from regina_cli.engine.trained import load_trained

    return load_trained(_run_dir(run), device=device)


# --- predict -------------------------------------------------------------------------------------
def predict(run: str | Path | TrainResult, conditions: str | Sequence[str] = "test", *, n_cells: int = 100,
            seed: int = 0, out: str | Path | None = None, with_controls: bool = True, clip: bool | None = None,
            sparsify: bool = False, device: str = "auto", data_dir: str | Path | None = None) -> AnnData:
    """`regina predict`: predicted cells for `conditions` ("test", "val", "all", "A+ctrl,A+B" or a
    list), written to `out` (default `<run>/predictions.h5ad`) and returned as AnnData.

    With `with_controls` the real control cells the predictions started from are appended under
    the dataset's control label, so `sc.tl.rank_genes_groups(pred, "condition", reference="ctrl")`
    runs on the result directly.
    """
    import anndata

    from regina_cli.engine.predict import run_prediction
    from regina_cli.engine.prediction_file import FileOptions

    options = FileOptions(with_controls=with_controls, clip=clip, sparsify=sparsify)
    chosen = conditions if isinstance(conditions, str) else list(conditions)
    result = run_prediction(_run_dir(run), chosen, n_cells=n_cells, seed=seed, out=out, device=device,
                            data_dir=data_dir, options=options)
    if result.skipped:
        warnings.warn(result.skipped_warning, stacklevel=2)
    return anndata.read_h5ad(result.path)


# --- evaluate ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvaluationResult:
    """Scores of one or more models and the baselines (what metrics.json and per_condition.csv hold)."""

    metrics: pd.DataFrame  # index (model, group): n_conditions and every metric's mean; group is
    #                        `overall` (the scored set), a subgroup, or `prompt_source:<source>`
    per_condition: pd.DataFrame  # one row per (condition, model), as per_condition.csv
    summary: dict  # metrics.json: context, results, comparison with the baselines, versions
    out: Path | None  # the folder written, None when nothing was kept

    @property
    def report(self) -> Path | None:
        """report.html, when plots were drawn and kept."""
        return self.out / self.summary["report"] if self.out is not None and "report" in self.summary else None


_SAFE_STEM = re.compile(r"[^A-Za-z0-9_.-]+")


def _named_profile(value) -> bool:
    """A mean profile indexed by gene names (not by position)."""
    import pandas as pd

    return isinstance(value, pd.Series) and not isinstance(value.index, pd.RangeIndex)


def _stage_predictions(items: list, names: list[str] | None, folder: Path, condition_key: str) -> list[Path]:
    """Prediction files for `items`: paths as given; AnnData, DataFrames and GEARS-style dicts
    written to `folder` in the format `regina evaluate` reads (h5ad, CSV, safe pickle)."""
    import pickle

    import numpy as np
    import pandas as pd
    from anndata import AnnData

    from regina_cli.io import write_h5ad

    paths = []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            paths.append(Path(item))
            continue
        default = "predictions" if len(items) == 1 else f"predictions_{i + 1}"
        stem = _SAFE_STEM.sub("_", names[i]) if names else default
        if names and names.count(names[i]) > 1:  # parts of one model: one file each
            stem += f"_part{i + 1}"
        if isinstance(item, AnnData):
            path = folder / f"{stem}.h5ad"
            write_h5ad(item, path)
        elif isinstance(item, dict) and any(_named_profile(v) for v in item.values()):
            path = folder / f"{stem}.csv"  # profiles that name their genes are matched by name, as a table's are
            frame = pd.DataFrame({str(k): pd.Series(v) for k, v in item.items()}).T
            frame.rename_axis(condition_key).reset_index().to_csv(path, index=False)
        elif isinstance(item, pd.DataFrame):
            path = folder / f"{stem}.csv"
            frame = item
            if condition_key not in item and (item.index.name in (condition_key, None)
                                              and not isinstance(item.index, pd.RangeIndex)):
                frame = item.rename_axis(condition_key).reset_index()  # conditions as the index, named or not
            frame.to_csv(path, index=False)
        elif isinstance(item, dict):
            path = folder / f"{stem}.pkl"
            path.write_bytes(pickle.dumps({str(k): np.asarray(v, dtype=np.float64) for k, v in item.items()}))
        else:
            raise ReginaError(f"predictions must be a path, an AnnData, a DataFrame or a dict condition -> mean "
                              f"profile, not {type(item).__name__}")
        paths.append(path)
    return paths


def _metrics_frame(results: dict) -> pd.DataFrame:
    """metrics.json `results` ({model: {group: {metric: mean}}}) as one row per (model, group)."""
    import pandas as pd

    from regina_cli.evaluate.report import BY_PROMPT_SOURCE

    rows = []
    for model, groups in results.items():
        for group, values in groups.items():
            nested = values.items() if group == BY_PROMPT_SOURCE else [(None, values)]
            for source, means in nested:
                name = group if source is None else f"{keys.OBS_PROMPT_SOURCE}:{source}"
                rows.append({"model": model, "group": name, **means})
    return pd.DataFrame(rows).set_index(["model", "group"])


def evaluate(name: str, predictions, *, model_name: str | Sequence[str] | None = None,
             split: str | SplitResult | None = None, on: str = "test", out: str | Path | None = None,
             baselines: str = "all", plots: bool = True, condition_key: str = keys.OBS_CONDITION,
             separator: str = keys.GENE_SEPARATOR, seed: int = 0, true_cells: int = 100, device: str = "auto",
             threads: int = 0, data_dir: str | Path | None = None) -> EvaluationResult:
    """`regina evaluate`: score predictions against dataset `name`'s held-out conditions and baselines.

    `predictions`: an AnnData (cells or one mean row per condition), a DataFrame (a `condition_key`
    column, one column per gene), a GEARS-style dict condition -> mean profile, a file path, or a
    list of these (one model each, named by `model_name`). `out`: where metrics.json,
    per_condition.csv, report.html and plots/ go; by default eval/ beside the first file, and
    nowhere (a temporary folder, no plots) when the first predictions are in memory.
    """
    import pandas as pd

    from regina_cli.evaluate.run import evaluate as evaluate_files, model_name_list

    items = list(predictions) if isinstance(predictions, (list, tuple)) else [predictions]
    names = model_name_list(model_name)
    with tempfile.TemporaryDirectory(prefix="in-memory-predictions-") as folder:
        paths = _stage_predictions(items, names if names and len(names) == len(items) else None, Path(folder),
                                   condition_key)
        keep = out is not None or isinstance(items[0], (str, Path))
        target = Path(out) if out is not None else None if keep else Path(folder) / keys.EVAL_DIR
        summary = evaluate_files(name, paths, split=_split_of(split, name), out=target, baselines=baselines,
                                 plots=plots and keep, condition_key=condition_key, separator=separator,
                                 model_name=names, on=on, data_dir=data_dir, seed=seed, device=device,
                                 max_true_cells=true_cells, threads=threads)
        written = Path(summary.pop("out"))
        if summary["n_genes_scored"] != summary["n_genes_dataset"]:  # the command line says so too
            warnings.warn(f"scored on the {summary['n_genes_scored']} of {summary['n_genes_dataset']} genes that "
                          "every prediction shares with the dataset", stacklevel=2)
        per_condition = pd.read_csv(written / keys.PER_CONDITION_FILE)
    return EvaluationResult(_metrics_frame(summary["results"]), per_condition, summary, written if keep else None)
