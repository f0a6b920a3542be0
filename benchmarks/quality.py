"""Prediction quality of the whole pipeline against honest baselines, over split seeds.

    python benchmarks/quality.py                       # demo, papalexi, mcfaline x seeds 1 2 3, test sets
    python benchmarks/quality.py --on val --datasets demo --seeds 1 2 --set gan.lambda_adv=0.1
    python benchmarks/quality.py --preset original --tag original

For each dataset and split seed it runs the real command line, exactly as a user would:
`regina fetch` (the demo, or the screens in ../shared/data with --from), `split --seed S`,
`label`, `train-ae`, `train-gan`, `predict --conditions test|val`, `evaluate`. It then reads
`per_condition.csv` and compares REGINA with every baseline *on the conditions both predict*
(additive only predicts combinations; linear only measured targets), and measures the collapse
index: the mean pairwise Pearson correlation of the predicted mean deltas across conditions,
beside the same for the true deltas (a model that predicts one shift for every condition has
an index near 1 whatever the truth). The table goes to `benchmarks/results/quality.md` (or
`--out`) with mean and spread over seeds and the wall time of each run.

Model choices are made with `--on val` (validation conditions); `--on test` is for reporting.
Each (dataset, seed) gets its own data folder, so splits and labels of different seeds never
share a file. `--jobs 2` runs two pipelines at once, each on one CPU thread. Each finished run
keeps its scores in `<workdir>/<dataset>/seed<S>/runs/<tag>/`; `--reuse` scores them again
without retraining, and a run that fails is reported without stopping the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from regina_cli import keys
from workdir import load_average, read_screen, seed_folder, split_of

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {
    # name: (file in the shared data folder, or None for the embedded demo; label method)
    "demo": (None, "stress"),
    "papalexi": ("papalexi21_thp1_crisprko.h5ad", "cell-cycle"),
    "mcfaline": ("mcfaline23_gbm_crispri.h5ad", "obs:cell_type"),
}
METRICS = ("pearson_delta", "pearson_delta_top20_de", "pearson_delta_pert", "mse_top20_de", "mmd_rbf", "energy_distance",
           "variance_pearson")
LOWER_IS_BETTER = {"mse_top20_de", "mmd_rbf", "energy_distance"}
WINS_METRIC = "pearson_delta"  # counted condition by condition too: a mean over 4 conditions hides how it splits
MODEL = "regina"
# Predicted cells per condition. REGINA's predicted mean change is an average over its cells, so a
# small draw adds Monte-Carlo noise that the baselines (exact means) do not carry: on Papalexi's
# held-out training conditions 100 cells scored 0.241, 1000 cells 0.301 and 3000 cells 0.303
# (benchmarks/README.md, "Predicted cells per condition"). Records without `cells` used 100.
CELLS = 1000
OLD_CELLS = 100


def regina_command() -> list[str]:
    beside = Path(sys.executable).with_name("regina")
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "regina_cli"]


class StepFailed(RuntimeError):
    """A command of the pipeline exited non-zero; the message is its `error:` line."""


def run(args: list[str], log: Path, env: dict) -> None:
    with log.open("a") as fh:
        fh.write(f"$ regina {' '.join(args)}\n")
        fh.flush()
        done = subprocess.run([*regina_command(), *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        raise StepFailed(f"`regina {args[0] if args[0] != '--quiet' else args[1]}`: "
                         f"{errors[-1] if errors else f'exit {done.returncode}, see {log}'}")


def pipeline(dataset: str, seed: int, opts) -> dict:
    """One dataset and split seed through all seven commands; returns the run's scores."""
    try:
        return _pipeline(dataset, seed, opts)
    except Exception as exc:  # report it with the others instead of losing every run
        return {"dataset": dataset, "seed": seed, "failed": f"{type(exc).__name__}: {exc}",
                "train_seconds": float("nan"), "seconds": float("nan")}


