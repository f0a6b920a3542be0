"""Cross-check with cell-eval: its own MetricsEvaluator and `regina evaluate` on the same files.

cell-eval (via pdex) needs scipy >= 1.17, which cannot be installed next to REGINA's scipy < 1.15
pin, so it runs in its own environment (`make celleval` creates .venv-celleval; or point
REGINA_CELLEVAL_PYTHON at any interpreter that has cell-eval). Without one the test skips.

Metrics defined the same way must agree: pearson_delta (the prediction file carries every real
control cell as its predicted controls, so cell-eval's reference equals REGINA's), mae (REGINA's
l1_means) and discrimination_score_l1 (single-gene conditions: cell-eval leaves out the gene
whose name equals the label, REGINA every targeted gene, which is the same for a single).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cli_helpers import invoke
from regina_cli import keys
from regina_cli.data.dataset import write_dataset
from regina_cli.data.demo import simulate_screen
from regina_cli.data.split import make_split, save_split

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RUNNER = BENCHMARKS / "celleval_runner.py"
sys.path.insert(0, str(BENCHMARKS))
from celleval_runner import find_python  # noqa: E402


def celleval_label(condition: str) -> str:
    """cell-eval's convention: a single perturbation is named by its gene."""
    return condition.replace("+ctrl", "").replace("ctrl+", "")


def test_metrics_defined_alike_agree_with_celleval(tmp_path):
    python = find_python()
    if python is None:
        pytest.skip("cell-eval not installed: it needs scipy>=1.17, REGINA pins scipy<1.15; run `make celleval` "
                    "(or set REGINA_CELLEVAL_PYTHON) to enable this cross-check")
    adata = simulate_screen(n_cells=1500, n_genes=150, n_singles=8, n_doubles=6, seed=2)
    write_dataset(adata, "xc", tmp_path / "data")
    conditions = sorted(set(adata.obs[keys.OBS_CONDITION]))
    perturbed = [c for c in conditions if c != "ctrl"]
    test = perturbed[::2]
    split = make_split("xc", conditions, user_split={"train": ["ctrl"] + perturbed[1::2][1:], "val": perturbed[1:2],
                                                     "test": test})
    save_split(split, tmp_path / "data")

    labels = adata.obs[keys.OBS_CONDITION].astype(str).to_numpy()
    rng = np.random.default_rng(1)
    control = np.flatnonzero(labels == "ctrl")
    blocks, names = [], []
    for k, c in enumerate(test):
        # imperfect predictions: half the true change, noise, and two conditions swapped
        source = test[(k + 1) % len(test)] if k < 2 else c
        true = adata.X[np.flatnonzero(labels == source)].toarray().mean(0)
        base = adata.X[rng.choice(control, 40)].toarray()
        cells = base + 0.5 * (true - adata.X[control].toarray().mean(0)) + rng.normal(0, 0.2, base.shape)
        blocks.append(np.clip(cells, 0, None))
        names += [celleval_label(c)] * 40
    blocks.append(adata.X[control].toarray())
    names += ["ctrl"] * len(control)
    pred = ad.AnnData(np.vstack(blocks).astype(np.float32))
    pred.var_names, pred.obs_names = adata.var_names.copy(), [f"p{i}" for i in range(sum(map(len, blocks)))]
    pred.obs[keys.OBS_CONDITION] = names
    pred.write_h5ad(tmp_path / "pred.h5ad")
    keep = np.isin(labels, test + ["ctrl"])
    real = ad.AnnData(sp.csr_matrix(adata.X[keep], dtype=np.float32))
    real.var_names, real.obs_names = adata.var_names.copy(), adata.obs_names[keep]
    real.obs[keys.OBS_CONDITION] = [celleval_label(c) for c in labels[keep]]
    real.write_h5ad(tmp_path / "real.h5ad")

    ours = invoke("evaluate", "xc", "--data-dir", tmp_path / "data", "--predictions", tmp_path / "pred.h5ad",
                  "--out", tmp_path / "regina", "--baselines", "none", "--no-plots")
    assert ours.exit_code == 0, ours.output
    done = subprocess.run([python, str(RUNNER), str(tmp_path / "real.h5ad"), str(tmp_path / "pred.h5ad"),
                           str(tmp_path / "celleval"), "--profile", "anndata", "--skip-de", "--threads", "1",
                           "--skip", "clustering_agreement,pearson_edistance"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    regina = pd.read_csv(tmp_path / "regina" / keys.PER_CONDITION_FILE).set_index("condition")
    theirs = pd.read_csv(tmp_path / "celleval" / "results.csv")
    theirs.index = [split.test[[celleval_label(c) for c in split.test].index(p)] for p in theirs["perturbation"]]
    theirs = theirs.loc[regina.index]
    assert len(regina) == len(test)
    np.testing.assert_allclose(regina["pearson_delta"], theirs["pearson_delta"], atol=1e-5)
    np.testing.assert_allclose(regina["l1_means"], theirs["mae"], rtol=1e-5, atol=1e-6)
    singles = [c for c in regina.index if c.endswith("+ctrl")]
    assert len(singles) >= 2
    np.testing.assert_allclose(regina.loc[singles, "discrimination_score_l1"],
                               theirs.loc[singles, "discrimination_score_l1"], atol=1e-6)  # CSV rounding
    assert regina["discrimination_score_l1"].nunique() > 1  # the swapped conditions are not ranked first

