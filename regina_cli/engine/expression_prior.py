"""Fitting the expression prior of phase 2 (`gan.expression_prior = linear`).

The prior of a condition sums its targets' effects: a gene perturbed alone in training brings its
observed mean change; any other gene the linear gene-embedding model of the training pseudo-bulk
(Ahlmann-Eltze, Huber & Anders 2025; `evaluate.baselines.fit_linear`), which predicts unseen genes
from how their expression moved across the training perturbations (or, where no training target
is measured and that model cannot be fitted, the mean change over training conditions), and, for
a measured target, the genes that co-vary with it across the training controls moved with its
knock-down (natural variation as a proxy for what lowering the gene does downstream). The
transition then learns what the prior gets wrong. It must learn that from the prior's errors on
conditions the prior did not see, not from its near-perfect fit of its own training data: so
during training each training condition gets the prior fitted without it (K-fold cross-fitting),
and only prediction and validation use the prior fitted on every training condition.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from regina_cli.data.conditions import canonical_condition, is_control, parse_condition
from regina_cli.engine.condition_stats import expression_sums
from regina_cli.engine.gene_prompts import sampled_rows, single_conditions, top_components
from regina_cli.evaluate.baselines import LINEAR_PCA_DIM, LinearModel, TrainingData, fit_linear
from regina_cli.model.losses import per_condition_means

FOLDS = 10
KNOWLEDGE_CHUNK = 1000  # genes per similarity computation (bounds its memory)
PRIOR_DIM = LINEAR_PCA_DIM


def _training_data(cells, stats, codes: list[int], control_mean: np.ndarray) -> TrainingData:
    return TrainingData(genes=list(cells.genes), control_mean=control_mean,
                        conditions=[cells.conditions[c] for c in codes],
                        means=stats.expression_mean[codes].double().cpu().numpy(),
                        counts=stats.counts[codes].double().cpu().numpy())


LINEAR_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
POOLINGS = (0.0, 0.5, 1.0)  # share of the mean change pooled over cells (`gan.prior_mean = chosen`)
# up to 16: from within-condition co-variation the demo's folds chose 4-8, beyond the old top of 3
COVARIATION_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
COVARIATION_CELLS = 10_000  # cells sampled for their co-variation (bounds its memory)


@dataclass
class _Effects:
    """Single-gene effects for the prior: the observed ones, else the mean change m (over
    conditions, moved by `pooling` towards its pooling over cells, `pooled_change`) moved by
    `weight` towards the linear model and by `knowledge_weight` towards the knowledge neighbours'
    observed effects (m + w (linear - m) + v (k - m)), plus for a measured gene g its control
    co-variation slopes times its knock-down (u s C C_g / var_g, `covariation_weight` u), the
    target's own entry `knockdown_scale` times `self_effect` s."""

    model: object  # evaluate.baselines.LinearModel
    observed: dict[str, np.ndarray]
    mean_change: np.ndarray
    weight: float
    self_effect: float
    neighbours: dict[str, tuple] = field(default_factory=dict)  # gene -> (neighbour genes, weights)
    knowledge_weight: float = 0.0
    covariation: np.ndarray | None = None  # [G, k] C, with C C^T the controls' rank-k covariance
    precision: np.ndarray | None = None  # [G] 1 / each gene's variance in the controls (0 if constant)
    covariation_weight: float = 0.0
    knockdown_scale: float = 1.0
    pooled_change: np.ndarray | None = None
    pooling: float = 0.0

    @property
    def start(self) -> np.ndarray:
        """m: where an unseen gene's effect starts."""
        if not self.pooling:
            return self.mean_change
        return self.mean_change + self.pooling * (self.pooled_change - self.mean_change)

    def unseen(self, gene: str) -> np.ndarray:
        embedding = self.model.embed(canonical_condition([gene]))
        linear = self.model.offset if embedding is None else self.model.predict_change(embedding)
        start = self.start
        effect = start + self.weight * (linear - start)
        if gene in self.neighbours and self.knowledge_weight:
            genes, weights = self.neighbours[gene]
            known = sum(w * self.observed[g] for g, w in zip(genes, weights))
            effect = effect + self.knowledge_weight * (known - start)
        if gene in self.model.gene_index:
            i = self.model.gene_index[gene]
            if self.covariation_weight:
                slopes = self.covariation @ self.covariation[i] * self.precision[i]
                effect = effect + self.covariation_weight * self.self_effect * slopes
            effect[i] = self.knockdown_scale * self.self_effect
        return effect

    def prior(self, condition: str, *, own: bool = False) -> np.ndarray:
        """Sum of the targets' effects; `own`: a training single, whose observed effect is its own
        data, so its gene is treated as unseen."""
        genes = parse_condition(condition)
        return sum(self.unseen(g) if (own and len(genes) == 1) or g not in self.observed else self.observed[g]
                   for g in genes)


