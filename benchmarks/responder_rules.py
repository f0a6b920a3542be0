"""Can a rule tell, before a target is perturbed, a strong responder from a weak one?

    python benchmarks/responder_rules.py --workdir /work/bench/pw --datasets papalexi \\
        --gene-knowledge benchmarks/work/knowledge/go_human.tsv      # from benchmarks/make_knowledge.py

Why: on Papalexi REGINA's prior (mostly the mean change of the training conditions plus the
target's median knock-down entry) leads train_mean on training conditions held out of phase 2 but
trails it on the strongest responders, the interferon-pathway knockouts whose loss moves cells
along the screen's shared response, and every split seed tests two of them (IFNGR2, JAK2). A rule
that closes that gap must see it coming from what is known before the target's cells are.

For every split seed this holds out each training single in turn (pseudo-bulk, no training) and
predicts its mean change from the other training conditions by:

* conditions: their mean change, each condition once (the prior's start, `gan.prior_mean`);
* cells: pooled over cells (the train_mean baseline);
* median: their median change, gene by gene (a centre that a few strong responders cannot move);
* knowledge: the observed effects of the target's gene-knowledge neighbours among the other
  training targets (`GeneKnowledge.neighbours`, GEARS's GO weighting), and halfway between the
  two (`conditions + 0.5 (knowledge - conditions)`, the prior's knowledge weight v = 0.5);
* amplitude: the conditions' mean change scaled by the factor (`AMPLITUDES`) that best predicts
  the other measured training singles, each from the rest (how much the shared response counts
  against the knock-down entry, chosen as the prior's fold weights are);
* pooling: the mean change moved from conditions towards cells by the share (`POOLINGS`) chosen
  the same way (whether this screen's training targets favour train_mean's pooling).

A measured target gets the median knock-down change of the other measured training singles at
its own gene in every rule (the prior's self entry). Scores: Pearson of predicted and observed
mean change, by the held-out condition's split-half reliability (`quality.split_half_correlation`:
how far its change stands above the noise of its cells). Only training conditions are read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import split_half_correlation  # noqa: E402
from workdir import load_average, read_screen, seed_data, split_of  # noqa: E402

from regina_cli.data.conditions import is_control, parse_condition  # noqa: E402
from regina_cli.data.knowledge import load_gene_knowledge  # noqa: E402
from regina_cli.data.split import load_split  # noqa: E402

AMPLITUDES = (0.25, 0.5, 1.0, 2.0, 4.0)
POOLINGS = (0.0, 0.5, 1.0)
STRATA = ((-1.0, 0.3), (0.3, 0.7), (0.7, 1.0))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


class Screen:
    """Pseudo-bulk mean changes, cell counts and split-half reliabilities of a screen's singles."""

    def __init__(self, adata, seed: int = 0):
        x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
        conditions = adata.obs["condition"].astype(str).to_numpy()
        control = x[np.asarray([is_control(c) for c in conditions])].mean(0)
        names = adata.var["gene_name"] if "gene_name" in adata.var else adata.var_names
        self.index = {g: i for i, g in enumerate(names)}
        rng = np.random.default_rng(seed)
        self.change, self.cells, self.reliability = {}, {}, {}
        for condition in sorted(set(conditions)):
            genes = parse_condition(condition)
            if is_control(condition) or len(genes) != 1:
                continue
            rows = x[conditions == condition]
            self.change[genes[0]] = rows.mean(0) - control
            self.cells[genes[0]] = len(rows)
            self.reliability[genes[0]] = split_half_correlation(rows, control, rng)

    def self_entry(self, targets: list[str]) -> float:
        return float(np.median([self.change[t][self.index[t]] for t in targets if t in self.index] or [0.0]))

    def predict(self, target: str, others: list[str], rule: str, knowledge=None, amplitude: float = 1.0,
                pooling: float = 0.0) -> np.ndarray:
        changes = np.stack([self.change[t] for t in others])
        mean = changes.mean(0)
        if rule == "median":
            mean = np.median(changes, axis=0)
        if rule == "cells":
            pooling = 1.0
        if pooling:
            counts = np.asarray([self.cells[t] for t in others], dtype=float)
            mean = mean + pooling * (counts @ changes / counts.sum() - mean)
        if rule.startswith("knowledge"):
            weights, usable = knowledge.neighbours([target], others)
            if usable[0]:
                mix = weights[0] @ changes
                mean = mix if rule == "knowledge" else mean + 0.5 * (mix - mean)
        prediction = amplitude * mean
        if target in self.index:
            prediction[self.index[target]] = self.self_entry(others)
        return prediction

    def chosen(self, others: list[str], setting: str, values: tuple[float, ...]) -> float:
        """The value of `setting` (`amplitude`, `pooling`) that best predicts each measured target
        among `others` from the rest."""
        measured = [t for t in others if t in self.index]

        def score(value: float) -> float:
            return np.mean([_pearson(self.predict(t, [o for o in others if o != t], "conditions", **{setting: value}),
                                     self.change[t]) for t in measured] or [0.0])
        return max(values, key=score)


