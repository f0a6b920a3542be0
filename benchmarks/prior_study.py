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
import os
from pathlib import Path

import anndata
import numpy as np

from regina_cli.data.conditions import canonical_condition, parse_condition
from regina_cli.data.split import load_split
from regina_cli.engine.expression_prior import LINEAR_WEIGHTS, _Effects, _fit, _pearson, median_self_effect
from regina_cli.evaluate.baselines import TrainingData, train_mean, training_data
from regina_cli.evaluate.truth import Truth


def _subset(train: TrainingData, keep: list[int]) -> TrainingData:
    return TrainingData(train.genes, train.control_mean, [train.conditions[i] for i in keep], train.means[keep],
                        train.counts[keep])


def held_out_scores(train: TrainingData) -> list[dict]:
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
            prior = _Effects(model, observed, mean_change, w, median_self_effect(observed, index)).unseen(gene)
            row[f"w={w}"] = _pearson(prior, truth)
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
    opts = parser.parse_args()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for dataset in opts.datasets:
        per_seed = {}
        for seed in opts.seeds:
            data = Path(opts.workdir) / dataset / f"seed{seed}" / "data"
            truth = Truth(anndata.read_h5ad(data / dataset / "perturb_processed.h5ad"))
            rows = held_out_scores(training_data(truth, load_split(dataset, f"simulation_{seed}", data).train))
            per_seed[seed] = rows
            if opts.per_gene:
                for row in rows:
                    print(seed, "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else v for k, v in row.items()))
        rules = [k for k in next(iter(per_seed.values()))[0] if k != "gene"]
        counts = ", ".join(f"seed {s}: {len(r)}" for s, r in per_seed.items())
        print(f"\n{dataset}: held-out measured training singles ({counts}); mean Pearson per seed, then over seeds\n")
        print("| rule | mean | " + " | ".join(f"seed {s}" for s in per_seed) + " |")
        print("| --- | --- |" + " --- |" * len(per_seed))
        for rule in rules:
            means = [np.mean([r[rule] for r in rows]) for rows in per_seed.values()]
            print(f"| {rule} | {np.mean(means):.3f} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
