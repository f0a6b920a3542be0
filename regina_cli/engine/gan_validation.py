"""Phase-2 validation: predict held-out conditions from controls, score their mean deltas, and
say when the predictions look wrong.

The plan (which cells, their condition groups, the true mean deltas and DE genes) is fixed for
the run and built once, so each epoch only runs the networks. Deltas are taken against the mean
of the training controls, as `regina evaluate` and GEARS take them against all controls, so the
validation `pearson_delta` is the evaluation's `pearson_delta` on validation conditions.

When no validation condition can be predicted (their targets have no prompt), or fewer than
`gan.validation_min_conditions`, a share of the training perturbations is held out of phase 2
and validated on as well (`gan.validation_holdout`), so model selection never silently scores
conditions the model trains on.

Diagnostics beside the scores (all on the validation conditions):
  collapse_index        mean pairwise Pearson of predicted mean deltas across conditions
                        (`collapse_index_true`: the same for the real deltas); near 1 with a much
                        lower truth means one generic shift for every condition
  prompt_to_shift       mean |prompt| / |real latent shift| of a condition
  shift_ratio           mean |predicted latent shift| / |real latent shift|
  ceiling_pearson_delta Pearson delta of decoding each control's latent plus the condition's real
                        mean latent shift: what a perfect transition could reach through this
                        autoencoder
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from regina_cli import keys
from regina_cli.data.conditions import gears_condition_names
from regina_cli.engine.condition_stats import expression_sums
from regina_cli.evaluate.metrics import pearson

SELECTION_METRIC = "pearson_delta_selectable"  # pearson_delta where `selectable`; top-20 DE is recorded beside it
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
    held_out: list[str]  # training conditions held out of phase 2 to validate on
    rows: torch.Tensor
    groups: torch.Tensor
    counts: torch.Tensor
    reference: torch.Tensor
    delta_true: torch.Tensor
    top_de: torch.Tensor
    type_reference: torch.Tensor  # [n_cell_types, G]: training-control mean of each cell type

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
    collapse_index: float
    collapse_index_true: float
    prompt_to_shift: float
    shift_ratio: float
    ceiling_pearson_delta: float
    pearson_delta_clipped: float = float("nan")  # the prediction with negative values set to 0

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))

    def warnings(self, prior_kept: bool = False) -> list[str]:
        """Plain sentences for what looks wrong (empty when nothing does). `prior_kept`: the scores
        are those of the untrained start with an expression prior, whose likeness comes from the
        change the training conditions share, not from a phase-2 collapse."""
        out = []
        if self.collapse_index - self.collapse_index_true > 0.2:
            cause = ("the kept start, the expression prior, leans on the change the training conditions share"
                     if prior_kept else "phase 2 collapsed towards one shift")
            out.append(f"predictions of different conditions look alike: their mean deltas correlate at "
                       f"{self.collapse_index:.2f} on average, the real ones at {self.collapse_index_true:.2f} "
                       f"({cause})")
        if self.prompt_to_shift < 0.1:
            out.append(f"the prompt is {self.prompt_to_shift:.2f} times the size of the real latent shifts: it can "
                       "hardly tell conditions apart (try gan.prompt_scale=matched or gan.gene_features)")
        if not 1 / 3 <= self.shift_ratio <= 3:
            out.append(f"predicted latent shifts are {self.shift_ratio:.2f} times the real ones")
        # Residual decoding and the prior bypass the decoder's limit: said only where the model is below it.
        if self.ceiling_pearson_delta < 0.5 and self.pearson_delta < self.ceiling_pearson_delta:
            out.append(f"the autoencoder limits phase 2: decoding the real latent shifts gives pearson_delta "
                       f"{self.ceiling_pearson_delta:.2f} on validation; a larger model (model.d_model, "
                       "model.z_dim) or longer phase 1 raises it")
        return out


def build_plan(cells, adata, *, seed: int, holdout: float = 0.0, min_conditions: int = 1) -> ValidationPlan:
    """The plan for the validation conditions the model can prompt (`cells.usable`). When fewer
    than `min_conditions` are (one or two conditions make a noisy selection), `holdout` > 0 holds
    out that share of the usable training perturbations (at least 2) and validates on them as
    well; with none to validate on at all, the training conditions themselves are scored, as
    `source` says."""
    source, held_out = FROM_VALIDATION, []
    rows, groups, conditions = _condition_groups(cells, cells.val_perturbed_idx, seed)
    if len(conditions) < min_conditions and holdout > 0:
        held_out = holdout_conditions(cells, holdout, seed)
    if held_out:
        extra_rows, extra_groups, extra = _condition_groups(cells, cells.train_perturbed_idx, seed, only=held_out)
        source = (f"{len(held_out)} training conditions held out of phase 2"
                  + (f" and {len(conditions)} validation condition{'s' * (len(conditions) != 1)} (fewer than "
                     f"{min_conditions} predictable)" if conditions else " (no validation condition is predictable)"))
        rows += extra_rows
        groups += [g + len(conditions) for g in extra_groups]
        conditions += extra
    if not conditions:
        source = "training conditions (no validation condition is predictable: its targets have no prompt)"
        rows, groups, conditions = _condition_groups(cells, cells.train_perturbed_idx, seed)
    return _plan(cells, adata, source, held_out, rows, groups, conditions)


def training_plan(cells, index: torch.Tensor, *, seed: int, max_conditions: int | None = None) -> ValidationPlan | None:
    """A plan over the usable perturbed training conditions of cells `index` (no top-DE lists; at
    most `max_conditions` of them, a seeded draw), for predictions that did not see them
    (`engine.clip_choice`, the `fit_*` diagnostics); None without any."""
    rows, groups, conditions = _condition_groups(cells, index, seed)
    if max_conditions is not None and len(conditions) > max_conditions:
        rows, groups, conditions = _some_groups(rows, conditions, max_conditions, seed)
    return _plan(cells, None, "training conditions", [], rows, groups, conditions) if conditions else None


def _some_groups(rows: list, conditions: list[str], n: int, seed: int) -> tuple[list, list, list[str]]:
    """`_condition_groups`' (rows, groups, conditions) cut to a seeded draw of `n` conditions."""
    keep = np.sort(np.random.default_rng(seed).choice(len(conditions), n, replace=False))
    rows = [rows[i] for i in keep]
    return rows, [np.full(len(r), j) for j, r in enumerate(rows)], [conditions[i] for i in keep]


