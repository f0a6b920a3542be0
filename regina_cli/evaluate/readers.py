"""Read another tool's predictions, whatever its file format, into one in-memory form.

.h5ad (cells or one mean row per condition), .csv/.tsv (a condition column plus one numeric column
per gene) and GEARS-style pickles (a dict condition -> mean profile over the dataset's genes, in
the dataset's gene order) read with a restricted unpickler that refuses anything able to run code.
Labels are turned into REGINA's spelling here (`--separator _`: "A_B" -> "A+B").
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from regina_cli import keys
from regina_cli.checks import check_input_file
from regina_cli.data.conditions import control_labels
from regina_cli.errors import ReginaError

TABLE_SEPARATORS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip")  # a table may be compressed (pandas reads them)
PICKLE_SUFFIXES = (".pkl", ".pickle")
H5AD_SUFFIXES = (".h5ad", ".h5")
SUPPORTED = ".h5ad, .csv or .tsv (also compressed: .csv.gz, ...), .txt (tab-separated) or a .pkl GEARS-style dict"


@dataclass
class RawPredictions:
    path: Path
    x: np.ndarray  # [n, g] float32
    gene_names: list[list[str]]  # candidate namings of the columns (var_names, var gene_name); pickles: none
    labels: np.ndarray  # [n] condition labels, REGINA spelling
    obs: pd.DataFrame  # optional per-row columns (control_cell, prompt_source), index reset
    reconstruction: pd.DataFrame | None = None  # genes (positional, like x's columns) x labels
    provenance: dict = field(default_factory=dict)


def normalise_labels(labels, separator: str) -> np.ndarray:
    """Labels in REGINA's spelling: another tool's control label (`control`, `non-targeting`, ...,
    as `regina fetch` reads them) is `ctrl`, and `--separator` joins combinations with `+`."""
    controls = control_labels()
    missing = pd.isna(pd.Series(labels, dtype=object)).to_numpy()
    if missing.any():
        raise ReginaError(f"{int(missing.sum())} prediction row(s) have no condition label (the first is row "
                          f"{int(np.flatnonzero(missing)[0]) + 1}); label every row")
    labels = [str(v).strip() for v in labels]
    labels = np.asarray([keys.CTRL if v.lower() in controls else v for v in labels], dtype=object)
    if separator and separator != keys.GENE_SEPARATOR:
        labels = np.array([v.replace(separator, keys.GENE_SEPARATOR) for v in labels], dtype=object)
    return labels


def _check_finite(x: np.ndarray, path: Path, row_names) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.flatnonzero(bad.any(1))[0])
        raise ReginaError(f"{path} contains {int(bad.sum())} NaN or infinite values (first in row "
                          f"'{row_names[row]}'); fix the predictions before evaluating")


SHOWN_COLUMNS = 8  # a gene table has thousands of columns: the error line names the first few


def missing_condition_column(source, key: str, columns, *, in_obs: bool) -> ReginaError:
    """`source` (a file, or what a Python caller passed) has no condition column `key`."""
    names = [str(c) if len(str(c)) <= 40 else f"{str(c)[:40]}..." for c in columns]  # one long name: a wrong separator
    shown = ", ".join(names[:SHOWN_COLUMNS]) + (f", ... ({len(names):,} in all)" if len(names) > SHOWN_COLUMNS else "")
    return ReginaError(f"{source} has no {'obs ' if in_obs else ''}column '{key}' "
                       f"(columns: {shown or 'none'}); pass --condition-key")


def _read_h5ad(path: Path, condition_key: str, separator: str) -> RawPredictions:
    import anndata

    try:
        pred = anndata.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means "not an h5ad"
        raise ReginaError(f"cannot read {path} as an .h5ad file ({type(exc).__name__}: {exc})") from None
    if condition_key not in pred.obs:
        raise missing_condition_column(path, condition_key, pred.obs.columns, in_obs=True)
    if pred.X is None:
        raise ReginaError(f"{path} has no X (layers: {', '.join(pred.layers) or 'none'}); write the predicted "
                          "values to X")
    x = pred.X.toarray() if sp.issparse(pred.X) else np.asarray(pred.X)
    x = np.asarray(x, dtype=np.float32)
    _check_finite(x, path, pred.obs_names)
    names = [list(map(str, pred.var_names))]
    if keys.VAR_GENE_NAME in pred.var:
        names.append(list(map(str, pred.var[keys.VAR_GENE_NAME])))
    recon = pred.varm[keys.VARM_RECONSTRUCTION] if keys.VARM_RECONSTRUCTION in pred.varm else None
    if recon is not None:
        if not isinstance(recon, pd.DataFrame):
            raise ReginaError(f"{path}: varm['{keys.VARM_RECONSTRUCTION}'] must be a DataFrame with one column "
                              "per condition (genes x conditions)")
        recon = recon.copy()
        recon.columns = normalise_labels(recon.columns, separator)
        recon.index = range(len(recon))
    extra = [k for k in (keys.OBS_CONTROL_CELL, keys.OBS_PROMPT_SOURCE) if k in pred.obs]
    return RawPredictions(path, x, names, normalise_labels(pred.obs[condition_key], separator),
                          pred.obs[extra].astype(str).reset_index(drop=True), recon,
                          dict(pred.uns.get(keys.UNS_REGINA, {})))


def _read_table(path: Path, condition_key: str, separator: str) -> RawPredictions:
    try:
        frame = pd.read_csv(path, sep=TABLE_SEPARATORS[_table_suffix(path)])
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ReginaError(f"cannot read {path} as a table ({exc})") from None
    if condition_key not in frame:
        error = missing_condition_column(path, condition_key, frame.columns, in_obs=False)
        if len(frame.columns) == 1:  # one column: the separator is not this file's
            error = ReginaError(f"{error} (read as {'comma' if _table_suffix(path) == '.csv' else 'tab'}-separated, "
                                "which gave one column: name a comma-separated file .csv, a tab-separated one .tsv)")
        raise error
    for column in frame.columns.drop(condition_key):
        if not pd.api.types.is_numeric_dtype(frame[column]):
            numbers = pd.to_numeric(frame[column], errors="coerce")
            if numbers.notna().any():  # some numbers: a gene column with a typo, not a label column
                row = int(np.flatnonzero(numbers.isna() & frame[column].notna())[0])
                raise ReginaError(f"{path}: column '{column}' holds numbers and text ({frame[column].iloc[row]!r} in "
                                  f"data row {row + 1}); a gene column must be all numbers")
    genes = [c for c in frame.columns if c != condition_key and pd.api.types.is_numeric_dtype(frame[c])]
    if not genes:
        raise ReginaError(f"{path} has no numeric gene columns beside '{condition_key}'")
    x = frame[genes].to_numpy(np.float32)
    _check_finite(x, path, frame.index.astype(str))
    extra = [k for k in (keys.OBS_CONTROL_CELL, keys.OBS_PROMPT_SOURCE) if k in frame and k not in genes]
    return RawPredictions(path, x, [list(map(str, genes))], normalise_labels(frame[condition_key], separator),
                          frame[extra].astype(str).reset_index(drop=True))


def _read_pickle(path: Path, separator: str) -> RawPredictions:
    from regina_cli.data.safe_pickle import safe_loads

    try:
        obj = safe_loads(path.read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as exc:
        raise ReginaError(f"cannot read {path} as a GEARS-style pickle ({exc})") from None
    if not isinstance(obj, dict) or not obj:
        raise ReginaError(f"{path} must hold a dict condition -> mean profile (as GEARS' predict returns)")
    rows = [np.asarray(value, dtype=np.float64).ravel() for value in obj.values()]
    if len({r.size for r in rows}) != 1:
        raise ReginaError(f"{path}: the mean profiles have different lengths; a GEARS-style pickle holds one mean "
                          "per dataset gene, in the dataset's gene order")
    x = np.stack(rows).astype(np.float32)
    labels = list(map(str, obj))
    _check_finite(x, path, labels)
    return RawPredictions(path, x, [], normalise_labels(labels, separator), pd.DataFrame(index=range(len(labels))))


def name_columns(raw: RawPredictions, dataset_genes: list[str]) -> RawPredictions:
    """A pickle's columns are the dataset's genes, in order: check the count and name them."""
    if not raw.gene_names:
        if raw.x.shape[1] != len(dataset_genes):
            raise ReginaError(f"{raw.path} holds {raw.x.shape[1]} values per condition, the dataset has "
                              f"{len(dataset_genes)} genes; a GEARS-style pickle holds one mean per dataset gene, "
                              "in the dataset's gene order")
        raw.gene_names = [list(dataset_genes)]
    return raw


def with_dataset_ids(raw: RawPredictions, adata) -> RawPredictions:
    """Also name the file's columns through the dataset's var['gene_id'], the file's own IDs
    (Ensembl, ...) that `fetch --from` replaced by symbols, so predictions named by those IDs score."""
    from regina_cli.data.importer import VAR_ORIGINAL_ID

    if VAR_ORIGINAL_ID not in adata.var:
        return raw
    symbol = dict(zip(adata.var[VAR_ORIGINAL_ID].astype(str), adata.var_names.astype(str)))
    raw.gene_names = raw.gene_names + [[symbol.get(n, n) for n in names] for names in raw.gene_names
                                       if any(n in symbol for n in names)]
    return raw


# What makes prediction files parts of one prediction: the same run, inputs and drawing rule.
PART_IDENTITY = ("run", "ae_model_sha256", "config_sha256", "dataset_sha256", "split_sha256", "seed", "clip",
                 "sparsify", "cells_per_condition", "cell_types")


def merge_parts(name: str, parts: list[RawPredictions]) -> RawPredictions:
    """One model's predictions from files that each hold some of its conditions (a job array's
    parts, `--model-name` given once per file with the same name). Each part of `regina predict`
    carries the control cells it drew from: a control cell in several parts counts once, or the
    predicted controls (and the DE metrics measured from them) would weigh it twice."""
    first = parts[0]
    for part in parts[1:]:
        if part.gene_names != first.gene_names or part.x.shape[1] != first.x.shape[1]:
            raise ReginaError(f"the parts of {name} ({first.path}, {part.path}) hold different genes: "
                              "predict every part from the same run")
        differs = [k for k in PART_IDENTITY if part.provenance.get(k) != first.provenance.get(k)]
        if differs:
            raise ReginaError(f"the parts of {name} ({first.path}, {part.path}) come from different predictions "
                              f"({', '.join(differs)} differ): score them as two models, with two --model-name")
    seen: dict[str, Path] = {}
    for part in parts:
        for label in sorted(set(part.labels) - {keys.CTRL}):
            if label in seen:
                raise ReginaError(f"{name}: condition {label} is in two parts ({seen[label]} and {part.path}); "
                                  "give each condition to one part")
            seen[label] = part.path
    obs = pd.concat([part.obs for part in parts], ignore_index=True)
    labels = np.concatenate([part.labels for part in parts])
    keep = np.ones(len(labels), dtype=bool)
    if keys.OBS_CONTROL_CELL in obs:
        control = labels == keys.CTRL
        keep[control] = ~obs[keys.OBS_CONTROL_CELL][control].duplicated().to_numpy()
    recons = [part.reconstruction for part in parts]
    reconstruction = None
    if all(r is not None for r in recons):
        joined = pd.concat(recons, axis=1)
        reconstruction = joined.loc[:, ~joined.columns.duplicated()]
    provenance = {**first.provenance, "parts": len(parts)}
    if "n_predicted_cells" in provenance:
        provenance["n_predicted_cells"] = sum(int(part.provenance.get("n_predicted_cells", 0)) for part in parts)
    return RawPredictions(Path(" + ".join(str(part.path) for part in parts)),
                          np.concatenate([part.x for part in parts])[keep], first.gene_names, labels[keep],
                          obs[keep].reset_index(drop=True), reconstruction, provenance)


def _table_suffix(path: Path) -> str:
    """`.csv` of data.csv and data.csv.gz (the table's own suffix under a compression suffix)."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def read_predictions(path: str | Path, *, condition_key: str, separator: str) -> RawPredictions:
    """Any supported prediction file, with at least one row (pickles: see name_columns)."""
    path = Path(path)
    check_input_file(path, "prediction file", "not found; run `regina predict` or pass --predictions FILE")
    suffix = path.suffix.lower()
    if _table_suffix(path) in TABLE_SEPARATORS:
        raw = _read_table(path, condition_key, separator)
    elif suffix in PICKLE_SUFFIXES:
        raw = _read_pickle(path, separator)
    elif suffix in H5AD_SUFFIXES:
        raw = _read_h5ad(path, condition_key, separator)
    else:
        raise ReginaError(f"{path}: unsupported file type '{''.join(path.suffixes[-2:]) or path.name}'; give {SUPPORTED}")
    if len(raw.labels) == 0:
        raise ReginaError(f"{path} holds no predictions")
    return raw
