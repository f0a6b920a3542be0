"""Configurations compared on training conditions held out of phase 2 (the validation side where a
split's own validation set is too small to choose on).

    python benchmarks/holdout.py --workdir /work/bench/pw --datasets papalexi --phase1-from final
    python benchmarks/holdout.py --workdir /work/bench/v2 --datasets demo --phase1-from valbase \\
        --draws 0 1 2 --arm lowadv=gan.lambda_adv=0.1

Papalexi's GEARS splits validate on 0-1 predictable conditions per seed, so `quality.py --on val`
says almost nothing there. This script reuses the phase-1 runs that `quality.py` left in
`<workdir>/<dataset>/seed<S>/runs/<TAG>` and, for every split seed and hold-out draw D, trains
phase 2 (`--max-epochs`, 1 by default; this code's phase-2 settings, `quality.reuse_phase1`) with
`gan.validation_holdout` of the training perturbations held out of phase 2, its prior and its
weight choices (`gan.validation_min_conditions` set high so the hold-out is always drawn;
`runtime.seed=D` draws it). Each arm (`--arm NAME=KEY=VALUE,...`, besides `default`) sees the same
held-out conditions. Reported per arm: the validation pearson_delta of the untrained transition
(epoch 0) and of the weights model selection kept (as `train-gan` measures them: at most 256 cells
of each condition, one predicted cell per real one), then, scored alike against every cell of each
held-out condition, REGINA (`regina predict --cells`, 1000 by default) and train_mean (pooled over
the phase-2 training cells, as `regina evaluate` pools it). Only the last two compare REGINA with
train_mean: the in-training figures carry the noise of a 256-cell truth that train_mean is not
scored against. The report also follows the held-out conditions epoch by epoch (`history.csv`:
pearson_delta, collapse index, latent shift ratio; `--max-epochs` above 1 to see a trend): what
training does to conditions it never saw. `--reuse` scores the runs a previous call trained
without training them again. Test conditions are never read.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CELLS, DATASETS, ROOT, StepFailed, reuse_phase1, run, split_half_correlation  # noqa: E402
from workdir import load_average, seed_data, seed_folder  # noqa: E402

from regina_cli import keys  # noqa: E402
from regina_cli.engine.expression_prior import _pearson  # noqa: E402
from regina_cli.evaluate.baselines import train_mean, training_data  # noqa: E402
from regina_cli.evaluate.predictions import align  # noqa: E402
from regina_cli.evaluate.readers import read_predictions  # noqa: E402
from regina_cli.evaluate.truth import Truth  # noqa: E402


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition("=")
    if not name or not sets:
        raise argparse.ArgumentTypeError(f"--arm takes NAME=KEY=VALUE[,KEY=VALUE...], not {text!r}")
    return name, sets.split(",")


def one_run(dataset: str, seed: int, draw: int, arm: str, sets: list[str], opts) -> dict:
    """Phase 2 of one arm on one hold-out draw; its validation scores and held-out conditions."""
    folder = seed_folder(opts.workdir, dataset, seed)
    run_dir = folder / "runs" / "holdout" / f"{arm}-draw{draw}"
    log = run_dir.parent / f"{run_dir.name}.log"
    meta_file = run_dir / keys.GAN_DIR / "meta.json"
    env = {**os.environ, "REGINA_DATA": str(folder / "data"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    trained = opts.reuse and meta_file.is_file() and json.loads(meta_file.read_text()).get("status") == "trained"
    try:
        if not trained:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            log.unlink(missing_ok=True)  # a rerun's log holds only its own commands, as in quality.py
            phase2 = reuse_phase1(folder / "runs" / opts.phase1_from, run_dir, dataset, folder / "data")
            overrides = ["gan.validation_min_conditions=1000", f"gan.validation_holdout={opts.share}",
                         f"runtime.seed={draw}", *sets]
            run(["--quiet", "train-gan", "--run", str(run_dir), "--device", "cpu", "--max-epochs",
                 str(opts.max_epochs), *phase2, *[a for s in overrides for a in ("--set", s)]], log, env)
        meta = json.loads(meta_file.read_text())
        predictions = run_dir / f"held_out_{opts.cells}{'_clip' if opts.clip else ''}.h5ad"
        run(["--quiet", "predict", "--run", str(run_dir), "--conditions", ",".join(meta["validation_conditions_scored"]),
             "--cells", str(opts.cells), "--no-controls", "--device", "cpu", "--out", str(predictions),
             *(["--clip"] if opts.clip else [])], log, env)
    except StepFailed as failure:
        return {"dataset": dataset, "seed": seed, "draw": draw, "arm": arm, "failed": str(failure)}
    with (run_dir / keys.GAN_DIR / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    selected = meta["training"]["best_value"]  # null in JSON where it is not finite
    return {"dataset": dataset, "seed": seed, "draw": draw, "arm": arm,
            "epoch0": float(rows[0]["val_pearson_delta"]), "selected": float("nan" if selected is None else selected),
            "by_epoch": {key: [float(row.get(f"val_{key}") or "nan") for row in rows] for key in BY_EPOCH},
            "best_epoch": int(meta["training"]["best_epoch"]), "conditions": meta["validation_conditions_scored"],
            "train_conditions": [c for c in meta["train_conditions"] if c not in meta["held_out_conditions"]],
            "predictions": str(predictions)}


STRATA = ((-1.0, 0.3), (0.3, 0.7), (0.7, 1.0))  # split-half correlation of a condition's true change
# history.csv's validation columns, per epoch; fit_*: the conditions phase 2 trains on, each from the
# prior fitted without it (absent from runs of older code: nan)
BY_EPOCH = ("pearson_delta", "collapse_index", "shift_ratio", "fit_pearson_delta", "fit_collapse_index")


def full_truth_scores(results: list[dict], opts) -> None:
    """Add to each finished run the pearson_delta (all genes, every cell of each condition) of
    REGINA's predicted cells (`predicted`) and of train_mean, pooled over its phase-2 training
    conditions: per condition (`per_condition`, with the split-half correlation of its true change)
    and averaged over them. Each screen is read once per split seed."""
    truths = {}
    for r in results:
        if "failed" in r:
            continue
        key = (r["dataset"], r["seed"])
        if key not in truths:
            path = keys.dataset_file(r["dataset"], seed_data(opts.workdir, r["dataset"], r["seed"]))
            truths[key] = Truth(anndata.read_h5ad(path))
        truth = truths[key]
        train = training_data(truth, r["train_conditions"])
        means, _ = truth.condition_means(r["conditions"])
        predicted = align(read_predictions(r["predictions"], condition_key=keys.OBS_CONDITION,
                                           separator=keys.GENE_SEPARATOR), truth, "regina")
        profiles = {"predicted": dict(zip(predicted.conditions, predicted.means)),
                    "train_mean": train_mean(train, r["conditions"])}
        rng = np.random.default_rng(0)  # the same halves for every arm
        r["per_condition"] = {}
        for c, m in zip(r["conditions"], means):
            x = truth.cells(truth.rows(c)).astype(np.float64)
            r["per_condition"][c] = {"reliability": split_half_correlation(x, train.control_mean, rng),
                                     **{name: _pearson(p[c] - train.control_mean, m - train.control_mean)
                                        for name, p in profiles.items()}}
        for name in profiles:
            r[name] = float(np.mean([row[name] for row in r["per_condition"].values()]))


def report(results: list[dict], opts) -> str:
    clipped = " (`--clip`: negative values set to 0)" if opts.clip else ""
    lines = ["# Training conditions held out of phase 2", "",
             f"Command: `python benchmarks/holdout.py {' '.join(sys.argv[1:])}`  ",
             f"Load average at the end: {load_average()}", "",
             "pearson_delta on the held-out conditions (and the split's own predictable validation conditions), "
             "mean over split seeds x draws. `epoch 0` and `selected`: as train-gan validates (at most 256 cells "
             "per condition); `predicted`: the selected model's "
             f"{opts.cells} predicted cells per condition{clipped}, scored like train_mean against every cell of each "
             "condition; `vs default`: the arm's `predicted` score minus the default's on the same draw "
             "(wins / losses).", ""]
    arms = ["default", *[name for name, _ in opts.arm]]
    for dataset in opts.datasets:
        done = [r for r in results if r["dataset"] == dataset and "failed" not in r]
        base = {(r["seed"], r["draw"]): r for r in done if r["arm"] == "default"}
        lines += [f"## {dataset}", "", "| arm | runs | epoch 0 | selected | predicted | train_mean | vs default |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for arm in arms:
            mine = [r for r in done if r["arm"] == arm]
            if not mine:
                continue
            diffs = [r["predicted"] - base[(r["seed"], r["draw"])]["predicted"] for r in mine
                     if (r["seed"], r["draw"]) in base]
            versus = "" if arm == "default" or not diffs else (
                f"{np.mean(diffs):+.4f} ({sum(d > 1e-4 for d in diffs)} / {sum(d < -1e-4 for d in diffs)})")
            lines.append(f"| {arm} | {len(mine)} | {np.mean([r['epoch0'] for r in mine]):.4f} | "
                         f"{np.mean([r['selected'] for r in mine]):.4f} | {np.mean([r['predicted'] for r in mine]):.4f} | "
                         f"{np.mean([r['train_mean'] for r in mine]):.4f} | {versus} |")
        lines += by_epoch_table(done, arms)
        lines += ["", "By the split-half correlation of each held-out condition's true change (how far it stands "
                  "above the noise of its cells), `predicted` per condition:", "",
                  "| arm | " + " | ".join(f"{lo:g} to {hi:g}" for lo, hi in STRATA) + " |",
                  "| --- |" + " --- |" * len(STRATA)]
        rows = {arm: [row for r in done if r["arm"] == arm for row in r["per_condition"].values()] for arm in arms}
        for name, key in [*((arm, "predicted") for arm in arms), ("train_mean", "train_mean")]:
            mine = rows["default" if name == "train_mean" else name]
            if mine:
                cells = [[row[key] for row in mine if lo < row["reliability"] <= hi] for lo, hi in STRATA]
                lines.append(f"| {name} | " + " | ".join(f"{np.mean(c):.3f} ({len(c)})" if c else "-"
                                                          for c in cells) + " |")
        lines.append("")
        for r in results:
            if r["dataset"] == dataset and "failed" in r:
                lines.append(f"Seed {r['seed']} draw {r['draw']} {r['arm']}: {r['failed']}")
        lines.append("")
    return "\n".join(lines)


def by_epoch_table(done: list[dict], arms: list[str]) -> list[str]:
    """What training did to the held-out conditions, epoch by epoch (as train-gan validates them):
    pearson_delta, in how many runs it beat the untrained start, the collapse index and the
    predicted-to-true latent shift ratio; and to the conditions it trained on (`fit`, each predicted
    from the prior fitted without it): pearson_delta and collapse index. Up to the last epoch every
    run of the arm reached."""
    lines = ["", "Validation by epoch (epoch 0: the untrained start; `beat start`: runs whose epoch scored "
             "higher than their epoch 0; collapse index and predicted-to-true latent shift ratio as "
             "`history.csv` records them; `fit`: the same model on the conditions phase 2 trains on, each "
             "predicted from the prior fitted without it, so a rise there is what training fitted):", "",
             "| arm | runs | pearson_delta by epoch | beat start | collapse index | shift ratio | fit: pearson_delta "
             "| fit: collapse index |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in arms:
        mine = [r["by_epoch"] for r in done if r["arm"] == arm]
        if not mine:
            continue
        epochs = range(min(len(m["pearson_delta"]) for m in mine))

        def series(key, fmt):
            return " / ".join(format(np.nanmean([m[key][e] for m in mine]), fmt) for e in epochs)

        beat = " / ".join(f"{sum(m['pearson_delta'][e] > m['pearson_delta'][0] for m in mine)}" for e in epochs[1:])
        lines.append(f"| {arm} | {len(mine)} | {series('pearson_delta', '.4f')} | {beat} of {len(mine)} | "
                     f"{series('collapse_index', '.3f')} | {series('shift_ratio', '.2f')} | "
                     f"{series('fit_pearson_delta', '.4f')} | {series('fit_collapse_index', '.3f')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["papalexi"], choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--draws", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="hold-out draws (runtime.seed)")
    parser.add_argument("--arm", action="append", type=parse_arm, default=[], help="NAME=KEY=VALUE[,KEY=VALUE...]")
    parser.add_argument("--share", type=float, default=0.3, help="gan.validation_holdout")
    parser.add_argument("--max-epochs", type=int, default=1)
    parser.add_argument("--phase1-from", required=True, metavar="TAG", help="quality.py run whose phase 1 is reused")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "work"))
    parser.add_argument("--out", default=None, help="markdown report (default: print it)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--cells", type=int, default=CELLS, help="predicted cells per held-out condition")
    parser.add_argument("--clip", action="store_true", help="predict with `regina predict --clip` (negative values to 0)")
    parser.add_argument("--reuse", action="store_true", help="score the runs a previous call trained, do not retrain")
    opts = parser.parse_args()
    if not 0 < opts.share < 1 or opts.max_epochs < 1 or opts.cells < 1:
        parser.error("--share must lie between 0 and 1, --max-epochs and --cells be at least 1")
    missing = [str(p) for d in opts.datasets for s in opts.seeds
               if not (p := seed_folder(opts.workdir, d, s) / "runs" / opts.phase1_from / keys.AE_DIR).is_dir()]
    if missing:
        parser.error(f"no phase-1 run to reuse at {missing[0]} (run benchmarks/quality.py --tag {opts.phase1_from} "
                     "with this --workdir first)")
    jobs = [(d, s, r, name, sets) for d in opts.datasets for s in opts.seeds for r in opts.draws
            for name, sets in [("default", []), *opts.arm]]
    with ThreadPoolExecutor(opts.jobs) as pool:
        results = list(pool.map(lambda job: one_run(*job, opts), jobs))
    full_truth_scores(results, opts)
    text = report(results, opts)
    if opts.out:
        Path(opts.out).write_text(text + "\n")
        Path(opts.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
