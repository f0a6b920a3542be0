"""`regina evaluate` as a Python function: score predictions and baselines against a held-out split.

Flow: truth (dataset) + split -> predictions lined up by gene name -> baselines fitted on the
training conditions -> precision metrics for every model in one batch -> distribution metrics per
condition -> metrics.json, per_condition.csv, plots.

Baselines produce mean profiles, not cells. To give them distribution metrics that are comparable
with the model's, each baseline's cells are the very control cells the model started from
(obs `control_cell`; a seeded random draw of control cells when the file has none), shifted by the
baseline's predicted change. `no_change` is then literally the control cells. When the
predictions are mean profiles (GEARS form) nothing has cells and only precision metrics exist.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from regina_cli import keys
from regina_cli.errors import ReginaError
from regina_cli.io import atomic_dir
from regina_cli.evaluate import report
from regina_cli.evaluate.baselines import baseline_profiles, parse_baselines, training_data
from regina_cli.evaluate.distribution import PredictedCells, TrueCells, distribution_metrics, random_projections
from regina_cli.evaluate.metrics import DISTRIBUTION_METRICS, PRECISION_METRICS, TOP_K, GeneSets, precision_metrics
from regina_cli.evaluate.report import MODEL, OTHER_SUBGROUP
from regina_cli.evaluate.predictions import CELLS, Predictions, load_predictions
from regina_cli.evaluate.truth import Truth

# True cells per condition for the pairwise distribution metrics (MMD, energy, sliced Wasserstein):
# up to 100, as the original evaluation did; their cost grows with its square. Means and standard
# deviations always use every true cell.
MAX_TRUE_CELLS = 100


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReginaError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def de_gene_sets(truth: Truth, conditions: list[str], device) -> GeneSets:
    """The GEARS DE gene selections of `conditions` as padded tensors (see metrics.GeneSets)."""
    def padded(lists: list[list[int]], width: int):
        index = torch.zeros(len(lists), max(width, 1), dtype=torch.long)
        valid = torch.zeros_like(index, dtype=torch.bool)
        for row, items in enumerate(lists):
            index[row, : len(items)] = torch.tensor(items, dtype=torch.long)
            valid[row, : len(items)] = True
        return index.to(device), valid.to(device)

    de = [truth.de_indices(keys.UNS_RANK_GENES, c, TOP_K) for c in conditions]
    nd = [truth.de_indices(keys.UNS_TOP_DE_20, c, TOP_K) for c in conditions]
    de_idx, de_ok = padded(de, TOP_K)
    nd_idx, nd_ok = padded(nd, max(map(len, nd), default=0))

    def masks(key):
        return torch.from_numpy(np.stack([truth.gene_mask(key, c) for c in conditions])).to(device)

    return GeneSets(de_idx, de_ok, nd_idx, nd_ok, masks(keys.UNS_NON_DROPOUT_IDX), masks(keys.UNS_NON_ZEROS_IDX))


def score_precision(profiles: np.ndarray, truth: Truth, conditions: list[str], gene_sets: GeneSets, device) -> dict:
    """Precision metrics for mean profiles [C, G] of `conditions`: {metric: np.ndarray[C]}."""
    stats = [truth.stats(c) for c in conditions]

    def t(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float64, device=device)

    out = precision_metrics(
        t(profiles), t(np.stack([s.mean for s in stats])), t(truth.control_mean), gene_sets,
        t(np.stack([s.std for s in stats])), torch.from_numpy(np.stack([s.all_zero for s in stats])).to(device),
    )
    return {m: v.cpu().numpy() for m, v in out.items()}


def _subsample(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return rows if len(rows) <= limit else np.sort(rng.choice(rows, limit, replace=False))


def _control_rows(truth: Truth, names: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """The control cells a prediction came from, else a seeded draw of `n` control cells."""
    if names is not None:
        index = truth.adata.obs_names.get_indexer(names)
        if (index >= 0).all():
            return index
    pool = truth.control_rows
    return rng.choice(pool, n, replace=n > len(pool))


def score_distributions(preds: Predictions, profiles: dict[str, dict[str, np.ndarray]], truth: Truth, *,
                        seed: int, device, max_true_cells: int = MAX_TRUE_CELLS) -> dict[tuple[str, str], dict]:
    """{(model, condition): {metric: value}} for the model's cells and each baseline's shifted controls."""
    rng = np.random.default_rng(seed)
    projections = random_projections(len(truth.genes), seed, device=device)
    control_mean = torch.as_tensor(truth.control_mean, dtype=torch.float32, device=device)
    results = {}
    for i, condition in enumerate(preds.conditions):
        stats = truth.stats(condition)
        sample = torch.from_numpy(truth.cells(_subsample(stats.rows, max_true_cells, rng))).to(device)
        reference = TrueCells.build(
            sample, projections,
            mean=torch.as_tensor(stats.mean, dtype=torch.float32, device=device),
            std=torch.as_tensor(stats.std, dtype=torch.float32, device=device),
        )
        model_cells = torch.from_numpy(preds.cells[i]).to(device)
        results[(MODEL, condition)] = distribution_metrics(PredictedCells.build(model_cells, reference), reference)
        covered = [name for name, by_condition in profiles.items() if condition in by_condition]
        if not covered:
            continue
        rows = _control_rows(truth, preds.control_cells[i], len(model_cells), rng)
        controls = PredictedCells.build(torch.from_numpy(truth.cells(rows)).to(device), reference)
        for name in covered:
            shift = torch.as_tensor(profiles[name][condition], dtype=torch.float32, device=device) - control_mean
            results[(name, condition)] = distribution_metrics(controls.shifted(shift, reference), reference)
    return results


def subgroup_of(split, condition: str) -> str:
    """GEARS test subgroup of a test condition; `val`/`train`/`unsplit` for the others."""
    set_name = split.set_of(condition)
    if set_name == "test":
        return split.subgroup_of(condition) or OTHER_SUBGROUP
    return set_name or "unsplit"


@dataclass
class Evaluation:
    table: pd.DataFrame  # one row per (condition, model)
    profiles: dict[str, dict[str, np.ndarray]]  # baseline -> condition -> mean profile


def _rows_of(gene_sets: GeneSets, rows: list[int]) -> GeneSets:
    return GeneSets(*(getattr(gene_sets, f.name)[rows] for f in fields(GeneSets)))


def evaluate_loaded(truth: Truth, split, preds: Predictions, *, baselines: list[str], seed: int = 0,
                    device="cpu", max_true_cells: int = MAX_TRUE_CELLS) -> Evaluation:
    """The engine without file I/O (tests and notebooks call it directly)."""
    device = torch.device(device)
    conditions = preds.conditions
    profiles = baseline_profiles(baselines, training_data(truth, split.train), conditions)
    gene_sets = de_gene_sets(truth, conditions, device)
    position = {c: i for i, c in enumerate(conditions)}

    with torch.inference_mode():
        scored = {MODEL: (conditions, score_precision(preds.means, truth, conditions, gene_sets, device))}
        for name, by_condition in profiles.items():
            covered = [c for c in conditions if c in by_condition]
            if covered:
                subset = _rows_of(gene_sets, [position[c] for c in covered])
                values = np.stack([by_condition[c] for c in covered])
                scored[name] = (covered, score_precision(values, truth, covered, subset, device))
        has_cells = preds.form == CELLS
        distributions = (
            score_distributions(preds, profiles, truth, seed=seed, device=device, max_true_cells=max_true_cells)
            if has_cells else {}
        )

    rows = []
    for model, (covered, values) in scored.items():
        for j, condition in enumerate(covered):
            row = {
                "condition": condition,
                "model": model,
                "subgroup": subgroup_of(split, condition),
                # cells scored by the distribution metrics; 0 when only mean profiles exist
                "n_cells": len(preds.cells[position[condition]]) if has_cells else 0,
            }
            row.update({m: float(values[m][j]) for m in PRECISION_METRICS})
            dist = distributions.get((model, condition), {})
            row.update({m: dist.get(m, float("nan")) for m in DISTRIBUTION_METRICS})
            rows.append(row)
    return Evaluation(pd.DataFrame(rows), profiles)


def _resolve_split(name: str, split: str | None, provenance: dict, data_dir) -> str:
    """--split, else the split `regina predict` recorded, else the dataset's only split."""
    if split:
        return split
    if isinstance(provenance.get("split"), str):
        return provenance["split"]
    folder = keys.dataset_dir(name, data_dir) / keys.SPLITS_DIR
    found = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise ReginaError(
        f"pass --split <mode>_<seed> (found {', '.join(found) if found else 'no splits'} in {folder}); "
        "`regina split NAME` writes one"
    )


