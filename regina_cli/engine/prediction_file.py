"""The predictions file as scanpy, pertpy and cell-eval users expect it.

- obs `condition` (dataset spelling), `cell_type`, `control_cell` (the real control each
  predicted cell started from) and `prompt_source`;
- real control cells, appended under the dataset's control label (`with_controls`, default on):
  every training control of the predicted cell types, whose mean the predictions were moved onto
  (`gan.match_control_mean`), else the distinct ones they started from, so `sc.tl.rank_genes_groups(groupby="condition",
  reference="ctrl")` and cell-eval run on the file directly;
- varm `reconstruction` (genes x conditions): the mean of the model's decoded controls with no
  perturbation applied, which `regina evaluate` scores as the honest `reconstruction` baseline
  (decoder bias alone must never pass for a perturbation effect);
- uns `regina`: how the cells were made (run, decoding, options).

Decoded values are log-normalised expression as the model produces it: they can be slightly
negative and are rarely exactly zero, unlike real cells. `clip` sets negative values to 0;
`sparsify` also sets values below half the smallest non-zero value of the real controls to 0 and
stores X sparse (CSR), like the data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from regina_cli import __version__, keys

CONTROL_SOURCE = "control"


@dataclass
class FileOptions:
    with_controls: bool = True
    clip: bool | None = None  # None: what train-gan chose (meta `clip_predictions`, `engine.clip_choice`)
    sparsify: bool = False


def predicted_names(conditions: np.ndarray) -> list[str]:
    """`<condition>_<n>` for each predicted cell, n counting within its condition: unique across the
    parts of a job array too (each part holds its own conditions), which `pred_<row>` was not."""
    counts = pd.Series(conditions).groupby(conditions).cumcount().to_numpy()
    return [f"{condition}_{n}" for condition, n in zip(conditions, counts)]


def build(x: np.ndarray, plan, conditions, genes, *, sources: dict[str, str], reconstruction: np.ndarray,
          controls: tuple[np.ndarray, pd.DataFrame], options: FileOptions, provenance: dict):
    """The AnnData of predicted cells (and, with `with_controls`, the real controls they came from)."""
    import anndata
    import scipy.sparse as sp

    control_x, control_obs = controls
    predicted_condition = np.asarray(conditions, dtype=object)[plan.cells["condition_index"].to_numpy()]
    obs = pd.DataFrame({
        keys.OBS_CONDITION: predicted_condition,
        keys.OBS_CELL_TYPE: plan.cells["cell_type"].astype(str).to_numpy(),
        keys.OBS_CONTROL_CELL: plan.control_names,
        keys.OBS_PROMPT_SOURCE: [sources[c] for c in predicted_condition],
    }, index=predicted_names(predicted_condition))
    threshold = _sparsify_threshold(control_x) if options.sparsify else None
    if options.clip:
        x = np.maximum(x, 0.0)
    if threshold is not None:
        x[x < threshold] = 0.0
    if options.with_controls:
        control_frame = pd.DataFrame({
            keys.OBS_CONDITION: control_obs[keys.OBS_CONDITION].astype(str).to_numpy(),
            keys.OBS_CELL_TYPE: (control_obs[keys.OBS_CELL_TYPE].astype(str).to_numpy()
                                 if keys.OBS_CELL_TYPE in control_obs else "all"),
            keys.OBS_CONTROL_CELL: control_obs.index.astype(str),
            keys.OBS_PROMPT_SOURCE: CONTROL_SOURCE,
        }, index=control_obs.index.astype(str))
        obs = pd.concat([obs, control_frame])
        x = np.vstack([x, control_x.astype(np.float32)])
    for column in (keys.OBS_CONDITION, keys.OBS_CELL_TYPE, keys.OBS_PROMPT_SOURCE):
        obs[column] = obs[column].astype("category")
    var = pd.DataFrame({keys.VAR_GENE_NAME: genes}, index=pd.Index(genes))
    uns = {**provenance, **asdict(options), "regina_version": __version__,
           "values": "log-normalised expression as decoded (may be negative unless clipped)",
           "n_predicted_cells": int(len(plan)), "prompt_sources": dict(pd.Series(sources).value_counts())}
    if threshold is not None:
        uns["sparsify_threshold"] = float(threshold)
    adata = anndata.AnnData(X=sp.csr_matrix(x) if options.sparsify else x, obs=obs, var=var,
                            uns={keys.UNS_REGINA: _plain(uns)})
    adata.varm[keys.VARM_RECONSTRUCTION] = pd.DataFrame(reconstruction.T, index=var.index,
                                                         columns=list(conditions))
    return adata


def _sparsify_threshold(control_x: np.ndarray) -> float:
    positive = control_x[control_x > 0]
    return float(positive.min()) / 2 if positive.size else 0.0


def _plain(value):
    """uns values h5py can write (numpy scalars as Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value