def _plan(cells, adata, source: str, held_out: list[str], rows, groups, conditions: list[str]) -> ValidationPlan:
    dev = cells.device
    as_long = lambda a: torch.as_tensor(np.concatenate(a), dtype=torch.long, device=dev)  # noqa: E731
    plan_rows, plan_groups = as_long(rows), as_long(groups)
    counts = torch.as_tensor([len(r) for r in rows], dtype=torch.float64, device=dev)
    true_sum = torch.zeros((len(conditions), cells.n_genes), dtype=torch.float64, device=dev)
    for chunk, chunk_groups in zip(plan_rows.split(CHUNK), plan_groups.split(CHUNK)):
        true_sum.index_add_(0, chunk_groups, cells.rows(chunk).double())
    reference = training_control_mean(cells)
    return ValidationPlan(
        source=source, conditions=conditions, held_out=held_out, rows=plan_rows, groups=plan_groups,
        counts=counts, reference=reference, delta_true=true_sum / counts.unsqueeze(1) - reference,
        top_de=torch.as_tensor(top_de_indices(adata, conditions, cells.genes), device=dev),
        type_reference=control_means_by_type(cells))


def holdout_conditions(cells, share: float, seed: int) -> list[str]:
    """A seeded share (at least 2, leaving at least 2) of the usable perturbed training conditions."""
    codes = np.unique(cells.condition_codes[cells.train_perturbed_idx].cpu().numpy())
    usable = [cells.conditions[c] for c in codes if bool(cells.usable[c])]
    n = min(max(2, round(share * len(usable))), len(usable) - 2)
    if n < 1:
        return []
    return sorted(np.random.default_rng(seed).choice(usable, n, replace=False).tolist())


