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

import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from regina_cli import keys
from regina_cli.errors import ReginaError, warnings_among
from regina_cli.global_state import leaves_global_state

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

    from regina_cli.config import ReginaConfig
    from regina_cli.data.split import Split


# The warn stack level of the user's line for a warning raised in a public function: its caller,
# past `leaves_global_state`'s wrapper.
_USER = 3


def _silent(_: str) -> None:
    """The log of a quiet call."""


def _log(verbose: bool):
    return print if verbose else _silent


def _progress(verbose: bool) -> str:
    return "plain" if verbose else "silent"


def _name_of(value, attribute: str, what: str) -> str:
    """A split or label method given as its name or as the result that made it (`what`: the
    argument, for the message). A path is neither: its file name is not the name."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike) or not hasattr(value, attribute):
        raise ReginaError(f"{what}= takes a name or a result of regina.{'split' if what == 'split' else 'label'} "
                          f"(with .{attribute}), not {value!r}")
    return getattr(value, attribute)


def _split_of(split, name: str, data_dir) -> str | None:
    """A split's name; a `SplitResult` of another dataset or data folder is refused (its name alone
    would pick this folder's split of that name, which is another split)."""
    found = _name_of(split, "name", "split")
    made_for = getattr(getattr(split, "split", None), "dataset", name)
    if made_for != name:
        raise ReginaError(f"split {found} was made for dataset {made_for!r}, not {name!r}: "
                          f"pass regina.split({name!r}, ...) or a split name")
    path = getattr(split, "path", None)
    if path is None:
        return found
    here = keys.split_file(name, found, data_dir)
    if Path(path).resolve() != here.resolve():
        raise ReginaError(f"split {found} was written to {path}, but this call reads {here}: pass "
                          f"data_dir={str(Path(path).resolve().parents[2])!r}, or the split's name for this folder's")
    return found


def _labels_of(labels, name: str, split: str | None, data_dir) -> str | None:
    """A label method; a `LabelResult` of another dataset, split or data folder is refused, for the
    same reason, and so are labels fitted on all cells where training would take those fitted on
    the split (`data.label.labels_path`)."""
    from regina_cli.data.label import labels_path

    method = _name_of(labels, "method", "labels")
    path = getattr(labels, "path", None)
    if path is None:
        return method
    path = Path(path).resolve()
    own, shared = (keys.labels_file(name, method, data_dir, split).resolve(),
                   keys.labels_file(name, method, data_dir).resolve())
    if path not in (own, shared):
        raise ReginaError(f"labels {path} are not {name}'s {method} labels for split {split}: pass "
                          f"regina.label({name!r}, {method!r}, split={split!r}) or the method's name")
    if path == shared and split is not None and labels_path(name, method, data_dir, split).resolve() == own:
        raise ReginaError(f"labels {path} were fitted on all cells, but training on split {split} takes the labels "
                          f"fitted on its training cells, {own}: pass labels={method!r} to train on those")
    return method


def _run_dir(run) -> Path:
    """A run given as a path, a `TrainResult` or a `TrainedRun` (both have `run_dir`)."""
    found = getattr(run, "run_dir", run)
    if not isinstance(found, (str, os.PathLike)):
        raise ReginaError(f"run= takes a run folder (a str or Path), a TrainResult or a TrainedRun, "
                          f"not {type(run).__name__}")
    return Path(found)


# --- fetch ---------------------------------------------------------------------------------------
def _unstorable(staged: AnnData, folder: Path) -> str | None:
    """The first obs or var column of `staged` that an h5ad file cannot hold (to name it)."""
    from anndata import AnnData

    for where in ("obs", "var"):
        frame = getattr(staged, where)
        for column in frame.columns:
            try:
                AnnData(**{where: frame[[column]]}).write_h5ad(folder / "probe.h5ad")
            except Exception:  # noqa: BLE001 - anndata and h5py raise many types
                return f"{where}[{column!r}]"
    return None


