"""Gene knowledge end to end through the CLI: a tiny demo whose targets are partly unmeasured.

With the demo's knowledge file, `predict --conditions test` covers every test condition and says
`knowledge` for exactly those with a target neither measured nor perturbed in training; without
it those conditions are skipped and listed. benchmarks/knowledge.py measures whether the
knowledge helps; this test pins what reaches the user.
"""

from __future__ import annotations

import json

import anndata as ad
import pytest
import torch

from cli_helpers import invoke
from regina_cli import keys
from regina_cli.data.conditions import condition_genes, parse_condition
from regina_cli.data.knowledge import load_gene_knowledge
from regina_cli.data.split import load_split
from regina_cli.engine.trained import load_trained

DEMO = ["--cells", "800", "--genes", "300", "--singles", "12", "--doubles", "6", "--seed", "2", "--drop-targets", "0.5"]
TINY = ["model.seq_len=4", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.z_dim=8",
        "model.classifier_hidden=8", "model.transition_hidden=16", "model.discriminator_hidden=[16,8]",
        "ae.max_epochs=1", "ae.min_epochs=1", "ae.batch_size=128", "gan.max_epochs=1", "gan.batch_size=128"]


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _train_and_predict(run, *knowledge) -> tuple[dict, ad.AnnData]:
    sets = [a for s in TINY for a in ("--set", s)]
    _ok(invoke("--quiet", "train-ae", "demo", "--split", "simulation_1", "--labels", "stress", "--run", run,
               "--device", "cpu", *knowledge, *sets))
    _ok(invoke("--quiet", "train-gan", "--run", run, "--device", "cpu"))
    out = json.loads(_ok(invoke("--json", "predict", "--run", run, "--conditions", "test", "--cells", "8",
                                "--device", "cpu", "--no-controls")).stdout)
    return out, ad.read_h5ad(run / keys.PREDICTIONS_FILE)


@pytest.fixture
def dropped_demo():
    """The demo with half its targets unmeasured, split and labelled; (knowledge file, test
    conditions, those with a target neither measured nor trained)."""
    _ok(invoke("--quiet", "fetch", "demo", *DEMO))
    _ok(invoke("--quiet", "split", "demo", "--seed", "1"))
    _ok(invoke("--quiet", "label", "demo", "--method", "stress", "--split", "simulation_1"))
    split = load_split("demo", "simulation_1")
    adata = ad.read_h5ad(keys.dataset_file("demo"), backed="r")
    measured = set(adata.var_names)
    adata.file.close()
    known = measured | condition_genes(split.train)
    unseen = {c for c in split.test if set(parse_condition(c)) - known}
    return keys.dataset_dir("demo") / keys.GENE_KNOWLEDGE_FILE, set(split.test), unseen


def test_knowledge_prompts_cover_every_test_condition_and_say_so(dropped_demo, tmp_path):
    knowledge, test, unseen = dropped_demo
    assert len(unseen) >= 2 and test - unseen  # the demo leaves both kinds in the test set

    out, pred = _train_and_predict(tmp_path / "with", "--gene-knowledge", knowledge)
    assert out["skipped"] == [] and out["conditions"] == len(test)
    sources = pred.obs.groupby(keys.OBS_CONDITION, observed=True)[keys.OBS_PROMPT_SOURCE].first().astype(str)
    assert sources.to_dict() == out["sources"] and set(sources.index) == test
    assert {c for c, s in sources.items() if s == "knowledge"} == unseen
    # What reaches those predictions: each unseen target's row of the prior's gene embedding is
    # the GO-similarity mix of the measured genes' rows.
    trained = load_trained(tmp_path / "with", device="cpu")
    prior, genes = trained.gan.expression_prior, list(trained.meta.gene_names)
    targets = sorted(condition_genes(unseen) - set(genes) - condition_genes(load_split("demo", "simulation_1").train))
    weights, usable = load_gene_knowledge(knowledge).vectors(targets, anchors=genes)
    assert usable.all()
    rows = prior.table_embedding[[trained.gan.prompt_genes.index(g) for g in targets]]
    expected = torch.as_tensor(weights, dtype=torch.float64) @ prior.embedding.double()
    torch.testing.assert_close(rows.double(), expected, rtol=1e-4, atol=1e-6)
    assert rows.abs().sum(1).min() > 0
    assert trained.meta.gene_knowledge["sha256"] == load_gene_knowledge(knowledge).sha256()

    out, pred = _train_and_predict(tmp_path / "without")
    assert set(out["skipped"]) == unseen
    assert set(pred.obs[keys.OBS_CONDITION]) == test - unseen
    assert set(pred.uns[keys.UNS_REGINA]["skipped_conditions"]) == unseen
    assert "knowledge" not in set(pred.obs[keys.OBS_PROMPT_SOURCE].astype(str))
