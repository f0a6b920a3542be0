"""Baselines on constructed cases whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from regina_cli.errors import ReginaError
from regina_cli.evaluate.baselines import (
    BASELINES,
    TrainingData,
    additive,
    fit_linear,
    linear,
    no_change,
    parse_baselines,
    perturbed_reference,
    train_mean,
)

GENES = [f"g{i}" for i in range(30)]


def _train(conditions, means, counts=None, control=None) -> TrainingData:
    control = np.zeros(len(GENES)) if control is None else control
    counts = np.ones(len(conditions), dtype=int) if counts is None else np.asarray(counts)
    return TrainingData(GENES, control, list(conditions), np.asarray(means, dtype=float), counts)


def test_no_change_and_train_mean(rng):
    control = rng.normal(size=len(GENES))
    means = rng.normal(size=(3, len(GENES)))
    train = _train(["g1+ctrl", "g2+ctrl", "g1+g2"], means, counts=[10, 30, 60], control=control)
    assert np.array_equal(no_change(train, ["g9+ctrl"])["g9+ctrl"], control)
    # the mean of all perturbed training *cells*, so conditions weigh by their cell counts
    expected = (10 * means[0] + 30 * means[1] + 60 * means[2]) / 100
    np.testing.assert_allclose(train_mean(train, ["g9+ctrl", "g5+g6"])["g5+g6"], expected)


def test_perturbed_reference_counts_each_training_condition_once(rng):
    means = rng.normal(size=(3, len(GENES)))
    train = _train(["g1+ctrl", "g2+ctrl", "g1+g2"], means, counts=[10, 30, 60])
    np.testing.assert_allclose(perturbed_reference(train), means.mean(0))  # not weighted by cells, as train_mean is
    equal = _train(["g1+ctrl", "g2+ctrl"], means[:2], counts=[20, 20])
    np.testing.assert_allclose(train_mean(equal, ["g9+ctrl"])["g9+ctrl"], perturbed_reference(equal))
    assert perturbed_reference(_train([], np.zeros((0, len(GENES))))) is None


def test_additive_is_exact_for_additive_truth(rng):
    control = rng.normal(size=len(GENES))
    effect = {g: rng.normal(size=len(GENES)) for g in ("g1", "g2", "g3")}
    train = _train(["g1+ctrl", "ctrl+g2", "g3+ctrl"], [control + effect[g] for g in ("g1", "g2", "g3")], control=control)
    out = additive(train, ["g1+g2", "g3+g1", "g1+g7", "g5+ctrl"])
    np.testing.assert_allclose(out["g1+g2"], control + effect["g1"] + effect["g2"])
    np.testing.assert_allclose(out["g3+g1"], control + effect["g1"] + effect["g3"])
    assert set(out) == {"g1+g2", "g3+g1"}  # g7 never trained on; singles are not its business


def test_additive_does_not_predict_a_trained_single(rng):
    """additive is a baseline for combinations: a single it trained on would be "predicted" as its
    own training mean, a perfect score the baseline did not earn (`predict --conditions all`)."""
    means = rng.normal(size=(2, len(GENES)))
    train = _train(["g1+ctrl", "g2+ctrl"], means)
    assert set(additive(train, ["g1+ctrl", "g2+ctrl", "g1+g2"])) == {"g1+g2"}


def test_linear_recovers_data_generated_by_the_linear_model(rng):
    """pseudo-bulk change = G W P^T + b with P = rows of G: unseen genes and pairs predicted exactly."""
    k = 3
    gene_embedding = rng.normal(size=(len(GENES), k))
    gene_embedding -= gene_embedding.mean(0)  # the PCA of the pseudo-bulk then spans exactly these columns
    weights = rng.normal(size=(k, k))
    offset = np.zeros(len(GENES))

    def change(condition):
        genes = [g for g in condition.split("+") if g != "ctrl"]
        p = sum(gene_embedding[GENES.index(g)] for g in genes)
        return gene_embedding @ weights @ p + offset

    train_conditions = [f"g{i}+ctrl" for i in range(12)] + ["g1+g2", "g3+g4"]
    train = _train(train_conditions, [change(c) for c in train_conditions])
    model = fit_linear(train, pca_dim=k, ridge=1e-9)
    assert model.gene_embedding.shape == (len(GENES), k)
    targets = ["g20+ctrl", "g25+g26", "g5+g21"]
    out = {c: p for c, p in linear(train, targets).items()}  # default ridge 0.1: close, not exact
    for c in targets:
        np.testing.assert_allclose(model.predict_change(model.embed(c)), change(c), atol=1e-6)
        assert np.corrcoef(out[c], change(c))[0, 1] > 0.99


def test_linear_fits_the_control_as_a_condition_with_no_embedding_and_no_change(rng):
    """The paper's fit counts the control among the training conditions (embedding 0, change 0),
    which pulls the offset, and so every prediction, towards no change. The fit must equal the
    two-sided ridge written out by hand with that row, not the one over perturbed conditions only."""
    train = _train([f"g{i}+ctrl" for i in range(8)] + ["g1+g2"], rng.normal(0.5, 1.0, size=(9, len(GENES))))
    model = fit_linear(train, pca_dim=4, ridge=0.1)
    g = model.gene_embedding
    p = np.stack([np.zeros(4)] + [model.embed(c) for c in train.conditions])  # control first
    y = np.stack([np.zeros(len(GENES))] + [m - train.control_mean for m in train.means], axis=1)
    p_c, y_c = p - p.mean(0), y - y.mean(1, keepdims=True)
    weights = (np.linalg.solve(g.T @ g + 0.1 * np.eye(4), g.T @ y_c @ p_c)
               @ np.linalg.inv(p_c.T @ p_c + 0.1 * np.eye(4)))
    np.testing.assert_allclose(model.weights, weights, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(model.offset, y.mean(1) - g @ weights @ p.mean(0), rtol=1e-8, atol=1e-10)


def test_linear_skips_unmeasured_targets(rng):
    train = _train([f"g{i}+ctrl" for i in range(6)], rng.normal(size=(6, len(GENES))))
    out = linear(train, ["g7+ctrl", "NOTMEASURED+ctrl", "g8+NOTMEASURED"])
    assert set(out) == {"g7+ctrl"}


def test_linear_is_deterministic(rng):
    train = _train([f"g{i}+ctrl" for i in range(8)], rng.normal(size=(8, len(GENES))))
    a, b = linear(train, ["g20+ctrl"]), linear(train, ["g20+ctrl"])
    assert np.array_equal(a["g20+ctrl"], b["g20+ctrl"])


def test_parse_baselines():
    assert parse_baselines("all") == list(BASELINES)
    assert parse_baselines("none") == []
    assert parse_baselines("linear, additive,linear") == ["linear", "additive"]
    with pytest.raises(ReginaError, match="unknown baseline"):
        parse_baselines("linear,mean")