def evaluate(
    name: str,
    predictions: str | Path,
    *,
    split: str | None = None,
    out: str | Path | None = None,
    baselines: str = "all",
    plots: bool = True,
    condition_key: str = keys.OBS_CONDITION,
    data_dir: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    max_true_cells: int = MAX_TRUE_CELLS,
) -> dict:
    """Score a prediction file against dataset `name` on a split; write metrics, table and plots.

    Returns the summary written to metrics.json plus `out` (the folder written).
    """
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.split import load_split

    predictions = Path(predictions)
    baseline_names = parse_baselines(baselines)
    out = Path(out) if out is not None else predictions.parent / keys.EVAL_DIR
    torch_device = resolve_device(device)
    truth = Truth(read_dataset(name, data_dir))
    preds = load_predictions(predictions, truth, condition_key=condition_key)
    split_name = _resolve_split(name, split, preds.provenance, data_dir)
    split_obj = load_split(name, split_name, data_dir)
    result = evaluate_loaded(truth, split_obj, preds, baselines=baseline_names, seed=seed,
                             device=torch_device, max_true_cells=max_true_cells)
    missing_test = sorted({truth.resolve(c) or c for c in split_obj.test} - set(preds.conditions))
    context = {
        "dataset": name,
        "split": split_name,
        "predictions": str(predictions),
        "prediction_form": preds.form,
        "condition_key": condition_key,
        "seed": seed,
        "device": str(torch_device),
        "max_true_cells": max_true_cells,
        "baselines": baseline_names,
        "n_conditions_evaluated": len(preds.conditions),
        "n_skipped_not_in_dataset": len(preds.skipped),
        "skipped_not_in_dataset": preds.skipped,
        "n_test_conditions_not_predicted": len(missing_test),
        "test_conditions_not_predicted": missing_test,
        "n_control_rows_ignored": preds.n_control_rows,
        "predictions_provenance": {k: v.item() if isinstance(v, np.generic) else v for k, v in preds.provenance.items()
                                   if isinstance(v, (str, int, float, bool, np.generic))},
    }
    with atomic_dir(out) as staging:  # every file appears at once, replacing the previous folder whole
        summary = report.write_report(result, context, staging, truth=truth, preds=preds, plots=plots)
    return {**summary, "out": str(out)}
