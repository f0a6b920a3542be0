"""Phase-2 validation: predict held-out conditions from controls and score their mean deltas.

The plan (which cells, their condition groups, the true mean deltas and DE genes) is fixed for
the run and built once, so each epoch only runs the networks. Deltas are taken against the mean
of the training controls, as `regina evaluate` and GEARS take them against all controls, so the
validation `pearson_delta` is the evaluation's `pearson_delta` on validation conditions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from regina_cli import keys
from regina_cli.data.conditions import gears_condition_names
from regina_cli.evaluate.metrics import pearson

SELECTION_METRIC = "pearson_delta"  # the original's criterion; top-20 DE is recorded beside it
CELLS_PER_CONDITION = 256
CHUNK = 4096
TOP_DE = 20
FROM_VALIDATION = "validation conditions"


@dataclass
class ValidationPlan:
    """What validation predicts and what it compares against, on the training device.

    `rows` are validation cells (at most CELLS_PER_CONDITION per usable condition), `groups`
    their condition's position in `conditions`; `delta_true` [K, G] is each condition's true
    mean minus `reference` (the training-control mean); `top_de` [K, 20] GEARS's top-20
    non-dropout DE genes, -1 where the dataset has no list.
    """

    source: str
    conditions: list[str]
    rows: torch.Tensor
    groups: torch.Tensor
    counts: torch.Tensor
    reference: torch.Tensor
    delta_true: torch.Tensor
    top_de: torch.Tensor

    @property
    def de_source(self) -> str:
        missing = int((self.top_de[:, 0] < 0).sum())
        if missing == 0:
            return keys.UNS_TOP_DE_20
        return f"{keys.UNS_TOP_DE_20} ({missing} conditions without a list ranked by true |delta|)"


@dataclass
class ValidationScores:
    pearson_delta: float
    pearson_delta_top20_de: float
    mse_delta: float

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


def build_plan(cells, adata, *, seed: int) -> ValidationPlan:
    """The plan for the validation conditions whose targets the model can prompt (each target
    measured or with a learned prompt). When none is, the training conditions are scored
    instead, and `source` says so."""
    source = FROM_VALIDATION
    rows, groups, conditions = _condition_groups(cells, cells.val_perturbed_idx, seed)
    if not conditions:
        source = "training conditions (no validation condition is predictable: its targets are unmeasured)"
        rows, groups, conditions = _condition_groups(cells, cells.train_perturbed_idx, seed)
    dev = cells.device
    as_long = lambda a: torch.as_tensor(np.concatenate(a), dtype=torch.long, device=dev)  # noqa: E731
    plan_rows, plan_groups = as_long(rows), as_long(groups)
    counts = torch.as_tensor([len(r) for r in rows], dtype=torch.float64, device=dev)
    true_sum = torch.zeros((len(conditions), cells.n_genes), dtype=torch.float64, device=dev)
    for chunk, chunk_groups in zip(plan_rows.split(CHUNK), plan_groups.split(CHUNK)):
        true_sum.index_add_(0, chunk_groups, cells.rows(chunk).double())
    reference = training_control_mean(cells)
    return ValidationPlan(
        source=source, conditions=conditions, rows=plan_rows, groups=plan_groups, counts=counts,
        reference=reference, delta_true=true_sum / counts.unsqueeze(1) - reference,
        top_de=torch.as_tensor(top_de_indices(adata, conditions, cells.genes), device=dev))


def _condition_groups(cells, index: torch.Tensor, seed: int):
    rng = np.random.default_rng(seed)
    cells_np = index.cpu().numpy()
    codes = cells.condition_codes.cpu().numpy()[cells_np]
    usable = cells.usable.cpu().numpy()
    rows, groups, conditions = [], [], []
    for code in np.unique(codes):
        if not usable[code]:
            continue
        members = cells_np[codes == code]
        if len(members) > CELLS_PER_CONDITION:
            members = np.sort(rng.choice(members, CELLS_PER_CONDITION, replace=False))
        rows.append(members)
        groups.append(np.full(len(members), len(conditions)))
        conditions.append(cells.conditions[code])
    return rows, groups, conditions


def training_control_mean(cells) -> torch.Tensor:
    """Mean expression of every training control cell [G] (float64)."""
    controls = cells.train_idx[cells.is_control[cells.train_idx]]
    total = torch.zeros(cells.n_genes, dtype=torch.float64, device=cells.device)
    for _, x in cells.batches(controls, CHUNK, shuffle=False):
        total += x.double().sum(0)
    return total / max(len(controls), 1)


def top_de_indices(adata, conditions: list[str], genes: list[str]) -> np.ndarray:
    """GEARS's `top_non_dropout_de_20` genes per condition as gene indices [K, 20] (the
    condition -> condition_name map as GEARS builds it); -1 where the dataset has no list."""
    out = np.full((len(conditions), TOP_DE), -1, dtype=np.int64)
    de = adata.uns.get(keys.UNS_TOP_DE_20, {}) or {}
    if keys.OBS_CONDITION_NAME not in adata.obs:
        return out
    names = gears_condition_names(adata.obs[keys.OBS_CONDITION], adata.obs[keys.OBS_CONDITION_NAME])
    gene_pos = {g: i for i, g in enumerate(genes)}  # `genes` are adata.var_names (CellTensors checks)
    for k, condition in enumerate(conditions):
        listed = de.get(names.get(condition, ""), [])
        idx = [gene_pos.get(str(g), -1) for g in list(listed)[:TOP_DE]]
        idx = [i for i in idx if i >= 0]
        if len(idx) == TOP_DE:
            out[k] = idx
    return out


@torch.no_grad()
def predicted_deltas(plan: ValidationPlan, cells, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     *, seed: int) -> torch.Tensor:
    """Mean predicted delta [K, G] per planned condition. `predict(rows, control_rows)` returns
    the predicted expression of cells `rows` (their conditions) started from `control_rows`;
    the controls are drawn with the same seed every epoch, so epochs are compared fairly."""
    generator = torch.Generator(cells.device).manual_seed(seed)
    pred_sum = torch.zeros((len(plan.conditions), cells.n_genes), dtype=torch.float64, device=cells.device)
    for rows, groups in zip(plan.rows.split(CHUNK), plan.groups.split(CHUNK)):
        pred_sum.index_add_(0, groups, predict(rows, cells.control_partners(rows, generator)).double())
    return pred_sum / plan.counts.unsqueeze(1) - plan.reference


def score(plan: ValidationPlan, delta_pred: torch.Tensor) -> ValidationScores:
    """Pearson of mean deltas over all genes and over each condition's top-20 DE genes, and
    their mean squared error; one read-back."""
    delta_true = plan.delta_true
    k = min(TOP_DE, delta_true.shape[1])  # a screen of fewer than 20 genes ranks all of them
    top = plan.top_de[:, :k]
    top = torch.where(top >= 0, top, delta_true.abs().topk(k, dim=1).indices)
    values = torch.stack([
        pearson(delta_pred, delta_true).nanmean(),
        pearson(delta_pred.gather(1, top), delta_true.gather(1, top)).nanmean(),
        ((delta_pred - delta_true) ** 2).mean(),
    ])
    return ValidationScores(*values.tolist())
