"""Perturbation prompts: X_fake scaling with the number of targets, padding, Z_ctrl - Z_fake."""

from __future__ import annotations

import torch

from regina_cli.model.prompt import build_prompt, fake_expression


def test_fake_expression_scales_with_number_of_targets():
    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    targets = torch.tensor([[1, -1, -1], [0, 3, -1], [2, -1, -1]])
    n_targets = torch.tensor([1, 2, 3])  # third row: two more targets that are not measured
    fake = fake_expression(x, targets, -1.0, n_targets)
    expected = x.clone()
    expected[0, 1] = -1.0
    expected[1, 0] = expected[1, 3] = -2.0
    expected[2, 2] = -3.0
    assert torch.equal(fake, expected)
    assert torch.equal(x, torch.arange(12, dtype=torch.float32).view(3, 4))  # control untouched
    default = fake_expression(x, targets, 0.5)  # n_targets defaults to the measured ones
    assert default[1, 0] == 1.0 and default[2, 2] == 0.5


def test_prompt_is_control_latent_minus_fake_latent():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    x = torch.rand(5, 4)
    targets = torch.tensor([[0, -1]] * 3 + [[1, 2]] * 2)
    prompt = build_prompt(encoder, x, targets, -1.0)
    expected = encoder(x) - encoder(fake_expression(x, targets, -1.0))
    assert torch.allclose(prompt, expected, atol=1e-6)
    assert torch.allclose(build_prompt(encoder, x, targets, -1.0, z_ctrl=encoder(x)), expected, atol=1e-6)
    no_targets = build_prompt(encoder, x, torch.full((5, 2), -1), -1.0)
    assert torch.equal(no_targets, torch.zeros(5, 3))
