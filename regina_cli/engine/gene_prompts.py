"""Which genes get a phase-2 gene prompt, their feature vectors, and what the prompts start from.

The method's prompt, E(X_ctrl) - E(X_fake), tells the transition which gene was hit only through
the frozen encoder's response to one changed gene: nothing for a target the screen does not
measure, and on the demo a vector ~18x smaller than the real latent shift that hardly tells
unseen genes apart. Gene prompts add what generalises (`model.gan.GenePrompts`):

* features: each measured gene's co-expression loadings on the leading principal components of
  the training cells (`gan.gene_features = coexpression`), or prior knowledge, mapped into latent
  space by a learned layer. Fitted first in closed form (ridge, penalty chosen by leave-one-out
  error) from the features of the genes perturbed alone in training to their real latent shifts,
  so an unseen gene starts at what its features predict, not at zero;
* a learned vector per gene perturbed in training (`gan.learned_prompts`: by default only the
  unmeasured ones, whose encoder prompt is empty), started small or, with
  `gan.learned_prompt_init = shift` (useful without an expression prior), at the part of its real
  shift that the features do not explain, so training starts with each seen condition at its own
  shift instead of one generic move.
"""

from __future__ import annotations

import torch

from regina_cli.data.conditions import condition_genes, is_control, parse_condition

RIDGE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
PCA_CELLS = 20_000
ENCODER_PROMPT_CELLS = 32  # controls per condition: enough for a mean, cheap for a large encoder


def prompt_gene_names(train_conditions, measured_genes, cfg, knowledge_genes=()) -> tuple[list[str], list[str]]:
    """(genes with a gene prompt, genes with a learned vector among them), both sorted."""
    targets = condition_genes(c for c in train_conditions if not is_control(c))
    learned = targets - set(measured_genes) if cfg.learned_prompts == "unmeasured" else targets
    table = set(learned) | set(knowledge_genes)
    if cfg.expression_prior != "none":  # the prior keeps each training target's observed effect by table row
        table |= targets
    if cfg.gene_features == "coexpression":
        table |= set(measured_genes)
    return sorted(table), sorted(learned)


@torch.no_grad()
def coexpression_features(cells, table_genes: list[str], dim: int, seed: int) -> torch.Tensor:
    """[len(table_genes), dim]: each measured gene's loadings on the top principal components of
    the standardised training cells (zeros for genes the screen does not measure)."""
    generator = torch.Generator().manual_seed(seed)
    _, x = sampled_rows(cells, cells.train_idx, PCA_CELLS, generator)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    k = min(dim, x.shape[0] - 1, x.shape[1])
    loadings = top_components(x, k, generator) / max(len(x) - 1, 1) ** 0.5  # [G, k]: gene-component correlation
    out = torch.zeros((len(table_genes), dim), device=cells.device)
    position = {g: i for i, g in enumerate(cells.genes)}
    rows = [(r, position[g]) for r, g in enumerate(table_genes) if g in position]
    if rows:
        table_rows, gene_rows = (torch.as_tensor(a, device=cells.device) for a in zip(*rows))
        out[table_rows, :k] = loadings[gene_rows].float()
    return out


