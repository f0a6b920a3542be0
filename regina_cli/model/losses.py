"""Every loss of the method, named as in `REGINA_method.md`; pure functions of tensors.

Each phase's objective returns a `LossOutput`: the total to back-propagate and its named,
unweighted terms, so the training loop and the logger never depend on how the model computes
them. A term named `x` is weighted by the config key `lambda_x` of its phase: adding a loss is
one function here, one entry in its phase's objective, and one config weight. Reconstruction is
compared on the unpadded gene vector only (`Decoder.forward` cuts the padding), so padding is in
no loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from regina_cli.config import AEConfig, GANConfig
from regina_cli.model.autoencoder import Autoencoder
from regina_cli.model.gan import decode_with_residual


@dataclass
class LossOutput:
    """One step's objective: `total`, its named unweighted `terms` (logged), and `extra` tensors
    the step reuses without logging them (phase 1: the latent and the classifier logits)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def logged(self) -> dict[str, torch.Tensor]:
        """`total` and every term, detached: what the training loop accumulates."""
        return {name: value.detach() for name, value in {"total": self.total, **self.terms}.items()}


def weighted_total(terms: dict[str, torch.Tensor], section) -> torch.Tensor:
    """sum of `lambda_<name> * term` over the terms, in their order."""
    total = None
    for name, value in terms.items():
        weighted = getattr(section, f"lambda_{name}") * value
        total = weighted if total is None else total + weighted
    return total


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L_MSE over the real genes (both tensors unpadded, [B, n_genes])."""
    return F.mse_loss(x_rec.float(), x.float())


def latent_regulariser(z: torch.Tensor) -> torch.Tensor:
    """L_reg: mean squared latent (L2).

    LayerNorm fixes each latent's scale only up to its learnable gain and bias, and no other
    term pins those (the decoder can absorb any scale, and L_CE is scale-free). A small L2
    keeps the latent bounded, which keeps gradients through the decoder steady and gives
    phase 2 a latent distribution that does not drift.
    """
    return z.float().pow(2).mean()


def classification_loss(model: Autoencoder, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_CLF = CE(C(E(X)), c) with gradients into encoder and classifier; returns (loss, logits)."""
    logits = model.classifier(z)
    return F.cross_entropy(logits.float(), labels), logits


