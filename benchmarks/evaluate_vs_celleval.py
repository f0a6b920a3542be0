"""`regina evaluate` and cell-eval side by side on the same Norman-shaped test set, on this machine.

    python benchmarks/evaluate_vs_celleval.py [--conditions 100] [--cells 100] [--genes 5045] [--keep DIR]
        [--threads N] [--skip-celleval] [--repeat N] [--before DIR]

Writes a synthetic screen of Norman's shape (5,045 genes, 7,353 control cells, 100 test conditions
with 300 true cells each, 40 training conditions) and a prediction file (100 cells per test
condition: its start control cells moved by 70% of the true change plus noise, then the control
cells they started from, as `regina predict --with-controls` appends),
then times, each in its own process and reading its files:

* the whole `regina evaluate` command (dataset and predictions read, all metrics, the 4 baselines,
  report.html and figures written);
* cell-eval's MetricsEvaluator (full profile) run by benchmarks/celleval_runner.py in the
  .venv-celleval environment (`make celleval`; or set REGINA_CELLEVAL_PYTHON).

It prints both wall times, their ratio, the load average before and after (the machine is shared:
wall time also measures the neighbours) and the mean over conditions of the metrics both compute.
`regina evaluate` runs `--repeat` times (default 2): the first run hashes the dataset in full, later
ones find that check remembered (as after `regina predict` read the same file); the ratio uses the
first. `--before DIR` also times the `regina_cli` package found in DIR (another version, e.g.
`git archive main regina_cli | tar -x -C DIR`), alternating with this one on the same files, and
prints after/before ratios. The checksum cache of these runs lives in the inputs folder.
Predicted values are clipped at 0 because cell-eval refuses negative expression.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
                    "POLARS_MAX_THREADS")
PAIRS = [  # (REGINA column, cell-eval column, same definition?)
    ("pearson_delta", "pearson_delta", "no: cell-eval's reference is the file's control rows (start cells)"),
    ("l1_means", "mae", "yes"),
    ("discrimination_score_l1", "discrimination_score_l1", "singles yes; combos: REGINA leaves out both targets"),
    ("de_overlap_at_N", "overlap_at_N", "no: Welch t-test vs Wilcoxon"),
    ("de_overlap_at_100", "overlap_at_100", "no: Welch t-test vs Wilcoxon"),
    ("de_precision_at_N", "precision_at_N", "no: Welch t-test vs Wilcoxon"),
]


def celleval_label(condition: str) -> str:
    return condition.replace("+ctrl", "")


def write_inputs(folder: Path, args) -> tuple[list[str], Path, Path]:
    """Dataset + split under folder/data, predictions and cell-eval's real cells as .h5ad."""
    import anndata as ad

    from evaluate_speed import synthetic_screen
    from regina_cli.data.dataset import write_dataset
    from regina_cli.data.split import make_split, save_split

    adata, test, train = synthetic_screen(args.genes, args.conditions, args.train_conditions, args.true_cells,
                                          args.controls, seed=0)
    write_dataset(adata, "bench", folder / "data")
    save_split(make_split("bench", sorted(set(adata.obs["condition"])),
                          user_split={"train": ["ctrl"] + train[:-1], "val": train[-1:], "test": test}),
               folder / "data")
    rng = np.random.default_rng(1)
    labels = adata.obs["condition"].to_numpy()
    controls = np.flatnonzero(labels == "ctrl")
    control_mean = np.asarray(adata.X[controls].mean(0)).ravel()
    starts = rng.choice(controls, (len(test), args.cells))
    used = np.unique(starts)
    # a model's output: its start cells moved by 70% of the true change, plus noise (clipped at 0)
    change = {c: np.asarray(adata.X[labels == c].mean(0)).ravel() - control_mean for c in test}
    blocks = [np.clip(adata.X[rows].toarray() + 0.7 * change[c] + rng.normal(0, 0.05, (args.cells, adata.n_vars)), 0,
                      None) for c, rows in zip(test, starts)]
    blocks.append(adata.X[used].toarray())
    pred = ad.AnnData(np.vstack(blocks).astype(np.float32))
    pred.var_names = adata.var_names.copy()
    pred.obs_names = [f"p{i}" for i in range(pred.n_obs)]
    pred.obs["condition"] = [celleval_label(c) for c in test for _ in range(args.cells)] + ["ctrl"] * len(used)
    pred.obs["control_cell"] = list(adata.obs_names[starts.ravel()]) + list(adata.obs_names[used])
    pred.write_h5ad(folder / "pred.h5ad")
    keep = np.isin(labels, test + ["ctrl"])
    real = adata[keep].copy()
    real.obs = real.obs[["condition"]].assign(condition=[celleval_label(c) for c in labels[keep]])
    real.uns = {}
    real.write_h5ad(folder / "real.h5ad")
    return test, folder / "pred.h5ad", folder / "real.h5ad"