def sampled_rows(cells, index: torch.Tensor, limit: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, their expression as float64 [n, G]): `index`, or a random `limit` of it in file order
    when longer (bounds the memory of a fit on a large screen)."""
    if len(index) > limit:
        index = index[torch.randperm(len(index), generator=generator)[:limit].to(index.device)].sort().values
    return index, torch.cat([batch for _, batch in cells.batches(index, 4096, shuffle=False)]).double()


def top_components(x: torch.Tensor, k: int, generator: torch.Generator, oversample: int = 10,
                   iterations: int = 4) -> torch.Tensor:
    """Right singular vectors times singular values [G, k] of `x` [n, G] by randomised SVD
    (Halko et al. 2011) with an explicit generator, so the global random stream is untouched."""
    sketch = torch.randn(x.shape[1], min(k + oversample, x.shape[1]), generator=generator, dtype=x.dtype)
    q = torch.linalg.qr(x @ sketch.to(x.device)).Q
    for _ in range(iterations):
        q = torch.linalg.qr(x @ torch.linalg.qr(x.T @ q).Q).Q
    _, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
    return vh[:k].T * s[:k]


@torch.no_grad()
def mean_encoder_prompts(encoder, cells, latents: torch.Tensor, codes: list[int], cfg, seed: int,
                         priors: torch.Tensor | None = None, prior_module=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean encoder prompt [len(codes), z] of each condition over a fixed sample of controls, and
    the mean latent offset E(X_ctrl + prior) - z_ctrl of its expression prior `priors`
    [len(codes), G] (zeros without priors), in each control's cell type (`prior_module`:
    `ExpressionPrior.with_cell_type`)."""
    from regina_cli.model.prompt import build_prompt, fake_value

    generator = torch.Generator(cells.device).manual_seed(seed)
    controls = cells.train_idx[cells.is_control[cells.train_idx]]
    sample = controls[torch.randint(len(controls), (ENCODER_PROMPT_CELLS,), generator=generator, device=cells.device)]
    x_ctrl, z_ctrl = cells.rows(sample), latents[sample]
    out = torch.zeros((len(codes), latents.shape[1]), device=cells.device)
    offsets = torch.zeros_like(out)
    for row, code in enumerate(codes):
        targets = cells.target_idx[code].expand(len(sample), -1)
        n_targets = cells.n_targets[code].expand(len(sample))
        prompt = build_prompt(encoder, x_ctrl, targets, fake_value(cfg), n_targets=n_targets, z_ctrl=z_ctrl,
                              sign=cfg.prompt_sign)
        out[row] = prompt.float().mean(0)
        if priors is not None:
            prior = priors[row].expand(len(sample), -1)
            if prior_module is not None:
                prior = prior_module.with_cell_type(prior, targets, cells.prompt_idx[code].expand(len(sample), -1),
                                                    cells.cell_type_codes[sample])
            offsets[row] = (encoder(x_ctrl + prior) - z_ctrl).float().mean(0)
    return out, offsets


def single_conditions(cells, codes: list[int]) -> dict[str, int]:
    """gene -> code of its single-gene condition, among `codes`."""
    out = {}
    for code in codes:
        genes = parse_condition(cells.conditions[code])
        if len(genes) == 1:
            out[genes[0]] = code
    return out


@torch.no_grad()
def initialise_gene_prompts(gan, shifts: dict[str, torch.Tensor], *, learned_init: str) -> dict:
    """Fit the feature map by ridge to the genes' latent shifts (what the encoder prompt leaves
    unexplained) and start the learned vectors from what is left; returns what was fitted."""
    prompts = gan.gene_prompts
    position = {g: i for i, g in enumerate(prompts.genes)}
    genes = [g for g in shifts if g in position]
    report = {"fitted_genes": len(genes), "ridge_penalty": None}
    if not genes:
        return report
    target = torch.stack([shifts[g] for g in genes]).double()
    explained = torch.zeros_like(target)
    if prompts.feature_map is not None:
        features = prompts.features[[position[g] for g in genes]].double()
        weight, bias, penalty = ridge_fit(features, target)
        prompts.feature_map.weight.copy_(weight.T.float())
        prompts.feature_map.bias.copy_(bias.float())
        explained = features @ weight + bias
        report["ridge_penalty"] = penalty
    if learned_init == "shift":
        rows = prompts.learned_rows[[position[g] for g in genes]]
        keep = rows >= 0
        prompts.learned[rows[keep]] = (target - explained)[keep].float()
    return report


def ridge_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(weight [d, z], bias [z], penalty): ridge regression of y on x with an unpenalised bias,
    the penalty (relative to the mean feature variance) chosen by leave-one-out error."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    n, d = xc.shape
    scale = float((xc * xc).sum() / max(n * d, 1)) or 1.0
    best = None
    for penalty in RIDGE_PENALTIES:
        gram = xc.T @ xc + penalty * scale * n * torch.eye(d, dtype=x.dtype, device=x.device)
        weight = torch.linalg.solve(gram, xc.T @ yc)
        hat = (xc @ torch.linalg.solve(gram, xc.T)).diagonal() + 1.0 / n
        loo = ((yc - xc @ weight) / (1 - hat).clamp_min(1e-6).unsqueeze(1)).pow(2).mean().item()
        if best is None or loo < best[0]:
            best = (loo, weight, penalty)
    _, weight, penalty = best
    return weight, y_mean - x_mean @ weight, penalty


def feature_source(cfg) -> str:
    return {"none": "none", "coexpression": f"co-expression loadings on {cfg.gene_feature_dim} principal "
                                            "components of the training cells"}[cfg.gene_features]
