"""Precision metrics on mean expression changes: pure, vectorised tensor functions.

Every function takes one row per condition ([C, G] tensors) and returns one value per condition,
so a whole test set is scored in a handful of tensor operations. The GEARS-named metrics follow
cell-gears' `deeper_analysis` / `non_dropout_analysis` (gears/inference.py) exactly, including
their quirks, so the numbers can be put beside published GEARS tables:

* deltas are taken against the mean of *all* control cells;
* a Pearson correlation that is undefined (a constant vector) counts as 0;
* "correct direction" compares `sign()` values, so a predicted change of exactly 0 is neither
  correct nor opposite;
* `top20_de` genes are the first 20 of `rank_genes_groups_cov_all`, the `_non_dropout` variants
  use `top_non_dropout_de_20` (which can hold fewer than 20 genes).

`discrimination_score_l1` follows cell-eval's `discrimination_score` (metric "l1"); the DE-based
cell-eval metrics live in de.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MetricInfo:
    higher_is_better: bool
    description: str
    kind: str  # "precision" (mean profiles suffice), "distribution" or "de" (both need predicted cells)


METRICS: dict[str, MetricInfo] = {
    # --- GEARS deeper_analysis ---
    "pearson_delta": MetricInfo(True, "GEARS: Pearson of predicted vs true mean change, all genes", "precision"),
    "pearson_delta_top20_de": MetricInfo(
        True, "GEARS: Pearson of mean change on the top 20 DE genes (rank_genes_groups_cov_all)", "precision"
    ),
    "mse_top20_de": MetricInfo(False, "GEARS: MSE of mean change on the top 20 DE genes", "precision"),
    "frac_correct_direction_20": MetricInfo(
        True, "GEARS: share of top 20 DE genes whose change has the true sign", "precision"
    ),
    "frac_correct_direction_all": MetricInfo(True, "GEARS: share of all genes whose change has the true sign", "precision"),
    # --- GEARS non_dropout_analysis ---
    "pearson_delta_top20_de_non_dropout": MetricInfo(
        True, "GEARS: Pearson of mean change on top_non_dropout_de_20", "precision"
    ),
    "mse_top20_de_non_dropout": MetricInfo(False, "GEARS: MSE of mean change on top_non_dropout_de_20", "precision"),
    "frac_correct_direction_top20_non_dropout": MetricInfo(
        True, "GEARS: share of top_non_dropout_de_20 genes with the true sign", "precision"
    ),
    "frac_opposite_direction_top20_non_dropout": MetricInfo(
        False, "GEARS: share of top_non_dropout_de_20 genes with the opposite sign", "precision"
    ),
    "frac_correct_direction_non_dropout": MetricInfo(
        True, "GEARS: share of non-dropout genes (non_dropout_gene_idx) with the true sign", "precision"
    ),
    "frac_correct_direction_non_zero": MetricInfo(
        True, "GEARS: share of non-zero genes (non_zeros_gene_idx) with the true sign", "precision"
    ),
    "frac_sigma_below_1_non_dropout": MetricInfo(
        True, "GEARS: share of top_non_dropout_de_20 genes predicted within 1 true-cell s.d. of the true mean",
        "precision",
    ),
    # --- normalised errors (1.0 = as bad as predicting no change) ---
    "nmse_top20_de": MetricInfo(
        False, "sum of squared change errors / sum of squared true changes, top 20 DE genes", "precision"
    ),
    "nmse_all": MetricInfo(False, "sum of squared change errors / sum of squared true changes, all genes", "precision"),
    # --- the original REGINA metrics: top 20 genes by |true change| ---
    "pearson_delta_top20_abs": MetricInfo(True, "REGINA: Pearson of mean change, top 20 genes by |true change|", "precision"),
    # --- Systema (Vinas Torne et al. 2025): change from the perturbed reference, not from control ---
    "pearson_delta_pert": MetricInfo(
        True, "Systema: Pearson of predicted vs true mean minus the average training perturbation (each training "
        "condition's mean counted once; on a screen of several cell types with matched baselines, each type's, mixed "
        "as the condition's cells are), all genes; what a prediction says beyond the change perturbations share "
        "(train_mean, which pools cells, scores about 0 where training conditions have alike cell counts)", "precision",
    ),
    "pearson_delta_pert_top20_de": MetricInfo(
        True, "Systema: as pearson_delta_pert, on the top 20 DE genes (rank_genes_groups_cov_all)", "precision"
    ),
    "frac_wrong_sign_top20_abs": MetricInfo(
        False, "REGINA: share of top 20 genes by |true change| predicted with the opposite sign", "precision"
    ),
    "frac_wrong_sign_all": MetricInfo(False, "REGINA: share of all genes predicted with the opposite sign", "precision"),
    "nmse_top20_abs": MetricInfo(False, "REGINA: normalised MSE of mean change, top 20 genes by |true change|", "precision"),
    # --- cell-eval ---
    "discrimination_score_l1": MetricInfo(
        True, "cell-eval: 1 - (rank of the true condition among all scored conditions by L1 distance of "
        "mean changes, targeted genes left out) / number of conditions", "precision",
    ),
    # --- distribution metrics (see distribution.py) ---
    "mmd_rbf": MetricInfo(False, "squared MMD, RBF kernels at 5 bandwidths around the true cells' median distance", "distribution"),
    "sliced_wasserstein": MetricInfo(False, "sliced Wasserstein-1 distance over 100 seeded random projections", "distribution"),
    "energy_distance": MetricInfo(False, "energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Euclidean)", "distribution"),
    "variance_pearson": MetricInfo(True, "variance preservation: Pearson of per-gene standard deviations", "distribution"),
    "l1_means": MetricInfo(False, "mean over genes of |predicted mean - true mean|", "distribution"),
}

def _de_metrics() -> dict[str, MetricInfo]:
    out = {}
    for kind, size in ((k, n) for k in ("overlap", "precision") for n in DE_SIZES):
        top = f"the top {size}" if size else "all"
        among = "true" if kind == "overlap" else "predicted"
        out[f"de_{kind}_at_{size or 'N'}"] = MetricInfo(
            True, f"cell-eval's {kind}_at_{size or 'N'} with a Welch t-test: share of {top} {among} DE genes "
            "(FDR < 0.05, by |log2 fold change|) found in both", "de",
        )
    return out


DE_SIZES = (None, 50, 100)  # cell-eval's N (every significant gene), 50, 100
METRICS.update(_de_metrics())
# Means suffice for these too, but each condition is ranked among all of them (discrimination_score).
POOLED_METRICS = ["discrimination_score_l1"]
PRECISION_METRICS = [m for m, info in METRICS.items() if info.kind == "precision" and m not in POOLED_METRICS]
DISTRIBUTION_METRICS = [m for m, info in METRICS.items() if info.kind == "distribution"]
DE_METRICS = [m for m, info in METRICS.items() if info.kind == "de"]
TOP_K = 20


@dataclass
class GeneSets:
    """Per-condition gene selections from the dataset's GEARS DE fields.

    Index sets are padded to a common width; the boolean `*_valid` masks mark real entries, so a
    condition with fewer DE genes (or none: no uns entry) is handled without Python loops.
    """

    top20_de: torch.Tensor  # [C, 20] long
    top20_de_valid: torch.Tensor  # [C, 20] bool
    top20_non_dropout: torch.Tensor  # [C, K<=20] long
    top20_non_dropout_valid: torch.Tensor  # [C, K] bool
    non_dropout: torch.Tensor  # [C, G] bool
    non_zero: torch.Tensor  # [C, G] bool


def _masked_pearson(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson over the entries where `mask` is true; NaN when undefined."""
    mask = mask.to(a.dtype)
    n = mask.sum(-1, keepdim=True)
    a_c = (a - (a * mask).sum(-1, keepdim=True) / n) * mask
    b_c = (b - (b * mask).sum(-1, keepdim=True) / n) * mask
    denom = torch.sqrt((a_c**2).sum(-1) * (b_c**2).sum(-1))
    r = (a_c * b_c).sum(-1) / denom
    return torch.where(denom > 0, r, torch.full_like(r, float("nan")))