def median_self_effect(observed: dict[str, np.ndarray], gene_index: dict[str, int], exclude=()) -> float:
    """Median change of measured training targets in their own single conditions (0 if none)."""
    changes = [effect[gene_index[g]] for g, effect in observed.items() if g in gene_index and g not in exclude]
    return float(np.median(changes)) if changes else 0.0


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else 0.0


def _neighbours(knowledge, genes, observed: dict[str, np.ndarray], exclude=()) -> dict[str, tuple]:
    """{gene: (its knowledge neighbours among the observed genes outside `exclude`, their
    weights)} for the `genes` knowledge places there (`GeneKnowledge.neighbours`)."""
    anchors = [g for g in sorted(observed) if g not in exclude]
    genes = sorted(genes)
    if knowledge is None or not anchors:
        return {}
    found = {}
    for start in range(0, len(genes), KNOWLEDGE_CHUNK):
        chunk = genes[start: start + KNOWLEDGE_CHUNK]
        weights, usable = knowledge.neighbours(chunk, anchors)
        for gene, row, ok in zip(chunk, weights, usable):
            if ok:
                kept = np.flatnonzero(row)
                found[gene] = (tuple(anchors[j] for j in kept), row[kept])
    return found


def _choose_weights(fold_effects: list[_Effects], held_out: list[tuple[int, str]], observed: dict[str, np.ndarray],
                    with_knowledge: bool, with_covariation: bool,
                    poolings: tuple[float, ...] = (0.0,)) -> tuple[float, float, float, float]:
    """(linear weight w, knowledge weight v, co-variation weight u, pooling p), w + v <= 1, each the
    candidate whose held-out single-gene predictions correlate best with the observed effects,
    scored on the genes it acts on, in turn: p among `poolings`, then w given p, both on the
    held-out targets the screen measures (for the others the linear model predicts a constant, so
    they would choose w by how the model's offset compares with the mean change); v, given w, on
    those with knowledge neighbours, without the co-variation term (v also moves targets the screen
    does not measure, where that term is absent); u, given both, on the measured ones again. Where
    no held-out gene qualifies, all of them."""
    def score(pairs: list[tuple[int, str]], w: float, v: float, u: float, p: float) -> float:
        return float(np.mean([_pearson(_reweighted(fold_effects[f], w, v, u, p).unseen(g), observed[g])
                              for f, g in pairs] or [0.0]))

    embedded = [(f, g) for f, g in held_out if fold_effects[f].model.embed(canonical_condition([g])) is not None]
    pooling = max(poolings, key=lambda p: score(embedded or held_out, 0.0, 0.0, 0.0, p))
    weight = max(LINEAR_WEIGHTS, key=lambda w: score(embedded or held_out, w, 0.0, 0.0, pooling))
    knowledge = 0.0
    if with_knowledge:
        near = [(f, g) for f, g in held_out if g in fold_effects[f].neighbours]
        knowledge = max((v for v in LINEAR_WEIGHTS if weight + v <= 1),
                        key=lambda v: score(near or held_out, weight, v, 0.0, pooling))
    covariation = max(COVARIATION_WEIGHTS if with_covariation else (0.0,),
                      key=lambda u: score(embedded or held_out, weight, knowledge, u, pooling))
    return weight, knowledge, covariation, pooling


