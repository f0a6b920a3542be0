"""What the demo's collapse index can be for a prediction that knows everything knowable.

    python benchmarks/demo_oracle.py --workdir /work/bench/v4 --seeds 1 2 3 --on test

The demo is simulated, so its hidden design is known. This script rebuilds it from the fetched
screen's recorded options (the simulator's own random stream) and scores, exactly as
`quality.py` scores REGINA (`regina evaluate` on 1000 predicted cells per condition, then its
collapse index), three predictions made by the simulator itself:

* `design`: every condition's true design (its true programs, knock-down strength, stress,
  idiosyncratic push and interaction), fresh cells: the truth without its sampling noise;
* `knowable`: what a perfect model could know of an unmeasured condition before seeing its cells
  (its target's true program memberships and the expected value of everything drawn at random
  for it: knock-down strength, stress, idiosyncratic push, interaction), fresh cells;
* `knowable_no_stress`: the same without the expected stress (which 35% of singles carry).

The gap between `knowable`'s collapse index and the truth's is the part of REGINA's gap that no
prediction aiming at the expected change can close. Reads only the demo's design and the split's
conditions; nothing is trained, nothing is chosen.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from regina_cli import keys
from regina_cli.data import demo
from workdir import read_screen, seed_data, split_of

from quality import MODEL, collapse_index, regina_command

STRESS_CHANCE = 0.35  # design_screen: a single raises stress with this chance ...
STRESS_MEAN = 1.75  # ... by uniform(1.0, 2.5)
STRENGTH_MEAN = -1.85  # knock-down strength: -uniform(1.2, 2.5)
INTERACTION_MEAN = (1 + 1 + 1.8 + 0.3 + 1) / 5  # additive, additive, synergy, buffering, neomorphic (+ mean-0 push)


def rebuild(options: dict):
    """The design, the measured genes and the cell type's base rate, drawn as `simulate_demo` draws them."""
    rng = np.random.default_rng(options["seed"])
    design = demo.design_screen(rng, n_genes=options["n_genes"], n_singles=options["n_singles"],
                                n_doubles=options["n_doubles"])
    dropped = demo._dropped_targets(design, options["drop_targets"], options["seed"])
    measured = ~np.isin(np.arange(options["n_genes"]), dropped)
    demo._allocate_cells(options["n_cells"], len(design.conditions), options["n_cell_types"],
                         options["control_fraction"], rng)
    rng.choice(len(demo.PHASES), size=options["n_cells"], p=[0.5, 0.3, 0.2])
    base = design.base + rng.normal(0.0, 0.3, (options["n_cell_types"], options["n_genes"])).astype(np.float32)
    return design, measured, base[0]


def knowable(design, *, stress: bool):
    """The design a perfect model could know for an unmeasured condition: expected values of what
    `design_screen` draws at random, the target's true programs kept."""
    n_singles = len(design.targets)
    member = design.loadings[3:, design.targets].T
    single = np.zeros((n_singles, design.loadings.shape[0]), np.float32)
    single[:, 3:] = demo.TARGET_GAIN * STRENGTH_MEAN * member / np.linalg.norm(member, axis=1, keepdims=True)
    if stress:
        single[:, 0] = STRESS_CHANCE * STRESS_MEAN
    index = {g: i for i, g in enumerate(design.genes[design.targets])}
    shifts = np.zeros_like(design.program_shift)
    effect = np.zeros_like(design.effect)
    for row, condition in enumerate(design.conditions[1:], start=1):
        singles = [index[g] for g in condition.split(keys.GENE_SEPARATOR) if g != keys.CTRL]
        shifts[row] = single[singles].sum(0) * (INTERACTION_MEAN if len(singles) > 1 else 1.0)
        effect[row, design.targets[singles]] = STRENGTH_MEAN
    return demo.Design(design.genes, design.base, design.loadings, design.targets, design.conditions,
                       shifts, effect, design.interactions)


def cells(design, measured, base, conditions: list[str], n: int, seed: int):
    """`n` simulated cells of each condition (and of control) under `design`, as AnnData."""
    import anndata
    import scipy.sparse as sp

    rng = np.random.default_rng([seed, 99])
    codes = {c: i for i, c in enumerate(design.conditions)}
    labels = [keys.CTRL, *conditions]
    cond = np.repeat([codes[c] for c in labels], n)
    phase = rng.choice(len(demo.PHASES), size=len(cond), p=[0.5, 0.3, 0.2])
    x = sp.vstack([demo._simulate_counts_chunk(rng, base, design, cond[i:i + 4096], phase[i:i + 4096], measured)
                   for i in range(0, len(cond), 4096)], format="csr")
    obs = pd.DataFrame({keys.OBS_CONDITION: np.repeat(labels, n)}, index=[f"o{i}" for i in range(len(cond))])
    return anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=design.genes[measured]))


def score_one(seed: int, opts) -> list[dict]:
    from regina_cli.data.split import load_split

    data = seed_data(opts.workdir, "demo", seed)
    split = split_of(seed)
    record = read_screen(data, "demo", backed="r").uns[keys.UNS_REGINA]["simulation"]
    options = {k: record[k] for k in demo.DEMO_OPTIONS}
    design, measured, base = rebuild(options)
    conditions = sorted(getattr(load_split("demo", split, data), opts.on))
    out = Path(opts.workdir) / "demo" / f"seed{seed}" / "oracle"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, oracle in (("design", design), ("knowable", knowable(design, stress=True)),
                         ("knowable_no_stress", knowable(design, stress=False))):
        path = out / f"{name}_{opts.on}.h5ad"
        cells(oracle, measured, base, conditions, opts.cells, seed).write_h5ad(path)
        eval_dir = out / f"eval_{name}_{opts.on}"
        on = ["--on", opts.on] if opts.on != "test" else []
        subprocess.run([*regina_command(), "--quiet", "evaluate", "demo", "--data-dir", str(data), "--predictions",
                        str(path), "--model-name", MODEL, "--split", split, "--out", str(eval_dir), "--no-plots",
                        "--baselines", "train_mean", "--device", "cpu", *on], check=True)
        table = pd.read_csv(eval_dir / "per_condition.csv")
        model = table.loc[table["model"] == MODEL]
        collapse = collapse_index("demo", data, path, table, split)
        rows.append({"seed": seed, "oracle": name, "n": len(model),
                     "pearson_delta": float(model["pearson_delta"].mean()), **collapse})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="quality.py's workdir (its demo data folders)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--on", choices=("test", "val"), default="test")
    parser.add_argument("--cells", type=int, default=1000, help="simulated cells per condition")
    parser.add_argument("--out", help="JSON file for the rows")
    opts = parser.parse_args()
    rows = [row for seed in opts.seeds for row in score_one(seed, opts)]
    frame = pd.DataFrame(rows)
    print(frame.groupby("oracle")[["pearson_delta", "collapse_index", "collapse_index_true",
                                   "collapse_index_true_denoised"]].mean().round(3).to_string())
    if opts.out:
        Path(opts.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
