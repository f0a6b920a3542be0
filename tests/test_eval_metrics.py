"""Each evaluation metric against a straightforward numpy/scipy computation on random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from regina_cli.evaluate.distribution import (
    PredictedCells,
    TrueCells,
    distribution_metrics,
    random_projections,
    wasserstein_1d,
)
from regina_cli.evaluate.metrics import METRICS, PRECISION_METRICS, GeneSets, pearson, precision_metrics

C, G = 6, 40


def _pearson0(a, b):
    """GEARS: scipy's pearsonr, with an undefined value counted as 0."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return stats.pearsonr(a, b)[0]


@pytest.fixture
def case(rng):
    control = rng.gamma(2.0, 0.5, G)
    true = control + rng.normal(0, 0.6, (C, G))
    pred = control + 0.7 * (true - control) + rng.normal(0, 0.3, (C, G))
    pred[0] = control  # "no change": every delta exactly 0 -> Pearson undefined -> 0
    pred[1, :5] = control[:5]  # some exact zeros: neither correct nor opposite
    de = [rng.choice(G, 20, replace=False) for _ in range(C)]
    nd = [d[: 20 - i] for i, d in enumerate(de)]  # non-dropout lists may be shorter than 20
    non_dropout = rng.random((C, G)) < 0.7
    non_zero = non_dropout & (rng.random((C, G)) < 0.8)
    std = rng.gamma(1.0, 0.5, (C, G))
    std[2, nd[2][:3]] = 0.0
    all_zero = np.zeros((C, G), dtype=bool)
    return dict(control=control, true=true, pred=pred, de=de, nd=nd, non_dropout=non_dropout,
                non_zero=non_zero, std=std, all_zero=all_zero)


def _gene_sets(c) -> GeneSets:
    def pad(lists):
        width = max(map(len, lists))
        idx = torch.zeros(len(lists), width, dtype=torch.long)
        ok = torch.zeros(len(lists), width, dtype=torch.bool)
        for i, items in enumerate(lists):
            idx[i, : len(items)] = torch.as_tensor(items)
            ok[i, : len(items)] = True
        return idx, ok

    return GeneSets(*pad(c["de"]), *pad(c["nd"]), torch.as_tensor(c["non_dropout"]), torch.as_tensor(c["non_zero"]))


def _ours(c) -> dict[str, np.ndarray]:
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    out = precision_metrics(t(c["pred"]), t(c["true"]), t(c["control"]), _gene_sets(c), t(c["std"]),
                            torch.as_tensor(c["all_zero"]))
    return {k: v.numpy() for k, v in out.items()}


def _reference(c, i) -> dict[str, float]:
    """Straight per-condition numpy/scipy, written from the metric definitions."""
    pd_, td = c["pred"][i] - c["control"], c["true"][i] - c["control"]
    de, nd = c["de"][i], c["nd"][i]
    top = np.argsort(-np.abs(td), kind="stable")[:20]
    nmse = lambda idx: np.sum((pd_[idx] - td[idx]) ** 2) / np.sum(td[idx] ** 2)  # noqa: E731
    same = lambda idx: np.mean(np.sign(pd_[idx]) == np.sign(td[idx]))  # noqa: E731
    spread = nd[c["std"][i][nd] > 0]
    return {
        "pearson_delta": _pearson0(pd_, td),
        "pearson_delta_top20_de": _pearson0(pd_[de], td[de]),
        "mse_top20_de": np.mean((pd_[de] - td[de]) ** 2),
        "frac_correct_direction_20": np.sum(np.sign(pd_[de]) == np.sign(td[de])) / 20,
        "frac_correct_direction_all": same(slice(None)),
        "pearson_delta_top20_de_non_dropout": _pearson0(pd_[nd], td[nd]),
        "mse_top20_de_non_dropout": np.mean((pd_[nd] - td[nd]) ** 2),
        "frac_correct_direction_top20_non_dropout": same(nd),
        "frac_opposite_direction_top20_non_dropout": np.mean(np.abs(np.sign(pd_[nd]) - np.sign(td[nd])) == 2),
        "frac_correct_direction_non_dropout": same(np.flatnonzero(c["non_dropout"][i])),
        "frac_correct_direction_non_zero": same(np.flatnonzero(c["non_zero"][i])),
        "frac_sigma_below_1_non_dropout": 1
        - np.mean(np.abs(c["pred"][i][spread] - c["true"][i][spread]) / c["std"][i][spread] > 1),
        "nmse_top20_de": nmse(de),
        "nmse_all": nmse(slice(None)),
        "pearson_delta_top20_abs": _pearson0(pd_[top], td[top]),
        "frac_wrong_sign_top20_abs": np.mean(pd_[top] * td[top] < 0),
        "frac_wrong_sign_all": np.mean(pd_ * td < 0),
        "nmse_top20_abs": nmse(top),
    }