def timed(command: list[str], env: dict, cwd: Path | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return elapsed, done


def child_cpu() -> np.ndarray:
    """User and system CPU seconds of every finished child so far (less sensitive to load than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return np.array([usage.ru_utime, usage.ru_stime])


def time_regina(folder: Path, pred: Path, env: dict, package: Path | None, out: str) -> tuple[float, np.ndarray]:
    """Wall seconds and [user, system] CPU seconds of one whole `regina evaluate` (this tree, or the package in `package`).
    `python -m` imports from its working folder first, so each version runs from its own folder."""
    cpu = child_cpu()
    wall, _ = timed([sys.executable, "-m", "regina_cli", "--quiet", "evaluate", "bench", "--data-dir",
                     str(folder / "data"), "--predictions", str(pred), "--out", str(folder / out),
                     "--model-name", "model", "--device", "cpu"], env, cwd=package or ROOT)
    return wall, child_cpu() - cpu


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    from evaluate_speed import add_shape_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--keep", type=Path, help="write the files here and keep them (default: a temp folder, removed at the end)")
    parser.add_argument("--skip-celleval", action="store_true", help="time regina only")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for both tools (OMP/BLAS/numba/polars; default: each library's own choice)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of `regina evaluate` (first one timed against cell-eval)")
    parser.add_argument("--before", type=Path, help="a folder holding another version's regina_cli, timed alternately")
    args = parser.parse_args()
    args.before = args.before.resolve() if args.before is not None else None
    if args.before is not None and not (args.before / "regina_cli" / "__init__.py").is_file():
        sys.exit(f"--before {args.before}: no regina_cli package there")

    folder = (args.keep or Path(tempfile.mkdtemp(prefix="regina-vs-celleval-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        compare(args, folder)
    finally:
        if args.keep is None:  # the inputs take about 1 GB
            shutil.rmtree(folder, ignore_errors=True)


def compare(args, folder: Path) -> None:
    """Write the inputs into `folder`, time both tools, print the metrics both compute."""
    import pandas as pd

    from celleval_runner import find_python

    t0 = time.perf_counter()
    test, pred, real = write_inputs(folder, args)
    print(f"inputs: {args.conditions} conditions x {args.cells} predicted cells x {args.genes} genes "
          f"(+ {args.controls} control, {args.true_cells} true cells per condition) in {folder} "
          f"({time.perf_counter() - t0:.0f} s to write)")

    env = {**os.environ, "XDG_CACHE_HOME": str(folder / "cache")}
    if args.threads:
        env.update({k: str(args.threads) for k in THREAD_VARIABLES})
    threads = args.threads or "default"
    print(f"regina evaluate: whole command, 4 baselines, report; threads {threads}")
    runs = {"this tree": [], "before": []}
    for k in range(max(args.repeat, 1)):
        for label, package in (("before", args.before), ("this tree", None)):
            if label == "before" and package is None:
                continue
            before_load = load()
            wall, cpu = time_regina(folder, pred, env, package, "regina" if label == "this tree" else "regina_before")
            runs[label].append(wall)
            note = " (dataset hashed in full)" if k == 0 and label == "this tree" else ""
            print(f"  run {k + 1} {label}: {wall:.1f} s wall, {cpu[0]:.1f} s user + {cpu[1]:.1f} s system{note}; "
                  f"load before {before_load}, after {load()}")
    if args.before is not None:
        ratios = [b / a for a, b in zip(runs["this tree"], runs["before"])]
        print("  before / this tree, run by run: " + ", ".join(f"{r:.2f}x" for r in ratios))
    regina_s = runs["this tree"][0]
    if args.skip_celleval:
        return
    python = find_python()
    if python is None:
        sys.exit("cell-eval not found: `make celleval` (or set REGINA_CELLEVAL_PYTHON)")
    print(f"load average before cell-eval: {load()}")
    celleval_s, _ = timed([python, str(ROOT / "benchmarks" / "celleval_runner.py"), str(real), str(pred),
                           str(folder / "celleval"), "--threads", str(args.threads or -1)], env)
    inner = json.loads((folder / "celleval" / "timing.json").read_text())
    print(f"cell-eval MetricsEvaluator (full profile; threads {threads}): {celleval_s:.1f} s wall "
          f"({inner['metrics_s']:.1f} s in its metrics); load after {load()}")
    print(f"ratio: cell-eval / regina = {celleval_s / regina_s:.1f}x")

    ours = pd.read_csv(folder / "regina" / "per_condition.csv")
    ours = ours[ours.model == "model"].set_index("condition")
    theirs = pd.read_csv(folder / "celleval" / "results.csv")
    theirs.index = [p if "+" in p else f"{p}+ctrl" for p in theirs["perturbation"]]
    theirs = theirs.loc[ours.index]
    print(f"\n{'REGINA metric':<26}{'mean':>9}  {'cell-eval metric':<26}{'mean':>9}  same definition")
    for a, b, same in PAIRS:
        print(f"{a:<26}{ours[a].mean():>9.4f}  {b:<26}{theirs[b].mean():>9.4f}  {same}")


if __name__ == "__main__":
    main()