def _pipeline(dataset: str, seed: int, opts) -> dict:
    folder = seed_folder(opts.workdir, dataset, seed)
    data, run_dir = folder / "data", folder / "runs" / opts.tag
    log = folder / f"{opts.tag}.log"
    record = run_dir / "quality.json"
    env = {**os.environ, "REGINA_DATA": str(data), "OMP_NUM_THREADS": str(opts.threads),
           "MKL_NUM_THREADS": str(opts.threads)}
    split = split_of(seed)
    if opts.reuse and record.is_file():
        kept = json.loads(record.read_text())
        if kept.get("cells", OLD_CELLS) != opts.cells and (run_dir / keys.GAN_DIR).is_dir():
            return score(dataset, seed, data, run_dir, split, log, env, opts,  # the same model, predicted again
                         kept["train_seconds"], time.perf_counter() - kept["train_seconds"])
        if "failed" in kept:
            return kept
        table = pd.read_csv(run_dir / "eval" / "per_condition.csv")
        if "collapse_index_pert" not in kept:  # a record from before it was measured
            kept.update(collapse_index(dataset, data, run_dir / "predictions.h5ad", table, split))
            record.write_text(json.dumps(kept))
        return {**kept, "table": table}
    folder.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    log.unlink(missing_ok=True)
    source, labels = DATASETS[dataset]
    fetch_args = [] if source is None else ["--from", str(Path(opts.shared_data) / source)]
    started = time.perf_counter()
    run(["--quiet", "fetch", dataset, *fetch_args], log, env)
    if not (data / dataset / "splits" / f"{split}.json").is_file():
        run(["--quiet", "split", dataset, "--seed", str(seed)], log, env)
    run(["--quiet", "label", dataset, "--method", labels, "--split", split], log, env)
    sets = [a for s in opts.set for a in ("--set", s)]
    preset = ["--preset", opts.preset] if opts.preset else []
    trained = time.perf_counter()
    phase2 = []
    if opts.phase1_from:  # a phase-2 experiment: the same trained phase 1, copied
        phase2 = reuse_phase1(folder / "runs" / opts.phase1_from, run_dir, dataset, data, opts.preset)
    else:
        run(["train-ae", dataset, "--split", split, "--labels", labels, "--run", str(run_dir), "--device", "cpu",
             *preset, *sets], log, env)
    run(["train-gan", "--run", str(run_dir), "--device", "cpu", *phase2, *sets], log, env)
    return score(dataset, seed, data, run_dir, split, log, env, opts, time.perf_counter() - trained, started)


def reuse_phase1(source: Path, run_dir: Path, dataset: str, data: Path, preset: str | None = None) -> list[str]:
    """Copy the trained phase 1 of run `source` into `run_dir` for a phase-2 experiment; returns
    the `train-gan` arguments that give phase 2 the settings this code gives a new run.
    `train-gan` starts from the config phase 1 saved, whose `gan` section holds the phase-2
    defaults of the code that trained it: a phase 1 kept from older code would carry those into
    the experiment unseen. They go in a `--config` file beside the run (phase 1's own file stays
    as trained, which `regina` checks), and `--set` still applies on top."""
    import yaml

    shutil.copytree(source / keys.AE_DIR, run_dir / keys.AE_DIR)
    path = run_dir.parent / f"{run_dir.name}.phase2.yaml"
    path.write_text(yaml.safe_dump({"gan": phase2_settings(dataset, data, preset)}, sort_keys=False))
    return ["--config", str(path)]


def phase2_settings(dataset: str, data: Path, preset: str | None = None) -> dict:
    """The `gan` section this code gives a new run of `dataset` (its preset, else sized for its genes)."""
    from regina_cli.config import PRESETS, preset_config
    from regina_cli.data.dataset import gene_count

    preset = preset or (dataset if dataset in PRESETS else None)
    return preset_config(preset, None if preset else gene_count(dataset, data)).to_dict()["gan"]


