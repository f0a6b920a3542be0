"""`regina predict`: cells for any perturbation, seen or unseen, from a trained run.

For each condition: draw control cells of the cell types the condition was measured in, encode
them, build the perturbation prompt, apply the forward transition, decode. All conditions go
through the networks together in large batches on the device, so a whole test set (Norman:
~100 conditions x 100 cells) is a handful of forward passes.

Cells per condition (`n_cells`) are shared between the condition's cell types in proportion to
its real cells, so predicted and real populations have the same mix; a condition with no real
cells (a new combination, say) is spread evenly over every cell type that has controls.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from regina_cli import keys
from regina_cli.data.conditions import canonical_condition, is_control, parse_condition
from regina_cli.errors import ReginaError

BATCH_CELLS = 4096
CONDITION_SETS = ("test", "all")


@dataclass
class PredictionResult:
    path: Path
    n_conditions: int
    n_cells: int
    n_new_conditions: int  # conditions without real cells in the dataset
    skipped: list[str]  # conditions of `test`/`all` whose targets the model cannot know
    device: str
    seconds: float


def predict(run_dir: str | Path, conditions: str | Sequence[str], *, n_cells: int = 100, seed: int = 0,
            out: str | Path | None = None, device: str = "auto", data_dir: str | Path | None = None) -> Path:
    """Write predictions for `conditions` ("test", "all", "A+ctrl,A+B" or a list); returns the file."""
    return run_prediction(run_dir, conditions, n_cells=n_cells, seed=seed, out=out, device=device,
                          data_dir=data_dir).path


def run_prediction(run_dir: str | Path, conditions: str | Sequence[str], *, n_cells: int = 100, seed: int = 0,
                   out: str | Path | None = None, device: str = "auto",
                   data_dir: str | Path | None = None) -> PredictionResult:
    """`predict` plus what the CLI reports (counts, device, time)."""
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.split import load_split
    from regina_cli.engine.trained import load_trained
    from regina_cli.io import write_h5ad

    started = time.perf_counter()
    if n_cells < 1:
        raise ReginaError("--cells must be at least 1")
    run_dir = Path(run_dir)
    trained = load_trained(run_dir, device=device)
    if trained.gan is None:
        raise ReginaError(f"{run_dir} has no trained phase 2; run `regina train-gan --run {run_dir}` first")
    meta = trained.meta
    genes = list(meta.gene_names)
    unmeasured = list(trained.gan.unmeasured_genes)
    split = load_split(meta.dataset, meta.split, data_dir)
    adata = read_dataset(meta.dataset, data_dir, backed=True)
    try:
        if [str(g) for g in adata.var_names] != genes:
            raise ReginaError(f"dataset {meta.dataset!r} no longer has the genes {run_dir} was trained "
                              "on; re-fetch the same dataset")
        requested = resolve_conditions(conditions, split, adata.obs[keys.OBS_CONDITION].astype(str).unique())
        skipped = []
        if isinstance(conditions, str) and conditions in CONDITION_SETS:
            # A whole set may hold genes the model knows nothing about: skip those, say which.
            skipped = [c for c in requested if unknown_targets(c, genes, unmeasured)]
            requested = [c for c in requested if c not in skipped]
            if not requested:
                raise ReginaError(f"none of the {len(skipped)} {conditions!r} conditions can be predicted: "
                                  "their targets are neither measured nor perturbed in training")
        check_targets(requested, genes, unmeasured)
        plan = sample_plan(adata.obs, requested, split.train, n_cells, seed)
        x_pred = _run_networks(trained, adata, plan, requested, genes, unmeasured)
    finally:
        adata.file.close()
    path = Path(out) if out is not None else run_dir / keys.PREDICTIONS_FILE
    predictions = _as_anndata(x_pred, plan, requested, genes, run_dir=run_dir, meta=meta, seed=seed,
                              n_cells=n_cells, prompt_value=trained.config.gan.prompt_value, skipped=skipped)
    write_h5ad(predictions, path)
    return PredictionResult(path=path, n_conditions=len(requested), n_cells=int(len(plan)),
                            n_new_conditions=plan.n_new, skipped=skipped,
                            device=str(trained.device), seconds=time.perf_counter() - started)


# --- Which conditions ---------------------------------------------------------------------------
def resolve_conditions(conditions: str | Sequence[str], split, data_conditions: Sequence[str]) -> list[str]:
    """`test` / `all` from the run's split, else the given labels, normalised and de-duplicated.

    A label the dataset uses is kept as spelled (so predictions match the real cells); any
    other is written in GEARS's spelling ("A" -> "A+ctrl").
    """
    if isinstance(conditions, str):
        if conditions in CONDITION_SETS:
            chosen = split.test if conditions == "test" else [*split.train, *split.val, *split.test]
            chosen = [c for c in chosen if not is_control(c)]
            if not chosen:
                raise ReginaError(f"the run's split has no perturbed {conditions!r} conditions; "
                                  "name them with --conditions A+ctrl,A+B")
            return list(dict.fromkeys(chosen))
        conditions = [c for c in conditions.split(",")]
    known = set(data_conditions)
    out = []
    for raw in conditions:
        label = raw.strip()
        if not label:
            continue
        if is_control(label):
            raise ReginaError(f"{label!r} is the control condition, not a perturbation; name perturbations "
                              "like A+ctrl or A+B")
        out.append(label if label in known else canonical_condition(parse_condition(label)))
    if not out:
        raise ReginaError("no conditions given; use --conditions test, all, or A+ctrl,A+B")
    return list(dict.fromkeys(out))


def read_conditions_file(path: str | Path) -> list[str]:
    """One condition per line; blank lines and `#` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ReginaError(f"conditions file {path} does not exist")
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def unknown_targets(condition: str, genes: Sequence[str], unmeasured: Sequence[str]) -> list[str]:
    """Targets that are neither measured nor an unmeasured gene perturbed in training."""
    known = set(genes) | set(unmeasured)
    return [g for g in parse_condition(condition) if g not in known]


