"""Perturbation prompts (method: "Prompt-Based Conditioning for Unseen Perturbations").

X_fake is a copy of the control cell in which every targeted gene is set to
`value * n_targets` (the method: with several targets "the assigned value is also going to be
multiplied with that amount"); Z_prompt = E(X_ctrl) - E(X_fake) as the method writes it, or
E(X_fake) - E(X_ctrl) (`gan.prompt_sign = perturbation`: from the control towards X_fake, the
sign the first research code ran). The value's sign follows `gan.modality`: silenced targets
(negative) for interference and knockout, raised ones (positive) for activation. Vectorised over
a batch: the targets of each row come as a padded index tensor, -1 marking no (or an unmeasured)
gene. The full prompt adds the gene prompts of `model.gan.GenePrompts`.
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


def fake_value(cfg) -> float:
    """The value X_fake's targets get (`gan.prompt_value`, its sign set by `gan.modality`)."""
    if cfg.modality in ("interference", "knockout"):
        return -abs(cfg.prompt_value)
    if cfg.modality == "activation":
        return abs(cfg.prompt_value)
    return cfg.prompt_value


def build_prompt(encoder, x_ctrl: torch.Tensor, target_idx: torch.Tensor, value: float, *,
                 n_targets: torch.Tensor | None = None, z_ctrl: torch.Tensor | None = None,
                 sign: str = "method") -> torch.Tensor:
    """Z_prompt = E(X_ctrl) - E(X_fake) for a batch (`sign="perturbation"`: the negative);
    pass `z_ctrl` if already encoded."""
    x_fake = fake_expression(x_ctrl, target_idx, value, n_targets)
    if z_ctrl is None:
        z_both = encoder(torch.cat([x_ctrl, x_fake]))
        z_ctrl, z_fake = z_both[: len(x_ctrl)], z_both[len(x_ctrl):]
    else:
        z_fake = encoder(x_fake)
    return z_fake - z_ctrl if sign == "perturbation" else z_ctrl - z_fake


def condition_prompt(encoder, gan, x_ctrl: torch.Tensor, target_idx: torch.Tensor, prompt_idx: torch.Tensor,
                     n_targets: torch.Tensor, cfg, *, z_ctrl: torch.Tensor | None = None,
                     keep_learned: torch.Tensor | None = None, anchor_z: torch.Tensor | None = None) -> torch.Tensor:
    """The full prompt the transition sees: the encoder prompt (the encoder is frozen in phase 2,
    so no gradient flows into it), times the GAN's `encoder_prompt_scale`, plus the gene prompts
    of the targets (which train), plus, with an expression prior, the prior's latent offset
    `anchor_z - z_ctrl` (`model.gan.prior_anchor`). `cfg` is the run's `GANConfig`."""
    with torch.no_grad():
        prompt = build_prompt(encoder, x_ctrl, target_idx, fake_value(cfg), n_targets=n_targets, z_ctrl=z_ctrl,
                              sign=cfg.prompt_sign)
        prompt = prompt * gan.encoder_prompt_scale.to(prompt.dtype)
        if anchor_z is not None and z_ctrl is not None and anchor_z is not z_ctrl:
            prompt = prompt + (anchor_z - z_ctrl).to(prompt.dtype)
    return gan.add_gene_prompts(prompt, prompt_idx, keep_learned)