def score(dataset: str, seed: int, data: Path, run_dir: Path, split: str, log: Path, env: dict, opts,
          train_seconds: float, started: float) -> dict:
    """`predict` (`--cells` per condition) and `evaluate` a trained run; its scores, also kept in
    the run's quality.json."""
    record = run_dir / "quality.json"
    predictions = run_dir / "predictions.h5ad"
    try:
        run(["--quiet", "predict", "--run", str(run_dir), "--conditions", opts.on, "--cells", str(opts.cells),
             "--device", "cpu"], log, env)
    except StepFailed as failure:  # e.g. no test condition has a target the model can prompt
        result = {"dataset": dataset, "seed": seed, "failed": str(failure), "train_seconds": train_seconds,
                  "seconds": time.perf_counter() - started, "cells": opts.cells}
        record.write_text(json.dumps(result))
        return result
    eval_dir = run_dir / "eval"
    on = ["--on", opts.on] if opts.on != "test" else []
    run(["--quiet", "evaluate", dataset, "--predictions", str(predictions), "--split", split, "--out",
         str(eval_dir), "--no-plots", "--device", "cpu", *on], log, env)
    table = pd.read_csv(eval_dir / "per_condition.csv")
    result = {"dataset": dataset, "seed": seed, **collapse_index(dataset, data, predictions, table, split),
              "train_seconds": train_seconds, "seconds": time.perf_counter() - started, "cells": opts.cells}
    record.write_text(json.dumps(result))
    return {**result, "table": table}


def collapse_index(dataset: str, data: Path, predictions: Path, table: pd.DataFrame, split: str) -> dict:
    """Mean pairwise Pearson of mean deltas across the scored conditions, predicted and true: from
    control, and (`*_pert`) from the average training perturbation (`regina evaluate`'s Systema
    reference), which tells a prediction leaning on the change perturbations share from one whose
    own parts look alike."""
    import anndata

    from regina_cli.data.split import load_split

    real = read_screen(data, dataset)
    pred = anndata.read_h5ad(predictions)
    if "prompt_source" in pred.obs:  # predictions written with their control cells
        pred = pred[pred.obs["prompt_source"].astype(str) != "control"]
    conditions = sorted(set(table.loc[table["model"] == MODEL, "condition"]))
    control = np.asarray(real.X[(real.obs["condition"].astype(str) == "ctrl").to_numpy()].mean(0)).ravel()
    genes = list(pred.var_names)
    real_x = real[:, genes]

    def mean_delta(adata, reference, condition):
        rows = (adata.obs["condition"].astype(str) == condition).to_numpy()
        return np.asarray(adata.X[rows].mean(0)).ravel() - reference

    reference = control[[real.var_names.get_loc(g) for g in genes]]
    predicted = np.stack([mean_delta(pred, reference, c) for c in conditions])
    true = np.stack([mean_delta(real_x, reference, c) for c in conditions])
    present = set(real_x.obs["condition"].astype(str))
    trained = [c for c in load_split(dataset, split, data).train if c != "ctrl" and c in present]
    shared = np.mean([mean_delta(real_x, reference, c) for c in trained], axis=0)
    return {"collapse_index": _mean_offdiagonal(predicted), "collapse_index_true": _mean_offdiagonal(true),
            "collapse_index_true_denoised": denoised_collapse_index(real_x, reference, conditions),
            "collapse_index_pert": _mean_offdiagonal(predicted - shared),
            "collapse_index_pert_true": _mean_offdiagonal(true - shared), "n_collapse_conditions": len(conditions)}


def _mean_offdiagonal(deltas: np.ndarray) -> float:
    if len(deltas) < 2:
        return float("nan")
    corr = np.corrcoef(deltas)
    return float(corr[~np.eye(len(corr), dtype=bool)].mean())


