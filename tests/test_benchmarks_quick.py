"""The GPU check and the memory benchmark in their tiny `--quick` modes, so neither can rot
between the rare sessions that have a GPU or an hour for the full sizes. No timings asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_check_quick_on_cpu_runs_every_part(tmp_path):
    out = tmp_path / "gpu_cpu.json"
    done = run("gpu_check.py", "--device", "cpu", "--quick", "--out", out, "--work", tmp_path / "work", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert results["card"] == "cpu" and results["quick"]
    parts = results["parts"]
    assert set(parts) == {"pipeline", "torchrun", "throughput", "evaluate"}
    assert all(p["status"] == "ok" and p["rows"] and all(r["ok"] for r in p["rows"]) for p in parts.values())
    pipeline = [r["item"] for r in parts["pipeline"]["rows"]]
    assert pipeline[:3] == ["fetch", "split", "label"] and "cpu evaluate" in pipeline
    assert 0 < parts["pipeline"]["rows"][-1]["pearson_delta"]["cpu"] <= 1
    launch = [r for r in parts["torchrun"]["rows"] if r["item"].startswith("torchrun")]
    assert len(launch) == 1 and "backend gloo" in launch[0]["result"]  # the 1-process launch joined a group
    measured = [r for r in parts["throughput"]["rows"] if "ae_cells_per_s" in r]
    assert len(measured) == 4 and all(r["ae_cells_per_s"] > 0 and r["gan_cells_per_s"] > 0 for r in measured)
    assert (tmp_path / "work" / "evaluate" / "out" / "metrics.json").is_file()
    assert "REGINA GPU check on cpu" in done.stdout and "throughput" in done.stdout


def test_memory_quick_measures_every_step(tmp_path):
    out = tmp_path / "memory.json"
    done = run("memory.py", "--quick", "--out", out, "--keep", tmp_path / "work", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    steps = results["steps"]
    assert [s["step"] for s in steps] == ["fetch", "split", "label", "train-ae", "train-gan", "predict", "evaluate"]
    assert all(s["ok"] and s["exit_code"] == 0 and 0 < s["peak_rss_gib"] < results["limit_gib"] for s in steps)
    assert steps[3]["note"] == "matrix kept dense in memory"  # a tiny screen fits
    assert (tmp_path / "work" / "run" / "eval" / "metrics.json").is_file()


@pytest.mark.parametrize("args, code", [(["--help"], 0), ([], 2), (["-x", "--", "fetch", "demo"], 2)])
def test_measured_step_without_a_report_path_prints_its_use_and_writes_nothing(tmp_path, args, code):
    """`measured_step.py --help` ran `regina` with no arguments and wrote its report to a file named `--help`."""
    done = run("measured_step.py", *args, cwd=tmp_path)
    assert done.returncode == code and "measured_step.py REPORT.json -- fetch demo" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_memory_guard_kills_a_step_past_its_limit(tmp_path):
    """The guard that keeps a too-big step from exhausting a shared machine."""
    sys.path.insert(0, str(BENCHMARKS))
    from measured_step import run_limited

    code, killed, seen = run_limited([sys.executable, "-c", "import time; x = bytearray(300 * 2**20); time.sleep(30)"],
                                     timeout_s=60, kill_gib=0.1)
    assert code != 0 and killed == "resident memory passed 0.1 GiB" and seen > 0.1


def test_denoised_collapse_index_recovers_the_noise_free_similarity():
    """Conditions sharing half their effect (pairwise correlation about 0.5), measured on few noisy
    cells: the plain index falls well below it, the corrected one comes back to it."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(BENCHMARKS))
    from quality import _mean_offdiagonal, denoised_collapse_index

    rng = np.random.default_rng(0)
    genes, conditions, cells = 400, [f"C{i}+ctrl" for i in range(8)], 40
    shared = rng.normal(size=genes)
    effects = [shared + rng.normal(size=genes) for _ in conditions]  # corr 0.5 between any two
    x = np.vstack([e + rng.normal(0, 6.0, (cells, genes)) for e in effects])  # noisy cells
    obs = pd.DataFrame({"condition": np.repeat(conditions, cells)}, index=[f"c{i}" for i in range(len(x))])
    real = ad.AnnData(x.astype(np.float32), obs=obs)
    measured = _mean_offdiagonal(np.stack([x[i * cells:(i + 1) * cells].mean(0) for i in range(len(conditions))]))
    denoised = denoised_collapse_index(real, np.zeros(genes), conditions)
    noise_free = _mean_offdiagonal(np.stack(effects))  # about 0.5
    assert measured < noise_free - 0.1 and abs(denoised - noise_free) < 0.06