def _condition_groups(cells, index: torch.Tensor, seed: int, only: list[str] | None = None):
    rng = np.random.default_rng(seed)
    cells_np = index.cpu().numpy()
    codes = cells.condition_codes.cpu().numpy()[cells_np]
    usable = cells.usable.cpu().numpy()
    rows, groups, conditions = [], [], []
    for code in np.unique(codes):
        if not usable[code] or (only is not None and cells.conditions[code] not in only):
            continue
        members = cells_np[codes == code]
        if len(members) > CELLS_PER_CONDITION:
            members = np.sort(rng.choice(members, CELLS_PER_CONDITION, replace=False))
        rows.append(members)
        groups.append(np.full(len(members), len(conditions)))
        conditions.append(cells.conditions[code])
    return rows, groups, conditions


def control_means_by_type(cells) -> torch.Tensor:
    """Mean expression of the training controls of each cell type [n_cell_types, G] (float64)."""
    controls = cells.train_idx[cells.is_control[cells.train_idx]]
    types = cells.cell_type_codes[controls]
    sums = expression_sums(cells, controls, cells.cell_type_codes, len(cells.cell_types))
    counts = torch.bincount(types, minlength=len(cells.cell_types)).double().clamp_min(1)
    return sums / counts.unsqueeze(1)


def mean_matching_offsets(x_controls, keys: torch.Tensor, n_keys: int, targets: torch.Tensor) -> torch.Tensor:
    """[n_keys, G]: what to add to the control cells of each key (a condition and cell type) so
    their mean becomes `targets[key]`. `x_controls` yields (positions, rows) chunks."""
    sums = torch.zeros((n_keys, targets.shape[1]), dtype=torch.float64, device=targets.device)
    for positions, x in x_controls:
        sums.index_add_(0, keys[positions], x.double())
    counts = torch.bincount(keys, minlength=n_keys).double()
    offsets = targets.double() - sums / counts.clamp_min(1).unsqueeze(1)
    return torch.where(counts.unsqueeze(1) > 0, offsets, torch.zeros_like(offsets)).float()


def training_control_mean(cells) -> torch.Tensor:
    """Mean expression of every training control cell [G] (float64)."""
    controls = cells.train_idx[cells.is_control[cells.train_idx]]
    total = torch.zeros(cells.n_genes, dtype=torch.float64, device=cells.device)
    for _, x in cells.batches(controls, CHUNK, shuffle=False):
        total += x.double().sum(0)
    return total / max(len(controls), 1)


def top_de_indices(adata, conditions: list[str], genes: list[str]) -> np.ndarray:
    """GEARS's `top_non_dropout_de_20` genes per condition as gene indices [K, 20] (the
    condition -> condition_name map as GEARS builds it); -1 where the dataset (or no `adata`) has no list."""
    out = np.full((len(conditions), TOP_DE), -1, dtype=np.int64)
    if adata is None:
        return out
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
def group_latent_shift(plan: ValidationPlan, latents: torch.Tensor, cells) -> torch.Tensor:
    """Real mean latent shift [K, z] of each planned condition from the training controls."""
    sums = torch.zeros((len(plan.conditions), latents.shape[1]), dtype=torch.float64, device=latents.device)
    sums.index_add_(0, plan.groups, latents[plan.rows].double())
    controls = cells.train_idx[cells.is_control[cells.train_idx]]
    return (sums / plan.counts.unsqueeze(1) - latents[controls].double().mean(0)).float()