def check_targets(conditions: Sequence[str], genes: Sequence[str], unmeasured: Sequence[str]) -> None:
    """Every target must be a measured gene or an unmeasured gene perturbed in training."""
    for condition in conditions:
        for gene in unknown_targets(condition, genes, unmeasured):
            close = close_names(gene, [*genes, *unmeasured])
            hint = f"close names: {', '.join(close)}" if close else "check the spelling"
            raise ReginaError(
                f"gene {gene!r} (condition {condition!r}) is not among the {len(genes)} measured genes "
                f"and was not perturbed in training, so it has no prompt; {hint}"
            )


def close_names(gene: str, names: Sequence[str], n: int = 5) -> list[str]:
    """Known names closest to `gene`, ignoring case (symbols are often typed in lower case)."""
    by_upper = {name.upper(): name for name in names}
    return [by_upper[m] for m in difflib.get_close_matches(gene.upper(), list(by_upper), n=n, cutoff=0.6)]


# --- Which control cells ------------------------------------------------------------------------
@dataclass
class SamplePlan:
    """One row of `cells` per predicted cell: `condition_index`, `cell_type` and `control_row`
    (the dataset row of the control it starts from, named `control_names`); `n_new` counts the
    conditions without real cells in the dataset."""

    cells: pd.DataFrame
    control_names: np.ndarray
    n_new: int

    def __len__(self) -> int:
        return len(self.cells)


def sample_plan(obs: pd.DataFrame, conditions: Sequence[str], train_conditions: Sequence[str],
                n_cells: int, seed: int) -> SamplePlan:
    """Which control cell each predicted cell starts from, per condition and cell type.

    Controls come from the training controls of the same cell type, drawn with replacement
    only when a cell type has fewer controls than cells requested.
    """
    rng = np.random.default_rng(seed)
    condition = obs[keys.OBS_CONDITION].astype(str).to_numpy()
    cell_type = (obs[keys.OBS_CELL_TYPE].astype(str).to_numpy() if keys.OBS_CELL_TYPE in obs
                 else np.full(len(obs), "all"))
    train = set(train_conditions)
    control_conds = [c for c in pd.unique(condition) if is_control(c) and c in train]
    control_rows = np.flatnonzero(np.isin(condition, control_conds))
    if len(control_rows) == 0:
        raise ReginaError("the dataset has no training control cells to start predictions from")
    pools = {t: control_rows[cell_type[control_rows] == t] for t in pd.unique(cell_type[control_rows])}
    counts = pd.crosstab(condition, cell_type)
    parts, n_new = [], 0
    for c_idx, cond in enumerate(conditions):
        measured = cond in counts.index
        n_new += not measured
        # Cell types the condition was measured in (and that have controls to start from).
        weights = counts.loc[cond, counts.columns.isin(list(pools))] if measured else pd.Series(dtype=float)
        if weights.sum() == 0:
            weights = pd.Series(1, index=sorted(pools))
        for ct, k in _allocate(weights, n_cells).items():
            picks = rng.choice(pools[ct], size=k, replace=k > len(pools[ct]))
            parts.append(pd.DataFrame({"condition_index": c_idx, "cell_type": ct, "control_row": picks}))
    cells = pd.concat(parts, ignore_index=True)
    return SamplePlan(cells, np.asarray(obs.index)[cells["control_row"].to_numpy()].astype(str), n_new)