def _write_staged(staged: AnnData, path: Path, what: str) -> None:
    """Write `staged`, a new AnnData holding what REGINA reads of the user's `what`: writing runs
    anndata's strings_to_categoricals on the object written, which must not be the user's."""
    from regina_cli.io import write_h5ad

    try:
        write_h5ad(staged, path)
    except ReginaError:
        raise
    except Exception as exc:  # noqa: BLE001 - anndata and h5py raise many types
        culprit = _unstorable(staged, path.parent) or "its content"
        raise ReginaError(f"{what}: {culprit} cannot be stored in an h5ad file ({type(exc).__name__}: {exc}); an "
                          "h5ad column has a text name and holds text, numbers or categories: convert, rename or "
                          "drop it") from None


@contextmanager
def _staged_anndata(adata, data_dir):
    """What the importer reads of an in-memory AnnData (X, obs, var, GEARS' uns fields), as a
    temporary h5ad under the data folder."""
    from anndata import AnnData

    from regina_cli.data.dataset import GEARS_UNS
    from regina_cli.data.fetch import DOWNLOADS_DIR
    from regina_cli.data.importer import check_has_x, duplicate_genes_allowed

    if not isinstance(adata, AnnData):
        raise ReginaError(f"adata must be an AnnData, not {type(adata).__name__}; give a file as source=")
    check_has_x(adata)
    with duplicate_genes_allowed():
        staged = AnnData(X=adata.X, obs=adata.obs.copy(deep=False), var=adata.var.copy(deep=False),
                         uns={k: adata.uns[k] for k in GEARS_UNS if k in adata.uns})
    scratch = keys.data_root(data_dir) / DOWNLOADS_DIR
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="in-memory-anndata-", dir=scratch) as folder:
            path = Path(folder) / "in-memory.h5ad"
            _write_staged(staged, path, "adata")
            yield path
    finally:
        if not any(scratch.iterdir()):
            scratch.rmdir()


@leaves_global_state
def fetch(name: str, adata: AnnData | None = None, *, source: str | Path | None = None, force: bool = False,
          control: str | Sequence[str] | None = (), condition_key: str | None = None,
          cell_type_key: str | None = None, separator: str | None = None, n_top_genes: int | None = None,
          gene_list: str | Path | None = None, data_dir: str | Path | None = None, backed: bool = False,
          verbose: bool = False, **simulation: Any):
    """`regina fetch`: put dataset `name` in the data folder and return it as AnnData (GEARS layout).

    `adata` imports an in-memory AnnData exactly as `source` (`--from`) imports a file (it is left
    unchanged); the import options (`control`: one label or a list, ...) apply to either.
    `simulation` takes the demo's options: `n_cells`, `n_genes`, `n_singles`, `n_doubles`,
    `n_cell_types`, `control_fraction`, `drop_targets`, `seed`. `fetch("go")` fetches GEARS' GO
    annotation and returns its `GoResult` instead.
    """
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.fetch import GO, check_go_options, fetch as fetch_dataset, fetch_go
    from regina_cli.data.importer import ImportOptions

    options = ImportOptions(control=control, condition_key=condition_key, separator=separator,
                            cell_type_key=cell_type_key, n_top_genes=n_top_genes, gene_list=gene_list)
    log = _log(verbose)
    if name == GO:
        check_go_options(options, others=adata is not None or bool(simulation))
        return fetch_go(data_dir=data_dir, source=None if source is None else str(source), force=force, log=log,
                        progress=verbose)
    if adata is not None and source is not None:
        raise ReginaError("give either adata or source (--from), not both")
    kwargs = dict(data_dir=data_dir, force=force, options=options, demo=simulation, log=log, progress=verbose)
    if adata is not None:
        with _staged_anndata(adata, data_dir) as path:
            result = fetch_dataset(name, source=str(path), **kwargs)
    else:
        result = fetch_dataset(name, source=None if source is None else str(source), **kwargs)
    for warning in warnings_among(result.notes):
        warnings.warn(warning, stacklevel=_USER)
    if result.action == "already present" and (adata is not None or source is not None or simulation):
        warnings.warn(f"{name} is already present and was not fetched again, so the options given did not "
                      "apply: pass force=True to replace it", stacklevel=_USER)
    return read_dataset(name, data_dir, backed=backed)


