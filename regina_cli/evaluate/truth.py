"""The measured screen as the evaluation sees it: control statistics, per-condition statistics, DE genes.

Kept apart from the metrics so the metrics stay pure tensor functions and the same truth serves
every model and baseline. A truth can be restricted to a subset of the screen's genes (predictions
made on highly variable genes only): every statistic, index and mask is then over those genes.
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
    """Statistics over *all* cells of a group (float64)."""

    rows: np.ndarray  # row indices into the dataset
    mean: np.ndarray  # [G]
    std: np.ndarray  # [G], ddof 0
    all_zero: np.ndarray  # [G] bool


def _sums(block, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Column sums of x and x^2 of a row block, in float64."""
    if sp.issparse(block):
        block = block.tocsr()
        data = block.data.astype(np.float64)
        return (np.bincount(block.indices, weights=data, minlength=n_cols),
                np.bincount(block.indices, weights=data * data, minlength=n_cols))
    block = np.asarray(block, dtype=np.float64)
    return block.sum(0), np.einsum("ij,ij->j", block, block)


def group_statistics(x, groups: list[np.ndarray], columns: np.ndarray | None) -> list[ConditionTruth]:
    """Mean, standard deviation and all-zero mask of row groups of `x`, one group at a time.

    The variance is E[x^2] - E[x]^2 in float64; values below 1e-12 of the squared mean are
    rounding noise of a constant gene and are set to 0, so "no spread" stays exact. A group costs
    its non-zero entries only (two bincounts), with no dataset-sized temporary.
    """
    out = []
    for rows in groups:
        sums, sums_sq = _sums(x[rows], x.shape[1])
        if columns is not None:
            sums, sums_sq = sums[columns], sums_sq[columns]
        n = max(len(rows), 1)
        mean = sums / n
        var = sums_sq / n - mean**2
        var[var <= 1e-12 * mean**2] = 0.0
        out.append(ConditionTruth(rows, mean, np.sqrt(np.clip(var, 0.0, None)), sums_sq == 0))
    return out


class Truth:
    """Read-only view of a GEARS-layout AnnData for scoring predictions against it."""

    def __init__(self, adata, genes: list[str] | None = None):
        obs = adata.obs
        if keys.OBS_CONDITION not in obs:
            raise ReginaError(f"the dataset has no obs column '{keys.OBS_CONDITION}'; re-import it with `regina fetch`")
        self.adata = adata
        all_genes = self.dataset_genes = [str(g) for g in adata.var_names]
        if genes is None or list(genes) == all_genes:
            self.columns, self.genes = None, all_genes
        else:
            position = {g: i for i, g in enumerate(all_genes)}
            self.columns = np.array([position[g] for g in genes], dtype=np.int64)
            self.genes = list(genes)
        self.gene_index = {g: i for i, g in enumerate(self.genes)}
        self.conditions_of_cells = obs[keys.OBS_CONDITION].astype(str).to_numpy()
        names = set(np.unique(self.conditions_of_cells))
        controls = {c for c in names if is_control(c)}
        self.control_rows = np.flatnonzero(np.isin(self.conditions_of_cells, list(controls)))
        if len(self.control_rows) == 0:
            raise ReginaError("the dataset has no control cells ('ctrl'); deltas cannot be computed")
        self.conditions = sorted(names - controls)
        self._by_genes = {frozenset(parse_condition(c)): c for c in self.conditions}
        # GEARS maps condition -> condition_name with dict(...), so the last cell's name wins.
        if keys.OBS_CONDITION_NAME in obs:
            self.condition_name = dict(zip(self.conditions_of_cells, obs[keys.OBS_CONDITION_NAME].astype(str)))
        else:
            self.condition_name = {}
        self._rows = pd.Series(np.arange(adata.n_obs)).groupby(self.conditions_of_cells).indices
        self._stats: dict[str, ConditionTruth] = {}
        # GEARS: the control mean is the mean over every control cell, whatever its cell type.
        self.control = group_statistics(adata.X, [self.control_rows], self.columns)[0]
        self.control_mean = self.control.mean

    def resolve(self, condition: str) -> str | None:
        """The dataset's spelling of a condition ("ctrl+A" -> "A+ctrl", "B+A" -> "A+B"), or None."""
        if condition in self._by_genes.values():
            return condition
        return self._by_genes.get(frozenset(parse_condition(condition)))

    def rows(self, condition: str) -> np.ndarray:
        return self._rows.get(condition, np.array([], dtype=np.int64))

    def prepare(self, conditions: list[str]) -> None:
        """Compute the statistics of many conditions at once (much faster than one by one)."""
        todo = [c for c in dict.fromkeys(conditions) if c not in self._stats]
        if todo:
            self._stats.update(zip(todo, group_statistics(self.adata.X, [self.rows(c) for c in todo], self.columns)))

    def stats(self, condition: str) -> ConditionTruth:
        self.prepare([condition])
        return self._stats[condition]

    def cells(self, rows: np.ndarray) -> np.ndarray:
        """Dense float32 rows, in the order given (repeats allowed)."""
        x = self.adata.X[rows]
        if self.columns is not None:
            x = x[:, self.columns]
        return _dense(x).astype(np.float32)

    def condition_means(self, conditions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pseudo-bulk means [C, G] and cell counts [C]."""
        self.prepare(conditions)
        means = np.stack([self._stats[c].mean for c in conditions]) if conditions else np.zeros((0, len(self.genes)))
        return means, np.array([len(self.rows(c)) for c in conditions], dtype=np.int64)

    # --- GEARS DE fields ------------------------------------------------------------------
    def _uns_list(self, key: str, condition: str) -> list | None:
        table = self.adata.uns.get(key)
        name = self.condition_name.get(condition)
        if table is None or name is None or name not in table:
            return None
        return list(np.asarray(table[name]).ravel())

    def de_indices(self, key: str, condition: str, top: int = 20) -> list[int]:
        """Positions of the first `top` genes of a ranked uns gene list (GEARS stores var_names)
        among the genes scored."""
        names = self._uns_list(key, condition) or []
        found = [self.gene_index[str(g)] for g in names if str(g) in self.gene_index]
        return found[:top]

    def gene_mask(self, key: str, condition: str) -> np.ndarray:
        """Boolean [G] from an uns integer index list (`non_dropout_gene_idx`, `non_zeros_gene_idx`)."""
        mask = np.zeros(len(self.dataset_genes), dtype=bool)
        idx = self._uns_list(key, condition)
        if idx is not None:
            mask[np.asarray(idx, dtype=np.int64)] = True
        return mask if self.columns is None else mask[self.columns]