def _allocate(weights: pd.Series, total: int) -> dict[str, int]:
    """Split `total` cells over cell types in proportion to `weights` (largest remainder)."""
    weights = weights[weights > 0].astype(float)
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(int)
    remainder = total - counts.sum()
    order = np.argsort(-(share - counts).to_numpy(), kind="stable")[:remainder]
    counts.iloc[order] += 1
    return counts.to_dict()


# --- Networks --------------------------------------------------------------------------------------
@torch.no_grad()
def _run_networks(trained, adata, plan: SamplePlan, conditions, genes, unmeasured) -> np.ndarray:
    from regina_cli.data.rows import RowReader
    from regina_cli.data.tensors import condition_targets
    from regina_cli.model.prompt import condition_prompt
    from regina_cli.model.gan import decode_prediction

    ae, gan = trained.autoencoder.eval(), trained.gan.eval()
    device = next(ae.parameters()).device
    unique_rows, inverse = np.unique(plan.cells["control_row"].to_numpy(), return_inverse=True)
    reader = RowReader(adata)
    controls = torch.from_numpy(reader.read(unique_rows)).to(device)
    reader.close()
    target_idx, unmeasured_idx, n_targets, _ = condition_targets(conditions, genes, unmeasured)
    target_idx, unmeasured_idx, n_targets = (torch.as_tensor(a, device=device)
                                             for a in (target_idx, unmeasured_idx, n_targets))
    control_pos = torch.as_tensor(inverse, device=device)
    cond_of_row = torch.as_tensor(plan.cells["condition_index"].to_numpy(), device=device)
    value = trained.config.gan.prompt_value
    out = np.empty((len(plan), len(genes)), dtype=np.float32)
    for start in range(0, len(plan), BATCH_CELLS):
        sl = slice(start, start + BATCH_CELLS)
        c = cond_of_row[sl]
        x_ctrl = controls[control_pos[sl]]
        z_ctrl = ae.encoder(x_ctrl)
        prompt = condition_prompt(ae.encoder, gan, x_ctrl, target_idx[c], unmeasured_idx[c], n_targets[c],
                                  value, z_ctrl=z_ctrl)
        pred = decode_prediction(ae.decoder, gan(z_ctrl, prompt), x_ctrl=x_ctrl, z_ctrl=z_ctrl,
                                 residual=trained.config.gan.residual_decoding)
        out[sl] = pred.float().cpu().numpy()
    return out


def _as_anndata(x: np.ndarray, plan: SamplePlan, conditions, genes, *, run_dir: Path, meta,
                seed: int, n_cells: int, prompt_value: float, skipped: list[str]):
    import anndata

    from regina_cli import __version__

    obs = pd.DataFrame({
        keys.OBS_CONDITION: np.asarray(conditions, dtype=object)[plan.cells["condition_index"].to_numpy()],
        keys.OBS_CELL_TYPE: plan.cells["cell_type"].astype(str).to_numpy(),
        keys.OBS_CONTROL_CELL: plan.control_names,
    }, index=[f"pred_{i}" for i in range(len(plan))])
    for column in (keys.OBS_CONDITION, keys.OBS_CELL_TYPE):
        obs[column] = obs[column].astype("category")
    var = pd.DataFrame({keys.VAR_GENE_NAME: genes}, index=pd.Index(genes))
    provenance = {"run": str(run_dir), "dataset": meta.dataset, "split": meta.split, "seed": seed,
                  "cells_per_condition": n_cells, "prompt_value": prompt_value, "regina_version": __version__,
                  "skipped_conditions": list(skipped)}
    return anndata.AnnData(X=x, obs=obs, var=var, uns={keys.UNS_REGINA: provenance})