def denoised_collapse_index(real, reference: np.ndarray, conditions: list[str], seed: int = 0) -> float:
    """The truth's collapse index without its sampling noise. A condition's measured mean delta is
    its effect plus the noise of its few cells, which decorrelates conditions from each other: the
    measured index understates how alike the true effects are. Each condition's cells are split in
    two random halves; the correlation of the halves' deltas (Spearman-Brown corrected to the whole)
    is its reliability R, and each pairwise correlation is divided by sqrt(R_i R_j) (Spearman's
    correction for attenuation), over the conditions with R > 0.2, clipped to [-1, 1]."""
    rng = np.random.default_rng(seed)
    deltas, reliable = [], []
    for condition in conditions:
        rows = np.flatnonzero((real.obs["condition"].astype(str) == condition).to_numpy())
        if len(rows) < 4:
            continue
        x = real.X[rows]
        x = np.asarray(x.todense() if hasattr(x, "todense") else x)
        r = split_half_correlation(x, reference, rng)
        reliability = 2 * r / (1 + r) if r > -1 else 0.0
        if reliability > 0.2:
            deltas.append(x.mean(0) - reference)
            reliable.append(reliability)
    if len(deltas) < 2:
        return float("nan")
    corr = np.corrcoef(np.stack(deltas)) / np.sqrt(np.outer(reliable, reliable))
    return float(np.clip(corr[~np.eye(len(corr), dtype=bool)], -1, 1).mean())


