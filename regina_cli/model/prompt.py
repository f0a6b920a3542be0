"""Perturbation prompts (method: "Prompt-Based Conditioning for Unseen Perturbations").

X_fake is a copy of the control cell in which every targeted gene is set to
`value * n_targets` (the method: with several targets "the assigned value is also going to be
multiplied with that amount"); Z_prompt = E(X_ctrl) - E(X_fake). Vectorised over a batch: the
targets of each row come as a padded index tensor, -1 marking no (or an unmeasured) gene.
"""

from __future__ import annotations

import torch


def fake_expression(x_ctrl: torch.Tensor, target_idx: torch.Tensor, value: float,
                    n_targets: torch.Tensor | None = None) -> torch.Tensor:
    """X_fake: `x_ctrl` [B, G] with the genes in `target_idx` [B, k] set to value * n_targets.

    `n_targets` [B] counts every target of the condition, measured or not; by default the
    measured ones (the non-negative entries of `target_idx`).
    """
    valid = target_idx >= 0
    if n_targets is None:
        n_targets = valid.sum(1)
    # Scatter into one spare column that absorbs the -1 (no target) entries: no boolean
    # indexing, so no device-to-host sync inside the training step.
    n_genes = x_ctrl.shape[1]
    x_fake = torch.nn.functional.pad(x_ctrl, (0, 1))
    columns = torch.where(valid, target_idx, n_genes)
    values = (value * n_targets.to(x_ctrl.dtype)).unsqueeze(1).expand_as(columns)
    x_fake.scatter_(1, columns, values.to(x_fake.dtype))
    return x_fake[:, :n_genes]


def build_prompt(encoder, x_ctrl: torch.Tensor, target_idx: torch.Tensor, value: float, *,
                 n_targets: torch.Tensor | None = None, z_ctrl: torch.Tensor | None = None) -> torch.Tensor:
    """Z_prompt = E(X_ctrl) - E(X_fake) for a batch; pass `z_ctrl` if already encoded."""
    x_fake = fake_expression(x_ctrl, target_idx, value, n_targets)
    if z_ctrl is None:
        z_both = encoder(torch.cat([x_ctrl, x_fake]))
        z_ctrl, z_fake = z_both[: len(x_ctrl)], z_both[len(x_ctrl):]
    else:
        z_fake = encoder(x_fake)
    return z_ctrl - z_fake


def condition_prompt(encoder, gan, x_ctrl: torch.Tensor, target_idx: torch.Tensor,
                     unmeasured_idx: torch.Tensor, n_targets: torch.Tensor, value: float, *,
                     z_ctrl: torch.Tensor | None = None) -> torch.Tensor:
    """The full prompt the transition sees: the measured-gene prompt E(X_ctrl) - E(X_fake)
    (the encoder is frozen in phase 2, so no gradient flows into it) plus the learned embeddings
    of unmeasured targets (which do train)."""
    with torch.no_grad():
        prompt = build_prompt(encoder, x_ctrl, target_idx, value, n_targets=n_targets, z_ctrl=z_ctrl)
    return gan.add_unmeasured(prompt, unmeasured_idx)
