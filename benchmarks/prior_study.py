"""How well the expression prior's rules predict training genes they did not see (validation side).

    python benchmarks/prior_study.py --workdir /work/bench/pw --datasets papalexi
    python benchmarks/prior_study.py --workdir benchmarks/work --datasets demo --per-gene

For every split seed it reads the fetched screen and split of `<workdir>/<dataset>/seed<S>/data`
(as benchmarks/quality.py leaves them) and holds out each *measured* training single in turn: the
prior is fitted on the other training conditions (every condition that perturbs the gene is left
out) and predicts the held-out gene's mean change as an unseen target, with the linear weight w
fixed on the grid phase 2 chooses from, with and without the target's own knock-down entry (the
median self-change). train_mean and the linear baseline are scored the same way. Only training
conditions are read: this is the evidence the fold choice of phase 2 sees, made visible, and a
place to try a rule before it goes near a test set.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from regina_cli.data.conditions import canonical_condition, is_control, parse_condition
from regina_cli.data.split import load_split
from regina_cli.engine.expression_prior import (COVARIATION_WEIGHTS, LINEAR_WEIGHTS, _Effects, _fit, _pearson,
                                                covariation_loadings, median_self_effect)
from regina_cli.evaluate.baselines import TrainingData, train_mean, training_data
from regina_cli.evaluate.truth import Truth
from workdir import load_average, read_screen, seed_data, split_of


def _subset(train: TrainingData, keep: list[int]) -> TrainingData:
    return TrainingData(train.genes, train.control_mean, [train.conditions[i] for i in keep], train.means[keep],
                        train.counts[keep])


def control_covariation(adata, components: int, skip: int) -> tuple[np.ndarray, np.ndarray]:
    """The co-variation term's (C, 1/variance) from every control cell of the screen."""
    x = adata.X[np.asarray([is_control(c) for c in adata.obs["condition"]])]
    x = torch.as_tensor(x.toarray() if hasattr(x, "toarray") else np.asarray(x))
    return tuple(t.numpy() for t in covariation_loadings(x, components, torch.Generator().manual_seed(0), skip))


def held_out_scores(train: TrainingData, covariation: tuple[np.ndarray, np.ndarray]) -> list[dict]:
    """One row per measured training single: Pearson of each rule's prediction with its change."""
    index = {g: i for i, g in enumerate(train.genes)}
    rows = []
    for i, condition in enumerate(train.conditions):
        genes = parse_condition(condition)
        if len(genes) != 1 or genes[0] not in index:
            continue
        gene = genes[0]
        rest = _subset(train, [j for j, c in enumerate(train.conditions) if gene not in parse_condition(c)])
        observed = {parse_condition(c)[0]: m - rest.control_mean for c, m in zip(rest.conditions, rest.means)
                    if len(parse_condition(c)) == 1}
        truth = train.means[i] - train.control_mean
        model = _fit(rest)
        mean_change = rest.means.mean(0) - rest.control_mean
        embedding = model.embed(canonical_condition([gene]))
        linear = model.offset if embedding is None else model.predict_change(embedding)
        pooled = train_mean(rest, [condition])[condition] - rest.control_mean
        row = {"gene": gene, "train_mean": _pearson(pooled, truth), "linear": _pearson(linear, truth)}
        for w in LINEAR_WEIGHTS:
            effects = _Effects(model, observed, mean_change, w, median_self_effect(observed, index),
                               covariation=covariation[0], precision=covariation[1])
            prior = effects.unseen(gene)
            row[f"w={w}"] = _pearson(prior, truth)
            for u in COVARIATION_WEIGHTS[1:]:
                row[f"w={w}, u={u}"] = _pearson(replace(effects, covariation_weight=u).unseen(gene), truth)
            prior[index[gene]] = (mean_change + w * (linear - mean_change))[index[gene]]
            row[f"w={w}, no knock-down entry"] = _pearson(prior, truth)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--datasets", nargs="+", default=["demo", "papalexi"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--per-gene", action="store_true", help="also print every held-out gene's scores")
    parser.add_argument("--covariation-components", type=int, default=32)
    parser.add_argument("--covariation-skip", type=int, default=2)
    opts = parser.parse_args()
    print(f"load average {load_average()}")
    for dataset in opts.datasets:
        per_seed = {}
        for seed in opts.seeds:
            data = seed_data(opts.workdir, dataset, seed)
            adata = read_screen(data, dataset)
            covariation = control_covariation(adata, opts.covariation_components, opts.covariation_skip)
            rows = held_out_scores(training_data(Truth(adata), load_split(dataset, split_of(seed), data).train),
                                   covariation)
            best = max(LINEAR_WEIGHTS, key=lambda w: np.mean([r[f"w={w}"] for r in rows]))
            for r in rows:  # the co-variation term as phase 2 adds it: at the seed's best w
                r.update({f"u={u} at the best w": r[f"w={best}, u={u}"] for u in COVARIATION_WEIGHTS[1:]})
            per_seed[seed] = rows
            if opts.per_gene:
                for row in rows:
                    print(seed, "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else v for k, v in row.items()))
        rules = [k for k in next(iter(per_seed.values()))[0] if k != "gene" and ", u=" not in k]  # u at the best w only
        counts = ", ".join(f"seed {s}: {len(r)}" for s, r in per_seed.items())
        print(f"\n{dataset}: held-out measured training singles ({counts}); mean Pearson per seed, then over seeds\n")
        print("| rule | mean | " + " | ".join(f"seed {s}" for s in per_seed) + " |")
        print("| --- | --- |" + " --- |" * len(per_seed))
        for rule in rules:
            means = [np.mean([r[rule] for r in rows]) for rows in per_seed.values()]
            print(f"| {rule} | {np.mean(means):.3f} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
