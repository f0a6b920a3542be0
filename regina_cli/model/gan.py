"""The latent cycle-GAN of phase 2: two transition blocks, two discriminators, and per-gene
prompt vectors that let the prompt carry each condition's identity.

Two discriminators, one per domain (as in CycleGAN): `discriminator` judges perturbed latents
(real Z_pert vs T_fwd(Z_ctrl)), `control_discriminator` judges control latents (real Z_ctrl vs
T_bwd(Z_pert)). One shared network would see both real controls and real perturbed cells
labelled "real" under the same prompt, so T_fwd could pass by producing a control-like latent.

Gene prompts (`GenePrompts`) complement the method's encoder prompt E(X_ctrl) - E(X_fake), which
is empty for a target the screen does not measure and tiny for one it does: every gene in the
prompt table (`prompt_genes`) can have a feature vector (its co-expression loadings, or prior
knowledge) mapped into latent space by a learned layer, and genes perturbed in training can have
a learned vector. A target in neither has no prompt and cannot be predicted; `engine.predict`
says so.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from regina_cli.config import ModelConfig
from regina_cli.model.discriminator import ConditionedDiscriminator
from regina_cli.model.transition import TransitionBlock


class GenePrompts(nn.Module):
    """Prompt vectors of the genes in `genes`: `feature_map(features[g]) + learned[g]`, summed
    over a condition's targets.

    `features` [n, d] (d may be 0) are fixed inputs (buffers); `learned_genes` name the genes
    that get a learned vector, initialised small (0.01 x noise) or to `learned_init` [m, z].
    """

    def __init__(self, genes: Sequence[str], z_dim: int, *, features: torch.Tensor | None = None,
                 learned_genes: Sequence[str] = (), learned_init: torch.Tensor | None = None):
        super().__init__()
        self.genes = list(genes)
        position = {g: i for i, g in enumerate(self.genes)}
        learned_rows = torch.full((len(self.genes),), -1, dtype=torch.long)
        for row, gene in enumerate(learned_genes):
            learned_rows[position[gene]] = row
        self.register_buffer("learned_rows", learned_rows)
        init = torch.randn(len(learned_genes), z_dim) * 0.01 if learned_init is None else learned_init.clone()
        self.learned = nn.Parameter(init)
        features = torch.zeros(len(self.genes), 0) if features is None else features.float()
        self.register_buffer("features", features)
        self.feature_map = nn.Linear(features.shape[1], z_dim) if features.shape[1] else None

    @property
    def learned_genes(self) -> list[str]:
        rows = self.learned_rows.tolist()
        return [g for g, _ in sorted(((g, r) for g, r in zip(self.genes, rows) if r >= 0), key=lambda t: t[1])]

    def forward(self, idx: torch.Tensor, keep_learned: torch.Tensor | None = None) -> torch.Tensor:
        """Summed prompt [B, z] of targets `idx` [B, k] (positions in `genes`, -1 = none).
        `keep_learned` [B, k] (bool) hides learned vectors where False (prompt dropout)."""
        valid = idx >= 0
        safe = idx.clamp(min=0)
        out = torch.zeros((idx.shape[0], self.learned.shape[1]), dtype=self.learned.dtype, device=idx.device)
        if len(self.learned):
            rows = self.learned_rows[safe]
            use_learned = valid & (rows >= 0)
            if keep_learned is not None:
                use_learned = use_learned & keep_learned
            out = (self.learned[rows.clamp(min=0)] * use_learned.unsqueeze(-1).to(self.learned.dtype)).sum(1)
        if self.feature_map is not None:
            mapped = self.feature_map(self.features[safe])
            out = out + (mapped * valid.unsqueeze(-1).to(mapped.dtype)).sum(1)
        return out


class _LoadsOlderRuns:
    """Loads the state dict of a run saved before some buffers existed: `LEGACY_BUFFERS` gives each
    such buffer the value that reproduces how that run behaved (None: its value as constructed,
    for buffers whose shape the constructor sets)."""

    LEGACY_BUFFERS: dict[str, float | None] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, value in self.LEGACY_BUFFERS.items():
            current = getattr(self, name)
            state_dict.setdefault(prefix + name, current.clone() if value is None else torch.full_like(current, value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LatentCycleGAN(_LoadsOlderRuns, nn.Module):
    LEGACY_BUFFERS = {"correction_scale": 1.0}

    def __init__(self, z_dim: int, cfg: ModelConfig, *, prompt_genes: Sequence[str] = (),
                 gene_features: torch.Tensor | None = None, learned_genes: Sequence[str] = (),
                 learned_init: torch.Tensor | None = None, n_genes: int = 0, prior_dim: int = 0,
                 prior_observed: int = 0, prior_neighbours: int = 0, prior_covariation: int = 0,
                 prior_cell_types: int = 0):
        super().__init__()
        self.forward_block = TransitionBlock(z_dim, cfg, direction=1)
        self.backward_block = TransitionBlock(z_dim, cfg, direction=-1)
        self.discriminator = ConditionedDiscriminator(z_dim, cfg)
        self.control_discriminator = ConditionedDiscriminator(z_dim, cfg)
        self.gene_prompts = GenePrompts(prompt_genes, z_dim, features=gene_features, learned_genes=learned_genes,
                                        learned_init=learned_init)
        # Fixed when training starts (`gan.prompt_scale`); saved with the weights so prediction uses it too.
        self.register_buffer("encoder_prompt_scale", torch.ones(()))
        # How much of the transition's move away from its anchor a prediction keeps (`gan.correction_scale`;
        # runs saved before it kept all of it).
        self.register_buffer("correction_scale", torch.ones(()))
        self.expression_prior = (ExpressionPrior(n_genes, len(self.prompt_genes), prior_dim, prior_observed,
                                                 prior_neighbours, prior_covariation, prior_cell_types)
                                 if prior_dim else None)

    @property
    def prompt_genes(self) -> list[str]:
        return self.gene_prompts.genes

    def add_gene_prompts(self, prompt: torch.Tensor, gene_idx: torch.Tensor,
                         keep_learned: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder prompt plus the gene prompts of the targets `gene_idx` ([B, k], -1 = none)."""
        if gene_idx.numel() == 0 or not self.gene_prompts.genes:
            return prompt
        return prompt + self.gene_prompts(gene_idx, keep_learned).to(prompt.dtype)

    def forward(self, z_ctrl: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Predicted perturbed latent T_fwd(Z_ctrl, Z_prompt)."""
        return self.forward_block(z_ctrl, prompt)

    def predict_latent(self, z_ctrl: torch.Tensor, prompt: torch.Tensor, anchor_z: torch.Tensor) -> torch.Tensor:
        """The latent a prediction decodes: the anchor (z_ctrl, or E(X_ctrl + prior)) moved by
        `correction_scale` times the transition's move from it; scale 1 is T_fwd(Z_ctrl, Z_prompt)."""
        z_pred = self.forward_block(z_ctrl, prompt)
        return anchor_z + self.correction_scale.to(z_pred.dtype) * (z_pred - anchor_z)

    def transition_parameters(self) -> list[nn.Parameter]:
        """What the generator optimiser updates: both blocks and the gene prompts."""
        return [*self.forward_block.parameters(), *self.backward_block.parameters(), *self.gene_prompts.parameters()]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [*self.discriminator.parameters(), *self.control_discriminator.parameters()]


def decode_with_residual(decoded: torch.Tensor, decoded_ctrl: torch.Tensor, x_ctrl: torch.Tensor) -> torch.Tensor:
    """Residual decoding, X_ctrl + D(T(z_ctrl)) - D(z_ctrl): the decoder's reconstruction error
    cancels and the control's own cell-to-cell variation is kept."""
    return x_ctrl + (decoded - decoded_ctrl).to(x_ctrl.dtype)


def decode_prediction(decoder: nn.Module, z_pred: torch.Tensor, *, anchor_x: torch.Tensor,
                      anchor_z: torch.Tensor, residual: bool) -> torch.Tensor:
    """Expression of a predicted perturbed latent: the method's D(T(z_ctrl)), or with `residual`
    the decoded change from the anchor latent added to the anchor cell (`decode_with_residual`):
    the real control (X_ctrl, z_ctrl), or with an expression prior X_ctrl + prior and its latent."""
    if not residual:
        return decoder(z_pred)
    decoded_pred, decoded_anchor = decoder(torch.cat([z_pred, anchor_z])).chunk(2)
    return decode_with_residual(decoded_pred, decoded_anchor, anchor_x)


@torch.no_grad()
def prior_anchor(encoder: nn.Module, x_ctrl: torch.Tensor, z_ctrl: torch.Tensor,
                 prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor cell X_ctrl + prior, its latent E(X_ctrl + prior)); the control itself without a prior.
    The latent's offset from z_ctrl joins the prompt, so an untrained transition reproduces the prior."""
    if prior is None:
        return x_ctrl, z_ctrl
    anchor_x = x_ctrl + prior.to(x_ctrl.dtype)
    return anchor_x, encoder(anchor_x).to(z_ctrl.dtype)


class ExpressionPrior(_LoadsOlderRuns, nn.Module):
    """A fixed expression-space prior for each condition (buffers only, fitted by the engine): the
    sum over its targets of each gene's effect,

        effect(g) = the observed mean change of g's own single condition in training, if any,
                    else m + w (G W e_g + b - m)
                         (e_g: g's row of G, or of `table_embedding` for genes of the prompt table
                          the screen does not measure; zero if none; m the mean change over the
                          training conditions; w the `linear_weight` the folds chose),
                         + v (k_g - m) when gene knowledge names g's neighbours among the observed
                         genes (k_g: their observed effects, weighted by similarity; v the
                         `knowledge_weight` the folds chose, w + v <= 1),
                         + u s C C_g / var_g for a measured target g: the genes that co-vary with g
                         across the training controls (C: their leading principal directions,
                         C C^T their covariance; var_g: g's variance) moved with g's knock-down s
                         as far as the regression slope on g says (u: the `covariation_weight`
                         the folds chose),
                    with the measured target itself set to `knockdown_scale` times `self_effect` s, the
                    median change of the training targets in their own conditions (a CRISPRi target
                    goes down, a CRISPRa one up, which a model of co-variation between genes cannot
                    know)

    where G W e + b is the linear gene-embedding model of Ahlmann-Eltze, Huber & Anders (2025),
    fitted on the training pseudo-bulk. On a screen of several cell types (`gan.prior_cell_types`)
    the changes above are each condition's change within each cell type, averaged over the types in
    the controls' proportions (so a condition's own cell-type mix does not pass for its effect), and
    a cell of type t adds, per target, `cell_type_change[t]`: how type t's change departs from
    that average over the training conditions (a line that responds more keeps doing so).
    """

    def __init__(self, n_genes: int, n_table: int, dim: int, n_observed: int = 0, n_neighbours: int = 0,
                 n_covariation: int = 0, n_cell_types: int = 0):
        super().__init__()
        self.register_buffer("embedding", torch.zeros(n_genes, dim))
        self.register_buffer("weight", torch.zeros(dim, dim))
        self.register_buffer("offset", torch.zeros(n_genes))
        self.register_buffer("table_embedding", torch.zeros(n_table, dim))
        self.register_buffer("observed_rows", torch.full((n_table,), -1, dtype=torch.long))
        self.register_buffer("observed", torch.zeros(n_observed, n_genes))
        self.register_buffer("self_effect", torch.zeros(()))
        self.register_buffer("mean_change", torch.zeros(n_genes))
        self.register_buffer("linear_weight", torch.ones(()))
        self.register_buffer("neighbour_rows", torch.full((n_table, n_neighbours), -1, dtype=torch.long))
        self.register_buffer("neighbour_weights", torch.zeros(n_table, n_neighbours))
        self.register_buffer("knowledge_weight", torch.zeros(()))
        self.register_buffer("covariation", torch.zeros(n_genes, n_covariation))
        self.register_buffer("covariation_precision", torch.zeros(n_genes))
        self.register_buffer("covariation_weight", torch.zeros(()))
        self.register_buffer("knockdown_scale", torch.ones(()))
        # the share of mean_change pooled over cells (`gan.prior_mean`): a record, mean_change holds it
        self.register_buffer("mean_pooling", torch.zeros(()))
        self.register_buffer("cell_type_change", torch.zeros(n_cell_types, n_genes))

    # Runs saved before a term existed: without it (as constructed), and the own entry s itself.
    LEGACY_BUFFERS = {**dict.fromkeys(("neighbour_rows", "neighbour_weights", "knowledge_weight", "covariation",
                                       "covariation_precision", "covariation_weight", "mean_pooling",
                                       "cell_type_change")),
                      "knockdown_scale": 1.0}

    def with_cell_type(self, prior: torch.Tensor, target_idx: torch.Tensor, prompt_idx: torch.Tensor,
                       cell_type: torch.Tensor | None) -> torch.Tensor:
        """`prior` [B, G] of cells of type `cell_type` [B] (-1: a type training did not see) plus,
        per target, that type's departure from the average change; `prior` itself on one cell type."""
        if cell_type is None or not len(self.cell_type_change):
            return prior
        n_targets = ((target_idx >= 0) | (prompt_idx >= 0)).sum(1, keepdim=True).to(prior.dtype)
        known = (cell_type >= 0).unsqueeze(1).to(prior.dtype)
        return prior + n_targets * known * self.cell_type_change[cell_type.clamp(min=0)].to(prior.dtype)

    def neighbour_effect(self, prompt_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(k [B, k, n_genes]: similarity-weighted observed effects of each target's knowledge
        neighbours, has [B, k, 1]: whether it has any), or None without knowledge neighbours."""
        if self.neighbour_rows.shape[1] == 0 or len(self.observed) == 0:
            return None
        row = prompt_idx.clamp(min=0)
        neighbours = self.neighbour_rows[row]
        weights = self.neighbour_weights[row] * (prompt_idx >= 0).unsqueeze(-1) * (neighbours >= 0)
        dense = torch.zeros((*prompt_idx.shape, len(self.observed)), dtype=weights.dtype, device=weights.device)
        dense.scatter_add_(-1, neighbours.clamp(min=0), weights)
        return dense @ self.observed, (weights.sum(-1, keepdim=True) > 0)

    def gene_embedding(self, target_idx: torch.Tensor, prompt_idx: torch.Tensor) -> torch.Tensor:
        """e [B, k, dim] of targets given as measured-gene indices and prompt-table positions (-1 = none)."""
        measured = target_idx >= 0
        e = self.embedding[target_idx.clamp(min=0)] * measured.unsqueeze(-1)
        if len(self.table_embedding):
            other = (prompt_idx >= 0) & ~measured
            e = e + self.table_embedding[prompt_idx.clamp(min=0)] * other.unsqueeze(-1)
        return e

    def forward(self, target_idx: torch.Tensor, prompt_idx: torch.Tensor,
                cell_type: torch.Tensor | None = None) -> torch.Tensor:
        """The prior change [B, n_genes] of each row's condition (in cells of `cell_type`, see
        `with_cell_type`)."""
        valid = (target_idx >= 0) | (prompt_idx >= 0)
        linear = (self.gene_embedding(target_idx, prompt_idx) @ self.weight.T) @ self.embedding.T + self.offset
        effect = self.mean_change + self.linear_weight * (linear - self.mean_change)
        neighbours = self.neighbour_effect(prompt_idx)
        if neighbours is not None:
            knn, has = neighbours
            effect = effect + self.knowledge_weight * (knn - self.mean_change) * has
        own = (target_idx >= 0).unsqueeze(-1)  # measured targets: the co-variation term and their own entry
        if self.covariation.shape[1]:
            gene = target_idx.clamp(min=0)
            slopes = (self.covariation[gene] * self.covariation_precision[gene].unsqueeze(-1)) @ self.covariation.T
            effect = effect + (self.covariation_weight * self.self_effect) * slopes * own
        column = target_idx.clamp(min=0).unsqueeze(-1)
        entry = (self.self_effect * self.knockdown_scale).to(effect.dtype)
        effect = effect.scatter(2, column, torch.where(own, entry, effect.gather(2, column)))
        if len(self.observed):
            rows = torch.where(prompt_idx >= 0, self.observed_rows[prompt_idx.clamp(min=0)], -1)
            effect = torch.where((rows >= 0).unsqueeze(-1), self.observed[rows.clamp(min=0)], effect)
        return self.with_cell_type((effect * valid.unsqueeze(-1)).sum(1), target_idx, prompt_idx, cell_type)
