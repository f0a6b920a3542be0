"""Latent discriminator conditioned on the perturbation through its prompt."""

from __future__ import annotations

import torch
from torch import nn

from regina_cli.config import ModelConfig


class ConditionedDiscriminator(nn.Module):
    """D(z, prompt) -> score [B]: MLP on [z, prompt] with LeakyReLU(0.2), linear output.

    Conditioning on the prompt (not on a perturbation index) lets the same discriminator judge
    perturbations never seen in training. Scores are unbounded: the losses are least squares.
    """

    def __init__(self, z_dim: int, cfg: ModelConfig):
        super().__init__()
        widths = [2 * z_dim, *cfg.discriminator_hidden]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.LeakyReLU(0.2)]
        layers.append(nn.Linear(widths[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, prompt.to(z.dtype)], dim=-1)).squeeze(-1)