# --- split and label -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitResult:
    """What `split` wrote: pass it (or its `name`) as `split=` to the later steps."""

    split: Split  # the condition lists: .train, .val, .test, .subgroups
    summary: pd.DataFrame  # per set and subgroup: conditions, cells, unmeasured, unpredictable
    path: Path  # data/<name>/splits/<split name>.json (absolute: a notebook may change folder)
    n_unassigned: int  # dataset conditions in no set (GEARS leaves some out in combo/single modes)
    warnings: list[str]

    @property
    def name(self) -> str:
        """`<mode>_<seed>`, e.g. simulation_1 (simulation_1_0.5 at train_gene_frac=0.5)."""
        return self.split.name

    def __repr__(self) -> str:
        """One line: the condition lists and the summary table are in their fields."""
        sets = ", ".join(f"{s}={len(getattr(self.split, s))}" for s in ("train", "val", "test"))
        return f"SplitResult(name={self.name!r}, {sets}, n_unassigned={self.n_unassigned}, path={str(self.path)!r})"


@leaves_global_state
def split(name: str, *, mode: str = "simulation", seed: int = 1, train_gene_frac: float = 0.75,
          split_file: str | Path | dict | None = None, gene_knowledge: str | None = None, force: bool = False,
          data_dir: str | Path | None = None) -> SplitResult:
    """`regina split`: train/val/test conditions, identical to cell-gears' for a mode and seed
    (`split_file`: your own, as a dict or a file)."""
    import pandas as pd

    from regina_cli.data.split import split_dataset

    outcome = split_dataset(name, mode=mode, seed=seed, train_gene_frac=train_gene_frac, split_file=split_file,
                            data_dir=data_dir, gene_knowledge=gene_knowledge, force=force)
    for warning in outcome.warnings:
        warnings.warn(warning, stacklevel=_USER)
    return SplitResult(outcome.split, pd.DataFrame(outcome.summary), Path(outcome.path).resolve(), outcome.n_unassigned,
                       list(outcome.warnings))


@dataclass(frozen=True)
class LabelResult:
    """What `label` wrote: pass it (or its `method`) as `labels=` to `train_ae`."""

    method: str
    labels: pd.Series = field(repr=False)  # cell name -> class, ready for adata.obs["cell_state"]
    balance: pd.DataFrame = field(repr=False)  # one row per class: cells, share, and cells per split set
    fitted_on: str  # which cells the labels were fitted on, in words
    details: dict = field(repr=False)  # how they were obtained (stress: threshold, quantile, markers)
    path: Path  # data/<name>/labels/<method>@<split>.csv (<method>.csv without a split; absolute)


@leaves_global_state
def label(name: str, method: str, *, split: str | SplitResult | None = None, quantile: float | None = None,
          force: bool = False, data_dir: str | Path | None = None) -> LabelResult:
    """`regina label`: one cell-state class per cell (`stress`, `cell-cycle` or `obs:<column>`),
    fitted on the training cells of `split`."""
    import pandas as pd

    from regina_cli.data.label import label_dataset

    outcome = label_dataset(name, method, quantile=quantile, split=_split_of(split, name, data_dir), data_dir=data_dir,
                            force=force)
    for warning in outcome.warnings:
        warnings.warn(warning, stacklevel=_USER)
    return LabelResult(method, outcome.labels.cell_state, pd.DataFrame(outcome.balance), outcome.fitted_on,
                       dict(outcome.labels.details), Path(outcome.path).resolve())


