"""The measured screen as the evaluation sees it: control mean, per-condition statistics, DE genes.

Kept apart from the metrics so the metrics stay pure tensor functions and the same truth serves
the model and every baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from regina_cli import keys
from regina_cli.data.conditions import is_control, parse_condition
from regina_cli.errors import ReginaError


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x)


@dataclass
class ConditionTruth:
    """Statistics over *all* true cells of a condition (float64, two-pass, as numpy does)."""

    rows: np.ndarray  # row indices into the dataset
    mean: np.ndarray  # [G]
    std: np.ndarray  # [G], ddof 0
    all_zero: np.ndarray  # [G] bool


class Truth:
    """Read-only view of a GEARS-layout AnnData for scoring predictions against it."""

    def __init__(self, adata):
        obs = adata.obs
        if keys.OBS_CONDITION not in obs:
            raise ReginaError(f"the dataset has no obs column '{keys.OBS_CONDITION}'; re-import it with `regina fetch`")
        self.adata = adata
        self.genes = [str(g) for g in adata.var_names]
        self.gene_index = {g: i for i, g in enumerate(self.genes)}
        self.conditions_of_cells = obs[keys.OBS_CONDITION].astype(str).to_numpy()
        names = set(np.unique(self.conditions_of_cells))
        controls = {c for c in names if is_control(c)}
        self.control_rows = np.flatnonzero(np.isin(self.conditions_of_cells, list(controls)))
        if len(self.control_rows) == 0:
            raise ReginaError("the dataset has no control cells ('ctrl'); deltas cannot be computed")
        # GEARS: the control mean is the mean over every control cell, whatever its cell type.
        self.control_mean = _dense(adata.X[self.control_rows]).astype(np.float64).mean(0)
        self.conditions = sorted(names - controls)
        self._by_genes = {frozenset(parse_condition(c)): c for c in self.conditions}
        # GEARS maps condition -> condition_name with dict(...), so the last cell's name wins.
        if keys.OBS_CONDITION_NAME in obs:
            self.condition_name = dict(zip(self.conditions_of_cells, obs[keys.OBS_CONDITION_NAME].astype(str)))
        else:
            self.condition_name = {}
        self._rows = pd.Series(np.arange(adata.n_obs)).groupby(self.conditions_of_cells).indices
        self._stats: dict[str, ConditionTruth] = {}

    def resolve(self, condition: str) -> str | None:
        """The dataset's spelling of a condition ("ctrl+A" -> "A+ctrl", "B+A" -> "A+B"), or None."""
        if condition in self._by_genes.values():
            return condition
        return self._by_genes.get(frozenset(parse_condition(condition)))

    def rows(self, condition: str) -> np.ndarray:
        return self._rows.get(condition, np.array([], dtype=np.int64))

    def stats(self, condition: str) -> ConditionTruth:
        if condition not in self._stats:
            rows = self.rows(condition)
            cells = _dense(self.adata.X[rows]).astype(np.float64)
            self._stats[condition] = ConditionTruth(rows, cells.mean(0), cells.std(0), ~cells.any(0))
        return self._stats[condition]

    def cells(self, rows: np.ndarray) -> np.ndarray:
        """Dense float32 rows, in the order given (repeats allowed)."""
        return _dense(self.adata.X[rows]).astype(np.float32)

    def condition_means(self, conditions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pseudo-bulk means [C, G] and cell counts [C], in one sparse product."""
        index = {c: i for i, c in enumerate(conditions)}
        hit = np.array([c in index for c in self.conditions_of_cells])
        code = np.array([index[c] for c in self.conditions_of_cells[hit]], dtype=np.int64)
        rows = np.flatnonzero(hit)
        indicator = sp.csr_matrix((np.ones(len(rows)), (code, rows)), shape=(len(conditions), self.adata.n_obs))
        counts = np.bincount(code, minlength=len(conditions))
        sums = indicator @ self.adata.X  # float64: the indicator's dtype wins
        return _dense(sums) / np.maximum(counts, 1)[:, None], counts

    # --- GEARS DE fields ------------------------------------------------------------------
    def _uns_list(self, key: str, condition: str) -> list | None:
        table = self.adata.uns.get(key)
        name = self.condition_name.get(condition)
        if table is None or name is None or name not in table:
            return None
        return list(np.asarray(table[name]).ravel())

    def de_indices(self, key: str, condition: str, top: int = 20) -> list[int]:
        """Gene positions of a ranked uns gene list (GEARS stores var_names), first `top` entries."""
        names = self._uns_list(key, condition)
        if names is None:
            return []
        return [self.gene_index[str(g)] for g in names[:top] if str(g) in self.gene_index]

    def gene_mask(self, key: str, condition: str) -> np.ndarray:
        """Boolean [G] from an uns integer index list (`non_dropout_gene_idx`, `non_zeros_gene_idx`)."""
        mask = np.zeros(len(self.genes), dtype=bool)
        idx = self._uns_list(key, condition)
        if idx is not None:
            mask[np.asarray(idx, dtype=np.int64)] = True
        return mask
