"""Cell-state labels for the latent classifier: `stress`, `cell-cycle`, or an obs column.

Gene scores follow scanpy's `score_genes` (Seurat's method): mean expression of the marker genes
minus that of reference genes drawn, bin by bin, among genes of similar average expression. The
reference draw depends on the cells it is computed on, so the score is *fitted* on the training
cells of a split (reference genes from their averages, and for `stress` the quantile threshold
from their scores) and then *applied* unchanged to every cell: validation and test cells never
influence their own labels (the original computed threshold and references per split).
Without a split, fitting on all cells gives exactly `sc.tl.score_genes` on the whole dataset;
`tests/test_label*.py` checks both against scanpy itself.

Labels fitted on a split go to their own file (`labels/stress@simulation_1.csv`), so two splits
never share one. The JSON record beside it is written last and holds the hashes of the dataset,
the split and the labels themselves; loading checks all three.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from regina_cli import keys
from regina_cli.checks import check_data_dir, check_share
from regina_cli.data.provenance import (dataset_sha256, file_sha256, refuse_replacing, text_sha256,
                                        unchanged_dataset_sha256)
from regina_cli.errors import ReginaError
from regina_cli.io import write_json, write_text

STRESS = "stress"
CELL_CYCLE = "cell-cycle"
OBS_PREFIX = "obs:"
METHODS_HELP = "stress, cell-cycle or obs:<column>"

STRESS_PREFIXES = ("HSP", "ATF", "DNAJ", "ERN", "EIF2", "CEBP")
STRESS_CLASSES = ("Homeostasis", "Stressed")
CELL_CYCLE_CLASSES = ("G1", "S", "G2M")
DEFAULT_QUANTILE = 0.7

# scanpy.tl.score_genes defaults: reference genes per expression bin, bins, and the seed of the draw.
SCORE_CTRL_SIZE = 50
SCORE_N_BINS = 25
SCORE_RANDOM_STATE = 0

S_GENES_FILE = "cell_cycle_s_genes.txt"
G2M_GENES_FILE = "cell_cycle_g2m_genes.txt"
# Tirosh symbols renamed by HGNC since 2016; used only when the old symbol is absent.
CURRENT_SYMBOLS = {"MLF1IP": "CENPU", "FAM64A": "PIMREG", "HN1": "JPT1"}


def cell_cycle_genes() -> tuple[list[str], list[str]]:
    """The shipped S and G2/M gene lists (Tirosh et al. 2016)."""

    def read(name: str) -> list[str]:
        text = resources.files("regina_cli").joinpath("resources", name).read_text()
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]

    return read(S_GENES_FILE), read(G2M_GENES_FILE)


def gene_names(adata) -> pd.Index:
    if keys.VAR_GENE_NAME in adata.var:
        return pd.Index(adata.var[keys.VAR_GENE_NAME].astype(str))
    return pd.Index(adata.var_names.astype(str))


def _column_means(x) -> np.ndarray:
    """Per-gene means in float64, computed as scanpy does (sum in float64, then divide)."""
    if sp.issparse(x):
        return np.asarray(x.sum(axis=0, dtype=np.float64)).ravel() / x.shape[0]
    return np.nanmean(np.asarray(x), axis=0, dtype=np.float64)


def _row_means(x, columns: np.ndarray) -> np.ndarray:
    sub = x[:, columns]
    if sp.issparse(sub):
        return np.asarray(sub.sum(axis=1, dtype=np.float64)).ravel() / len(columns)
    return np.nanmean(np.asarray(sub), axis=1, dtype=np.float64)


@dataclass(frozen=True)
class GeneScore:
    """A fitted gene-set score: column indices of the markers and of their reference genes."""

    markers: np.ndarray
    reference: np.ndarray

    @classmethod
    def fit(cls, x, markers: np.ndarray, *, ctrl_size: int = SCORE_CTRL_SIZE, n_bins: int = SCORE_N_BINS,
            random_state: int = SCORE_RANDOM_STATE) -> "GeneScore":
        """Draw reference genes exactly as `sc.tl.score_genes` does on the cells in `x`.

        Genes are ranked by mean expression and cut into bins; for each bin holding a marker,
        `ctrl_size` genes of that bin are sampled (the same legacy NumPy draws scanpy makes after
        `np.random.seed(random_state)`), and markers are removed from the references.
        """
        markers = np.unique(markers)
        means = _column_means(x)
        pool = np.flatnonzero(np.isfinite(means))
        n_items = int(np.round(len(pool) / (n_bins - 1)))
        if n_items == 0:
            raise ReginaError(f"gene scores need at least {n_bins // 2 + 1} genes with finite means")
        cut = np.full(len(means), np.nan)
        cut[pool] = pd.Series(means[pool]).rank(method="min").to_numpy() // n_items
        rng = np.random.RandomState(random_state)
        reference: set[int] = set()
        for value in np.unique(cut[markers]):
            in_bin = pool[cut[pool] == value]
            if ctrl_size < len(in_bin):
                in_bin = in_bin[rng.choice(len(in_bin), ctrl_size, replace=False)]
            reference.update(int(i) for i in np.setdiff1d(in_bin, markers))
        if not reference:
            raise ReginaError("no reference genes of matching expression for the markers: the dataset has too few genes")
        return cls(markers, np.array(sorted(reference), dtype=np.int64))

    def apply(self, x) -> np.ndarray:
        """Score of every cell in `x`: mean of the markers minus mean of the references."""
        return _row_means(x, self.markers) - _row_means(x, self.reference)


def _marker_columns(names: pd.Index, wanted: list[str]) -> np.ndarray:
    present = set(names)
    resolved = [g if g in present else CURRENT_SYMBOLS.get(g, g) for g in wanted]
    return np.flatnonzero(names.isin(resolved))


def stress_markers(names: pd.Index) -> np.ndarray:
    return np.flatnonzero(names.str.startswith(STRESS_PREFIXES))


@dataclass(frozen=True)
class Labels:
    """Labels for every cell, the class vocabulary, and how they were obtained."""

    cell_state: pd.Series
    classes: tuple[str, ...]
    details: dict


def stress_labels(adata, train: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> Labels:
    """`Stressed` above the `quantile` of the training cells' stress score, else `Homeostasis`."""
    check_share(quantile, "--quantile")
    names = gene_names(adata)
    markers = stress_markers(names)
    if len(markers) == 0:
        raise ReginaError(
            f"no stress marker gene (names starting with {', '.join(STRESS_PREFIXES)}) among the "
            f"{len(names)} genes: choose --method cell-cycle or obs:<column>"
        )
    score = GeneScore.fit(adata.X[train], markers)
    values = score.apply(adata.X)
    threshold = float(np.quantile(values[train], quantile))
    states = np.where(values > threshold, STRESS_CLASSES[1], STRESS_CLASSES[0])
    details = {
        "quantile": quantile,
        "threshold": threshold,
        "markers": sorted(names[markers]),
        "n_reference_genes": len(score.reference),
    }
    return Labels(pd.Series(states, index=adata.obs_names), STRESS_CLASSES, details)