def test_demo_oracle_rebuilds_the_fetched_screens_design_and_its_expected_values():
    """`demo_oracle.py` replays the simulator's random stream from the screen's recorded options:
    the same genes (a dropped target left out), conditions and cell type base rate, so fresh
    control cells sit where the screen's do (closer than with the base rate alone); `knowable`
    keeps each target's programs and replaces every draw by its expected value."""
    import numpy as np
    import pytest

    sys.path.insert(0, str(BENCHMARKS))
    import demo_oracle
    from regina_cli import keys
    from regina_cli.data.demo import DEMO_OPTIONS, simulate_demo

    adata, _ = simulate_demo(n_cells=3000, n_genes=300, n_singles=6, n_doubles=3, drop_targets=0.2, seed=5)
    record = adata.uns[keys.UNS_REGINA]["simulation"]
    design, measured, base = demo_oracle.rebuild({k: record[k] for k in DEMO_OPTIONS})
    assert list(design.genes[measured]) == list(adata.var_names) and (~measured).sum() == 1
    assert set(design.conditions) == set(adata.obs[keys.OBS_CONDITION])

    def control_mean(x):
        return np.asarray(x.mean(0)).ravel()

    real = control_mean(adata.X[(adata.obs[keys.OBS_CONDITION] == keys.CTRL).to_numpy()])
    fresh = demo_oracle.cells(design, measured, base, [], 3000, seed=0)
    alone = demo_oracle.cells(design, measured, design.base, [], 3000, seed=0)
    assert np.abs(control_mean(fresh.X) - real).mean() < 0.5 * np.abs(control_mean(alone.X) - real).mean()

    known = demo_oracle.knowable(design, stress=True)
    singles = [i for i, c in enumerate(design.conditions) if c.endswith("+" + keys.CTRL)]
    doubles = [i for i, c in enumerate(design.conditions) if c != keys.CTRL and i not in singles]
    assert known.program_shift[singles, 0] == pytest.approx(demo_oracle.STRESS_CHANCE * demo_oracle.STRESS_MEAN)
    a, b = design.conditions[doubles[0]].split("+")
    row = {c: i for i, c in enumerate(design.conditions)}
    np.testing.assert_allclose(known.program_shift[doubles[0]], demo_oracle.INTERACTION_MEAN * (
        known.program_shift[row[f"{a}+ctrl"]] + known.program_shift[row[f"{b}+ctrl"]]), rtol=1e-5)
    assert set(np.unique(known.effect[singles])) == {0.0, np.float32(demo_oracle.STRENGTH_MEAN)}
    assert not demo_oracle.knowable(design, stress=False).program_shift[:, 0].any()