@torch.no_grad()
def fit_expression_prior(prior, cells, stats, control_mean: torch.Tensor, prompt_genes: list[str], *,
                         seed: int, knowledge=None, covariation_skip: int = 0,
                         covariation_cells: str = "controls", prior_mean: str = "conditions",
                         prior_per_gene: bool = False, knockdown_scale: float = 1.0) -> torch.Tensor:
    """Fit `prior` (`model.gan.ExpressionPrior`) on every perturbed training condition in `stats`
    and return the cross-fitted prior of each condition code [C, G]: a training condition gets the
    fold model that left it out (and not its own observed effect); other codes the full prior.

    How far an unseen gene's effect moves from the mean change towards the linear model (the
    weight) is chosen from the folds: the weight whose held-out predictions of measured single
    genes correlate best with their observed effects (`_choose_weights`; a screen whose genes'
    co-variation says little about their effects keeps close to the mean change; train_mean is
    weight 0, the linear baseline weight 1).
    With gene knowledge, and neighbour slots in `prior` (`gan.knowledge_neighbours`), the folds also
    choose how far an unseen gene moves towards the observed effects of its knowledge neighbours;
    with co-variation columns in `prior` (`gan.covariation_components`, past the
    `covariation_skip` leading directions of the training controls, or with `covariation_cells`
    `training` or `within` of the controls and the training cells of the conditions a fit may see:
    each fold's own, so a held-out gene's cells never shape its slopes), how far a measured
    target's co-varying genes follow its knock-down. `prior_mean`: the mean change counts each condition
    once (`conditions`), by its cell count (`cells`, train_mean's pooling), or the folds choose the
    share pooled over cells (`chosen`, among `POOLINGS`) first, on the measured held-out targets;
    with `prior_per_gene` each condition's change is divided by its number of targets first.
    The folds choose these weights with a measured target's own entry at 1 x the median
    self-change; `knockdown_scale` k applies to the cross-fitted table and the fitted prior only.
    Choosing them at k lost on the demo's validation conditions (benchmarks/README.md).
    """
    if prior.neighbour_rows.shape[1] == 0:
        knowledge = None
    components = prior.covariation.shape[1]
    codes = [c for c, name in enumerate(cells.conditions) if stats.counts[c] > 0 and not is_control(name)]
    mean = control_mean.double().cpu().numpy()
    singles = single_conditions(cells, codes)
    observed = {g: stats.expression_mean[code].double().cpu().numpy() - mean for g, code in singles.items()}
    full = _fit(_training_data(cells, stats, codes, mean))
    with_perturbed = covariation_cells in ("training", "within")

    def mean_changes(kept: list[int]) -> tuple:
        targets = np.array([len(parse_condition(cells.conditions[c])) for c in kept]) if prior_per_gene else None
        return _mean_changes(stats, kept, mean, prior_mean, targets)

    def covariation(kept: list[int]) -> dict:  # training cells: only the conditions this fit may see
        c, p = cell_covariation(cells, components, covariation_skip, seed, kept if with_perturbed else None,
                                within=covariation_cells == "within")
        return {"covariation": c, "precision": p}

    shared = covariation(codes) if not with_perturbed else None
    folds = [set(f.tolist()) for f in np.array_split(np.random.default_rng(seed).permutation(codes),
                                                       min(FOLDS, len(codes)))]
    fold_effects, held_out_singles = [], []
    for held in folds:
        kept = [c for c in codes if c not in held]
        model = _fit(_training_data(cells, stats, kept, mean))
        held_genes = {g for g, c in singles.items() if c in held}
        unseen_here = {g for c in held for g in parse_condition(cells.conditions[c])
                       if g in held_genes or g not in observed}
        once, pooled = mean_changes(kept)
        fold_effects.append(_Effects(model, observed, once, 1.0,
                                     median_self_effect(observed, full.gene_index, exclude=held_genes),
                                     _neighbours(knowledge, unseen_here, observed, exclude=held_genes),
                                     **(shared or covariation(kept)), pooled_change=pooled))
        held_out_singles += [(len(fold_effects) - 1, g) for g in held_genes]
    weight, knowledge_weight, covariation_weight, pooling = _choose_weights(
        fold_effects, held_out_singles, observed, knowledge is not None, fold_effects[0].covariation is not None,
        POOLINGS if prior_mean == "chosen" else (0.0,))
    needed = (set(prompt_genes) | {g for name in cells.conditions for g in parse_condition(name)}) - set(observed)
    once, pooled = mean_changes(codes)
    effects = _Effects(full, observed, once, weight,
                       median_self_effect(observed, full.gene_index), _neighbours(knowledge, needed, observed),
                       knowledge_weight, **(shared or covariation(codes)), covariation_weight=covariation_weight,
                       knockdown_scale=knockdown_scale, pooled_change=pooled, pooling=pooling)
    _load(prior, effects, prompt_genes)
    table = np.stack([effects.prior(name) if not is_control(name) else np.zeros(cells.n_genes)
                      for name in cells.conditions])
    for held, fold in zip(folds, fold_effects):
        chosen = replace(_reweighted(fold, weight, knowledge_weight, covariation_weight, pooling),
                         knockdown_scale=knockdown_scale)
        for code in held:
            table[code] = chosen.prior(cells.conditions[code], own=True)
    return torch.as_tensor(table, dtype=torch.float32, device=cells.device)


