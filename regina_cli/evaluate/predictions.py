"""Line prediction files up with the truth: shared genes, dataset spelling of conditions, forms.

Two forms are accepted: predicted cells (many rows per condition, as `regina predict` writes) and
one mean profile per condition (the form GEARS's `predict` returns). Genes are matched by name, so
another gene order is fine; files predicting a subset of the genes are scored on the genes every
file shares with the dataset. Rows labelled as the control are not scored: they are the file's
predicted control cells, the reference of the cell-eval metrics (predicted change = predicted
cells - predicted controls).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from regina_cli.data.conditions import is_control
from regina_cli.errors import ReginaError
from regina_cli.evaluate.readers import RawPredictions
from regina_cli.evaluate.truth import Truth

CELLS = "cells"
MEANS = "means"


@dataclass
class Predictions:
    name: str  # model name in every table, file and plot
    form: str  # CELLS or MEANS
    conditions: list[str]  # dataset spelling, sorted
    means: np.ndarray  # [C, G] float64, truth gene order
    cells: list[np.ndarray]  # per condition [n, G] float32 (the single mean row for MEANS)
    control_cells: list[np.ndarray | None]  # obs `control_cell` per condition, when given
    predicted_controls: np.ndarray | None = None  # [n, G] rows labelled as control
    prompt_source: dict[str, str] = field(default_factory=dict)  # condition -> measured/learned/...
    reconstruction: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> profile
    skipped: list[str] = field(default_factory=list)  # conditions absent from the truth
    scale_warning: str = ""  # why the values look off the dataset's log1p scale ('' when they do not)
    path: str = ""
    provenance: dict = field(default_factory=dict)  # uns['regina'] written by `regina predict`

    @property
    def n_control_rows(self) -> int:
        return 0 if self.predicted_controls is None else len(self.predicted_controls)


def gene_naming(raw: RawPredictions, dataset_genes: list[str]) -> list[str]:
    """The candidate naming of the file's columns that shares most genes with the dataset."""
    known = set(dataset_genes)
    best = max(raw.gene_names, key=lambda names: len(known.intersection(names)))
    if len(set(best)) != len(best):
        raise ReginaError(f"{raw.path} has duplicate gene names; make the gene names unique")
    if not known.intersection(best):
        raise ReginaError(f"{raw.path} shares no gene with the dataset (first columns: {', '.join(best[:3])}); "
                          "gene names must be the dataset's var_names")
    return best


def shared_genes(raws: list[RawPredictions], dataset_genes: list[str]) -> list[str]:
    """Dataset genes (in dataset order) that every prediction file predicts."""
    common = set(dataset_genes)
    for raw in raws:
        common &= set(gene_naming(raw, dataset_genes))
    genes = [g for g in dataset_genes if g in common]
    if len(genes) < 2:
        raise ReginaError(f"the prediction files share only {len(genes)} gene(s) with the dataset; nothing to score")
    return genes


def _most_common(values) -> str:
    return Counter(values).most_common(1)[0][0]


WHOLE_NUMBER_SAMPLE = 1_000_000  # values checked for being whole numbers


def off_scale(x: np.ndarray) -> str:
    """Why predicted values `x` cannot be on the dataset's scale (log1p of depth-normalised counts,
    which `regina fetch` makes), or '': counts or unlogged values from another tool would be scored
    without a word, and score near 0."""
    from regina_cli.data.importer import LOG_MAX, looks_like_counts

    top = float(x.max()) if x.size else 0.0
    if top > LOG_MAX:
        return f"values up to {top:,.1f}, where log1p of normalised counts stays below {LOG_MAX:g}"
    if looks_like_counts(x.ravel()[:: max(1, x.size // WHOLE_NUMBER_SAMPLE)]):
        return "every value is a whole number (raw counts?)"
    return ""


def align(raw: RawPredictions, truth: Truth, name: str) -> Predictions:
    """Predictions of one file on the truth's genes and condition spelling."""
    position = {g: i for i, g in enumerate(gene_naming(raw, truth.dataset_genes))}
    columns = np.array([position[g] for g in truth.genes], dtype=np.int64)
    same_order = len(columns) == raw.x.shape[1] and (columns == np.arange(len(columns))).all()
    x = raw.x if same_order else np.ascontiguousarray(raw.x[:, columns])
    labels = raw.labels
    rows_of = pd.Series(np.arange(len(labels))).groupby(labels).indices
    names = np.array(sorted(rows_of), dtype=object)
    counts = np.array([len(rows_of[n]) for n in names])
    control = np.array([is_control(n) for n in names], dtype=bool)
    perturbed = list(names[~control])
    if not perturbed:
        raise ReginaError(f"{raw.path} holds only control rows; nothing to score")
    # One row per condition is GEARS's output form; a single predicted cell cannot be told apart.
    form = MEANS if (counts[~control] == 1).all() else CELLS

    grouped: dict[str, np.ndarray] = {}
    spelled: dict[str, str] = {}
    skipped = []
    for label in perturbed:
        condition = truth.resolve(label)
        if condition is None:
            skipped.append(label)
        elif condition in grouped:
            raise ReginaError(f"{raw.path} names condition {condition} twice (as '{spelled[condition]}' and "
                              f"'{label}'); keep one spelling")
        else:
            grouped[condition], spelled[condition] = rows_of[label], label
    if not grouped:
        raise ReginaError(f"none of the {len(perturbed)} predicted conditions of {raw.path} is in the dataset; "
                          "wrong dataset, --condition-key or --separator?")

    conditions = sorted(grouped)
    cells = [x[grouped[c]] for c in conditions]
    control_rows = np.sort(np.concatenate([rows_of[n] for n in names[control]] or [np.zeros(0, np.int64)]))
    obs = raw.obs
    sources = obs["control_cell"].to_numpy() if "control_cell" in obs else None
    prompts = obs["prompt_source"].to_numpy() if "prompt_source" in obs else None
    return Predictions(
        name=name,
        form=form,
        conditions=conditions,
        means=np.stack([c.mean(0, dtype=np.float64) for c in cells]),  # no float64 copy; same sums
        cells=cells,
        control_cells=[None if sources is None else sources[grouped[c]] for c in conditions],
        predicted_controls=x[control_rows] if len(control_rows) else None,
        prompt_source={} if prompts is None else {c: _most_common(prompts[grouped[c]]) for c in conditions},
        reconstruction=_reconstruction(raw, truth, columns),
        skipped=sorted(skipped),
        scale_warning=off_scale(x),
        path=str(raw.path),
        provenance=raw.provenance,
    )


def _reconstruction(raw: RawPredictions, truth: Truth, columns: np.ndarray) -> dict[str, np.ndarray]:
    """varm['reconstruction'] columns as profiles over the truth's genes, by dataset condition."""
    if raw.reconstruction is None:
        return {}
    values = raw.reconstruction.to_numpy(np.float64)[columns]
    out = {}
    for j, label in enumerate(raw.reconstruction.columns):
        condition = truth.resolve(str(label))
        if condition is not None and np.isfinite(values[:, j]).all():
            out[condition] = values[:, j]
    return out