def split_half_correlation(x: np.ndarray, reference: np.ndarray, rng: np.random.Generator) -> float:
    """Pearson of the mean changes (from `reference`) of two random halves of a condition's cells
    `x` [n, G]: how far its measured change stands above the noise of its cells."""
    order = rng.permutation(len(x))
    halves = [x[order[: len(x) // 2]].mean(0) - reference, x[order[len(x) // 2:]].mean(0) - reference]
    return float(np.corrcoef(halves)[0, 1])


def summarise(results: list[dict]) -> pd.DataFrame:
    """One row per (dataset, seed, model): means over the conditions the model and REGINA share."""
    rows = []
    for r in results:
        if "failed" in r:
            rows.append({"dataset": r["dataset"], "seed": r["seed"], "model": MODEL, "n": 0, "failed": r["failed"],
                         "train_seconds": r["train_seconds"], "seconds": r["seconds"]})
            continue
        table = r["table"]
        ours = table[table["model"] == MODEL].set_index("condition")
        for model, frame in table.groupby("model", sort=False):
            theirs = frame.set_index("condition")
            shared = theirs.index.intersection(ours.index)
            row = {"dataset": r["dataset"], "seed": r["seed"], "model": model, "n": len(shared),
                   "regina_higher": int((ours.loc[shared, WINS_METRIC] > theirs.loc[shared, WINS_METRIC]).sum())}
            for m in METRICS:
                if m in frame.columns:
                    row[m] = float(theirs.loc[shared, m].mean())
                    row[f"regina_{m}"] = float(ours.loc[shared, m].mean())
            if model == MODEL:
                row.update({k: r[k] for k in ("collapse_index", "collapse_index_true", "collapse_index_true_denoised",
                                              "collapse_index_pert", "collapse_index_pert_true", "train_seconds",
                                              "seconds")})
            rows.append(row)
    return pd.DataFrame(rows)


def markdown(summary: pd.DataFrame, opts, load: str) -> str:
    lines = [f"# Prediction quality ({opts.on} conditions)", "",
             f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M')}; load average at the end: {load}; "
             f"seeds {' '.join(map(str, opts.seeds))}; config: {opts.preset or 'defaults'} "
             f"{' '.join(opts.set)}", "",
             "Each cell: mean over split seeds (± standard deviation over seeds) of the mean over the conditions "
             "that the model and REGINA both predict (n = conditions per seed). `Δ vs REGINA`: the baseline's "
             "score minus REGINA's on those conditions; REGINA wins where the sign favours it. Collapse index: "
             "mean pairwise Pearson of predicted mean deltas across conditions (truth beside it, measured and "
             "without its sampling noise: `denoised_collapse_index`).", ""]
    for dataset, frame in summary.groupby("dataset", sort=False):
        lines += [f"## {dataset}", "", "| model | n | " + " | ".join(METRICS) + " |",
                  "| --- | --- |" + " --- |" * len(METRICS)]
        for model, rows in frame.groupby("model", sort=False):
            cells = []
            for m in METRICS:
                if m not in rows or rows[m].isna().all():
                    cells.append("-")
                    continue
                text = f"{rows[m].mean():.3f} ± {rows[m].std(ddof=0):.3f}"
                if model != MODEL:
                    diff = (rows[m] - rows[f"regina_{m}"]).mean()
                    wins = diff > 0 if m in LOWER_IS_BETTER else diff < 0
                    text += f" ({'REGINA +' if wins else 'baseline +'}{abs(diff):.3f})"
                cells.append(text)
            lines.append(f"| {model} | {rows['n'].mean():.1f} | " + " | ".join(cells) + " |")
        if (frame["model"] != MODEL).any():
            lines += ["", wins_line(frame)]
        ours = frame[frame["model"] == MODEL]
        if "failed" in ours:
            for _, failed in ours[ours["failed"].notna()].iterrows():
                lines.append(f"\nSeed {failed['seed']}: nothing scored ({failed['failed']}).")
        if ours["collapse_index"].notna().any():
            lines += ["", f"Collapse index: REGINA {ours['collapse_index'].mean():.3f} ± "
                          f"{ours['collapse_index'].std(ddof=0):.3f}, truth {ours['collapse_index_true'].mean():.3f} "
                          f"(without sampling noise {ours['collapse_index_true_denoised'].mean():.3f}); from the "
                          f"average training perturbation instead of control: REGINA "
                          f"{ours['collapse_index_pert'].mean():.3f}, truth {ours['collapse_index_pert_true'].mean():.3f}. "
                          f"Wall time per seed: {ours['seconds'].mean():.0f} s "
                          f"(training {ours['train_seconds'].mean():.0f} s).", ""]
    return "\n".join(lines) + "\n"


def wins_line(frame: pd.DataFrame) -> str:
    """Per condition, summed over seeds: on how many shared conditions REGINA's pearson_delta is
    higher than each baseline's."""
    baselines = [(m, rows) for m, rows in frame.groupby("model", sort=False) if m != MODEL and rows["n"].sum()]
    counts = ", ".join(f"{m} {int(rows['regina_higher'].sum())}/{int(rows['n'].sum())}" for m, rows in baselines)
    return f"Conditions where REGINA's {WINS_METRIC} is higher (all seeds): {counts}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--on", choices=["test", "val"], default="test")
    parser.add_argument("--set", action="append", default=[], help="config override for both phases")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--tag", default="default", help="run name (several configs can share a workdir)")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "work"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.md"))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per pipeline")
    parser.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"),
                        help="folder with the real screens (papalexi, mcfaline)")
    parser.add_argument("--cells", type=int, default=CELLS, help="predicted cells per condition")
    parser.add_argument("--reuse", action="store_true",
                        help="score finished runs of this tag again, do not retrain (predicted again when --cells "
                             "differs from the run's record)")
    parser.add_argument("--phase1-from", default=None, metavar="TAG",
                        help="copy phase 1 from the run of this tag (same workdir) and train only phase 2, "
                             "with this code's phase-2 settings (not those phase 1 saved); training time then "
                             "counts phase 2 alone")
    opts = parser.parse_args()
    if opts.cells < 1:
        parser.error(f"--cells must be at least 1, not {opts.cells}")

    jobs = [(d, s) for d in opts.datasets for s in opts.seeds]
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        results = list(pool.map(lambda job: pipeline(*job, opts), jobs))
    summary = summarise(results)
    load = load_average()
    text = markdown(summary, opts, load)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(text)
    Path(opts.out).with_suffix(".json").write_text(
        json.dumps(summary.to_dict(orient="records"), indent=1, default=float))
    print(text)


if __name__ == "__main__":
    main()
