"""Is there anything in the training conditions that phase 2 could learn about the prior's errors?

    python benchmarks/prior_residuals.py --workdir /work/bench/v2 --datasets demo --phase1-from base --draws 0 1 2
    python benchmarks/prior_residuals.py --workdir /work/bench/pw --datasets papalexi --phase1-from base

Phase 2 trains the transition on each training condition anchored at the prior fitted without it
(cross-fitted), to move that prior towards the condition's cells. What it could learn there that
carries over to an unseen gene is, at the level of condition means, a map from a condition's prior
to the prior's error. This script asks whether the data hold such a map, without the network.
For every split seed and hold-out draw it sets phase 2 up as `holdout.py`'s runs start it (the
same share and draw of training perturbations held out of phase 2 and of its prior;
`engine.train_gan.setup_phase`: nothing trained, nothing written) and reads, per condition, the
mean change of at most 256 cells (what `train-gan` validates against) and the prior: the
cross-fitted one for phase 2's training conditions, the full one for the held-out conditions.
Each rule fits a correction on the training conditions and adds it to the held-out conditions'
prior; the report gives each rule's pearson_delta (all genes) on the held-out conditions next to
the prior's own and train_mean's. Every rule and setting is reported, none is picked. Test
conditions are never read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import phase2_settings  # noqa: E402
from workdir import load_average, seed_folder  # noqa: E402

from regina_cli import keys  # noqa: E402
from regina_cli.engine import gan_validation  # noqa: E402
from regina_cli.engine.distributed import DistContext  # noqa: E402
from regina_cli.engine.expression_prior import _pearson  # noqa: E402
from regina_cli.engine.run_config import ConfigRequest, resolve_run_config  # noqa: E402
from regina_cli.engine.train_gan import setup_phase  # noqa: E402

RIDGE = (0.1, 1.0, 10.0)  # penalties, relative to the data's own scale
RANKS = (2, 5, 10)
NEIGHBOURS = (1, 3, 5)
NEIGHBOUR_WEIGHTS = (0.5, 1.0)


def tables(dataset: str, seed: int, draw: int, opts) -> dict[str, np.ndarray]:
    """Priors and true mean changes of phase 2's training conditions (cross-fitted priors) and of
    the held-out ones (full prior), and train_mean pooled over phase 2's training cells."""
    folder = seed_folder(opts.workdir, dataset, seed)
    run, data = folder / "runs" / opts.phase1_from, folder / "data"
    settings = {**phase2_settings(dataset, data), "validation_min_conditions": 1000, "validation_holdout": opts.share}
    config, _ = resolve_run_config(keys.GAN_DIR, run, ConfigRequest(overrides={"gan": settings,
                                                                               "runtime": {"seed": draw}}))
    setup = setup_phase(DistContext(0, 0, 1, torch.device("cpu")), run, config, data)
    phase, cells, held = setup.phase, setup.cells, setup.plan
    setup.adata.file.close()
    trained = gan_validation.training_plan(cells, phase.train_index, seed=config.runtime.seed)

    def codes(plan):
        return torch.as_tensor([cells.conditions.index(c) for c in plan.conditions])

    held_codes, train_codes = codes(held), codes(trained)
    prior = phase.gan.expression_prior(cells.target_idx[held_codes], cells.prompt_idx[held_codes])
    counts = phase.stats.counts[train_codes].double().unsqueeze(1)
    pooled = (phase.stats.expression_mean[train_codes].double() * counts).sum(0) / counts.sum() - held.reference
    out = {"held_prior": prior, "held_true": held.delta_true, "train_prior": phase.train_prior[train_codes],
           "train_true": trained.delta_true, "train_mean": pooled}
    cells.close()
    return {k: v.double().cpu().numpy() for k, v in out.items()}


def mean_pearson(predicted: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean([_pearson(p, t) for p, t in zip(predicted, true)]))