def test_prior_study_scores_held_out_measured_singles():
    """Each measured single held out in turn: a screen of one shared change plus each target's own
    knock-down rewards the prior's knock-down entry, train_mean scores the shared part, and the
    co-variation term is rewarded where a target's partner in the controls falls with it."""
    import numpy as np

    sys.path.insert(0, str(BENCHMARKS))
    from prior_study import held_out_scores

    from regina_cli.evaluate.baselines import TrainingData

    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(30)]
    control = rng.uniform(1, 3, len(genes))
    shared = rng.normal(0, 0.3, len(genes))
    conditions, means = [], []
    for target in range(8):
        change = shared + rng.normal(0, 0.05, len(genes))
        change[target] -= 2.0
        change[target + 10] -= 1.0  # its partner in the controls' co-variation
        conditions.append(f"g{target}+ctrl")
        means.append(control + change)
    conditions.append("NOT_MEASURED+ctrl")  # no row: not scored, still trained on
    means.append(control + shared)
    train = TrainingData(genes, control, conditions, np.array(means), np.full(len(conditions), 50.0))
    loadings = np.zeros((len(genes), 8))
    loadings[np.arange(8), np.arange(8)] = loadings[np.arange(8) + 10, np.arange(8)] = 1.0
    rows = held_out_scores(train, (loadings, np.ones(len(genes))))
    assert [r["gene"] for r in rows] == [f"g{i}" for i in range(8)]
    for row in rows:
        assert row["w=0.0, u=1.0"] > row["w=0.0"] + 0.01
        assert row["w=0.0"] > row["w=0.0, no knock-down entry"] + 0.1
        assert row["train_mean"] > 0.4 and abs(row["w=0.0, no knock-down entry"] - row["train_mean"]) < 0.1


def test_shape_ceiling_arms_land_on_the_true_mean_and_a_shifted_screen_sits_at_the_floor():
    """Every arm that claims the exact mean has it (the mixtures too); the spread arm has the truth's
    per-gene spread; and on a screen whose conditions are the controls shifted, only the draw's
    own mean noise separates a shift from the floor, which matching removes."""
    import anndata as ad
    import numpy as np
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from shape_ceiling import ARMS, MIXTURE_SHARES, arms, condition_scores

    generator = torch.Generator().manual_seed(0)
    controls = torch.rand((400, 12), generator=generator) * 3
    half = torch.rand((60, 12), generator=generator) * torch.linspace(1, 4, 12) + 1
    drawn = controls[:60]
    out = arms(half, drawn, controls.mean(0), controls.std(0))
    assert set(out) == set(ARMS[:-1]) | {f"mixture {p}" for p in MIXTURE_SHARES}
    for name in ["other half", "... draw's mean matched", "... with each gene's spread",
                 *(f"mixture {p}" for p in MIXTURE_SHARES)]:
        assert torch.allclose(out[name].mean(0), half.mean(0), atol=1e-4), name
    assert torch.allclose(out["... with each gene's spread"].std(0), half.std(0) * drawn.std(0) / controls.std(0),
                          atol=1e-4)
    assert (out["... clipped at 0"] >= 0).all() and len(out["mixture 0.5"]) == len(half)

    rng = np.random.default_rng(0)
    base = rng.poisson(2.0, (1200, 20)).astype(np.float32)
    labels = ["ctrl"] * 400 + ["A+ctrl"] * 400 + ["B+ctrl"] * 400
    base[400:800, :5] += 2.0
    base[800:, 5:10] += 3.0
    screen = ad.AnnData(np.log1p(base), obs={"condition": labels, "cell_type": ["t"] * 1200})
    rows = condition_scores(screen, ["A+ctrl", "B+ctrl"], seed=0, min_cells=20, reference_cells=100)
    assert [r["condition"] for r in rows] == ["A+ctrl", "B+ctrl"]
    for row in rows:
        energy = {arm: row[arm]["energy_distance"] for arm in ARMS}
        assert energy["controls"] > energy["controls + true mean"] > energy["... draw's mean matched"]
        assert energy["... as a mixture"] <= energy["... draw's mean matched"]
        assert energy["... draw's mean matched"] - energy["other half"] < 0.1 * (energy["controls"] - energy["other half"])