def cell_cycle_labels(adata, train: np.ndarray) -> Labels:
    """G1/S/G2M by scanpy's rule on S and G2/M scores fitted on the training cells."""
    names = gene_names(adata)
    s_list, g2m_list = cell_cycle_genes()
    ctrl_size = min(len(s_list), len(g2m_list))  # as score_genes_cell_cycle
    scores, details = {}, {}
    for phase, wanted in (("S", s_list), ("G2M", g2m_list)):
        markers = _marker_columns(names, wanted)
        if len(markers) == 0:
            raise ReginaError(
                f"none of the {len(wanted)} {phase}-phase marker genes is among the dataset's genes: "
                "choose --method stress or obs:<column>"
            )
        score = GeneScore.fit(adata.X[train], markers, ctrl_size=ctrl_size)
        scores[phase] = score.apply(adata.X)
        details[f"{phase}_markers"] = sorted(names[markers])
        details[f"{phase}_n_reference_genes"] = len(score.reference)
    states = np.where(scores["G2M"] > scores["S"], "G2M", "S")
    states[(scores["S"] < 0) & (scores["G2M"] < 0)] = "G1"
    return Labels(pd.Series(states, index=adata.obs_names), CELL_CYCLE_CLASSES, details)


def obs_labels(adata, column: str) -> Labels:
    """Any existing categorical obs column, taken as is."""
    if column not in adata.obs:
        raise ReginaError(f"obs has no column {column!r}; columns: {', '.join(map(str, adata.obs.columns))}")
    values = adata.obs[column]
    if pd.api.types.is_float_dtype(values) or (
        pd.api.types.is_numeric_dtype(values) and not isinstance(values.dtype, pd.CategoricalDtype)
        and values.nunique() > 20
    ):
        raise ReginaError(f"obs column {column!r} is numeric, not categorical: choose a column of classes")
    if values.isna().any():
        raise ReginaError(f"obs column {column!r} has {int(values.isna().sum())} cells without a value")
    states = values.astype(str)
    return Labels(pd.Series(states.to_numpy(), index=adata.obs_names), tuple(sorted(states.unique())), {})