def classifier_sg_loss(model: Autoencoder, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_sg = CE(C(sg[E(X)]), c): trains the classifier only; the encoder gets no gradient."""
    return F.cross_entropy(model.classifier(z.detach()).float(), labels)


def consistency_loss(model: Autoencoder, z: torch.Tensor) -> torch.Tensor:
    """L_cons = CE(C(z), C(E(D(z)))): the class prediction must survive decode + re-encode.

    C(z) is the (soft, detached) target and C(z_rec) the prediction, so the term asks the
    round trip to agree with the original latent, never the other way round. It includes the
    target's entropy, so its absolute value is not zero at perfect consistency; the trend is
    what early stopping watches.
    """
    target = F.softmax(model.classifier(z).float(), dim=-1).detach()
    z_rec = model.encoder(model.decoder(z))
    return F.cross_entropy(model.classifier(z_rec).float(), target)


def ae_losses(model: Autoencoder, x: torch.Tensor, labels: torch.Tensor, cfg: AEConfig) -> LossOutput:
    """L_AE = l_mse L_MSE + l_center L_CE + l_reg L_reg + l_clf L_CLF (+ l_cons L_cons if > 0).

    `extra["latent"]` is E(X) with its graph (the classifier's L_sg step uses it detached, so it
    needs no second encoder pass) and `extra["logits"]` is C(E(X)).
    """
    z = model.encoder(x)
    terms = {"mse": reconstruction_loss(model.decoder(z), x), "center": model.center_loss(z.float(), labels),
             "reg": latent_regulariser(z)}
    terms["clf"], logits = classification_loss(model, z, labels)
    if cfg.lambda_cons > 0:
        terms["cons"] = consistency_loss(model, z)
    return LossOutput(weighted_total(terms, cfg), terms, {"latent": z, "logits": logits})


# --- Phase 2 -----------------------------------------------------------------------------------
def _with_noise(z: torch.Tensor, noise_std: float, generator: torch.Generator | None) -> torch.Tensor:
    if noise_std <= 0:
        return z
    noise = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
    return z + noise_std * noise


def discriminator_loss(
    discriminator,
    z_real: torch.Tensor,
    z_fake: torch.Tensor,
    prompt: torch.Tensor,
    *,
    real_target: float = 1.0,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L_D = MSE(D(Z_real, p), real_target) + MSE(D(T(Z), p), 0) (least squares).

    `z_fake` is detached here (this step trains the discriminator only). `real_target` < 1 is
    one-sided label smoothing; `noise_std` adds instance noise to both inputs' latents.
    """
    real = discriminator(_with_noise(z_real, noise_std, generator), prompt).float()
    fake = discriminator(_with_noise(z_fake.detach(), noise_std, generator), prompt).float()
    return F.mse_loss(real, torch.full_like(real, real_target)) + F.mse_loss(fake, torch.zeros_like(fake))


def generator_loss(
    discriminator,
    z_fake: torch.Tensor,
    prompt: torch.Tensor,
    *,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L_G = MSE(D(T(Z), p), 1): the transition tries to be judged real."""
    score = discriminator(_with_noise(z_fake, noise_std, generator), prompt).float()
    return F.mse_loss(score, torch.ones_like(score))


def cycle_loss(
    gan,
    z_ctrl: torch.Tensor,
    z_pert: torch.Tensor,
    prompt: torch.Tensor,
    *,
    fake_pert: torch.Tensor | None = None,
    fake_ctrl: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_cycle = MSE(Z_ctrl, T_bwd(T_fwd(Z_ctrl))) + MSE(Z_pert, T_fwd(T_bwd(Z_pert))).

    One prompt per control/perturbed pair, the same for both directions (the method). Pass
    `fake_pert = T_fwd(z_ctrl)` and `fake_ctrl = T_bwd(z_pert)` when the loop already has
    them (for L_G) to skip recomputing them.
    """
    fake_pert = gan.forward_block(z_ctrl, prompt) if fake_pert is None else fake_pert
    fake_ctrl = gan.backward_block(z_pert, prompt) if fake_ctrl is None else fake_ctrl
    ctrl_cycle = gan.backward_block(fake_pert, prompt)
    pert_cycle = gan.forward_block(fake_ctrl, prompt)
    return F.mse_loss(ctrl_cycle.float(), z_ctrl.float()) + F.mse_loss(pert_cycle.float(), z_pert.float())


def per_condition_means(values: torch.Tensor, codes: torch.Tensor, n_codes: int):
    """(count [C], mean [C, D]) of `values` [B, D] grouped by condition code, with scatter sums
    on the device (no host sync); empty codes have count 0 and mean 0."""
    ones = torch.ones(len(codes), dtype=values.dtype, device=values.device)
    count = torch.zeros(n_codes, dtype=values.dtype, device=values.device).index_add_(0, codes, ones)
    total = torch.zeros((n_codes, values.shape[1]), dtype=values.dtype, device=values.device).index_add_(0, codes, values)
    return count, total / count.clamp_min(1).unsqueeze(1)


def per_condition_moments(values: torch.Tensor, codes: torch.Tensor, n_codes: int):
    """(count [C], mean [C, D], variance [C, D]): `per_condition_means` and the spread around them."""
    count, mean = per_condition_means(values, codes, n_codes)
    squares = torch.zeros_like(mean).index_add_(0, codes, values * values)
    return count, mean, (squares / count.clamp_min(1).unsqueeze(1) - mean * mean).clamp_min(0)


def _masked_mean(per_code: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_code.dtype)
    return (per_code * mask).sum() / mask.sum().clamp_min(1)


def moment_loss(fake_pert: torch.Tensor, codes: torch.Tensor, latent_mean: torch.Tensor,
                latent_std: torch.Tensor) -> torch.Tensor:
    """Per-condition latent moment matching: the mean (and, for conditions with two or more cells
    in the batch, the per-dimension spread) of T_fwd(z_ctrl) over a condition's cells against its
    real perturbed latents. Needs no control/perturbed pairing, only the condition label."""
    count, mean, var = per_condition_moments(fake_pert.float(), codes, len(latent_mean))
    mean_error = (mean - latent_mean).pow(2).mean(1)
    std_error = ((var + 1e-6).sqrt() - latent_std).pow(2).mean(1)
    return _masked_mean(mean_error, count > 0) + _masked_mean(std_error, count > 1)


def bulk_loss(predicted: torch.Tensor, codes: torch.Tensor, expression_mean: torch.Tensor) -> torch.Tensor:
    """Per-condition pseudo-bulk matching: the mean decoded prediction of a condition's cells in
    the batch against the mean expression of all its real cells (what `pearson_delta` scores)."""
    count, mean = per_condition_means(predicted.float(), codes, len(expression_mean))
    return _masked_mean((mean - expression_mean).pow(2).mean(1), count > 0)


def generator_losses(gan, decoder, *, z_ctrl: torch.Tensor, z_pert: torch.Tensor, x_ctrl: torch.Tensor,
                     x_pert: torch.Tensor, prompt: torch.Tensor, cfg: GANConfig, noise_std: float = 0.0,
                     generator: torch.Generator | None = None, codes: torch.Tensor | None = None,
                     stats=None, anchor: tuple[torch.Tensor, torch.Tensor] | None = None) -> LossOutput:
    """The transitions' (and decoder's) phase-2 objective for a batch of random control/perturbed pairs:

      cycle  = L_cycle
      adv    = L_G(fwd) + L_G(bwd), each against its domain's conditioned discriminator
      anchor = MSE(D(z_ctrl), X_ctrl) + MSE(D(z_pert), X_pert)   (the decoder keeps decoding real cells)
      pred   = MSE(D(T_fwd(z_ctrl)), X_pert)                     (residual-decoded when configured)
      moment = `moment_loss` (when gan.lambda_moment > 0; needs `codes` and `stats`)
      bulk   = `bulk_loss` of the decoded predictions (when gan.lambda_bulk > 0)

    `stats` is the run's `engine.condition_stats.ConditionStats`; `anchor` the (cell, latent) that
    residual decoding starts from (`model.gan.prior_anchor`; default the control). `extra` holds T_fwd(z_ctrl)
    and T_bwd(z_pert) for the discriminator step. The discriminators must be frozen by the
    caller (their parameters get no gradient from L_G).
    """
    fake_pert = gan.forward_block(z_ctrl, prompt)
    fake_ctrl = gan.backward_block(z_pert, prompt)
    noise = dict(noise_std=noise_std, generator=generator)
    adv = (generator_loss(gan.discriminator, fake_pert, prompt, **noise)
           + generator_loss(gan.control_discriminator, fake_ctrl, prompt, **noise))
    cycle = cycle_loss(gan, z_ctrl, z_pert, prompt, fake_pert=fake_pert, fake_ctrl=fake_ctrl)
    anchored = anchor is not None and anchor[1] is not z_ctrl
    latents = [z_ctrl, z_pert, fake_pert] + ([anchor[1]] if anchored else [])
    decoded = decoder(torch.cat(latents)).float().chunk(len(latents))
    rec_ctrl, rec_pert, pred = decoded[:3]
    if cfg.residual_decoding:
        pred = decode_with_residual(pred, decoded[3], anchor[0]) if anchored else decode_with_residual(pred, rec_ctrl, x_ctrl)
    terms = {"cycle": cycle, "adv": adv,
             "anchor": F.mse_loss(rec_ctrl, x_ctrl) + F.mse_loss(rec_pert, x_pert),
             "pred": F.mse_loss(pred, x_pert)}
    if cfg.lambda_moment > 0:
        terms["moment"] = moment_loss(fake_pert, codes, stats.latent_mean, stats.latent_std)
    if cfg.lambda_bulk > 0:
        terms["bulk"] = bulk_loss(pred, codes, stats.expression_mean)
    return LossOutput(weighted_total(terms, cfg), terms, {"fake_pert": fake_pert, "fake_ctrl": fake_ctrl})


def discriminator_losses(gan, *, z_ctrl: torch.Tensor, z_pert: torch.Tensor, fake_pert: torch.Tensor,
                         fake_ctrl: torch.Tensor, prompt: torch.Tensor, cfg: GANConfig, noise_std: float = 0.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """L_D of both conditioned discriminators: real perturbed vs T_fwd(z_ctrl), real control vs T_bwd(z_pert)."""
    noise = dict(real_target=cfg.real_target, noise_std=noise_std, generator=generator)
    return (discriminator_loss(gan.discriminator, z_pert, fake_pert.detach(), prompt, **noise)
            + discriminator_loss(gan.control_discriminator, z_ctrl, fake_ctrl.detach(), prompt, **noise))