def corrections(train_prior: np.ndarray, train_true: np.ndarray, held_prior: np.ndarray) -> dict[str, np.ndarray]:
    """Each rule's corrected prior of the held-out conditions, fitted on the training conditions."""
    residual = train_true - train_prior
    out = {"shared shift (mean error)": held_prior + residual.mean(0)}
    centred_prior, centred_true = train_prior - train_prior.mean(0), train_true - train_true.mean(0)
    spread = (centred_prior ** 2).sum(0)
    for lam in RIDGE:  # per gene: true ~ a_g prior + b_g, a_g shrunk towards 1
        slope = ((centred_prior * centred_true).sum(0) + lam * spread.mean()) / (spread + lam * spread.mean())
        out[f"per-gene recalibration, ridge {lam:g}"] = train_true.mean(0) + slope * (held_prior - train_prior.mean(0))
    _, singular, directions = np.linalg.svd(centred_prior, full_matrices=False)
    for rank in RANKS:  # error ~ W (prior on its k leading directions)
        basis = directions[:rank].T
        x = centred_prior @ basis
        for lam in RIDGE:
            w = np.linalg.solve(x.T @ x + lam * singular[0] ** 2 * np.eye(x.shape[1]), x.T @ (residual - residual.mean(0)))
            out[f"rank-{rank} linear map, ridge {lam:g}"] = (held_prior + residual.mean(0)
                                                             + (held_prior - train_prior.mean(0)) @ basis @ w)
    similarity = np.array([[_pearson(h, t) for t in train_prior] for h in held_prior])
    for k in NEIGHBOURS:  # the errors of the k training conditions whose priors correlate best
        nearest = np.argsort(-similarity, axis=1)[:, :k]
        for weight in NEIGHBOUR_WEIGHTS:
            out[f"{k} nearest conditions' errors x {weight:g}"] = held_prior + weight * residual[nearest].mean(1)
    return out


def score(t: dict[str, np.ndarray]) -> dict[str, float]:
    held = t["held_true"]
    scores = {"prior (none learned)": mean_pearson(t["held_prior"], held),
              "train_mean": mean_pearson(np.broadcast_to(t["train_mean"], held.shape), held)}
    for name, predicted in corrections(t["train_prior"], t["train_true"], t["held_prior"]).items():
        scores[name] = mean_pearson(predicted, held)
    return scores


def report(runs: list[dict], opts) -> str:
    lines = [f"# What the prior gets wrong, learned from the training conditions: {', '.join(opts.datasets)}", "",
             f"Command: `python benchmarks/prior_residuals.py {' '.join(sys.argv[1:])}`  ",
             f"Load average at the end: {load_average()}", ""]
    for dataset in opts.datasets:
        mine = [r for r in runs if r["dataset"] == dataset]
        if not mine:
            continue
        start = np.array([r["scores"]["prior (none learned)"] for r in mine])
        n_train = np.mean([r["train_conditions"] for r in mine])
        n_held = np.mean([r["held_conditions"] for r in mine])
        lines += [f"## {dataset}", "",
                  f"{len(mine)} runs (split seeds x hold-out draws); per run {n_train:.1f} phase-2 training "
                  f"conditions to fit on and {n_held:.1f} held-out conditions to score. pearson_delta on the "
                  "held-out conditions, mean over runs; `runs higher`: runs where the rule beat the prior.", "",
                  "| rule | pearson_delta | vs the prior | runs higher |", "| --- | --- | --- | --- |"]
        for name in mine[0]["scores"]:
            values = np.array([r["scores"][name] for r in mine])
            lines.append(f"| {name} | {values.mean():.4f} | {values.mean() - start.mean():+.4f} | "
                         f"{int((values > start + 1e-12).sum())} of {len(mine)} |")
        in_sample = np.mean([r["train_prior_score"] for r in mine])
        lines += ["", f"The cross-fitted prior on the training conditions themselves: {in_sample:.4f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the --workdir of quality.py's runs")
    parser.add_argument("--datasets", nargs="+", default=["demo", "papalexi"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="hold-out draws (runtime.seed)")
    parser.add_argument("--phase1-from", default="base", help="the quality.py run tag whose phase 1 is read")
    parser.add_argument("--share", type=float, default=0.3, help="share of training perturbations held out")
    parser.add_argument("--out", default=None, help="report path (default: stdout only); a .json beside it")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for dataset in opts.datasets:
        for seed in opts.seeds:
            for draw in opts.draws:
                t = tables(dataset, seed, draw, opts)
                runs.append({"dataset": dataset, "seed": seed, "draw": draw, "scores": score(t),
                             "train_conditions": len(t["train_true"]), "held_conditions": len(t["held_true"]),
                             "train_prior_score": mean_pearson(t["train_prior"], t["train_true"])})
                print(f"{dataset} seed {seed} draw {draw}: prior {runs[-1]['scores']['prior (none learned)']:.4f}",
                      flush=True)
    text = report(runs, opts)
    print(text)
    if opts.out:
        Path(opts.out).write_text(text + "\n")
        Path(opts.out).with_suffix(".json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