def obs_column_of(method: str) -> str | None:
    """The column of an `obs:<column>` method, None for a scoring method; unknown -> error."""
    if method in (STRESS, CELL_CYCLE):
        return None
    if method.startswith(OBS_PREFIX) and method[len(OBS_PREFIX):]:
        return method[len(OBS_PREFIX):]
    raise ReginaError(f"unknown label method {method!r}: choose {METHODS_HELP}")


def compute_labels(adata, method: str, *, train: np.ndarray | None = None,
                   quantile: float | None = None) -> Labels:
    """Labels for `method` (`stress`, `cell-cycle`, `obs:<column>`), fitted on `train` cells.

    `train`: boolean mask of the cells to fit on (all cells when None). Refuses a class that no
    training cell carries, since the classifier could never learn it.
    """
    column = obs_column_of(method)
    train = np.ones(adata.n_obs, dtype=bool) if train is None else np.asarray(train, dtype=bool)
    if not train.any():
        raise ReginaError("no training cell to fit the labels on: check the split matches the dataset")
    if quantile is not None and method != STRESS:
        raise ReginaError("--quantile applies to --method stress only")
    if method == STRESS:
        labels = stress_labels(adata, train, DEFAULT_QUANTILE if quantile is None else quantile)
    elif method == CELL_CYCLE:
        labels = cell_cycle_labels(adata, train)
    else:
        labels = obs_labels(adata, column)
        if len(labels.classes) < 2:
            raise ReginaError(f"{method} has a single class ({labels.classes[0]}): the classifier needs two or more")
    train_counts = labels.cell_state[train].value_counts()
    empty = [c for c in labels.classes if train_counts.get(c, 0) == 0]
    if empty:
        raise ReginaError(
            f"class {empty[0]!r} of {method} would be empty among the {int(train.sum())} training cells: "
            "the classifier could not learn it; choose another method or quantile"
        )
    return labels


@dataclass(frozen=True)
class LabelOutcome:
    path: Path
    labels: Labels
    fitted_on: str  # human-readable: which cells the labels were fitted on
    balance: list[dict]  # one row per class: cells overall and per split set
    warnings: tuple[str, ...] = ()


FEW_MARKERS = 3  # stress labels over fewer marker genes than this rest on one gene's noise


def label_warnings(labels: Labels) -> tuple[str, ...]:
    """What a user should know before training on `labels`: a stress score of one or two genes."""
    markers = labels.details.get("markers")
    if markers is not None and len(markers) < FEW_MARKERS:
        return (f"the stress score rests on {len(markers)} marker gene(s) ({', '.join(markers)}): the classes follow "
                "that gene's expression more than a stress state; consider --method cell-cycle or obs:<column>",)
    return ()


