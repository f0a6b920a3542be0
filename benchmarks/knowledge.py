"""Does gene knowledge predict targets the screen does not measure? The whole CLI, three ways.

    python benchmarks/knowledge.py --datasets demo --seeds 1 2 3 --jobs 2
    python benchmarks/knowledge.py --datasets papalexi mcfaline   # needs benchmarks/make_knowledge.py's file

For each dataset and split seed it runs the real command line (as benchmarks/quality.py does):
`regina fetch` (the demo with `--drop-targets`, which leaves a quarter of the targets out of the
measured genes and writes its GO-like `gene_knowledge.tsv`; the real screens from ../shared/data),
`split --seed S`, `label`, `train-ae`, then for each arm `train-gan`, `predict --conditions test`
and `evaluate`, with the default configuration. Phase 1 does not read the knowledge (trained once
per arm, the demo's three arms gave identical weights), so it is trained once per seed, without
knowledge, and each arm trains phase 2 on a copy of it with `--set model.gene_knowledge=FILE`. The arms:

* none: no knowledge. Test conditions with a target that is neither measured nor perturbed in
  training are skipped by `predict`; the only fallback for them is the `train_mean` baseline.
* knowledge: `--gene-knowledge FILE` (the demo's own file; for the real screens the human GO
  annotation that `benchmarks/make_knowledge.py` builds).
* random: the same file with its genes permuted (seeded by the split seed): every gene keeps a
  real-looking term set, but another gene's, so only the gene-to-knowledge link is broken.

Scores are `pearson_delta` and `pearson_delta_top20_de` from `per_condition.csv`, on the test
conditions with an unmeasured target (on the demo: the dropped targets) and on those whose
unmeasured target was not perturbed in training either (the ones only knowledge can predict),
mean over conditions per seed, then mean ± sd over seeds. Every model is compared with REGINA +
knowledge on the conditions both predict. `none + fallback` is REGINA without knowledge where it
predicts and `train_mean` elsewhere. The baselines do not depend on the arm; each condition's
baseline scores come from the first arm that evaluated it. Coverage is predicted / all test
conditions.

A prior check isolates the route knowledge takes, without training: phase 2 predicts around an
expression prior, the linear gene-embedding model of the training pseudo-bulk, and knowledge gives
an unmeasured target its row of that model's gene embedding (GO-similarity mix of the measured
genes' rows). The check scores that prior alone (Pearson of predicted and true mean change, all
genes) with each arm's row: `none` gives no row (the model's mean change); on measured unseen
single targets it also hides the gene's own row and compares the knowledge mix with the real row,
the most any knowledge could give through this route. Results go to
benchmarks/results/knowledge.md (`--out`); `--reuse` rescores finished runs without training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from quality import DATASETS, ROOT, StepFailed, run
from workdir import load_average, read_screen, seed_folder, split_of

ARMS = ("none", "knowledge", "random")
SCORES = ("pearson_delta", "pearson_delta_top20_de")
MODEL, FALLBACK, COMPOSITE = "regina", "train_mean", "none + fallback"
PHASE1 = "phase1"  # run folder of the shared phase 1
GROUPS = {  # group -> (column of the condition table that selects it, title)
    "unseen": ("unseen", "a target neither measured nor perturbed in training (only knowledge predicts them)"),
    "unmeasured": ("unmeasured", "a target the screen does not measure"),
    "all": ("test", "every test condition"),
}


def shuffled_copy(source: Path, out: Path, seed: int) -> Path:
    """`source` (a gene table with a header, gene first) with its gene names permuted."""
    table = pd.read_csv(source, sep="\t", dtype=str, keep_default_na=False)
    genes = table.iloc[:, 0].unique()
    permuted = dict(zip(genes, np.random.default_rng(seed).permutation(genes)))
    table.iloc[:, 0] = table.iloc[:, 0].map(permuted)
    table.to_csv(out, sep="\t", index=False)
    return out


def conditions_table(dataset: str, split: str, data: Path) -> pd.DataFrame:
    """One row per test condition: subgroup, unmeasured (a target not measured), unseen (and
    not perturbed in training either)."""
    from regina_cli.data.conditions import condition_genes, parse_condition
    from regina_cli.data.split import load_split

    split_obj = load_split(dataset, split, data)
    adata = read_screen(data, dataset, backed="r")
    measured = set(map(str, adata.var_names))
    adata.file.close()
    trained = condition_genes(split_obj.train)
    subgroup = {c: name for name, conds in split_obj.subgroups.get("test", {}).items() for c in conds}
    rows = []
    for condition in split_obj.test:
        missing = set(parse_condition(condition)) - measured
        if parse_condition(condition):
            rows.append({"condition": condition, "subgroup": subgroup.get(condition, ""), "test": True,
                         "unmeasured": bool(missing), "unseen": bool(missing - trained)})
    return pd.DataFrame(rows).set_index("condition")


def train_phase1(dataset: str, seed: int, folder: Path, env: dict) -> Path:
    """`train-ae` once per seed, without knowledge (phase 1 does not read it); runs/phase1."""
    run_dir = folder / "runs" / PHASE1
    if not (run_dir / "ae" / "meta.json").is_file() or json.loads((run_dir / "ae" / "meta.json").read_text()).get(
            "status") != "trained":
        shutil.rmtree(run_dir, ignore_errors=True)
        run(["train-ae", dataset, "--split", split_of(seed), "--labels", DATASETS[dataset][1], "--run",
             str(run_dir), "--device", "cpu"], folder / f"{PHASE1}.log", env)
    return run_dir


def run_arm(dataset: str, seed: int, arm: str, knowledge: Path | None, folder: Path, env: dict, opts) -> dict:
    """train-gan (on a copy of the seed's phase 1, with `--set model.gene_knowledge=FILE`),
    predict --conditions test, evaluate for one arm; what it predicted and scored."""
    import anndata

    run_dir = folder / "runs" / arm
    record = run_dir / "knowledge.json"
    if opts.reuse and record.is_file():
        kept = json.loads(record.read_text())
        scores = run_dir / "eval" / "per_condition.csv"
        return {**kept, "table": pd.read_csv(scores) if scores.is_file() else None}
    log = folder / f"{arm}.log"
    log.unlink(missing_ok=True)
    split = split_of(seed)
    given = ["--set", f"model.gene_knowledge={knowledge}"] if knowledge is not None else []
    given += [a for s in opts.set for a in ("--set", s)]
    started = time.perf_counter()
    result = {"arm": arm, "sources": {}, "skipped": [], "failed": None}
    try:
        phase1 = train_phase1(dataset, seed, folder, env)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(phase1 / "ae", run_dir / "ae")
        run(["train-gan", "--run", str(run_dir), "--device", "cpu", *given], log, env)
        predictions = run_dir / "predictions.h5ad"
        run(["--quiet", "predict", "--run", str(run_dir), "--conditions", "test", "--device", "cpu"], log, env)
        pred = anndata.read_h5ad(predictions, backed="r")
        obs = pred.obs[pred.obs["prompt_source"].astype(str) != "control"]
        result["sources"] = obs.groupby(obs["condition"].astype(str), observed=True)["prompt_source"].first().astype(str).to_dict()
        result["skipped"] = [str(c) for c in pred.uns["regina"].get("skipped_conditions", [])]
        pred.file.close()
        run(["--quiet", "evaluate", dataset, "--predictions", str(predictions), "--split", split, "--out",
             str(run_dir / "eval"), "--no-plots", "--device", "cpu"], log, env)
    except StepFailed as failure:  # McFaline without knowledge: no test condition can be predicted
        result["failed"] = str(failure)
    result["seconds"] = time.perf_counter() - started
    record.write_text(json.dumps(result))
    scores = run_dir / "eval" / "per_condition.csv"
    return {**result, "table": pd.read_csv(scores) if scores.is_file() and not result["failed"] else None}


def job(dataset: str, seed: int, opts) -> dict:
    """Data, split and labels for one (dataset, seed), then every arm on them."""
    folder = seed_folder(opts.workdir, dataset, seed)
    data = folder / "data"
    source, labels = DATASETS[dataset]
    arm_names = opts.arms if source is None else opts.real_arms
    if opts.only_finished:  # the prior check still runs on every seed
        arm_names = [a for a in arm_names if (folder / "runs" / a / "knowledge.json").is_file()]
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "REGINA_DATA": str(data), "OMP_NUM_THREADS": str(opts.threads),
           "MKL_NUM_THREADS": str(opts.threads)}
    log = folder / "data.log"
    split = split_of(seed)
    try:
        fetch = (["--drop-targets", str(opts.drop_targets)] if source is None
                 else ["--from", str(Path(opts.shared_data) / source)])
        run(["--quiet", "fetch", dataset, *fetch], log, env)
        if not (data / dataset / "splits" / f"{split}.json").is_file():
            run(["--quiet", "split", dataset, "--seed", str(seed)], log, env)
        run(["--quiet", "label", dataset, "--method", labels, "--split", split], log, env)
    except StepFailed as failure:
        return {"dataset": dataset, "seed": seed, "failed": str(failure)}
    knowledge = data / dataset / "gene_knowledge.tsv" if source is None else Path(opts.knowledge_file)
    files = {"none": None, "knowledge": knowledge,
             "random": shuffled_copy(knowledge, folder / "random_knowledge.tsv", seed)}
    arms = {arm: run_arm(dataset, seed, arm, files[arm], folder, env, opts) for arm in arm_names}
    return {"dataset": dataset, "seed": seed, "conditions": conditions_table(dataset, split, data), "arms": arms,
            "prior": prior_check(dataset, split, data, files)}


def prior_check(dataset: str, split: str, data: Path, files: dict) -> list[dict]:
    """The expression prior alone, per knowledge source (see the module docstring): one row per
    (group, source) with the mean Pearson over the group's test conditions."""
    from regina_cli.data.conditions import condition_genes, parse_condition
    from regina_cli.data.knowledge import ANNOTATION, load_gene_knowledge
    from regina_cli.data.split import load_split
    from regina_cli.evaluate.baselines import fit_linear, training_data
    from regina_cli.evaluate.truth import Truth

    truth = Truth(read_screen(data, dataset))
    split_obj = load_split(dataset, split, data)
    train = training_data(truth, split_obj.train)
    model = fit_linear(train)
    observed = {parse_condition(c)[0]: m - train.control_mean
                for c, m in zip(train.conditions, train.means) if len(parse_condition(c)) == 1}
    knowledge = {arm: load_gene_knowledge(f) for arm, f in files.items() if f is not None}
    if model is None:
        return [{"note": "no training condition targets a measured gene, so the linear prior cannot be fitted: "
                         "phase 2's expression prior of an unseen target is the mean change over training "
                         "conditions, and knowledge has no embedding rows to mix (with gan.knowledge_neighbours it "
                         "reaches the prior through the observed effects of similar trained genes)"}]
    if any(k.kind != ANNOTATION for k in knowledge.values()):
        return []  # the check mixes rows by annotation similarity, as the engine does for GO terms
    g, index = model.gene_embedding, model.gene_index

    def effect(gene: str, source: str, hidden: str = "") -> np.ndarray:
        if gene in observed and gene != hidden:
            return observed[gene]
        if gene in index and (gene != hidden or source == "real row"):
            row = g[index[gene]]
        elif source in knowledge:
            anchors = [a for a in truth.genes if a != hidden]
            weights, usable = knowledge[source].vectors([gene], anchors=anchors)
            row = weights[0] @ g[[index[a] for a in anchors]] if usable[0] else np.zeros(g.shape[1])
        else:  # no knowledge: the mean change alone
            row = np.zeros(g.shape[1])
        return model.predict_change(row)

    trained = condition_genes(split_obj.train)
    groups = {"unseen": [], "own row hidden": []}
    for c in split_obj.test:
        targets = parse_condition(c)
        if targets and any(t not in index and t not in trained for t in targets):
            groups["unseen"].append((c, ""))
        elif len(targets) == 1 and targets[0] in index and targets[0] not in trained:
            groups["own row hidden"].append((c, targets[0]))
    rows = []
    for group, items in groups.items():
        sources = (["real row"] if group == "own row hidden" else []) + ["none", *knowledge]
        for source in sources:
            r = [np.corrcoef(sum(effect(t, source, hidden) for t in parse_condition(c)),
                             truth.stats(c).mean - truth.control_mean)[0, 1] for c, hidden in items]
            rows.append({"group": group, "source": source, "n": len(r), "pearson": float(np.mean(r)) if r else np.nan})
    return rows


# --- Scoring ---------------------------------------------------------------------------------------


def score_frame(result: dict) -> pd.DataFrame:
    """[condition x (model, score)] for one (dataset, seed): REGINA per arm (`regina:<arm>`), the
    baselines (first arm that scored each condition) and the no-knowledge fallback composite."""
    frames = {}
    for arm, out in result["arms"].items():
        table = out["table"]
        if table is None:
            continue
        for model, rows in table.groupby("model", sort=False):
            name = f"{MODEL}:{arm}" if model == MODEL else model
            scored = rows.set_index("condition")[list(SCORES)]
            frames[name] = scored if name not in frames else frames[name].combine_first(scored)
    index = result["conditions"].index
    wide = pd.concat({name: frame.reindex(index) for name, frame in frames.items()}, axis=1)
    if f"{MODEL}:none" in frames and FALLBACK in frames:
        wide = pd.concat([wide, pd.concat({COMPOSITE: wide[f"{MODEL}:none"].combine_first(wide[FALLBACK])}, axis=1)],
                         axis=1)
    elif FALLBACK in frames and "none" in result["arms"]:  # no-knowledge predicted nothing: all fallback
        wide = pd.concat([wide, pd.concat({COMPOSITE: wide[FALLBACK]}, axis=1)], axis=1)
    return wide


def summarise(results: list[dict]) -> pd.DataFrame:
    """One row per (dataset, seed, group, model): n and mean scores, and on the conditions it shares
    with REGINA + knowledge, both means (`paired_*`, `knowledge_*`)."""
    rows = []
    reference = f"{MODEL}:knowledge"
    for result in results:
        if "failed" in result or not result["arms"]:
            continue
        wide, conditions = score_frame(result), result["conditions"]
        for group, (column, _) in GROUPS.items():
            chosen = conditions.index[conditions[column]]
            for model in dict.fromkeys(m for m, _ in wide.columns):
                frame = wide.loc[chosen, model].dropna(how="all")
                row = {"dataset": result["dataset"], "seed": result["seed"], "group": group, "model": model,
                       "n": len(frame), "of": len(chosen)}
                shared = frame.index[wide.loc[frame.index, reference].notna().all(axis=1)] if reference in wide else []
                for score in SCORES:
                    row[score] = frame[score].mean() if len(frame) else np.nan
                    row[f"paired_{score}"] = frame.loc[shared, score].mean() if len(shared) else np.nan
                    row[f"knowledge_{score}"] = wide.loc[shared, (reference, score)].mean() if len(shared) else np.nan
                rows.append(row)
    return pd.DataFrame(rows)


def coverage(results: list[dict]) -> pd.DataFrame:
    """One row per (dataset, seed, arm): predicted test conditions, by prompt source."""
    rows = []
    for result in results:
        if "failed" in result:
            continue
        conditions = result["conditions"]
        for arm, out in result["arms"].items():
            sources = pd.Series(out["sources"], dtype=str)
            rows.append({"dataset": result["dataset"], "seed": result["seed"], "arm": arm,
                         "predicted": len(sources), "of": len(conditions),
                         "unseen": int(conditions.index[conditions["unseen"]].isin(sources.index).sum()),
                         "unseen_of": int(conditions["unseen"].sum()),
                         "knowledge_source": int((sources == "knowledge").sum()),
                         "seconds": out["seconds"], "failed": out["failed"] or ""})
    return pd.DataFrame(rows)


# --- Report ----------------------------------------------------------------------------------------


def _cell(values: pd.Series) -> str:
    values = values.dropna()
    return "-" if values.empty else f"{values.mean():.3f} ± {values.std(ddof=0):.3f}"


def _delta(rows: pd.DataFrame, score: str) -> str:
    """Knowledge minus the model on the same conditions, mean over seeds, and seeds knowledge wins."""
    pair = rows[[f"knowledge_{score}", f"paired_{score}"]].dropna()
    if pair.empty or rows["model"].iloc[0] == f"{MODEL}:knowledge":
        return ""
    diff = pair.iloc[:, 0] - pair.iloc[:, 1]
    return f" ({diff.mean():+.3f}; {int((diff > 0).sum())}/{len(diff)})"


def markdown(summary: pd.DataFrame, cover: pd.DataFrame, results: list[dict], opts, load: str) -> str:
    lines = ["# Gene knowledge: predictions for targets the screen does not measure", "",
             f"Command: `OMP_NUM_THREADS=1 python benchmarks/knowledge.py {' '.join(sys.argv[1:])}`  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M')}; load average at the end: {load}; split seeds "
             f"{' '.join(map(str, opts.seeds))}; configuration: {' '.join(opts.set) or 'defaults'}; "
             f"demo with --drop-targets {opts.drop_targets}.", "",
             "Arms: `none` (no knowledge; `predict` skips what it cannot prompt), `knowledge` (`--gene-knowledge "
             "FILE`), `random` (the same file, genes permuted); phase 1 (which does not read the knowledge) is "
             "trained once per seed and each arm trains phase 2 on it. Each cell: mean ± sd over seeds of the mean over "
             "the conditions the model predicts (n of N per seed, averaged). In brackets: REGINA + knowledge minus "
             "the model on the same conditions, mean over seeds, and in how many seeds knowledge scored higher. "
             "`none + fallback`: REGINA without knowledge where it predicts, `train_mean` elsewhere.", ""]
    for dataset, frame in summary.groupby("dataset", sort=False):
        lines += [f"## {dataset}", "", "Coverage of `predict --conditions test` (sum over seeds):", "",
                  "| arm | predicted / test conditions | unseen unmeasured predicted | prompt source `knowledge` | "
                  "minutes per seed (phase 1 in the arm that trained it) |", "| --- | --- | --- | --- | --- |"]
        for arm, rows in cover[cover["dataset"] == dataset].groupby("arm", sort=False):
            lines.append(f"| {arm} | {rows['predicted'].sum()} / {rows['of'].sum()} | {rows['unseen'].sum()} / "
                         f"{rows['unseen_of'].sum()} | {rows['knowledge_source'].sum()} | "
                         f"{rows['seconds'].mean() / 60:.1f} |")
            for _, failed in rows[rows["failed"] != ""].iterrows():
                lines.append(f"|  | seed {failed['seed']}: {failed['failed']} | | | |")
        shown = {}
        for group, (column, title) in GROUPS.items():
            rows_g = frame[frame["group"] == group]
            chosen = frozenset((r["seed"], c) for r in results if r["dataset"] == dataset and "failed" not in r
                               and r["arms"] for c in r["conditions"].index[r["conditions"][column]])
            if rows_g["of"].max() == 0 or chosen in shown:
                if chosen in shown and chosen:
                    lines += ["", f"Test conditions with {title}: the same conditions as {shown[chosen]!r} above."]
                continue
            shown[chosen] = group
            lines += ["", f"Test conditions with {title} (N = {rows_g['of'].mean():.1f} per seed):", "",
                      "| model | n | " + " | ".join(SCORES) + " |", "| --- | --- |" + " --- |" * len(SCORES)]
            for model, rows in rows_g.groupby("model", sort=False):
                if rows["n"].sum() == 0:
                    lines.append(f"| {model} | 0 | " + " | ".join("-" for _ in SCORES) + " |")
                    continue
                cells = [_cell(rows[s]) + _delta(rows, s) for s in SCORES]
                lines.append(f"| {model} | {rows['n'].mean():.1f} | " + " | ".join(cells) + " |")
        lines += prior_lines([r for r in results if r["dataset"] == dataset and "failed" not in r])
    failed = [r for r in results if "failed" in r]
    lines += [f"\n{r['dataset']} seed {r['seed']}: no data ({r['failed']})" for r in failed]
    return "\n".join(lines) + "\n"


def prior_lines(results: list[dict]) -> list[str]:
    """The prior check's table: rows (group, source), mean ± sd over seeds."""
    frame = pd.DataFrame([{**row, "seed": r["seed"]} for r in results for row in r["prior"]])
    if "note" in frame:
        return ["", f"Prior check: {frame['note'].dropna().iloc[0]}."]
    if frame.empty:
        return []
    seeds = " ".join(map(str, sorted(frame["seed"].unique())))
    lines = ["", f"Prior check (no training, seeds {seeds}; Pearson of the expression prior's mean change with "
             "the truth):", "",
             "| test conditions | n | " + " | ".join(dict.fromkeys(frame["source"])) + " |",
             "| --- | --- |" + " --- |" * frame["source"].nunique()]
    for group, rows in frame.groupby("group", sort=False):
        cells = [_cell(rows.loc[rows["source"] == s, "pearson"]) for s in dict.fromkeys(frame["source"])]
        lines.append(f"| {group} | {rows['n'].mean():.1f} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="arms on the demo")
    parser.add_argument("--real-arms", nargs="+", default=list(ARMS), choices=ARMS, help="arms on the real screens")
    parser.add_argument("--drop-targets", type=float, default=0.25, help="demo: share of targets not measured")
    parser.add_argument("--knowledge-file", default=str(ROOT / "benchmarks" / "work" / "knowledge" / "go_human.tsv"),
                        help="knowledge for the real screens (python benchmarks/make_knowledge.py writes it)")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "work" / "knowledge"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "knowledge.md"))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per pipeline")
    parser.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--set", action="append", default=[], help="config override for phase 2 (every arm)")
    parser.add_argument("--reuse", action="store_true", help="rescore finished runs, do not retrain")
    parser.add_argument("--only-finished", action="store_true",
                        help="with --reuse: report the finished arms only, train nothing")
    opts = parser.parse_args()
    opts.reuse = opts.reuse or opts.only_finished
    if any(d != "demo" for d in opts.datasets) and not Path(opts.knowledge_file).is_file():
        raise SystemExit(f"error: {opts.knowledge_file} not found: run python benchmarks/make_knowledge.py first")

    jobs = [(d, s) for d in opts.datasets for s in opts.seeds]
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        results = list(pool.map(lambda j: job(*j, opts), jobs))
    summary, cover = summarise(results), coverage(results)
    load = load_average()
    text = markdown(summary, cover, results, opts, load)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary.to_dict(orient="records"),
                                                    "coverage": cover.to_dict(orient="records")}, indent=1, default=float))
    print(text)


if __name__ == "__main__":
    main()