def test_every_precision_metric_matches_reference(case):
    ours = _ours(case)
    assert set(ours) == set(PRECISION_METRICS)
    for i in range(C):
        for name, expected in _reference(case, i).items():
            assert ours[name][i] == pytest.approx(expected, rel=1e-9, abs=1e-12), (name, i)


def test_no_change_prediction_scores_like_gears(case):
    ours = _ours(case)
    assert ours["pearson_delta"][0] == 0.0  # undefined correlation counts as 0, as in GEARS
    assert ours["frac_correct_direction_all"][0] == 0.0  # sign 0 is never "correct"
    assert ours["nmse_all"][0] == pytest.approx(1.0)  # normalised so that no change scores 1


def test_condition_without_de_genes_is_undefined_not_zero(case):
    case["de"][3] = np.array([], dtype=int)
    ours = _ours(case)
    assert np.isnan(ours["pearson_delta_top20_de"][3]) and np.isnan(ours["mse_top20_de"][3])
    assert np.isfinite(ours["pearson_delta"][3])


def test_frac_correct_direction_20_divides_by_20_when_fewer_de_genes_are_listed(case):
    """GEARS' deeper_analysis divides the correct-sign count by 20 even when
    rank_genes_groups_cov_all lists fewer genes (a small screen): dividing by the genes listed
    would score such a condition higher than GEARS' published tables do."""
    case["de"][3] = case["de"][3][:8]
    ours = _ours(case)
    assert ours["frac_correct_direction_20"][3] == pytest.approx(_reference(case, 3)["frac_correct_direction_20"])
    assert ours["frac_correct_direction_20"][3] <= 8 / 20


def test_frac_sigma_undefined_when_de_genes_all_zero(case):
    case["all_zero"][4, :] = True
    case["std"][4, :] = 0.0
    assert np.isnan(_ours(case)["frac_sigma_below_1_non_dropout"][4])


def test_systema_metrics_are_pearson_of_changes_from_the_perturbed_reference(case, rng):
    reference = case["control"] + rng.normal(0.3, 0.2, G)  # the average training perturbation
    case["pred"][4] = reference  # predicts only what perturbations share: undefined, not 0
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    out = precision_metrics(t(case["pred"]), t(case["true"]), t(case["control"]), _gene_sets(case), t(case["std"]),
                            torch.as_tensor(case["all_zero"]), t(reference))
    for i in [0, 1, 2, 3, 5]:
        p, q, de = case["pred"][i] - reference, case["true"][i] - reference, case["de"][i]
        assert out["pearson_delta_pert"][i].item() == pytest.approx(stats.pearsonr(p, q)[0], rel=1e-9)
        assert out["pearson_delta_pert_top20_de"][i].item() == pytest.approx(stats.pearsonr(p[de], q[de])[0], rel=1e-9)
    assert np.isnan(out["pearson_delta_pert"][4].item()) and np.isnan(out["pearson_delta_pert_top20_de"][4].item())
    # the control-based metrics do not depend on the reference
    assert out["pearson_delta"].numpy() == pytest.approx(_ours(case)["pearson_delta"])
    assert np.isnan(_ours(case)["pearson_delta_pert"]).all()  # no reference (no perturbed training condition)


def test_de_metric_descriptions_read_all_or_the_top_n():
    """The `_at_N` descriptions read "share of the all true DE genes"."""
    assert "share of all true DE genes" in METRICS["de_overlap_at_N"].description
    assert "share of all predicted DE genes" in METRICS["de_precision_at_N"].description
    assert "share of the top 50 true DE genes" in METRICS["de_overlap_at_50"].description
    assert not [m for m, info in METRICS.items() if "the all" in info.description]