def _balance(labels: Labels, sets: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    n = len(labels.cell_state)
    for cls in labels.classes:
        is_cls = (labels.cell_state == cls).to_numpy()
        row = {"class": cls, "cells": int(is_cls.sum()), "share": round(float(is_cls.sum()) / n, 4)}
        row.update({s: int((is_cls & mask).sum()) for s, mask in sets.items()})
        rows.append(row)
    return rows


def label_dataset(name: str, method: str, *, quantile: float | None = None, split: str | None = None,
                  data_dir: str | Path | None = None, force: bool = False) -> LabelOutcome:
    """`regina label`: compute the labels and write `labels/<method>[@<split>].csv`, then its record.

    Replacing an existing labels file of other content needs `force` (runs built on it become stale).
    """
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.split import SETS, check_split_conditions, load_split

    check_data_dir(data_dir, writes=True)
    is_obs = obs_column_of(method) is not None  # checked before the (slow) read
    path = keys.labels_file(name, method, data_dir, split=split)
    split_obj = load_split(name, split, data_dir) if split is not None else None
    read_sha256 = dataset_sha256(name, data_dir)  # before the read: checked again before the record names it
    adata = read_dataset(name, data_dir, backed=is_obs)  # obs columns need no expression matrix
    try:
        condition = adata.obs[keys.OBS_CONDITION].astype(str).to_numpy()
        if split_obj is not None:
            check_split_conditions(split_obj, set(condition))
        sets = {s: np.isin(condition, getattr(split_obj, s)) for s in SETS} if split_obj else {}
        train = sets.get("train")
        labels = compute_labels(adata, method, train=train, quantile=quantile)
    finally:
        if adata.isbacked:
            adata.file.close()
    if split_obj is None:
        fitted_on = f"all {len(condition)} cells (no --split given)"
    else:
        fitted_on = f"the {int(train.sum())} training cells of split {split}"

    table = pd.DataFrame({"cell": labels.cell_state.index.astype(str), keys.OBS_CELL_STATE: labels.cell_state.to_numpy()})
    text = table.to_csv(index=False)
    if path.is_file() and not force and file_sha256(path) != text_sha256(text):
        refuse_replacing(path, "keep the labels you have")
    balance = _balance(labels, sets)
    record = {"dataset": name, "method": method, "split": split, "fitted_on": fitted_on,
              "classes": list(labels.classes), **labels.details, "balance": balance,
              keys.DATASET_SHA256: unchanged_dataset_sha256(name, data_dir, read_sha256, "labelling"),
              keys.LABELS_SHA256: text_sha256(text),
              keys.SPLIT_SHA256: split_obj.sha256() if split_obj else None}
    write_text(path, text)
    write_json(record_file(path), record)  # last: the mark of a complete labels file
    return LabelOutcome(path, labels, fitted_on, balance, label_warnings(labels))


def record_file(path: Path) -> Path:
    return path.with_suffix(keys.RECORD_SUFFIX)


def _record(path: Path) -> dict:
    try:
        record = json.loads(record_file(path).read_text())
    except (OSError, ValueError):
        return {}  # labels written by hand or by an older REGINA: nothing to check against
    return record if isinstance(record, dict) else {}


def labels_path(name: str, method: str, data_dir: str | Path | None = None, split: str | None = None) -> Path:
    """The labels file for training on `split`: the one fitted on it, else one fitted on all cells
    (`verify_labels` refuses either when its record names another split)."""
    own = keys.labels_file(name, method, data_dir, split=split)
    if own.is_file():
        return own
    shared = keys.labels_file(name, method, data_dir)
    if not shared.is_file():
        raise ReginaError(f"labels {method!r} of {name} not found at {own}: run "
                          f"`regina label {name} --method {method}{f' --split {split}' if split else ''}`")
    return shared


def verify_labels(path: Path, name: str, method: str, data_dir: str | Path | None = None,
                  split: str | None = None) -> str:
    """The labels file's SHA-256, after checking it against its record: its method (`obs:a/b` and
    `obs:a_b` share a file name), its own hash, the dataset's, and that it was fitted on `split` as
    it is now (name and hash) or on all cells: labels fitted on another split saw that split's
    training cells, which may be this one's test cells. A mismatch is a one-line error with the
    command that remakes it."""
    from regina_cli.data.split import load_split

    record, digest = _record(path), file_sha256(path)
    fitted = record.get("split")
    fix = f"run `regina label {name} --method {method}{f' --split {split}' if split else ''} --force`"
    if record.get("method") not in (None, method):
        raise ReginaError(f"{path} holds the labels of method {record['method']!r}, not {method!r} (their "
                          f"file names are the same): {fix}")
    if record.get(keys.LABELS_SHA256) not in (None, digest):
        raise ReginaError(f"{path} does not match its record {record_file(path).name} (an interrupted or "
                          f"hand-edited label file): {fix}")
    if fitted is not None and fitted != split:
        raise ReginaError(f"{path} was fitted on split {fitted}, not {split}: {fix}")
    if record.get(keys.DATASET_SHA256) not in (None, dataset_sha256(name, data_dir)):
        raise ReginaError(f"{path} was fitted on another version of dataset {name}: {fix}")
    if fitted and record.get(keys.SPLIT_SHA256) not in (None, load_split(name, fitted, data_dir).sha256()):
        raise ReginaError(f"split {fitted} changed after {path} was fitted on it: {fix}")
    return digest


def load_labels(name: str, method: str, data_dir: str | Path | None = None, split: str | None = None) -> pd.Series:
    """Labels written by `regina label` for training on `split`, verified (see `verify_labels`):
    a Series of class names indexed by obs_names."""
    path = labels_path(name, method, data_dir, split)
    verify_labels(path, name, method, data_dir, split)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns) != ["cell", keys.OBS_CELL_STATE]:
        raise ReginaError(f"{path} must have the columns cell,{keys.OBS_CELL_STATE}: run `regina label` again")
    return pd.Series(table[keys.OBS_CELL_STATE].to_numpy(), index=pd.Index(table["cell"], name="cell"),
                     name=keys.OBS_CELL_STATE)