# --- training ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainResult:
    """A finished training phase: pass it as the run of `train_gan` and `predict`, which then read
    the data folder it was trained on."""

    run_dir: Path  # absolute, as data_dir
    phase: str  # "ae" or "gan"
    stop_reason: str
    epochs: int
    best_epoch: int  # the epoch whose weights model.pt holds
    best_metric: str
    best_value: float
    data_dir: Path  # the data folder it was trained on (absolute: a notebook may change folder)
    history: pd.DataFrame = field(repr=False)  # one row per epoch: training losses and validation scores
    config: ReginaConfig = field(repr=False)  # the configuration the phase ran with
    config_source: str = field(repr=False)  # where its base came from (preset, phase 1, a resumed run)
    warnings: list[str] = field(repr=False)
    summary: dict = field(repr=False)  # everything the engine reported (what `--json` prints)


def _trained(summary: dict, run_dir: Path, phase: str, config, source: str, data_dir) -> TrainResult:
    import pandas as pd

    for warning in summary.get("warnings", []):
        warnings.warn(warning, stacklevel=_USER + 1)
    history = pd.read_csv(run_dir / phase / keys.HISTORY_FILE)
    return TrainResult(run_dir.resolve(), phase, summary["stop_reason"], summary["epochs"], summary["best_epoch"],
                       summary["best_metric"], summary["best_value"], keys.data_root(data_dir).resolve(), history, config,
                       source, list(summary.get("warnings", [])), summary)


def _data_dir_of(run, data_dir):
    """`data_dir` as given, else the one a `TrainResult` was trained on (else None: the default)."""
    return data_dir if data_dir is not None else getattr(run, "data_dir", None)


@leaves_global_state
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
    from regina_cli.engine.run_config import resolve_training_config
    from regina_cli.engine.train_ae import train_autoencoder

    run_dir = _run_dir(run) if run is not None else Path(keys.DEFAULT_RUNS_DIR) / name
    config, source = resolve_training_config(
        keys.AE_DIR, run_dir, dataset=name, resume=resume, data_dir=data_dir, preset=preset, config_file=config_file,
        overrides=overrides, max_epochs=max_epochs, batch_size=batch_size, gene_knowledge=gene_knowledge)
    split_name = _split_of(split, name, data_dir)
    summary = train_autoencoder(name, split=split_name, labels=_labels_of(labels, name, split_name, data_dir),
                                run_dir=run_dir, config=config, data_dir=data_dir, gpus=gpus, device=device,
                                resume=resume, progress=_progress(verbose))
    return _trained(summary, run_dir, keys.AE_DIR, config, source, data_dir)


@leaves_global_state
def train_gan(run: str | Path | TrainResult, *, config_file: str | Path | None = None,
              overrides: list[str] | dict | None = None, max_epochs: int | None = None,
              batch_size: int | None = None, resume: bool = False, gpus: int = 1, device: str = "auto",
              data_dir: str | Path | None = None, verbose: bool = False) -> TrainResult:
    """`regina train-gan`: phase 2 (the prompt-conditioned latent cycle-GAN) into `run`/gan/,
    starting from phase 1's configuration."""
    from regina_cli.engine.run_config import resolve_training_config
    from regina_cli.engine.train_gan import train_gan as train_phase2

    run_dir, data_dir = _run_dir(run), _data_dir_of(run, data_dir)
    config, source = resolve_training_config(keys.GAN_DIR, run_dir, resume=resume, config_file=config_file,
                                             overrides=overrides, max_epochs=max_epochs, batch_size=batch_size)
    summary = train_phase2(run_dir, config=config, data_dir=data_dir, gpus=gpus, device=device, resume=resume,
                           progress=_progress(verbose))
    return _trained(summary, run_dir, keys.GAN_DIR, config, source, data_dir)


@leaves_global_state
def load_run(run: str | Path | TrainResult, *, device: str = "auto"):
    """A trained run's networks in eval mode (`TrainedRun`: autoencoder, gan, meta, config, device)."""
    from regina_cli.engine.trained import load_trained

    return load_trained(_run_dir(run).resolve(), device=device)