def test_pearson_rowwise_matches_numpy(rng):
    a, b = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    expected = [np.corrcoef(a[i], b[i])[0, 1] for i in range(5)]
    np.testing.assert_allclose(pearson(torch.as_tensor(a), torch.as_tensor(b)).numpy(), expected, rtol=1e-10)


# --- distribution metrics ----------------------------------------------------------------------


def _rbf_mmd_reference(x, y, bandwidths):
    """Biased (V-statistic) squared MMD averaged over kernels, by explicit pairwise loops in numpy."""
    def k_mean(a, b, s):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * s * s)).mean()

    return np.mean([k_mean(x, x, s) + k_mean(y, y, s) - 2 * k_mean(x, y, s) for s in bandwidths])


def _energy_reference(x, y):
    dist = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).mean()  # noqa: E731
    return 2 * dist(x, y) - dist(x, x) - dist(y, y)


@pytest.fixture
def cells(rng):
    y = rng.gamma(1.5, 1.0, (37, 25)).astype(np.float32)
    x = (rng.gamma(1.5, 1.0, (23, 25)) * 1.3 + 0.2).astype(np.float32)
    return x, y


def _score(x, truth):
    return distribution_metrics(PredictedCells.build(torch.from_numpy(x), truth), truth)


def test_distribution_metrics_match_reference_formulas(cells):
    x, y = cells
    projections = random_projections(x.shape[1], seed=3)
    truth = TrueCells.build(torch.from_numpy(y), projections)
    got = _score(x, truth)
    assert set(got) == {m for m, i in METRICS.items() if i.kind == "distribution"}

    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    pairwise = np.sqrt(((y64[:, None] - y64[None]) ** 2).sum(-1))
    median = np.median(pairwise[~np.eye(len(y64), dtype=bool)])
    bandwidths = median * np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    assert got["mmd_rbf"] == pytest.approx(_rbf_mmd_reference(x64, y64, bandwidths), rel=1e-3, abs=1e-6)
    assert got["energy_distance"] == pytest.approx(_energy_reference(x64, y64), rel=1e-3)
    theta = projections.double().numpy()
    sliced = np.mean([stats.wasserstein_distance(x64 @ theta[:, p], y64 @ theta[:, p]) for p in range(theta.shape[1])])
    assert got["sliced_wasserstein"] == pytest.approx(sliced, rel=1e-4)
    assert got["variance_pearson"] == pytest.approx(stats.pearsonr(x64.std(0), y64.std(0))[0], rel=1e-5)
    assert got["l1_means"] == pytest.approx(np.abs(x64.mean(0) - y64.mean(0)).mean(), rel=1e-5)


def test_energy_distance_in_one_dimension_matches_scipy(rng):
    """scipy's 1-D energy_distance is the square root of 2E|X-Y| - E|X-X'| - E|Y-Y'|."""
    x, y = rng.normal(0, 1, (50, 1)), rng.normal(0.5, 2, (80, 1))
    assert _energy_reference(x, y) == pytest.approx(stats.energy_distance(x[:, 0], y[:, 0]) ** 2, rel=1e-10)
    projections = torch.ones(1, 1, dtype=torch.float64)
    truth = TrueCells.build(torch.from_numpy(y), projections)
    got = _score(x, truth)
    assert got["energy_distance"] == pytest.approx(stats.energy_distance(x[:, 0], y[:, 0]) ** 2, rel=1e-9)


