"""The latent cycle-GAN of phase 2: two transition blocks, two discriminators, and prompt
embeddings for perturbed genes that the screen did not measure.

Two discriminators, one per domain (as in CycleGAN): `discriminator` judges perturbed latents
(real Z_pert vs T_fwd(Z_ctrl)), `control_discriminator` judges control latents (real Z_ctrl vs
T_bwd(Z_pert)). One shared network would see both real controls and real perturbed cells
labelled "real" under the same prompt, so T_fwd could pass by producing a control-like latent.

Unmeasured targets: the prompt E(X_ctrl) - E(X_fake) needs the target gene in the expression
vector. For a training perturbation whose target is not measured (Papalexi: 16 of 25 targets)
the prompt would be empty, so each such gene gets a learned latent vector that is added to the
prompt. A gene that is neither measured nor perturbed in training has neither and cannot be
predicted; `engine.predict` says so.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from regina_cli.config import ModelConfig
from regina_cli.model.discriminator import ConditionedDiscriminator
from regina_cli.model.transition import TransitionBlock


class LatentCycleGAN(nn.Module):
    def __init__(self, z_dim: int, cfg: ModelConfig, *, unmeasured_genes: Sequence[str] = ()):
        super().__init__()
        self.unmeasured_genes = list(unmeasured_genes)
        self.forward_block = TransitionBlock(z_dim, cfg, direction=1)
        self.backward_block = TransitionBlock(z_dim, cfg, direction=-1)
        self.discriminator = ConditionedDiscriminator(z_dim, cfg)
        self.control_discriminator = ConditionedDiscriminator(z_dim, cfg)
        self.unmeasured_embedding = nn.Parameter(torch.randn(len(self.unmeasured_genes), z_dim) * 0.01)

    def add_unmeasured(self, prompt: torch.Tensor, unmeasured_idx: torch.Tensor) -> torch.Tensor:
        """Prompt plus the summed embeddings of unmeasured targets ([B, k], -1 = none)."""
        if unmeasured_idx.numel() == 0 or len(self.unmeasured_genes) == 0:
            return prompt
        valid = (unmeasured_idx >= 0).unsqueeze(-1).to(prompt.dtype)
        table = self.unmeasured_embedding.to(prompt.dtype)
        return prompt + (table[unmeasured_idx.clamp(min=0)] * valid).sum(1)

    def forward(self, z_ctrl: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Predicted perturbed latent T_fwd(Z_ctrl, Z_prompt)."""
        return self.forward_block(z_ctrl, prompt)

    def transition_parameters(self) -> list[nn.Parameter]:
        """What the generator optimiser updates: both blocks and the unmeasured-gene prompts."""
        return [*self.forward_block.parameters(), *self.backward_block.parameters(),
                self.unmeasured_embedding]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [*self.discriminator.parameters(), *self.control_discriminator.parameters()]


def decode_with_residual(decoded: torch.Tensor, decoded_ctrl: torch.Tensor, x_ctrl: torch.Tensor) -> torch.Tensor:
    """Residual decoding, X_ctrl + D(T(z_ctrl)) - D(z_ctrl): the decoder's reconstruction error
    cancels and the control's own cell-to-cell variation is kept."""
    return x_ctrl + (decoded - decoded_ctrl).to(x_ctrl.dtype)


def decode_prediction(decoder: nn.Module, z_pred: torch.Tensor, *, x_ctrl: torch.Tensor,
                      z_ctrl: torch.Tensor, residual: bool) -> torch.Tensor:
    """Expression of a predicted perturbed latent: the method's D(T(z_ctrl)), or with `residual`
    the decoded change added to the real control cell (`decode_with_residual`)."""
    if not residual:
        return decoder(z_pred)
    decoded_pred, decoded_ctrl = decoder(torch.cat([z_pred, z_ctrl])).chunk(2)
    return decode_with_residual(decoded_pred, decoded_ctrl, x_ctrl)
