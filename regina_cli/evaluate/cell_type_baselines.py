"""Baselines matched to each condition's cell-type mix, for screens of several cell types.

Why: GEARS measures every change from the mean of all control cells. On a screen of several cell
lines, a condition whose cells lean towards one line moves away from that mean by its mix alone.
`regina predict` draws each condition's controls in that condition's own mix, so its predictions
carry that move; baselines fitted on the pooled cells do not (on McFaline the mix alone scored a
pearson_delta of 0.32). Matched, each baseline is fitted per cell type, on that type's controls and
training cells, and a condition's profile is its cell types' predictions mixed in the proportions
of its measured cells. no_change becomes the mix of the types' control means: what a model that
knows the mix and nothing about the perturbation scores. Systema's reference (the average training
perturbation) is mixed likewise. A screen of one cell type is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from regina_cli import keys
from regina_cli.evaluate.baselines import BASELINE_FUNCTIONS, TrainingData, perturbed_reference
from regina_cli.evaluate.truth import group_statistics

MIN_CELLS = 3  # cells of one cell type a training condition needs to enter that type's pseudo-bulk


@dataclass
class MatchedBaselines:
    """Baseline profiles mixed per condition, and each cell type's predicted change behind them."""

    profiles: dict[str, dict[str, np.ndarray]]  # baseline -> condition -> [G] mixed mean profile
    # baseline -> condition -> cell type -> [G] change from that type's control mean; a type the
    # baseline cannot predict for the condition gets the condition's mixed change
    changes: dict[str, dict[str, dict[str, np.ndarray]]]
    # condition -> [G] Systema's average training perturbation, of each cell type, mixed likewise
    references: dict[str, np.ndarray]
    # baseline -> cell types that took the pooled baseline's change somewhere (too few training cells)
    borrowed: dict[str, list[str]]


def screen_cell_types(truth) -> np.ndarray | None:
    """Each cell's type (obs `cell_type`) where the controls hold at least two types, else None."""
    obs = truth.adata.obs
    if keys.OBS_CELL_TYPE not in obs:
        return None
    types = obs[keys.OBS_CELL_TYPE].astype(str).to_numpy()
    return types if len(set(types[truth.control_rows])) > 1 else None


def condition_mix(truth, cell_types: np.ndarray, condition: str) -> dict[str, float]:
    """Share of each cell type among the condition's measured cells."""
    found, counts = np.unique(cell_types[truth.rows(condition)], return_counts=True)
    return {str(t): float(n) / counts.sum() for t, n in zip(found, counts)}


def _per_type_training(truth, train: TrainingData, cell_types: np.ndarray) -> dict[str, TrainingData]:
    """The training pseudo-bulk of each cell type that has controls: its own control mean, and the
    training conditions with at least MIN_CELLS cells of that type."""
    out = {}
    for cell_type in sorted(set(cell_types[truth.control_rows])):
        of_type = cell_types == cell_type
        groups = [truth.control_rows[of_type[truth.control_rows]]]
        kept = []
        for condition in train.conditions:
            rows = truth.rows(condition)
            rows = rows[of_type[rows]]
            if len(rows) >= MIN_CELLS:
                groups.append(rows)
                kept.append(condition)
        stats = group_statistics(truth.adata.X, groups, truth.columns)
        means = np.stack([s.mean for s in stats[1:]]) if kept else np.zeros((0, len(truth.genes)))
        out[cell_type] = TrainingData(truth.genes, stats[0].mean, kept, means,
                                      np.array([len(g) for g in groups[1:]], dtype=np.int64))
    return out


def matched_baselines(names: list[str], truth, train: TrainingData, conditions: list[str],
                      cell_types: np.ndarray) -> MatchedBaselines:
    """Every baseline of `names` fitted per cell type. A cell type it cannot predict a condition in
    (too few training cells of that type) takes the pooled baseline's change from its own control
    mean (`borrowed` says where); a condition holding cells of a type without controls is not
    predicted."""
    strata = _per_type_training(truth, train, cell_types)
    mixes = {c: condition_mix(truth, cell_types, c) for c in conditions}
    every_type = [str(t) for t in np.unique(cell_types)]
    profiles, changes, borrowed = {}, {}, {}
    pooled_reference = perturbed_reference(train)
    references = {}
    if pooled_reference is not None:
        type_references = {t: data.means.mean(0) if data.conditions
                           else data.control_mean + pooled_reference - train.control_mean for t, data in strata.items()}
        references = {c: sum(share * type_references[t] for t, share in mix.items()) for c, mix in mixes.items()
                      if mix and all(t in strata for t in mix)}
    for name in names:
        per_type = {t: BASELINE_FUNCTIONS[name](data, conditions) for t, data in strata.items()}
        pooled = BASELINE_FUNCTIONS[name](train, conditions)
        profiles[name], changes[name], borrowed[name] = {}, {}, set()
        for condition, mix in mixes.items():
            if not mix or any(t not in strata for t in mix):
                continue
            own = {t: per_type[t][condition] - strata[t].control_mean for t in strata if condition in per_type[t]}
            missing = [t for t in mix if t not in own]
            if missing:
                if condition not in pooled:
                    continue
                own.update({t: pooled[condition] - train.control_mean for t in missing})
                borrowed[name].update(missing)
            mixed = sum(share * own[t] for t, share in mix.items())
            profiles[name][condition] = sum(share * strata[t].control_mean for t, share in mix.items()) + mixed
            changes[name][condition] = {t: own.get(t, mixed) for t in every_type}
    return MatchedBaselines(profiles, changes, references, {n: sorted(t) for n, t in borrowed.items() if t})