def _fit(train: TrainingData) -> LinearModel:
    """The linear model, or where it cannot be fitted (no training condition targets a measured
    gene, as in a screen whose targets were filtered out) a model that predicts the mean change
    for every gene: unseen targets then start from train_mean's prediction, not from no change."""
    model = fit_linear(train)
    if model is not None:
        return model
    genes = len(train.genes)
    mean_change = (train.means.mean(0) - train.control_mean) if len(train.means) else np.zeros(genes)
    return LinearModel(np.zeros((genes, 0)), np.zeros((0, 0)), mean_change, {g: i for i, g in enumerate(train.genes)})


def _reweighted(effects: _Effects, weight: float, knowledge_weight: float = 0.0,
                covariation_weight: float = 0.0, pooling: float = 0.0) -> _Effects:
    return replace(effects, weight=weight, knowledge_weight=knowledge_weight, covariation_weight=covariation_weight,
                   pooling=pooling)


@torch.no_grad()
def cell_covariation(cells, components: int, skip: int, seed: int, codes: list[int] | None = None,
                     within: bool = False) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(C [G, components], 1/variance [G]) of the training controls, and with `codes` also of the
    training cells of those perturbed conditions, each cell centred on its cell type's mean (with
    `within`, on its condition's mean in its cell type: no perturbation's effect enters), past
    their `skip` leading principal directions (`covariation_loadings`); (None, None) without
    components or with fewer than 3 cells."""
    index = cells.train_idx
    keep = cells.is_control[index]
    if codes is not None:
        keep = keep | torch.isin(cells.condition_codes[index], torch.as_tensor(codes, device=index.device))
    index = index[keep]
    if components == 0 or len(index) < 3:
        return None, None
    generator = torch.Generator().manual_seed(seed)
    index, x = sampled_rows(cells, index, COVARIATION_CELLS, generator)
    groups = cells.cell_type_codes[index]  # co-variation within a cell type, not between types
    if within:
        groups = cells.condition_codes[index] * len(cells.cell_types) + groups
    _, groups = torch.unique(groups, return_inverse=True)  # only the groups present: bounded by the cells
    x -= per_condition_means(x, groups, int(groups.max()) + 1)[1][groups]
    loadings, precision = covariation_loadings(x, components, generator, skip=skip)
    return loadings.cpu().numpy(), precision.cpu().numpy()


def covariation_loadings(x: torch.Tensor, components: int, generator: torch.Generator,
                         skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(C [G, components], 1/variance [G]) of cells `x` [n, G]: C C^T is their covariance on the
    `components` principal directions that follow the `skip` leading ones (zero columns past the
    rank), and C C_g / var_g the slope of every gene's regression on gene g along them (precision
    0 for a gene constant across `x`). The leading directions of control cells are the axes every
    gene moves on (cell cycle, stress, depth): kept, they would give every knock-down one shared
    shift."""
    centred = x.double()
    centred -= centred.mean(0)
    n = max(len(x) - 1, 1)
    variance = centred.pow(2).sum(0) / n
    k = min(components + skip, len(x) - 1, x.shape[1])
    loadings = torch.zeros((x.shape[1], components), dtype=torch.float64, device=x.device)
    if k > skip:
        loadings[:, :k - skip] = top_components(centred, k, generator)[:, skip:] / n ** 0.5
    precision = torch.where(variance > 1e-12, 1.0 / variance.clamp_min(1e-12), torch.zeros_like(variance))
    return loadings, precision


MIN_TYPE_CELLS = 3  # cells of one cell type a condition needs for its change within that type


