"""Read a prediction file from REGINA or another tool and line it up with the truth.

Two forms are accepted: predicted cells (many rows per condition, as `regina predict` writes) and
one mean profile per condition (the form GEARS's `predict` returns). Genes are matched by name,
so another gene order is fine; a missing gene or a NaN is an error, never a silent zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from regina_cli import keys
from regina_cli.data.conditions import is_control
from regina_cli.errors import ReginaError
from regina_cli.evaluate.truth import Truth

CELLS = "cells"
MEANS = "means"


@dataclass
class Predictions:
    form: str  # CELLS or MEANS
    conditions: list[str]  # dataset spelling, sorted
    means: np.ndarray  # [C, G] float64, truth gene order
    cells: list[np.ndarray]  # per condition [n, G] float32 (the single mean row for MEANS)
    control_cells: list[np.ndarray | None]  # obs `control_cell` per condition, when given
    skipped: list[str] = field(default_factory=list)  # conditions absent from the truth
    n_control_rows: int = 0  # prediction rows labelled as control, ignored
    provenance: dict = field(default_factory=dict)  # uns['regina'] written by `regina predict`


def _gene_columns(pred, truth: Truth, path: Path) -> np.ndarray:
    """Column of each truth gene in the prediction matrix; error listing missing genes."""
    candidates = [list(map(str, pred.var_names))]
    if keys.VAR_GENE_NAME in pred.var:
        candidates.append(list(map(str, pred.var[keys.VAR_GENE_NAME])))
    best_missing = None
    for names in candidates:
        position = {g: i for i, g in enumerate(names)}
        if len(position) != len(names):
            raise ReginaError(f"{path} has duplicate gene names; make var_names unique")
        missing = [g for g in truth.genes if g not in position]
        if not missing:
            return np.array([position[g] for g in truth.genes], dtype=np.int64)
        if best_missing is None or len(missing) < len(best_missing):
            best_missing = missing
    shown = ", ".join(best_missing[:5]) + (" ..." if len(best_missing) > 5 else "")
    raise ReginaError(
        f"{path} lacks {len(best_missing)} of the dataset's {len(truth.genes)} genes ({shown}); "
        "predict every measured gene (var_names must be gene names)"
    )


def load_predictions(path: str | Path, truth: Truth, *, condition_key: str = keys.OBS_CONDITION) -> Predictions:
    import anndata

    path = Path(path)
    if not path.is_file():
        raise ReginaError(f"prediction file {path} not found; run `regina predict` or pass --predictions FILE")
    try:
        pred = anndata.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means "not an h5ad"
        raise ReginaError(f"cannot read {path} as an .h5ad file ({type(exc).__name__}: {exc})") from None
    if condition_key not in pred.obs:
        raise ReginaError(
            f"{path} has no obs column '{condition_key}' (columns: {', '.join(map(str, pred.obs.columns)) or 'none'}); "
            "pass --condition-key"
        )
    if pred.n_obs == 0:
        raise ReginaError(f"{path} holds no predictions")
    columns = _gene_columns(pred, truth, path)
    x = pred.X.toarray() if sp.issparse(pred.X) else np.asarray(pred.X)
    x = np.ascontiguousarray(x[:, columns], dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.flatnonzero(bad.any(1))[0])
        raise ReginaError(
            f"{path} contains {int(bad.sum())} NaN or infinite values (first in row '{pred.obs_names[row]}'); "
            "fix the predictions before evaluating"
        )

    labels = pred.obs[condition_key].astype(str).to_numpy()
    control_cell = pred.obs[keys.OBS_CONTROL_CELL].astype(str).to_numpy() if keys.OBS_CONTROL_CELL in pred.obs else None
    names, counts = np.unique(labels, return_counts=True)
    control = np.array([is_control(n) for n in names], dtype=bool)
    perturbed = list(names[~control])
    # One row per condition is GEARS's output form; a single predicted cell cannot be told apart.
    form = MEANS if (counts[~control] == 1).all() else CELLS

    grouped: dict[str, np.ndarray] = {}
    skipped = []
    for label in perturbed:
        condition = truth.resolve(label)
        if condition is None:
            skipped.append(label)
        elif condition in grouped:
            raise ReginaError(f"{path} names condition {condition} twice (as '{label}' too); keep one spelling")
        else:
            grouped[condition] = np.flatnonzero(labels == label)
    if not grouped:
        raise ReginaError(f"none of the {len(perturbed)} predicted conditions is in the dataset; wrong dataset or --condition-key?")

    conditions = sorted(grouped)
    cells = [x[grouped[c]] for c in conditions]
    return Predictions(
        form=form,
        conditions=conditions,
        means=np.stack([c.astype(np.float64).mean(0) for c in cells]),
        cells=cells,
        control_cells=[None if control_cell is None else control_cell[grouped[c]] for c in conditions],
        skipped=sorted(skipped),
        n_control_rows=int(counts[control].sum()),
        provenance=dict(pred.uns.get(keys.UNS_REGINA, {})),
    )