def test_holdout_compares_arms_on_the_same_held_out_training_conditions(tmp_path):
    """A tiny phase 1 laid out as quality.py leaves it; holdout.py trains phase 2 per arm with a
    share of the training perturbations held out and reports both arms and train_mean on them.
    Phase 2 takes this code's phase-2 defaults, not those phase 1 saved (here a stale scale)."""
    import numpy as np
    from test_train_run import TINY

    from regina_cli.data.dataset import write_dataset
    from regina_cli.data.demo import simulate_screen
    from regina_cli.data.label import label_dataset
    from regina_cli.data.split import split_dataset
    from regina_cli.engine.train_ae import train_autoencoder
    from regina_cli.config import build_config

    folder = tmp_path / "demo" / "seed1"
    data = folder / "data"
    write_dataset(simulate_screen(n_cells=400, n_genes=160, n_singles=10, n_doubles=2, seed=0), "demo", data)
    split_dataset("demo", mode="simulation", seed=1, data_dir=data)
    label_dataset("demo", "stress", split="simulation_1", data_dir=data)
    config = build_config(preset="demo", overrides=[*TINY, "ae.max_epochs=1", "gan.correction_scale=1"])
    train_autoencoder("demo", split="simulation_1", labels="stress", run_dir=folder / "runs" / "p1", config=config,
                      data_dir=data, device="cpu", progress="silent")
    out = tmp_path / "holdout.md"
    done = run("holdout.py", "--workdir", str(tmp_path), "--datasets", "demo", "--seeds", "1", "--draws", "0",
               "--phase1-from", "p1", "--arm", "noprior=gan.expression_prior=none",
               "--arm", "trained=gan.correction_choice=false", "--max-epochs", "2",
               "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.with_suffix(".json").read_text())
    assert [r["arm"] for r in results] == ["default", "noprior", "trained"] and not any("failed" in r for r in results)
    assert results[0]["conditions"] == results[1]["conditions"]  # the same draw for every arm
    from regina_cli.config import ReginaConfig, load_yaml

    phase2 = load_yaml(folder / "runs" / "holdout" / "default-draw0" / "gan" / "config.yaml")["gan"]
    assert phase2["correction_scale"] == ReginaConfig().gan.correction_scale != 1
    assert all(-1 <= r[k] <= 1 for r in results for k in ("epoch0", "selected", "predicted", "train_mean"))
    text = out.read_text()
    assert "| default | 1 |" in text and "| noprior | 1 |" in text and "| train_mean | " in text
    for r in results:  # what each epoch did to the held-out conditions, epoch 0 first, as history.csv has it
        history = (folder / "runs" / "holdout" / f"{r['arm']}-draw0" / "gan" / "history.csv").read_text().splitlines()
        # the default arm keeps the prior alone here (gan.correction_choice) and trains nothing
        assert len(r["by_epoch"]["pearson_delta"]) == len(history) - 1 == (1 if r["arm"] == "default" else 3)
        assert r["by_epoch"]["pearson_delta"][0] == r["epoch0"]
    fit = results[2]["by_epoch"]["fit_pearson_delta"]  # the conditions phase 2 trained on: only with a prior
    assert len(fit) == 3 and all(-1 <= v <= 1 for v in fit)
    assert np.isnan(results[1]["by_epoch"]["fit_pearson_delta"]).all()
    by_epoch = text.split("Validation by epoch")[1]
    assert "| default | 1 | " in by_epoch and " of 1 |" in by_epoch
    for r in results:  # per held-out condition: its reliability and both scores, averaging to the run's
        rows = r["per_condition"]
        assert sorted(rows) == sorted(r["conditions"]) and all(-1 <= v["reliability"] <= 1 for v in rows.values())
        assert abs(sum(v["predicted"] for v in rows.values()) / len(rows) - r["predicted"]) < 1e-9

    # --reuse scores the trained runs again (here with more predicted cells, clipped at 0) without
    # retraining them.
    model = folder / "runs" / "holdout" / "default-draw0" / "gan" / "model.pt"
    trained_at = model.stat().st_mtime_ns
    again = run("holdout.py", "--workdir", str(tmp_path), "--datasets", "demo", "--seeds", "1", "--draws", "0",
                "--phase1-from", "p1", "--arm", "noprior=gan.expression_prior=none",
                "--arm", "trained=gan.correction_choice=false", "--reuse", "--cells", "300",
                "--clip", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    rescored = json.loads(out.with_suffix(".json").read_text())
    assert model.stat().st_mtime_ns == trained_at
    assert [r["selected"] for r in rescored] == [r["selected"] for r in results]
    assert all(r["predictions"].endswith("held_out_300_clip.h5ad") and -1 <= r["predicted"] <= 1 for r in rescored)
    import anndata

    assert all(anndata.read_h5ad(r["predictions"]).X.min() >= 0 for r in rescored)

    # quality.py --reuse predicts a finished run again when its record used another --cells.
    import shutil

    shutil.copytree(folder / "runs" / "holdout" / "default-draw0", folder / "runs" / "q")
    (folder / "runs" / "q" / "quality.json").write_text(json.dumps({"dataset": "demo", "seed": 1, "train_seconds": 1.0}))
    scored = run("quality.py", "--workdir", str(tmp_path), "--datasets", "demo", "--seeds", "1", "--tag", "q",
                 "--reuse", "--cells", "40", "--out", str(tmp_path / "q.md"), cwd=tmp_path)
    assert scored.returncode == 0, scored.stdout + scored.stderr
    record = json.loads((folder / "runs" / "q" / "quality.json").read_text())
    assert record["cells"] == 40 and "failed" not in record
    assert -1 <= record["collapse_index_pert"] <= 1 and -1 <= record["collapse_index_pert_true"] <= 1
    predicted = anndata.read_h5ad(folder / "runs" / "q" / "predictions.h5ad")
    counts = predicted.obs["condition"].astype(str).value_counts()
    assert (counts.drop("ctrl", errors="ignore") == 40).all()
    assert "| regina | " in (tmp_path / "q.md").read_text()


def test_responder_rules_score_held_out_singles_by_their_reliability(tmp_path):
    """Two pathways of strong responders, each with its own program and annotation term, and weak
    responders that only fall at their own gene: held out, a strong one is predicted better from
    its knowledge neighbours than from the mean change of every condition, and the amplitude
    chosen on the measured singles (mostly weak) shrinks the shared change against the knock-down
    entry, which the weak ones reward."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(BENCHMARKS))
    from responder_rules import Screen, held_out_rows, report

    from regina_cli.data.knowledge import load_gene_knowledge

    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(40)]
    pathways = {"a": ["g0", "g1", "g2"], "b": ["g12", "g13", "g14"]}
    programs = {"a": np.isin(np.arange(40), range(20, 26)) * -1.5, "b": np.isin(np.arange(40), range(30, 36)) * -1.5}
    weak = [f"g{i}" for i in range(3, 12)]
    blocks, labels = [rng.normal(3, 0.3, (60, len(genes)))], ["ctrl"] * 60
    for term, targets in [*pathways.items(), (None, weak)]:
        for target in targets:
            change = programs[term].copy() if term else np.zeros(len(genes))
            change[genes.index(target)] -= 1.0 if term else 0.2
            blocks.append(rng.normal(3, 0.3, (60, len(genes))) + change)
            labels += [f"{target}+ctrl"] * 60
    adata = ad.AnnData(np.vstack(blocks), obs=pd.DataFrame({"condition": labels}, index=map(str, range(len(labels)))),
                       var=pd.DataFrame({"gene_name": genes}, index=genes))
    strong = pathways["a"] + pathways["b"]
    (tmp_path / "k.tsv").write_text("gene\tterm\n" + "".join(f"{g}\t{t}\n" for t, gs in pathways.items() for g in gs) +
                                    "".join(f"{g}\tT{g}\n" for g in weak))
    screen = Screen(adata)
    assert min(screen.reliability[t] for t in strong) > 0.7 > max(screen.reliability[t] for t in weak)
    rows = {r["target"]: r for r in held_out_rows(screen, strong + weak, load_gene_knowledge(tmp_path / "k.tsv"))}
    for target in strong:
        assert rows[target]["knowledge"] > rows[target]["conditions"] + 0.2
    for target in weak:
        assert rows[target]["amplitude chosen"] < 1 and rows[target]["amplitude"] > rows[target]["conditions"]
    # the median over conditions ignores the minority's programs: better for the weak, worse for the strong
    assert np.mean([rows[t]["median"] - rows[t]["conditions"] for t in weak]) > 0
    assert np.mean([rows[t]["median"] - rows[t]["conditions"] for t in strong]) < -0.2
    table = report("toy", {1: list(rows.values())})
    assert "| measured targets | 15 |" in table and "| reliability 0.7-1 | 6 |" in table


def test_make_knowledge_reads_kegg_and_go_from_an_org_db_sqlite(tmp_path):
    """`make_knowledge.py --org-db` turns org.Hs.eg.db's tables into gene<TAB>term pairs that
    `--gene-knowledge` loads: KEGG pathways prefixed, GO ids from all three aspects, genes by symbol,
    rows of genes without a symbol dropped, and the source dates kept beside the file."""
    import json
    import sqlite3

    sys.path.insert(0, str(BENCHMARKS))
    from make_knowledge import build_from_org_db

    from regina_cli.data.knowledge import load_gene_knowledge

    db = sqlite3.connect(tmp_path / "org.sqlite")
    db.executescript("""
        CREATE TABLE gene_info (_id INTEGER, symbol TEXT);
        CREATE TABLE metadata (name TEXT, value TEXT);
        CREATE TABLE kegg (_id INTEGER, path_id TEXT);
        CREATE TABLE go_bp (_id INTEGER, go_id TEXT);
        CREATE TABLE go_mf (_id INTEGER, go_id TEXT);
        CREATE TABLE go_cc (_id INTEGER, go_id TEXT);
        INSERT INTO gene_info VALUES (1, 'IFNGR1'), (2, 'JAK2');
        INSERT INTO metadata VALUES ('KEGGSOURCEDATE', '2011-Mar15');
        INSERT INTO kegg VALUES (1, '04630'), (2, '04630'), (2, '04062'), (9, '04630');
        INSERT INTO go_bp VALUES (1, 'GO:0060333');
        INSERT INTO go_mf VALUES (2, 'GO:0004713');
        INSERT INTO go_cc VALUES (2, 'GO:0005886');
    """)
    db.commit()
    db.close()
    kegg = build_from_org_db(tmp_path / "org.sqlite", tmp_path / "kegg.tsv", ["kegg"])
    assert kegg.read_text().splitlines() == ["gene\tterm", "IFNGR1\tKEGG:04630", "JAK2\tKEGG:04062", "JAK2\tKEGG:04630"]
    assert json.loads(kegg.with_suffix(".json").read_text())["source_dates"]["KEGGSOURCEDATE"] == "2011-Mar15"
    both = load_gene_knowledge(build_from_org_db(tmp_path / "org.sqlite", tmp_path / "both.tsv", ["kegg", "go"]))
    terms = dict(zip(both.genes, both.terms))
    assert set(terms["JAK2"]) == {"KEGG:04630", "KEGG:04062", "GO:0004713", "GO:0005886"}
    assert set(terms["IFNGR1"]) == {"KEGG:04630", "GO:0060333"}


def test_quality_counts_the_conditions_regina_wins_over_seeds():
    """The markdown says, per baseline, on how many shared conditions REGINA's pearson_delta is
    higher, summed over seeds; conditions only one model predicts are not counted."""
    from types import SimpleNamespace

    import pandas as pd

    sys.path.insert(0, str(BENCHMARKS))
    from quality import markdown, summarise

    def result(seed, ours, mean, extra=()):
        rows = [("regina", c, v) for c, v in ours.items()] + [("train_mean", c, v) for c, v in mean.items()]
        rows += [("additive", c, v) for c, v in extra]
        table = pd.DataFrame(rows, columns=["model", "condition", "pearson_delta"])
        return {"dataset": "demo", "seed": seed, "table": table, "collapse_index": 0.3, "collapse_index_true": 0.2,
                "collapse_index_true_denoised": 0.25, "collapse_index_pert": 0.1, "collapse_index_pert_true": 0.05,
                "train_seconds": 1.0, "seconds": 2.0}

    results = [result(1, {"A": 0.5, "B": 0.2}, {"A": 0.4, "B": 0.3, "C": 0.9}, extra=[("B", 0.1)]),
               result(2, {"A": 0.6, "D": 0.7}, {"A": 0.1, "D": 0.2})]
    summary = summarise(results)
    text = markdown(summary, SimpleNamespace(on="test", seeds=[1, 2], preset=None, set=[]), "0.00")
    assert "Conditions where REGINA's pearson_delta is higher (all seeds): train_mean 3/4, additive 1/1." in text
    assert "from the average training perturbation instead of control: REGINA 0.100, truth 0.050" in text


def test_prior_residual_rules_learn_an_error_that_is_there_and_report_every_rule(tmp_path):
    """prior_residuals.py's rules recover a shared or a linear error of the prior from the training
    conditions when the data hold one; end to end, it sets phase 2 up as holdout.py's runs start it
    (a tiny phase 1 laid out as quality.py leaves it) and scores every rule on the held-out conditions."""
    import numpy as np

    sys.path.insert(0, str(BENCHMARKS))
    from prior_residuals import corrections, mean_pearson

    rng = np.random.default_rng(0)
    programs = rng.normal(size=(4, 60))
    prior = rng.normal(size=(40, 4)) @ programs + 0.1 * rng.normal(size=(40, 60))
    shift, mixing = rng.normal(size=60), 0.8 * rng.normal(size=(60, 60)) / np.sqrt(60)
    for truth, rule in ((prior + 3 * shift, "shared shift (mean error)"),
                        (prior + prior @ programs.T @ programs @ mixing / 60, "rank-5 linear map, ridge 0.1")):
        fitted = corrections(prior[:30], truth[:30], prior[30:])
        assert mean_pearson(fitted[rule], truth[30:]) > 0.99 > mean_pearson(prior[30:], truth[30:]) + 0.05

    from test_train_run import TINY

    from regina_cli.config import build_config
    from regina_cli.data.dataset import write_dataset
    from regina_cli.data.demo import simulate_screen
    from regina_cli.data.label import label_dataset
    from regina_cli.data.split import split_dataset
    from regina_cli.engine.train_ae import train_autoencoder

    folder = tmp_path / "demo" / "seed1"
    data = folder / "data"
    write_dataset(simulate_screen(n_cells=400, n_genes=160, n_singles=10, n_doubles=2, seed=0), "demo", data)
    split_dataset("demo", mode="simulation", seed=1, data_dir=data)
    label_dataset("demo", "stress", split="simulation_1", data_dir=data)
    config = build_config(preset="demo", overrides=[*TINY, "ae.max_epochs=1"])
    train_autoencoder("demo", split="simulation_1", labels="stress", run_dir=folder / "runs" / "p1", config=config,
                      data_dir=data, device="cpu", progress="silent")
    out = tmp_path / "residuals.md"
    done = run("prior_residuals.py", "--workdir", str(tmp_path), "--datasets", "demo", "--seeds", "1", "--draws", "0",
               "--phase1-from", "p1", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    [record] = json.loads(out.with_suffix(".json").read_text())
    assert record["held_conditions"] >= 2 and record["train_conditions"] >= 2
    assert set(record["scores"]) == {"prior (none learned)", "train_mean",
                                     *corrections(prior[:12], prior[:12], prior[12:14])}
    assert all(-1 <= v <= 1 for v in record["scores"].values())
    assert not (folder / "runs" / "p1" / "gan").exists()  # set up, never trained or written
    assert "| shared shift (mean error) |" in out.read_text()
