"""How much of a condition's distribution distance is left once its mean change is known exactly.

    python benchmarks/shape_ceiling.py --workdir /work/bench/shape --datasets papalexi demo

REGINA's default predictions are control cells moved by the expression prior's mean change (phase
2 keeps its untrained start, benchmarks/README.md): every cell of a condition gets the same shift.
What could a cell-level model (the cycle-GAN's job) add on top, by the distribution metrics
`regina evaluate` reports? This script bounds it without training anything. For each *training*
condition of a split (split seed S, read from `<workdir>/<dataset>/seed<S>/data` as
benchmarks/quality.py leaves it), its cells are halved at random: half A is the reference (at most
`--reference-cells`, as `regina evaluate` subsamples), half B stands in for a perfect model, and
each arm below gives as many cells as B has, so every arm carries the same sample-size bias:

* `other half`: B itself, the floor no model can beat on this sample;
* `controls`: control cells, unmoved (no_change);
* `controls + true mean`: the same control cells moved by B's mean change from the mean of all
  controls: the draw's own mean keeps its sampling noise;
* `... draw's mean matched`: moved onto B's mean exactly (what `gan.match_control_mean`, on by
  default, does for REGINA's draws): the best any shift-only prediction can do;
* `... clipped at 0`: that, negative values set to 0 (what `predict --clip` does);
* `... with each gene's spread`: each gene's deviations from the draw's mean also scaled to B's
  standard deviation (mean and per-gene spread both known);
* `... as a mixture`: a share p of the drawn cells moved by the change / p and the rest left
  as they are (knock-out cells and cells that escaped their guide), with the p of the grid
  (1 included) that scores best on each condition: an optimistic bound for any responder-share
  model.

Energy distance, MMD and variance Pearson are `regina evaluate`'s own functions
(`evaluate.distribution`). No model is trained and no test condition is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from regina_cli.data.conditions import is_control
from regina_cli.data.split import load_split
from regina_cli.evaluate.distribution import PredictedCells, TrueCells, distribution_metrics, random_projections
from regina_cli.evaluate.run import MAX_TRUE_CELLS
from workdir import load_average, read_screen, seed_data, split_of

ARMS = ("other half", "controls", "controls + true mean", "... draw's mean matched", "... clipped at 0",
        "... with each gene's spread", "... as a mixture")
MIXTURE_SHARES = (0.8, 0.6, 0.5, 0.4, 0.3)
METRICS = ("energy_distance", "mmd_rbf", "variance_pearson")


def arms(half: torch.Tensor, controls: torch.Tensor, control_mean: torch.Tensor,
         control_sd: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each arm's cells for one condition, as many as `half` (B) has; the mixture arm has one
    entry per share p (`mixture p`), of which `condition_scores` keeps the best."""
    target, drawn_mean = half.mean(0), controls.mean(0)
    change = target - drawn_mean  # from the draw's own mean: lands exactly on B's
    matched = controls + change
    ratio = torch.where(control_sd > 0, half.std(0) / control_sd.clamp_min(1e-12), torch.ones_like(control_sd))
    spread = target + (controls - drawn_mean) * ratio
    mixtures = {}
    for share in MIXTURE_SHARES:  # k of the n cells moved by the change x n / k: the mean lands on target
        k = max(round(share * len(controls)), 1)
        mixed = controls.clone()
        mixed[:k] += change * (len(controls) / k)
        mixtures[f"mixture {share}"] = mixed
    arms_ = (half, controls, controls + target - control_mean, matched, matched.clamp_min(0.0), spread)
    return {**dict(zip(ARMS, arms_)), **mixtures}


