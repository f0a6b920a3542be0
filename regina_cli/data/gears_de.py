"""The GEARS obs and uns fields, computed exactly as cell-gears computes them.

GEARS' own metrics (and ours, to stay comparable with the literature) rank genes by a per-cell-type
t-test of every condition against that cell type's controls and keep the top 20 genes that are not
drop-outs. This module reproduces `gears.data_utils.get_DE_genes` and `get_dropout_non_zero_genes`
(cell-gears 0.1.2) without importing gears: same obs spellings, same scanpy call, same filters.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData

from regina_cli import keys
from regina_cli.errors import ReginaError

TOP_DE = 20
_CONTROL_GROUP = "ctrl_1"  # GEARS' name of the control group within one cell type


def add_gears_obs(adata: AnnData) -> None:
    """obs `dose_val`, `control`, `condition_name` from `condition` and `cell_type`, as GEARS.

    GEARS counts '+'-separated parts: two parts ("A+ctrl", "A+B") is a perturbation with dose
    "1+1"; one part ("ctrl") is a control with dose "1".
    """
    condition = adata.obs[keys.OBS_CONDITION].astype(str)
    cell_type = adata.obs[keys.OBS_CELL_TYPE].astype(str)
    two_parts = condition.str.split(keys.GENE_SEPARATOR).str.len() == 2
    dose = np.where(two_parts, "1+1", "1")
    adata.obs[keys.OBS_DOSE] = pd.Categorical(dose)
    adata.obs[keys.OBS_CONTROL] = pd.Categorical(np.where(two_parts, 0, 1))
    adata.obs[keys.OBS_CONDITION_NAME] = pd.Categorical(cell_type + "_" + condition + "_" + dose)
    for key in (keys.OBS_CONDITION, keys.OBS_CELL_TYPE):
        adata.obs[key] = pd.Categorical(adata.obs[key].astype(str))


def rank_genes_by_cell_type(adata: AnnData) -> dict[str, np.ndarray]:
    """All genes of every condition ranked against its cell type's controls (GEARS'
    `rank_genes_groups_by_cov`: scanpy t-test, rankby_abs, n_genes = all, use_raw=False)."""
    ranked: dict[str, np.ndarray] = {}
    cell_types = adata.obs[keys.OBS_CELL_TYPE].astype(str).to_numpy()
    names = adata.obs[keys.OBS_CONDITION_NAME].astype(str).to_numpy()
    for cell_type in pd.unique(cell_types):
        reference = f"{cell_type}_{_CONTROL_GROUP}"
        rows = np.flatnonzero(cell_types == cell_type)
        groups = names[rows]
        if reference not in set(groups):
            raise ReginaError(
                f"cell type {cell_type!r} has no control cells: every cell type needs its own controls"
            )
        if len(set(groups)) == 1:
            continue  # controls only: nothing to rank
        # A light AnnData (no other obs) so scanpy does not copy the caller's whole object.
        sub = AnnData(
            X=adata.X if len(rows) == adata.n_obs else adata.X[rows],  # one cell type: no copy
            obs=pd.DataFrame({"group": pd.Categorical(groups)}, index=adata.obs_names[rows]),
            var=pd.DataFrame(index=adata.var_names),
        )
        with warnings.catch_warnings():  # scanpy's own pandas fragmentation/zero-variance noise
            warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            sc.tl.rank_genes_groups(
                sub, groupby="group", reference=reference, rankby_abs=True, n_genes=sub.n_vars,
                use_raw=False,
            )
        table = sub.uns["rank_genes_groups"]["names"]
        for group in table.dtype.names:
            ranked[group] = np.asarray(table[group]).astype(str)
    return ranked


def condition_means(adata: AnnData) -> tuple[np.ndarray, np.ndarray]:
    """(conditions, mean expression per condition over all cell types) – one sparse product."""
    codes, conditions = pd.factorize(adata.obs[keys.OBS_CONDITION].astype(str), sort=True)
    indicator = sp.csr_matrix(
        (np.ones(adata.n_obs), (codes, np.arange(adata.n_obs))), shape=(len(conditions), adata.n_obs)
    )
    sums = indicator @ adata.X
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    counts = np.bincount(codes, minlength=len(conditions))
    return np.asarray(conditions), sums / counts[:, None]


def add_dropout_fields(adata: AnnData) -> None:
    """uns `top_non_dropout_de_20`, `non_dropout_gene_idx`, `top_non_zero_de_20`,
    `non_zeros_gene_idx` (GEARS' `get_dropout_non_zero_genes`).

    A gene is a drop-out for a condition when its mean is zero there but not in the controls;
    the top-20 lists keep the DE ranking order and skip drop-outs (or all zeros).
    """
    conditions, means = condition_means(adata)
    row_of = {c: i for i, c in enumerate(conditions)}
    if keys.CTRL not in row_of:
        raise ReginaError(f"no control cells (condition {keys.CTRL!r}): the screen needs controls")
    ctrl_zero = means[row_of[keys.CTRL]] == 0
    name_to_condition = dict(
        zip(adata.obs[keys.OBS_CONDITION_NAME].astype(str), adata.obs[keys.OBS_CONDITION].astype(str))
    )
    gene_names = np.asarray(adata.var_names).astype(str)
    gene_index = pd.Index(gene_names)
    top_non_dropout, non_dropout_idx, top_non_zero, non_zero_idx = {}, {}, {}, {}
    for group, ranked in adata.uns[keys.UNS_RANK_GENES].items():
        mean = means[row_of[name_to_condition[group]]]
        non_zero = mean != 0
        non_dropout = non_zero | ctrl_zero
        order = gene_index.get_indexer(np.asarray(ranked).astype(str))
        top_non_dropout[group] = gene_names[order[non_dropout[order]][:TOP_DE]]
        top_non_zero[group] = gene_names[order[non_zero[order]][:TOP_DE]]
        non_zero_idx[group] = np.flatnonzero(non_zero)
        non_dropout_idx[group] = np.flatnonzero(non_dropout)
    adata.uns[keys.UNS_TOP_DE_20] = top_non_dropout
    adata.uns[keys.UNS_NON_DROPOUT_IDX] = non_dropout_idx
    adata.uns[keys.UNS_TOP_NON_ZERO_DE_20] = top_non_zero
    adata.uns[keys.UNS_NON_ZEROS_IDX] = non_zero_idx


def add_gears_de(adata: AnnData) -> None:
    """Add the GEARS obs fields and every uns DE field to `adata` in place.

    Needs obs `condition` (GEARS labels) and `cell_type`, and log-normalised X.
    """
    add_gears_obs(adata)
    adata.uns[keys.UNS_RANK_GENES] = rank_genes_by_cell_type(adata)
    add_dropout_fields(adata)