# --- predict -------------------------------------------------------------------------------------
@leaves_global_state
def predict(run: str | Path | TrainResult, conditions: str | Sequence[str] = "test", *, n_cells: int = 100,
            seed: int = 0, out: str | Path | None = None, with_controls: bool = True, clip: bool | None = None,
            sparsify: bool = False, device: str = "auto", allow_stale: bool = False,
            cell_types: str | Sequence[str] | None = None, data_dir: str | Path | None = None) -> AnnData:
    """`regina predict`: predicted cells for `conditions` ("test", "val", "all", "A+ctrl,A+B" or a
    list), written to `out` (default `<run>/predictions.h5ad`) and returned as AnnData.

    With `with_controls` real control cells (every training control of the predicted cell types,
    the mean the predictions were matched to) are appended under the dataset's control label, so `sc.tl.rank_genes_groups(pred, "condition", reference="ctrl")`
    runs on the result directly. `cell_types` ("K562,RPE1" or a list): predict only in those cell
    types (default: each condition's measured mix).
    """
    import anndata

    from regina_cli.engine.predict import run_prediction
    from regina_cli.engine.prediction_file import FileOptions

    options = FileOptions(with_controls=with_controls, clip=clip, sparsify=sparsify)
    result = run_prediction(_run_dir(run), conditions, n_cells=n_cells, seed=seed, out=out, device=device,
                            data_dir=_data_dir_of(run, data_dir), options=options, allow_stale=allow_stale,
                            cell_types=cell_types)
    for warning in result.all_warnings:
        warnings.warn(warning, stacklevel=_USER)
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

    def __repr__(self) -> str:
        """One line: the tables are in `metrics` and `per_condition` (a notebook cell would print
        the whole summary otherwise)."""
        s = self.summary
        models = [m["name"] for m in s["models"]]
        n_conditions = int(self.per_condition["condition"].nunique())
        return (f"EvaluationResult(dataset={s['dataset']!r}, split={s['split']!r}, on={s['on']!r}, models={models}, "
                f"baselines={s['baselines']}, n_conditions={n_conditions}, out={self.out!r})")


_SAFE_STEM = re.compile(r"[^A-Za-z0-9_.-]+")


def _named_profile(value) -> bool:
    """A mean profile indexed by gene names (not by position)."""
    import pandas as pd

    return isinstance(value, pd.Series) and not isinstance(value.index, pd.RangeIndex)


def _prediction_fields(adata: AnnData, condition_key: str, what: str) -> AnnData:
    """What `evaluate` reads of an AnnData of predictions, as a new AnnData (`_write_staged`): X,
    the condition column, var names and REGINA's own fields."""
    from anndata import AnnData

    from regina_cli.evaluate.readers import missing_condition_column

    if condition_key not in adata.obs:
        raise missing_condition_column(what, condition_key, adata.obs.columns, in_obs=True)
    columns = list(dict.fromkeys(c for c in (condition_key, keys.OBS_CONTROL_CELL, keys.OBS_PROMPT_SOURCE)
                                 if c in adata.obs))
    genes = [keys.VAR_GENE_NAME] if keys.VAR_GENE_NAME in adata.var else []
    varm = {k: adata.varm[k] for k in [keys.VARM_RECONSTRUCTION] if k in adata.varm}
    uns = {k: adata.uns[k] for k in [keys.UNS_REGINA] if k in adata.uns}
    return AnnData(X=adata.X, obs=adata.obs[columns].copy(), var=adata.var[genes].copy(), varm=varm, uns=uns)


def _stage_predictions(items: list, names: list[str] | None, folder: Path,
                       condition_key: str) -> tuple[list[Path], dict[Path, str]]:
    """Prediction files for `items`: paths as given; AnnData, DataFrames and GEARS-style dicts
    written to `folder` in the format `regina evaluate` reads (h5ad, CSV, safe pickle). Also what
    to call each written file in messages: the argument passed (`predictions[1] (a dict)`)."""
    import pickle

    import numpy as np
    import pandas as pd
    from anndata import AnnData

    paths, called = [], {}
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            paths.append(Path(item))
            continue
        if not isinstance(item, (AnnData, pd.DataFrame, dict)):
            raise ReginaError(f"predictions must be a path, an AnnData, a DataFrame or a dict condition -> mean "
                              f"profile, not {type(item).__name__}")
        default = "predictions" if len(items) == 1 else f"predictions_{i + 1}"
        stem = _SAFE_STEM.sub("_", names[i]) if names else default
        if names and names.count(names[i]) > 1:  # parts of one model: one file each
            stem += f"_part{i + 1}"
        kind = ("an AnnData" if isinstance(item, AnnData) else "a DataFrame" if isinstance(item, pd.DataFrame)
                else "a dict")
        what = f"{'predictions' if len(items) == 1 else f'predictions[{i}]'} ({kind})"
        if isinstance(item, AnnData):
            path = folder / f"{stem}.h5ad"
            _write_staged(_prediction_fields(item, condition_key, what), path, what)
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
        else:
            path = folder / f"{stem}.pkl"
            path.write_bytes(pickle.dumps({str(k): np.asarray(v, dtype=np.float64) for k, v in item.items()}))
        paths.append(path)
        called[path] = what
    return paths, called