@torch.no_grad()
def group_means(plan: ValidationPlan, cells, predict: Callable[..., dict[str, torch.Tensor]], *, seed: int,
                match_control_mean: bool = False) -> dict:
    """Per planned condition, the mean of each quantity `predict(rows, control_rows, groups,
    control_offsets)` returns for cells `rows` started from `control_rows` ({name: [B, ...]} ->
    {name: [K, ...]}). The controls are drawn with the same seed every epoch, so epochs are
    compared fairly; with `match_control_mean` each condition's draw is shifted (per cell type)
    to the training-control mean (`gan.match_control_mean`)."""
    generator = torch.Generator(cells.device).manual_seed(seed)
    partners = torch.cat([cells.control_partners(rows, generator) for rows in plan.rows.split(CHUNK)])
    n_types = len(cells.cell_types)
    keys = plan.groups * n_types + cells.cell_type_codes[partners]
    offsets = None
    if match_control_mean:
        positions = torch.arange(len(partners), device=cells.device)
        chunks = ((p, cells.rows(partners[p])) for p in positions.split(CHUNK))
        offsets = mean_matching_offsets(chunks, keys, len(plan.conditions) * n_types,
                                        plan.type_reference.repeat(len(plan.conditions), 1))
    sums: dict[str, torch.Tensor] = {}
    for rows, groups, controls, chunk_keys in zip(plan.rows.split(CHUNK), plan.groups.split(CHUNK),
                                                  partners.split(CHUNK), keys.split(CHUNK)):
        shift = None if offsets is None else offsets[chunk_keys]
        for name, values in predict(rows, controls, groups, shift).items():
            if name not in sums:
                sums[name] = torch.zeros((len(plan.conditions), values.shape[1]), dtype=torch.float64,
                                         device=cells.device)
            sums[name].index_add_(0, groups, values.double())
    return {name: total / plan.counts.unsqueeze(1) for name, total in sums.items()}


def score(plan: ValidationPlan, means: dict, latent_shift_true: torch.Tensor) -> ValidationScores:
    """Pearson of mean deltas over all genes and over each condition's top-20 DE genes, their
    mean squared error, and the diagnostics (module docstring); one read-back.

    `means` (from `group_means`): "expression" (prediction), "ceiling" (decoded control latent +
    real shift), "prompt" and "latent_shift" (predicted), and "clipped" (the predicted cells with
    negative values set to 0, averaged) per condition; `latent_shift_true` [K, z].
    """
    delta_true, delta_pred = plan.delta_true, means["expression"] - plan.reference
    k = min(TOP_DE, delta_true.shape[1])  # a screen of fewer than 20 genes ranks all of them
    top = plan.top_de[:, :k]
    top = torch.where(top >= 0, top, delta_true.abs().topk(k, dim=1).indices)
    true_norm = latent_shift_true.double().norm(dim=1).clamp_min(1e-12)
    values = torch.stack([
        condition_pearson(plan, means).nanmean(),
        pearson(delta_pred.gather(1, top), delta_true.gather(1, top)).nanmean(),
        ((delta_pred - delta_true) ** 2).mean(),
        mean_pairwise_correlation(delta_pred),
        mean_pairwise_correlation(delta_true),
        (means["prompt"].norm(dim=1) / true_norm).mean(),
        (means["latent_shift"].norm(dim=1) / true_norm).mean(),
        pearson(means["ceiling"] - plan.reference, delta_true).nanmean(),
        pearson(means["clipped"] - plan.reference, delta_true).nanmean(),
    ])
    return ValidationScores(*values.tolist())


def condition_pearson(plan: ValidationPlan, means: dict) -> torch.Tensor:
    """Pearson delta of each planned condition [K] (`score` averages it)."""
    return pearson(means["expression"] - plan.reference, plan.delta_true)


def selectable(per_condition: torch.Tensor, start: torch.Tensor | None, standard_errors: float) -> bool:
    """Whether an epoch with these per-condition validation scores may replace the untrained
    start (`start`, the same conditions): its mean gain over the start exceeds `standard_errors`
    standard errors of the per-condition gains (`gan.selection_se`; 0: always)."""
    if standard_errors <= 0 or start is None:
        return True
    gain = (per_condition - start).double()
    gain = gain[gain.isfinite()]
    if len(gain) < 2:
        return False
    return bool(gain.mean() > standard_errors * gain.std() / len(gain) ** 0.5)


def mean_pairwise_correlation(deltas: torch.Tensor) -> torch.Tensor:
    """Mean Pearson correlation over all pairs of rows (NaN with fewer than two rows)."""
    if len(deltas) < 2:
        return torch.tensor(float("nan"), dtype=torch.float64, device=deltas.device)
    centred = deltas - deltas.mean(1, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    corr = unit @ unit.T
    n = len(deltas)
    return (corr.sum() - corr.diagonal().sum()) / (n * (n - 1))
