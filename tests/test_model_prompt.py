"""Perturbation prompts: X_fake scaling with the number of targets, padding, Z_ctrl - Z_fake."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from regina_cli.model.prompt import build_prompt, condition_prompt, fake_expression, fake_value


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


@pytest.mark.parametrize("modality, value, expected", [
    ("interference", 1.5, -1.5), ("knockout", 1.5, -1.5), ("interference", -1.5, -1.5),
    ("activation", -1.5, 1.5), ("activation", 1.5, 1.5), ("as_given", 1.5, 1.5), ("as_given", -1.5, -1.5),
])
def test_fake_value_sign_follows_the_modality(modality, value, expected):
    """A CRISPRi or knockout screen lowers its targets, an activation screen raises them, whatever
    sign gan.prompt_value was written with; as_given keeps it."""
    assert fake_value(SimpleNamespace(modality=modality, prompt_value=value)) == expected


def test_perturbation_sign_is_the_fake_latent_minus_the_control_latent():
    """gan.prompt_sign = perturbation (the default) points the prompt the way the perturbation
    moves the latent: Z_fake - Z_ctrl, the method's prompt negated."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    x, targets = torch.rand(5, 4), torch.tensor([[0, -1]] * 3 + [[1, 2]] * 2)
    method = build_prompt(encoder, x, targets, -1.0, sign="method")
    perturbation = build_prompt(encoder, x, targets, -1.0, sign="perturbation")
    assert torch.allclose(perturbation, encoder(fake_expression(x, targets, -1.0)) - encoder(x), atol=1e-6)
    assert torch.allclose(perturbation, -method, atol=1e-6) and method.abs().sum() > 0


class _Gan:
    """The parts of model.gan the prompt reads: the encoder prompt's scale, gene prompts (none)."""

    encoder_prompt_scale = torch.tensor(2.0)

    def add_gene_prompts(self, prompt, prompt_idx, keep_learned):
        return prompt


def test_condition_prompt_scales_the_encoder_prompt_and_adds_the_priors_latent_offset():
    """The transition's prompt: encoder prompt x encoder_prompt_scale, plus anchor_z - z_ctrl (the
    latent offset of the expression prior), so a prior that raises genes points the same way."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    x, targets = torch.rand(5, 4), torch.tensor([[0, -1]] * 5)
    z_ctrl = encoder(x).detach()
    anchor_z = z_ctrl + torch.tensor([0.5, -1.0, 2.0])
    cfg = SimpleNamespace(modality="interference", prompt_value=1.0, prompt_sign="perturbation")
    got = condition_prompt(encoder, _Gan(), x, targets, None, torch.ones(5, dtype=torch.long), cfg,
                           z_ctrl=z_ctrl, anchor_z=anchor_z)
    encoder_prompt = build_prompt(encoder, x, targets, -1.0, z_ctrl=z_ctrl, sign="perturbation")
    torch.testing.assert_close(got, 2.0 * encoder_prompt + torch.tensor([0.5, -1.0, 2.0]))