@torch.no_grad()
def average_over_cell_types(prior, cells, stats, index: torch.Tensor, reference: torch.Tensor):
    """`stats` whose expression means hold each perturbed condition's change averaged over cell
    types, for the prior to fit on; fills `prior.cell_type_change`.

    A condition's pooled mean minus the pooled control mean mixes its effect with its cell-type mix
    (on McFaline the mix alone scored 0.32 pearson_delta). Instead its change within each type t
    it has at least MIN_TYPE_CELLS cells of (d_t: mean of those cells minus type t's training
    controls) is averaged with the controls' type proportions (renormalised over its types), and
    placed on `reference`; `cell_type_change[t]` is the mean over conditions of d_t minus that
    average: how type t departs from it (`ExpressionPrior.with_cell_type`). A condition with too
    few cells of every type keeps its pooled mean. `index`: the cells phase 2 trains on.
    """
    from regina_cli.engine.gan_validation import control_means_by_type

    n_types, n_codes = len(cells.cell_types), len(cells.conditions)
    controls = cells.train_idx[cells.is_control[cells.train_idx]]
    share = torch.bincount(cells.cell_type_codes[controls], minlength=n_types).double()
    share /= share.sum()
    type_controls = control_means_by_type(cells)  # [T, G]
    keys = cells.condition_codes * n_types + cells.cell_type_codes  # each cell's (condition, type)
    counts = torch.bincount(keys[index], minlength=n_codes * n_types).double().view(n_codes, n_types)
    sums = expression_sums(cells, index, keys, n_codes * n_types)
    within = sums.view(n_codes, n_types, -1) / counts.clamp_min(1).unsqueeze(2) - type_controls  # d_t
    enough = (counts >= MIN_TYPE_CELLS).double()
    weights = enough * share
    usable = weights.sum(1) > 0
    average = (weights.unsqueeze(2) * within).sum(1) / weights.sum(1).clamp_min(1e-12).unsqueeze(1)  # [C, G]
    perturbed = torch.tensor([not is_control(c) for c in cells.conditions], device=cells.device) & usable
    departs = (within - average.unsqueeze(1)) * (enough * perturbed.unsqueeze(1)).unsqueeze(2)
    prior.cell_type_change.copy_((departs.sum(0) / (enough * perturbed.unsqueeze(1)).sum(0).clamp_min(1).unsqueeze(1))
                                 .to(prior.cell_type_change.dtype))
    means = torch.where((perturbed & (stats.counts > 0)).unsqueeze(1),
                        (reference.double() + average).to(stats.expression_mean.dtype), stats.expression_mean)
    return replace(stats, expression_mean=means)


def _mean_changes(stats, codes: list[int], control_mean: np.ndarray, prior_mean: str,
                  targets: np.ndarray | None = None) -> tuple:
    """(the mean change, the change pooled over cells or None): the mean change counts each
    condition once, or (`prior_mean` cells) by its cell count, as train_mean pools it; with `chosen`
    the pooled change comes too, for the folds to mix in. `targets` (each code's number of target
    genes, `gan.prior_per_gene`) divides each change by it: the change of one gene, where a
    combination's change holds two."""
    changes = stats.expression_mean[codes].double().cpu().numpy() - control_mean
    if targets is not None:
        changes = changes / targets[:, None]
    counts = stats.counts[codes].double().cpu().numpy()
    once, pooled = changes.mean(0), counts @ changes / counts.sum()
    return {"conditions": (once, None), "cells": (pooled, None), "chosen": (once, pooled)}[prior_mean]