def test_wasserstein_1d_batched_matches_scipy(rng):
    u, v = rng.normal(size=(31, 4)), rng.exponential(size=(17, 4))
    got = wasserstein_1d(torch.from_numpy(u), torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(got, [stats.wasserstein_distance(u[:, p], v[:, p]) for p in range(4)], rtol=1e-10)


def test_identical_cells_score_perfectly(cells):
    _, y = cells
    projections = random_projections(y.shape[1], seed=0)
    truth = TrueCells.build(torch.from_numpy(y), projections)
    got = _score(y, truth)
    assert got["mmd_rbf"] == pytest.approx(0.0, abs=1e-5)
    assert got["energy_distance"] == pytest.approx(0.0, abs=1e-3)
    assert got["sliced_wasserstein"] == pytest.approx(0.0, abs=1e-5)
    assert got["variance_pearson"] == pytest.approx(1.0, abs=1e-5)


def test_true_cells_all_alike_still_give_a_finite_mmd(cells):
    """A condition whose true cells are all the same (one cell, or identical rows on the genes
    scored) has a median distance of 0: the kernels fall back to a unit scale, so the MMD is a
    number, 0 for the same cells and positive for others, never NaN."""
    x, y = cells
    alike = np.repeat(y[:1], 5, axis=0)
    truth = TrueCells.build(torch.from_numpy(alike), random_projections(y.shape[1], seed=0))
    assert torch.isfinite(truth.bandwidths).all() and (truth.bandwidths > 0).all()
    assert _score(alike, truth)["mmd_rbf"] == pytest.approx(0.0, abs=1e-6)
    assert _score(x, truth)["mmd_rbf"] > 0


def test_random_projections_are_seeded_unit_vectors():
    a, b = random_projections(50, seed=7), random_projections(50, seed=7)
    assert torch.equal(a, b) and a.shape == (50, 100)
    torch.testing.assert_close(a.norm(dim=0), torch.ones(100), rtol=1e-5, atol=1e-5)
    assert not torch.equal(a, random_projections(50, seed=8))


def test_shifted_cells_score_like_recomputed_cells(cells, rng):
    """Baselines move control cells by their predicted change without recomputing distances."""
    x, y = cells
    truth = TrueCells.build(torch.from_numpy(y), random_projections(y.shape[1], seed=1))
    shift = rng.normal(0, 0.5, y.shape[1]).astype(np.float32)
    fast = distribution_metrics(PredictedCells.build(torch.from_numpy(x), truth).shifted(torch.from_numpy(shift), truth), truth)
    slow = _score(x + shift, truth)
    assert fast == pytest.approx(slow, rel=1e-4, abs=1e-6)


def test_wasserstein_numpy_sort_is_exactly_torch_sort_s(monkeypatch):
    """wasserstein_1d sorts with NumPy on the CPU; equal and unequal sample sizes, with ties and
    signed zeros, must give bit-identical distances to torch.sort's."""
    from regina_cli.evaluate import distribution

    rng = np.random.default_rng(1)
    u = torch.from_numpy(rng.choice([-1.0, -0.0, 0.0, 0.5, 2.0], (40, 25)).astype(np.float32))
    pairs = [(u, torch.from_numpy(rng.normal(size=(40, 25)).astype(np.float32))),
             (u, torch.from_numpy(rng.normal(size=(33, 25)).astype(np.float32)))]
    fast = [distribution.wasserstein_1d(a, b) for a, b in pairs]
    monkeypatch.setattr(distribution, "_sorted_rows", lambda x: torch.sort(x, dim=1).values)
    for (a, b), value in zip(pairs, fast):
        assert torch.equal(value, distribution.wasserstein_1d(a, b))


def test_cells_moved_by_their_types_shift_keep_the_distances_of_a_rebuild():
    """`PredictedCells.shifted_by_type` updates the pairwise distances instead of recomputing them
    (the matched baselines of a screen of several cell types move each control by its own type's change)."""
    from regina_cli.evaluate.distribution import PredictedCells, TrueCells, distribution_metrics, random_projections

    gen = torch.Generator().manual_seed(0)
    cells, true = torch.rand(30, 12, generator=gen) * 3, torch.rand(25, 12, generator=gen) * 3
    truth = TrueCells.build(true, random_projections(12, 0))
    shifts, types = torch.randn(3, 12, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    moved = PredictedCells.build(cells, truth).shifted_by_type(shifts, types, truth)
    rebuilt = PredictedCells.build(cells + shifts[types], truth)
    for name in ("cells", "d2_self", "d2_true", "projected", "mean", "std"):
        torch.testing.assert_close(getattr(moved, name), getattr(rebuilt, name), atol=2e-4, rtol=1e-4)
    expected, got = distribution_metrics(rebuilt, truth), distribution_metrics(moved, truth)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