def held_out_rows(screen: Screen, train: list[str], knowledge) -> list[dict]:
    rows = []
    for target in train:
        others = [t for t in train if t != target]
        rules = ["conditions", "cells", "median"] + (["knowledge", "knowledge 0.5"] if knowledge is not None else [])
        row = {"target": target, "measured": target in screen.index, "reliability": screen.reliability[target]}
        for rule in rules:
            row[rule] = _pearson(screen.predict(target, others, rule, knowledge), screen.change[target])
        for setting, values in (("amplitude", AMPLITUDES), ("pooling", POOLINGS)):
            value = screen.chosen(others, setting, values)
            row[setting] = _pearson(screen.predict(target, others, "conditions", **{setting: value}),
                                    screen.change[target])
            row[f"{setting} chosen"] = value
        rows.append(row)
    return rows


def report(dataset: str, per_seed: dict[int, list[dict]]) -> str:
    rows = [r for seed_rows in per_seed.values() for r in seed_rows]
    rules = [k for k in rows[0] if k not in ("target", "measured", "reliability") and not k.endswith(" chosen")]
    groups = [(f"reliability {lo:g}-{hi:g}", lambda r, lo=lo, hi=hi: lo < r["reliability"] <= hi) for lo, hi in STRATA]
    groups += [("measured targets", lambda r: r["measured"]),
               ("measured, reliability > 0.7", lambda r: r["measured"] and r["reliability"] > 0.7),
               ("all", lambda r: True)]
    lines = [f"## {dataset}", "", "Held-out training singles, seeds " + ", ".join(map(str, per_seed)) +
             "; mean Pearson over them (n = held-out conditions, summed over seeds)", "",
             "| held-out singles | n | " + " | ".join(rules) + " |", "| --- | --- |" + " --- |" * len(rules)]
    for name, keep in groups:
        chosen = [r for r in rows if keep(r)]
        if chosen:
            lines.append(f"| {name} | {len(chosen)} | " +
                         " | ".join(f"{np.mean([r[k] for r in chosen]):.3f}" for k in rules) + " |")
    lines.append("")
    for setting in ("amplitude", "pooling"):
        chosen = [r[f"{setting} chosen"] for r in rows]
        lines.append(f"{setting.capitalize()} chosen: " + ", ".join(
            f"{a:g} ({chosen.count(a)})" for a in sorted(set(chosen))) + "  ")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a benchmarks/quality.py workdir (its fetched data)")
    parser.add_argument("--datasets", nargs="+", default=["papalexi"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--gene-knowledge", default=None, help="a knowledge file (benchmarks/make_knowledge.py)")
    parser.add_argument("--json", default=None, help="also write every held-out row here")
    opts = parser.parse_args()
    knowledge = load_gene_knowledge(opts.gene_knowledge) if opts.gene_knowledge else None
    print(f"load average {load_average()}\n")
    everything = {}
    for dataset in opts.datasets:
        per_seed = {}
        for seed in opts.seeds:
            data = seed_data(opts.workdir, dataset, seed)
            screen = Screen(read_screen(data, dataset))
            train = sorted({g for c in load_split(dataset, split_of(seed), data).train
                            for g in parse_condition(c) if len(parse_condition(c)) == 1} & set(screen.change))
            per_seed[seed] = held_out_rows(screen, train, knowledge)
        everything[dataset] = per_seed
        print(report(dataset, per_seed))
    if opts.json:
        Path(opts.json).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