def _load(prior, effects: _Effects, prompt_genes: list[str]) -> None:
    """Copy the fitted effects (and the table genes' knowledge neighbours) into the prior's buffers."""
    model = effects.model
    k = model.gene_embedding.shape[1]
    prior.embedding.zero_()[:, :k] = torch.as_tensor(model.gene_embedding, dtype=prior.embedding.dtype)
    prior.weight.zero_()[:k, :k] = torch.as_tensor(model.weights, dtype=prior.weight.dtype)
    prior.offset.copy_(torch.as_tensor(model.offset, dtype=prior.offset.dtype))
    prior.mean_change.copy_(torch.as_tensor(effects.start, dtype=prior.mean_change.dtype))
    prior.mean_pooling.fill_(effects.pooling)
    prior.linear_weight.fill_(effects.weight)
    prior.self_effect.fill_(effects.self_effect)
    prior.knockdown_scale.fill_(effects.knockdown_scale)
    position = {g: i for i, g in enumerate(prompt_genes)}
    observed_row = {gene: row for row, gene in enumerate(sorted(effects.observed))}
    for gene, row in observed_row.items():
        prior.observed[row] = torch.as_tensor(effects.observed[gene], dtype=prior.observed.dtype)
        prior.observed_rows[position[gene]] = row
    prior.knowledge_weight.fill_(effects.knowledge_weight)
    if effects.covariation is not None:
        prior.covariation.copy_(torch.as_tensor(effects.covariation, dtype=prior.covariation.dtype))
        prior.covariation_precision.copy_(torch.as_tensor(effects.precision, dtype=prior.covariation_precision.dtype))
        prior.covariation_weight.fill_(effects.covariation_weight)
    slots = prior.neighbour_rows.shape[1]
    prior.neighbour_rows.fill_(-1)
    prior.neighbour_weights.zero_()
    for gene, (genes, weights) in effects.neighbours.items():
        if gene not in position or not slots:
            continue
        k = min(len(genes), slots)
        prior.neighbour_rows[position[gene], :k] = torch.as_tensor([observed_row[g] for g in genes[:k]])
        prior.neighbour_weights[position[gene], :k] = torch.as_tensor(weights[:k])


def observed_genes(cells, stats) -> list[str]:
    """Genes with a single condition among phase 2's training cells: their observed effects."""
    codes = [c for c, name in enumerate(cells.conditions) if stats.counts[c] > 0 and not is_control(name)]
    return sorted(single_conditions(cells, codes))


def knowledge_genes(knowledge, measured_genes: list[str], train_targets: set[str]) -> list[str]:
    """The genes `knowledge` gives a usable vector (annotation: sharing a term with a measured or
    trained gene), in the file's spelling, plus the trained targets it knows, in the screen's."""
    anchors = sorted(set(measured_genes) | train_targets)
    genes = list(knowledge.genes)
    usable = []
    for start in range(0, len(genes), KNOWLEDGE_CHUNK):
        chunk = genes[start: start + KNOWLEDGE_CHUNK]
        usable += [g for g, ok in zip(chunk, knowledge.vectors(chunk, anchors=anchors)[1]) if ok]
    return sorted(set(usable) | {g for g in train_targets if knowledge.knows(g)})


@torch.no_grad()
def fill_knowledge_embeddings(prior, knowledge, measured_genes: list[str], table_genes: list[str]) -> int:
    """Give the prompt-table genes the screen does not measure a row of the prior's gene
    embedding G from `knowledge`: annotation, the similarity-weighted mix of the measured genes'
    rows (GEARS's GO weighting); embedding, a ridge map from the knowledge vectors of measured
    genes to their rows of G. Returns how many genes got one."""
    from regina_cli.data.knowledge import ANNOTATION
    from regina_cli.engine.gene_prompts import ridge_fit

    measured = set(measured_genes)
    rows = [(i, g) for i, g in enumerate(table_genes) if g not in measured]
    if not rows:
        return 0
    embedding = prior.embedding.double()
    targets = [g for _, g in rows]
    out = torch.zeros((len(rows), embedding.shape[1]), dtype=torch.float64, device=embedding.device)
    ok = torch.zeros(len(rows), dtype=torch.bool, device=embedding.device)
    if knowledge.kind == ANNOTATION:
        for start in range(0, len(targets), KNOWLEDGE_CHUNK):
            weights, usable = knowledge.vectors(targets[start: start + KNOWLEDGE_CHUNK], anchors=measured_genes)
            out[start: start + len(weights)] = torch.as_tensor(weights, dtype=torch.float64, device=out.device) @ embedding
            ok[start: start + len(weights)] = torch.as_tensor(usable, device=out.device)
    else:
        x, known = knowledge.vectors(measured_genes)
        if known.sum() < 2:
            return 0
        x = torch.as_tensor(x[known], dtype=torch.float64, device=embedding.device)
        weight, bias, _ = ridge_fit(x, embedding[torch.as_tensor(known, device=embedding.device)])
        vectors, usable = knowledge.vectors(targets)
        out = torch.as_tensor(vectors, dtype=torch.float64, device=embedding.device) @ weight + bias
        ok = torch.as_tensor(usable, device=out.device)
    index = torch.as_tensor([i for i, _ in rows], device=out.device)
    prior.table_embedding[index[ok]] = out[ok].to(prior.table_embedding.dtype)
    return int(ok.sum())