def condition_scores(adata, conditions: list[str], seed: int, min_cells: int, reference_cells: int) -> list[dict]:
    """One row per training condition with at least 2 x `min_cells` cells: each arm's metrics."""
    x = torch.as_tensor(adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X), dtype=torch.float32)
    labels = adata.obs["condition"].astype(str).to_numpy()
    if "cell_type" in adata.obs and adata.obs["cell_type"].nunique() > 1:
        raise SystemExit("the draws here ignore cell types, and this screen has several: not supported")
    controls = x[np.asarray([is_control(c) for c in labels])]
    control_mean, control_sd = controls.mean(0), controls.std(0)
    generator = torch.Generator().manual_seed(seed)
    projections = random_projections(x.shape[1], seed)
    rows = []
    for condition in conditions:
        cells = x[labels == condition]
        if len(cells) < 2 * min_cells:
            continue
        order = torch.randperm(len(cells), generator=generator)
        half = len(cells) // 2
        reference, other = cells[order[:min(half, reference_cells)]], cells[order[half:]]
        drawn = controls[torch.randperm(len(controls), generator=generator)[:len(other)]]
        truth = TrueCells.build(reference, projections)
        scores = {name: distribution_metrics(PredictedCells.build(cells_, truth), truth)
                  for name, cells_ in arms(other, drawn, control_mean, control_sd).items()}
        mixtures = [scores.pop(f"mixture {share}") for share in MIXTURE_SHARES] + [scores["... draw's mean matched"]]
        scores[ARMS[-1]] = min(mixtures, key=lambda m: m["energy_distance"])
        rows.append({"condition": condition, "cells": len(cells), **scores})
    return rows


def report(dataset: str, per_seed: dict[int, list[dict]]) -> str:
    counts = ", ".join(f"seed {s}: {len(r)}" for s, r in per_seed.items())
    lines = [f"\n## {dataset}\n", f"Training conditions scored ({counts}); mean over conditions, then mean ± sd "
             "over split seeds.\n", "| arm | " + " | ".join(METRICS) + " |", "| --- |" + " --- |" * len(METRICS)]
    for arm in ARMS:
        cells = []
        for metric in METRICS:
            means = [np.mean([r[arm][metric] for r in rows]) for rows in per_seed.values()]
            cells.append(f"{np.mean(means):.3f} ± {np.std(means):.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    gap = {arm: np.mean([np.mean([r[arm]["energy_distance"] - r["other half"]["energy_distance"] for r in rows])
                         for rows in per_seed.values()]) for arm in ARMS}
    lines.append(f"\nEnergy distance above the floor: controls {gap['controls']:.3f}, controls + true mean "
                 f"{gap['controls + true mean']:.3f}, the draw's mean matched {gap[ARMS[3]]:.3f} "
                 f"({gap[ARMS[3]] / gap['controls']:.0%} of the controls' excess left once the mean is exact), "
                 f"with each gene's spread "
                 f"{gap[ARMS[-2]]:.3f} ({gap[ARMS[-2]] / gap['controls']:.0%}), as the best mixture "
                 f"{gap[ARMS[-1]]:.3f} ({gap[ARMS[-1]] / gap['controls']:.0%}).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--datasets", nargs="+", default=["papalexi", "demo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--min-cells", type=int, default=20, help="cells per half a condition needs to be scored")
    parser.add_argument("--reference-cells", type=int, default=MAX_TRUE_CELLS)
    parser.add_argument("--out", help="also write the tables to this markdown file")
    opts = parser.parse_args()
    text = [f"Command: `python benchmarks/shape_ceiling.py --workdir {opts.workdir} --datasets "
            f"{' '.join(opts.datasets)} --seeds {' '.join(map(str, opts.seeds))}`  ",
            f"Load average at the start: {load_average()}"]
    for dataset in opts.datasets:
        per_seed = {}
        for seed in opts.seeds:
            data = seed_data(opts.workdir, dataset, seed)
            adata = read_screen(data, dataset)
            train = [c for c in load_split(dataset, split_of(seed), data).train if not is_control(c)]
            per_seed[seed] = condition_scores(adata, train, seed, opts.min_cells, opts.reference_cells)
        text.append(report(dataset, per_seed))
    print("\n".join(text))
    if opts.out:
        Path(opts.out).write_text("# Distribution distance left once the mean change is exact\n\n" + "\n".join(text) + "\n")


if __name__ == "__main__":
    main()
