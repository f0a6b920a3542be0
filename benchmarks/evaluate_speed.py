"""Time `regina evaluate` on a test set of Norman's size (synthetic data), all metrics and baselines.

    python benchmarks/evaluate_speed.py [--device cpu|cuda] [--conditions 100] [--cells 100]

Norman's shape: 5,045 genes, 7,353 control cells, ~100 test conditions with ~300 cells each,
and REGINA predicting 100 cells per test condition. Wall time and process CPU time are printed
with the load average, because on a shared machine wall time mostly measures the neighbours. The expression values are random (sparse,
log-normal-like, each perturbation scaling 100 genes); the metrics' cost does not depend on what the
values mean.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp


DENSITY = 0.2  # share of non-zero entries, as in a log-normalised 10x screen
EFFECT_GENES = 100


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The test set's shape, Norman's by default (shared with evaluate_vs_celleval.py)."""
    parser.add_argument("--genes", type=int, default=5045)
    parser.add_argument("--conditions", type=int, default=100)
    parser.add_argument("--cells", type=int, default=100, help="predicted cells per condition")
    parser.add_argument("--true-cells", type=int, default=300, help="true cells per condition")
    parser.add_argument("--train-conditions", type=int, default=40)
    parser.add_argument("--controls", type=int, default=7353)


def synthetic_screen(n_genes: int, n_conditions: int, n_train: int, cells_per_condition: int, n_control: int, seed: int):
    import anndata as ad

    rng = np.random.default_rng(seed)
    genes = [f"G{i:05d}" for i in range(n_genes)]
    train_genes = genes[n_conditions: n_conditions + n_train]
    train = [f"{g}+ctrl" for g in train_genes]
    # half unseen singles, half pairs of trained singles (so the additive baseline has work too)
    pairs = itertools.combinations(train_genes, 2)
    test = [f"{genes[i]}+ctrl" if i % 2 == 0 else "+".join(next(pairs)) for i in range(n_conditions)]
    labels = ["ctrl"] * n_control + [c for c in test + train for _ in range(cells_per_condition)]
    base = rng.gamma(1.0, 1.0, n_genes).astype(np.float32)
    # each perturbation turns EFFECT_GENES random genes up (twice as often expressed, x4) or down (a
    # quarter as often, x1/4), so that DE tests find something
    codes = np.repeat(np.arange(len(test + train) + 1), [n_control] + [cells_per_condition] * len(test + train))
    scale = np.ones((len(test + train) + 1, n_genes), dtype=np.float32)
    for row in scale[1:]:
        row[rng.choice(n_genes, EFFECT_GENES, replace=False)] = rng.choice([4.0, 0.25], EFFECT_GENES)
    chunks = []
    for start in range(0, len(labels), 4096):  # dense chunks: fast to draw, bounded in memory
        n = min(4096, len(labels) - start)
        values = rng.random((n, n_genes), dtype=np.float32)
        factor = scale[codes[start:start + n]]
        expressed = values < DENSITY * np.sqrt(factor)
        chunks.append(sp.csr_matrix(np.where(expressed, np.log1p(values * 50 * base * factor), 0).astype(np.float32)))
    adata = ad.AnnData(sp.vstack(chunks, format="csr"))
    adata.var_names = genes
    adata.var["gene_name"] = genes
    adata.obs_names = [f"c{i}" for i in range(len(labels))]
    adata.obs["condition"] = labels
    adata.obs["condition_name"] = [f"K562_{c}_1+1" for c in labels]
    adata.obs["cell_type"] = "K562"
    adata.obs["control"] = [int(c == "ctrl") for c in labels]
    adata.obs["dose_val"] = "1+1"
    names = sorted(set(adata.obs["condition_name"]))
    adata.uns["rank_genes_groups_cov_all"] = {n: np.array(genes)[rng.permutation(n_genes)[:200]] for n in names}
    adata.uns["top_non_dropout_de_20"] = {n: adata.uns["rank_genes_groups_cov_all"][n][:20] for n in names}
    adata.uns["non_dropout_gene_idx"] = {n: np.sort(rng.choice(n_genes, n_genes // 2, replace=False)) for n in names}
    adata.uns["non_zeros_gene_idx"] = adata.uns["non_dropout_gene_idx"]
    adata.uns["top_non_zero_de_20"] = adata.uns["top_non_dropout_de_20"]
    return adata, test, train


def predictions(adata, test, n_cells: int, seed: int):
    from regina_cli.evaluate.predictions import CELLS, Predictions

    rng = np.random.default_rng(seed)
    controls = np.flatnonzero(adata.obs["condition"].to_numpy() == "ctrl")
    cells, sources = [], []
    for _ in sorted(test):
        rows = rng.choice(controls, n_cells)
        cells.append(adata.X[rows].toarray() + rng.normal(0, 0.05, (n_cells, adata.n_vars)).astype(np.float32))
        sources.append(adata.obs_names[rows].to_numpy())
    return Predictions("model", CELLS, sorted(test), np.stack([c.astype(np.float64).mean(0) for c in cells]), cells,
                       sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    add_shape_arguments(parser)
    args = parser.parse_args()

    import torch

    from regina_cli.data.split import make_split
    from regina_cli.evaluate.baselines import BASELINES
    from regina_cli.devices import resolve_device
    from regina_cli.evaluate.run import evaluate_loaded
    from regina_cli.evaluate.truth import Truth

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    adata, test, train = synthetic_screen(args.genes, args.conditions, args.train_conditions, args.true_cells,
                                          args.controls, seed=0)
    split = make_split("bench", sorted(set(adata.obs["condition"])), user_split={
        "train": ["ctrl"] + train[:-1], "val": train[-1:], "test": test})
    preds = predictions(adata, test, args.cells, seed=1)
    print(f"synthetic data: {adata.n_obs} cells x {adata.n_vars} genes, {len(test)} test conditions x "
          f"{args.cells} predicted cells ({time.perf_counter() - t0:.1f} s to build)")
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                 f" ({torch.get_num_threads()} threads)"))

    for label, baselines in (("model only", []), ("model + 4 baselines", list(BASELINES))):
        t0, cpu0 = time.perf_counter(), time.process_time()
        truth = Truth(adata)
        result = evaluate_loaded(truth, split, [preds], baselines=baselines, seed=0, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rows = result.table
        print(f"{label:>20}: {elapsed:6.1f} s wall, {cpu:6.1f} s CPU, for {len(rows)} (condition, model) rows "
              f"with all metrics ({pd.Series(rows['model']).nunique()} models)")
    print(f"load average: {' '.join(f'{v:.1f}' for v in os.getloadavg())} (other processes share these CPUs)")


if __name__ == "__main__":
    main()