def pearson(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise Pearson correlation ([C, G] -> [C]); NaN where a row is constant or empty."""
    return _masked_pearson(a, b, torch.ones_like(a, dtype=torch.bool) if mask is None else mask)


def gears_pearson(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GEARS replaces an undefined Pearson by 0; rows without any gene stay NaN (no metric).
    The figures' r uses it too, so a constant prediction (no_change) shows the tables' 0 there."""
    r = _masked_pearson(a, b, mask)
    return torch.where(mask.any(-1), torch.nan_to_num(r, nan=0.0), r)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1)  # NaN for an empty row: metric undefined


def _normalised_mse(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error relative to the 'no change' prediction, whose score is therefore 1."""
    mask = mask.to(pred.dtype)
    return ((pred - true) ** 2 * mask).sum(-1) / (true**2 * mask).sum(-1)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, index.clamp_min(0))


def precision_metrics(
    pred_mean: torch.Tensor,
    true_mean: torch.Tensor,
    control_mean: torch.Tensor,
    genes: GeneSets,
    true_std: torch.Tensor,
    true_all_zero: torch.Tensor,
    perturbed_reference: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All precision metrics, one value per condition.

    pred_mean, true_mean: [C, G] mean profiles; control_mean: [G]; true_std: [C, G] standard
    deviation (ddof 0) over the true cells; true_all_zero: [C, G] true where every true cell is 0;
    perturbed_reference: [G] the average training perturbation, or [C, G] one per condition (Systema's
    metrics are NaN without).
    """
    pred_delta = pred_mean - control_mean
    true_delta = true_mean - control_mean
    all_genes = torch.ones_like(pred_delta, dtype=torch.bool)
    same_sign = torch.sign(pred_delta) == torch.sign(true_delta)
    opposite_sign = pred_delta * true_delta < 0
    out: dict[str, torch.Tensor] = {}

    out["pearson_delta"] = gears_pearson(pred_delta, true_delta, all_genes)
    out["frac_correct_direction_all"] = same_sign.to(pred_delta.dtype).mean(-1)

    de, de_ok = genes.top20_de, genes.top20_de_valid
    p_de, t_de = _gather(pred_delta, de), _gather(true_delta, de)
    out["pearson_delta_top20_de"] = gears_pearson(p_de, t_de, de_ok)
    out["mse_top20_de"] = _masked_mean((p_de - t_de) ** 2, de_ok)
    # GEARS divides by 20 whatever the number of listed genes.
    n_correct = ((torch.sign(p_de) == torch.sign(t_de)) & de_ok).sum(-1).to(pred_delta.dtype)
    out["frac_correct_direction_20"] = torch.where(de_ok.any(-1), n_correct / TOP_K, torch.nan)
    out["nmse_top20_de"] = _normalised_mse(p_de, t_de, de_ok)

    nd, nd_ok = genes.top20_non_dropout, genes.top20_non_dropout_valid
    p_nd, t_nd = _gather(pred_delta, nd), _gather(true_delta, nd)
    out["pearson_delta_top20_de_non_dropout"] = gears_pearson(p_nd, t_nd, nd_ok)
    out["mse_top20_de_non_dropout"] = _masked_mean((p_nd - t_nd) ** 2, nd_ok)
    out["frac_correct_direction_top20_non_dropout"] = _masked_mean(
        (torch.sign(p_nd) == torch.sign(t_nd)).to(pred_delta.dtype), nd_ok
    )
    out["frac_opposite_direction_top20_non_dropout"] = _masked_mean((p_nd * t_nd < 0).to(pred_delta.dtype), nd_ok)
    out["frac_correct_direction_non_dropout"] = _masked_mean(same_sign.to(pred_delta.dtype), genes.non_dropout)
    out["frac_correct_direction_non_zero"] = _masked_mean(same_sign.to(pred_delta.dtype), genes.non_zero)
    out["frac_sigma_below_1_non_dropout"] = _frac_sigma_below_1(
        _gather(pred_mean, nd), _gather(true_mean, nd), _gather(true_std, nd), _gather(true_all_zero, nd), nd_ok
    )

    out["nmse_all"] = _normalised_mse(pred_delta, true_delta, all_genes)
    top_abs = torch.topk(true_delta.abs(), min(TOP_K, true_delta.shape[1]), dim=1).indices
    p_top, t_top = _gather(pred_delta, top_abs), _gather(true_delta, top_abs)
    top_ok = torch.ones_like(top_abs, dtype=torch.bool)
    out["pearson_delta_top20_abs"] = gears_pearson(p_top, t_top, top_ok)
    out["frac_wrong_sign_top20_abs"] = (p_top * t_top < 0).to(pred_delta.dtype).mean(-1)
    out["frac_wrong_sign_all"] = opposite_sign.to(pred_delta.dtype).mean(-1)
    out["nmse_top20_abs"] = _normalised_mse(p_top, t_top, top_ok)
    out.update(_systema(pred_mean, true_mean, perturbed_reference, de, de_ok))
    return out


def _systema(pred_mean, true_mean, reference, de, de_ok) -> dict[str, torch.Tensor]:
    """Pearson of the changes from the perturbed reference (Systema's corr_all_allpert and
    corr_20de_allpert): undefined (NaN), not 0, for a prediction equal to the reference, so
    predicting what every perturbation shares never scores."""
    if reference is None:
        nan = torch.full(pred_mean.shape[:1], float("nan"), dtype=pred_mean.dtype, device=pred_mean.device)
        return {"pearson_delta_pert": nan, "pearson_delta_pert_top20_de": nan.clone()}
    pred, true = pred_mean - reference, true_mean - reference
    return {"pearson_delta_pert": pearson(pred, true),
            "pearson_delta_pert_top20_de": _masked_pearson(_gather(pred, de), _gather(true, de), de_ok)}


def _frac_sigma_below_1(pred_mean, true_mean, true_std, all_zero, valid) -> torch.Tensor:
    """GEARS: among DE genes with spread in the true cells, the share predicted within one s.d.

    Undefined (NaN) when every DE gene is zero in every true cell, as GEARS then skips it.
    """
    spread = valid & (true_std > 0)
    within = (pred_mean - true_mean).abs() <= true_std
    frac = (within & spread).sum(-1).to(pred_mean.dtype) / spread.sum(-1).to(pred_mean.dtype)
    defined = (valid & ~all_zero).any(-1) & spread.any(-1)
    return torch.where(defined, frac, torch.nan)


def discrimination_score(pred_delta: torch.Tensor, true_delta: torch.Tensor, truth_row: torch.Tensor,
                         targets: torch.Tensor, targets_valid: torch.Tensor) -> torch.Tensor:
    """cell-eval's discrimination_score_l1, one value per predicted condition.

    pred_delta [C, G] predicted changes; true_delta [K, G] true changes of *every* scored condition
    (the pool to rank among); truth_row [C] the pool row of each prediction's own condition;
    targets [C, T] (with validity mask) the genes each condition targets, left out of its
    distances. The score is 1 - rank / K, rank 0 when the true condition is the nearest.
    """
    distances = torch.cdist(pred_delta, true_delta, p=1.0)  # [C, K]
    own = _gather(pred_delta, targets)  # [C, T]
    pool = true_delta[:, targets.clamp_min(0)].permute(1, 0, 2)  # [C, K, T]
    excluded = ((own[:, None, :] - pool).abs() * targets_valid[:, None, :]).sum(-1)
    distances = distances - excluded
    own_distance = distances.gather(1, truth_row[:, None])
    rank = (distances < own_distance).sum(1)
    return 1.0 - rank.to(pred_delta.dtype) / true_delta.shape[0]
