"""cell-eval's metrics in REGINA's tensor form against straight ports of cell-eval's loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from regina_cli.evaluate.de import (FDR_THRESHOLD, Moments, benjamini_hochberg, de_ranks, log2_fold_change,
                                    overlap_metrics, welch_p_values)
from regina_cli.evaluate.metrics import DE_SIZES, discrimination_score


def _moments(groups: list[np.ndarray]) -> Moments:
    return Moments(torch.tensor(np.stack([g.mean(0) for g in groups])), torch.tensor(np.stack([g.var(0) for g in groups])),
                   torch.tensor([float(len(g)) for g in groups], dtype=torch.float64))


@pytest.fixture
def groups(rng):
    """Two conditions and a control, log1p-like values with exact zeros and a few strong changes."""
    control = np.log1p(rng.poisson(2.0, (80, 30)) * rng.random((80, 30)))
    out = []
    for shift in (1.5, 0.8):
        cells = np.log1p(rng.poisson(2.0, (50, 30)) * rng.random((50, 30)))
        cells[:, :6] += shift * rng.random(6)
        out.append(cells)
    return control, out


def test_welch_p_values_and_fdr_match_scipy(groups):
    control, conditions = groups
    p = welch_p_values(_moments(conditions), _moments([control, control]))
    for i, cells in enumerate(conditions):
        expected = stats.ttest_ind(cells, control, equal_var=False).pvalue
        np.testing.assert_allclose(p[i].numpy(), expected, rtol=1e-8)
        np.testing.assert_allclose(benjamini_hochberg(p)[i].numpy(), stats.false_discovery_control(expected), rtol=1e-10)


def test_constant_groups_are_significant_only_when_they_differ():
    same = Moments(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([5.0]))
    other = Moments(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.tensor([5.0]))
    assert welch_p_values(same, other).tolist() == [[1.0, 0.0]]


def test_log2_fold_change_is_pdex_on_back_transformed_means():
    target, reference = torch.tensor([[np.log1p(3.0), 0.0, 0.5, 0.0]]), torch.tensor([[np.log1p(1.0), 0.0, 0.0, 0.7]])
    lfc = log2_fold_change(target, reference)[0].tolist()
    assert lfc[0] == pytest.approx(np.log2(3.0)) and lfc[1] == 0.0  # 0/0 counts as no change
    assert lfc[2] == float("inf") and lfc[3] == float("-inf")


def test_de_ranks_order_the_significant_genes_only():
    """A gene with the largest fold change but no significance (a noisy gene) is not DE and takes
    no place in the ranking: the significant genes rank 0, 1, ... among themselves, as cell-eval
    ranks its DE table."""
    reference = Moments(torch.ones(1, 3, dtype=torch.float64), torch.full((1, 3), 0.01, dtype=torch.float64),
                        torch.tensor([50.0], dtype=torch.float64))
    target = Moments(torch.tensor([[3.0, 1.5, 1.2]], dtype=torch.float64),
                     torch.tensor([[100.0, 0.01, 0.01]], dtype=torch.float64), torch.tensor([50.0], dtype=torch.float64))
    rank, n = de_ranks(target, reference)
    assert n.tolist() == [2]
    assert rank[0, 1:].tolist() == [0, 1] and rank[0, 0] == np.iinfo(np.int64).max


def _celleval_overlap(true_genes, pred_genes, k, metric):
    """cell-eval's DEComparison.compute_overlap for one perturbation (ranked significant genes)."""
    available = len(true_genes) if metric == "overlap" else len(pred_genes)
    k_eff = min(available if not k else k, available)
    return 0.0 if k_eff == 0 else len(np.intersect1d(true_genes[:k_eff], pred_genes[:k_eff])) / k_eff


def _ranked_significant(target: Moments, reference: Moments, row: int) -> np.ndarray:
    p = welch_p_values(target, reference)
    significant = (benjamini_hochberg(p) < FDR_THRESHOLD)[row].numpy()
    strength = log2_fold_change(target.mean, reference.mean).abs().float()[row].numpy()
    genes = np.flatnonzero(significant)
    return genes[np.argsort(-strength[genes], kind="stable")]


def test_overlap_and_precision_at_k_match_celleval(groups, rng):
    control, conditions = groups
    truth, reference = _moments(conditions), _moments([control, control])
    pred = _moments([c + rng.normal(0, 0.3, c.shape) for c in conditions[::-1]])  # swapped and noisy
    true_rank, n_true = de_ranks(truth, reference)
    pred_rank, n_pred = de_ranks(pred, reference)
    for sizes in (DE_SIZES, (None, 3, 5)):
        ours = overlap_metrics(true_rank, n_true, pred_rank, n_pred, sizes)
        for row in range(2):
            true_genes, pred_genes = _ranked_significant(truth, reference, row), _ranked_significant(pred, reference, row)
            assert n_true[row] == len(true_genes) > 0
            for metric in ("overlap", "precision"):
                for k in sizes:
                    expected = _celleval_overlap(true_genes, pred_genes, k, metric)
                    assert ours[f"de_{metric}_at_{k or 'N'}"][row].item() == pytest.approx(expected)


def test_discrimination_score_matches_celleval_loop(rng):
    k, g = 7, 25
    true = rng.normal(0, 1, (k, g))
    pred = true[[0, 2, 1, 3, 4, 5, 6]] + rng.normal(0, 0.6, (k, g))  # rows 1 and 2 swapped
    targets = [[0], [3, 4], [], [5], [6], [7], [8]]

    expected = []
    for p in range(k):  # cell-eval: L1 distance to every true change, target genes left out, normalised rank
        keep = np.setdiff1d(np.arange(g), targets[p])
        distances = np.abs(true[:, keep] - pred[p, keep]).sum(1)
        expected.append(1 - np.flatnonzero(np.argsort(distances) == p)[0] / k)

    index = torch.zeros(k, 2, dtype=torch.long)
    valid = torch.zeros(k, 2, dtype=torch.float64)
    for row, genes in enumerate(targets):
        index[row, : len(genes)] = torch.tensor(genes)
        valid[row, : len(genes)] = 1.0
    ours = discrimination_score(torch.tensor(pred), torch.tensor(true), torch.arange(k), index, valid)
    np.testing.assert_allclose(ours.numpy(), expected)
    assert ours[1] < 1 and ours[2] < 1


def test_fdr_with_ties_is_exactly_torch_sort_s(monkeypatch):
    """benjamini_hochberg sorts with NumPy on the CPU; tied p-values (ranked in another order than
    torch.sort may rank them) must get bit-identical adjusted values."""
    from regina_cli.evaluate import de

    rng = np.random.default_rng(0)
    p = torch.from_numpy(rng.choice([0.001, 0.01, 0.02, 0.5, 1.0], (40, 300)) * rng.choice([1.0, 0.999], (40, 300)))
    fast = benjamini_hochberg(p)
    monkeypatch.setattr(de, "_sort_rows", lambda x: torch.sort(x, dim=1))
    assert torch.equal(fast, benjamini_hochberg(p))
    np.testing.assert_allclose(fast[0].numpy(), stats.false_discovery_control(p[0].numpy()), rtol=1e-12)