def _called(text: str, called: dict[Path, str]) -> str:
    """`text` (a message) naming in-memory predictions as passed, not by their staged file (deleted
    by the time the user reads it)."""
    for path, what in called.items():
        text = text.replace(str(path), what)
    return text


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


@leaves_global_state
def evaluate(name: str, predictions, *, model_name: str | Sequence[str] | None = None,
             split: str | SplitResult | None = None, on: str = "test", out: str | Path | None = None,
             baselines: str | Sequence[str] = "all", plots: bool = True, condition_key: str = keys.OBS_CONDITION,
             separator: str = keys.GENE_SEPARATOR, seed: int = 0, true_cells: int = 100, device: str = "auto",
             threads: int = 0, allow_stale: bool = False, baseline_cell_types: str = "matched",
             data_dir: str | Path | None = None) -> EvaluationResult:
    """`regina evaluate`: score predictions against dataset `name`'s held-out conditions and baselines.

    `predictions`: an AnnData (cells or one mean row per condition), a DataFrame (a `condition_key`
    column, one column per gene), a GEARS-style dict condition -> mean profile, a file path, or a
    list of these (one model each, named by `model_name`). `out`: where metrics.json,
    per_condition.csv, report.html and plots/ go; by default eval/ beside the first file, and
    nowhere (a temporary folder, no plots) when the first predictions are in memory.
    """
    import pandas as pd

    from regina_cli.evaluate.report import genes_scored_notice
    from regina_cli.evaluate.run import evaluate as evaluate_files, model_name_list

    items = list(predictions) if isinstance(predictions, (list, tuple)) else [predictions]
    if not items:
        raise ReginaError("predictions is an empty list: give at least one model's predictions")
    names = model_name_list(model_name)
    with tempfile.TemporaryDirectory(prefix="in-memory-predictions-") as folder:
        paths, called = _stage_predictions(items, names if names and len(names) == len(items) else None,
                                           Path(folder), condition_key)
        keep = out is not None or isinstance(items[0], (str, Path))
        target = Path(out) if out is not None else None if keep else Path(folder) / keys.EVAL_DIR
        found = []
        try:
            summary = evaluate_files(name, paths, split=_split_of(split, name, data_dir), out=target,
                                     baselines=baselines, plots=plots and keep, condition_key=condition_key,
                                     separator=separator, model_name=names, on=on, data_dir=data_dir, seed=seed,
                                     device=device, max_true_cells=true_cells, threads=threads,
                                     allow_stale=allow_stale, baseline_cell_types=baseline_cell_types,
                                     warn=found.append)
        except ReginaError as exc:
            exc.args = (_called(str(exc), called),)
            raise
        finally:  # a warning found before an error explains it (a stale file, say)
            for warning in found:
                warnings.warn(_called(warning, called), stacklevel=_USER)
        written = Path(summary.pop("out"))
        if notice := genes_scored_notice(summary):  # the command line says so too
            warnings.warn(notice, stacklevel=_USER)
        per_condition = pd.read_csv(written / keys.PER_CONDITION_FILE)
    return EvaluationResult(_metrics_frame(summary["results"]), per_condition, summary,
                            written.resolve() if keep else None)
