"""Configurations compared on training conditions held out of phase 2 (the validation side where a
split's own validation set is too small to choose on).

    python benchmarks/holdout.py --workdir /work/bench/pw --datasets papalexi --phase1-from final
    python benchmarks/holdout.py --workdir /work/bench/v2 --datasets demo --phase1-from valbase \\
        --draws 0 1 2 --arm lowadv=gan.lambda_adv=0.1

Papalexi's GEARS splits validate on 0-1 predictable conditions per seed, so `quality.py --on val`
says almost nothing there. This script reuses the phase-1 runs that `quality.py` left in
`<workdir>/<dataset>/seed<S>/runs/<TAG>` and, for every split seed and hold-out draw D, trains
phase 2 (`--max-epochs`, 1 by default) with `gan.validation_holdout` of the training perturbations
held out of phase 2, its prior and its weight choices (`gan.validation_min_conditions` set high so
the hold-out is always drawn; `runtime.seed=D` draws it). Each arm (`--arm NAME=KEY=VALUE,...`,
besides `default`) sees the same held-out conditions. Reported per arm: the validation
pearson_delta of the untrained transition (epoch 0) and of the weights model selection kept, and
train_mean (pooled over the phase-2 training cells, as `regina evaluate` pools it) on every cell
of the same conditions. Test conditions are never read.
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
from quality import DATASETS, ROOT, StepFailed, run  # noqa: E402

from regina_cli import keys  # noqa: E402
from regina_cli.engine.expression_prior import _pearson  # noqa: E402
from regina_cli.evaluate.baselines import train_mean, training_data  # noqa: E402
from regina_cli.evaluate.truth import Truth  # noqa: E402


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition("=")
    if not name or not sets:
        raise argparse.ArgumentTypeError(f"--arm takes NAME=KEY=VALUE[,KEY=VALUE...], not {text!r}")
    return name, sets.split(",")


def one_run(dataset: str, seed: int, draw: int, arm: str, sets: list[str], opts) -> dict:
    """Phase 2 of one arm on one hold-out draw; its validation scores and held-out conditions."""
    folder = Path(opts.workdir) / dataset / f"seed{seed}"
    run_dir = folder / "runs" / "holdout" / f"{arm}-draw{draw}"
    log = run_dir.parent / f"{run_dir.name}.log"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    log.unlink(missing_ok=True)  # a rerun's log holds only its own commands, as in quality.py
    shutil.copytree(folder / "runs" / opts.phase1_from / keys.AE_DIR, run_dir / keys.AE_DIR)
    env = {**os.environ, "REGINA_DATA": str(folder / "data"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    overrides = ["gan.validation_min_conditions=1000", f"gan.validation_holdout={opts.share}",
                 f"runtime.seed={draw}", *sets]
    try:
        run(["--quiet", "train-gan", "--run", str(run_dir), "--device", "cpu", "--max-epochs",
             str(opts.max_epochs), *[a for s in overrides for a in ("--set", s)]], log,
            env)
    except StepFailed as failure:
        return {"dataset": dataset, "seed": seed, "draw": draw, "arm": arm, "failed": str(failure)}
    meta = json.loads((run_dir / keys.GAN_DIR / "meta.json").read_text())
    with (run_dir / keys.GAN_DIR / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return {"dataset": dataset, "seed": seed, "draw": draw, "arm": arm,
            "epoch0": float(rows[0]["val_pearson_delta"]), "selected": float(meta["training"]["best_value"]),
            "best_epoch": int(meta["training"]["best_epoch"]), "conditions": meta["validation_conditions_scored"],
            "train_conditions": [c for c in meta["train_conditions"] if c not in meta["held_out_conditions"]]}


def train_mean_scores(results: list[dict], opts) -> None:
    """Add to each finished run train_mean's pearson_delta (all genes, every cell of each condition),
    pooled over its phase-2 training conditions and averaged over its validation conditions; each
    screen is read once per split seed."""
    truths = {}
    for r in results:
        if "failed" in r:
            continue
        key = (r["dataset"], r["seed"])
        if key not in truths:
            path = Path(opts.workdir) / r["dataset"] / f"seed{r['seed']}" / "data" / r["dataset"] / "perturb_processed.h5ad"
            truths[key] = Truth(anndata.read_h5ad(path))
        truth = truths[key]
        train = training_data(truth, r["train_conditions"])
        means, _ = truth.condition_means(r["conditions"])
        pooled = train_mean(train, r["conditions"])
        r["train_mean"] = float(np.mean([_pearson(pooled[c] - train.control_mean, m - train.control_mean)
                                         for c, m in zip(r["conditions"], means)]))


def report(results: list[dict], opts) -> str:
    lines = ["# Training conditions held out of phase 2", "",
             f"Command: `python benchmarks/holdout.py {' '.join(sys.argv[1:])}`  ",
             f"Load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", "",
             "pearson_delta on the held-out conditions (and the split's own predictable validation conditions), "
             "mean over split seeds x draws; `vs default`: the arm's selected score minus the default's on the "
             "same draw (wins / losses).", ""]
    arms = ["default", *[name for name, _ in opts.arm]]
    for dataset in opts.datasets:
        done = [r for r in results if r["dataset"] == dataset and "failed" not in r]
        base = {(r["seed"], r["draw"]): r for r in done if r["arm"] == "default"}
        lines += [f"## {dataset}", "", "| arm | runs | epoch 0 | selected | train_mean | vs default |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for arm in arms:
            mine = [r for r in done if r["arm"] == arm]
            if not mine:
                continue
            diffs = [r["selected"] - base[(r["seed"], r["draw"])]["selected"] for r in mine
                     if (r["seed"], r["draw"]) in base]
            versus = "" if arm == "default" or not diffs else (
                f"{np.mean(diffs):+.4f} ({sum(d > 1e-4 for d in diffs)} / {sum(d < -1e-4 for d in diffs)})")
            lines.append(f"| {arm} | {len(mine)} | {np.mean([r['epoch0'] for r in mine]):.4f} | "
                         f"{np.mean([r['selected'] for r in mine]):.4f} | "
                         f"{np.mean([r['train_mean'] for r in mine]):.4f} | {versus} |")
        lines.append("")
        for r in results:
            if r["dataset"] == dataset and "failed" in r:
                lines.append(f"Seed {r['seed']} draw {r['draw']} {r['arm']}: {r['failed']}")
        lines.append("")
    return "\n".join(lines)


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
    opts = parser.parse_args()
    if not 0 < opts.share < 1 or opts.max_epochs < 1:
        parser.error("--share must lie between 0 and 1 and --max-epochs be at least 1")
    missing = [str(p) for d in opts.datasets for s in opts.seeds
               if not (p := Path(opts.workdir) / d / f"seed{s}" / "runs" / opts.phase1_from / keys.AE_DIR).is_dir()]
    if missing:
        parser.error(f"no phase-1 run to reuse at {missing[0]} (run benchmarks/quality.py --tag {opts.phase1_from} "
                     "with this --workdir first)")
    jobs = [(d, s, r, name, sets) for d in opts.datasets for s in opts.seeds for r in opts.draws
            for name, sets in [("default", []), *opts.arm]]
    with ThreadPoolExecutor(opts.jobs) as pool:
        results = list(pool.map(lambda job: one_run(*job, opts), jobs))
    train_mean_scores(results, opts)
    text = report(results, opts)
    if opts.out:
        Path(opts.out).write_text(text + "\n")
        Path(opts.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
