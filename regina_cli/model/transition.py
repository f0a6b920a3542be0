"""Phase 2 transition blocks T_fwd and T_bwd: prompt-conditioned maps between latent domains.

Shape from the original implementation: latent and prompt each projected with LeakyReLU and
summed, residual blocks (Linear-LayerNorm-LeakyReLU-Linear-LayerNorm), a zero-initialised
output head whose output is added to the prompt; that sum is the latent delta.

The same prompt drives both directions (the method). The forward block adds the prompt
(`direction=+1`: Z_pert = Z_ctrl + prompt + head) and the backward block subtracts it
(`direction=-1`: Z_ctrl = Z_pert - prompt + head), so at initialisation the two are exact
inverses and the cycle loss starts at zero; training then learns the corrections.
"""

from __future__ import annotations

import torch
from torch import nn

from regina_cli.config import ModelConfig


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, width), nn.LayerNorm(width), nn.LeakyReLU(0.2),
            nn.Linear(width, width), nn.LayerNorm(width),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h)


class TransitionBlock(nn.Module):
    """T(z, prompt) = z + direction * prompt + head(...); head starts at zero."""

    def __init__(self, z_dim: int, cfg: ModelConfig, *, direction: int = 1):
        super().__init__()
        if direction not in (1, -1):
            raise ValueError("direction is +1 (forward) or -1 (backward)")
        self.direction = direction
        width = cfg.transition_hidden
        self.latent_in = nn.Sequential(nn.Linear(z_dim, width), nn.LeakyReLU(0.2))
        self.prompt_in = nn.Sequential(nn.Linear(z_dim, width), nn.LeakyReLU(0.2))
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(cfg.transition_blocks)])
        self.head = nn.Linear(width, z_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def delta(self, z: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.latent_in(z) + self.prompt_in(prompt))
        return self.head(h) + self.direction * prompt

    def forward(self, z: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        return z + self.delta(z, prompt)
