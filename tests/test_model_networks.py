"""Shapes, padding, spectral norm, the zero-initialised transition and the losses of the method."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from regina_cli.config import AEConfig, ModelConfig
from regina_cli.model.autoencoder import Autoencoder, token_width
from regina_cli.model.gan import LatentCycleGAN
from regina_cli.model.losses import (
    ae_losses, classifier_sg_loss, consistency_loss, cycle_loss, discriminator_loss, generator_loss,
)
from regina_cli.model.transition import TransitionBlock

N_GENES = 37  # not a multiple of seq_len: the last token is padded


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig(seq_len=4, d_model=16, n_layers=1, n_heads=2, z_dim=8, classifier_hidden=8,
                       transition_hidden=16, discriminator_hidden=[16, 8], dropout=0.0)


@pytest.fixture
def model(cfg) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(N_GENES, 3, cfg)


def test_shapes_and_padding_width(model, cfg):
    x = torch.randn(5, N_GENES)
    z, x_rec = model(x)
    assert token_width(N_GENES, cfg.seq_len) == 10
    assert z.shape == (5, cfg.z_dim) and x_rec.shape == (5, N_GENES)
    assert model.decoder.forward_padded(z).shape == (5, 40)
    assert model.classifier(z).shape == (5, 3)


def test_padding_never_reaches_the_losses(model, monkeypatch):
    """Garbage written into the decoder's padded outputs changes no loss term."""
    torch.manual_seed(1)
    x, labels = torch.randn(6, N_GENES), torch.randint(0, 3, (6,))
    model.eval()
    before = {k: v.item() for k, v in ae_losses(model, x, labels, AEConfig(lambda_cons=1.0)).logged().items()}
    original = model.decoder.forward_padded

    def garbage_padding(z):
        out = original(z).clone()
        out[:, N_GENES:] = 1e6
        return out

    monkeypatch.setattr(model.decoder, "forward_padded", garbage_padding)
    after = {k: v.item() for k, v in ae_losses(model, x, labels, AEConfig(lambda_cons=1.0)).logged().items()}
    assert "cons" in after  # a weighted term is logged
    assert after == pytest.approx(before, rel=1e-6)


def test_classifier_is_spectrally_normalised(model):
    linears = [m for m in model.classifier.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 and all(parametrize.is_parametrized(m, "weight") for m in linears)
    model.train()
    for _ in range(20):  # power iterations converge in training mode
        model.classifier(torch.randn(16, 8))
    for m in linears:
        assert torch.linalg.matrix_norm(m.weight.detach(), ord=2) == pytest.approx(1.0, abs=0.05)


def test_ae_terms_and_stop_gradient(model):
    x, labels = torch.randn(8, N_GENES), torch.randint(0, 3, (8,))
    out = ae_losses(model, x, labels, AEConfig())
    assert set(out.logged()) == {"total", "mse", "center", "reg", "clf"}
    t = out.terms
    weighted = 1.5 * t["mse"] + 0.5 * t["center"] + 1e-4 * t["reg"] + 1.0 * t["clf"]
    assert out.total.item() == pytest.approx(weighted.item(), rel=1e-6)
    model.zero_grad()
    classifier_sg_loss(model, out.extra["latent"], labels).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.classifier.parameters())
    out.total.backward()  # L_CLF reaches the encoder
    assert model.encoder.to_latent.weight.grad.abs().sum() > 0
    assert model.center_loss.centers.grad.abs().sum() > 0


def test_center_loss_is_scale_free_and_rewards_clusters(model):
    labels = torch.tensor([0, 0, 1, 1])
    centers = model.center_loss.centers
    with torch.no_grad():
        centers.zero_()
        centers[0] = -1.0
        centers[1] = 1.0
    clustered = torch.tensor([[-1.0] * 8, [-1.1] * 8, [1.0] * 8, [0.9] * 8])
    mixed = clustered[[0, 2, 1, 3]]
    assert model.center_loss(clustered, labels) < 0.1 < model.center_loss(mixed, labels)
    with torch.no_grad():  # shrinking latents and centers together cannot lower it
        loss = model.center_loss(clustered, labels).item()
        centers.mul_(0.01)
        assert model.center_loss(clustered * 0.01, labels).item() == pytest.approx(loss, rel=1e-2)


def test_consistency_loss_uses_first_prediction_as_soft_target(model):
    model.eval()
    z = model.encoder(torch.randn(4, N_GENES))
    probs = torch.softmax(model.classifier(z), -1)
    rec_logits = model.classifier(model.encoder(model.decoder(z)))
    expected = -(probs * torch.log_softmax(rec_logits, -1)).sum(-1).mean()
    assert consistency_loss(model, z).item() == pytest.approx(expected.item(), rel=1e-5)


def test_consistency_loss_moves_the_round_trip_towards_the_first_prediction_only(model):
    """With ae.lambda_cons > 0, L_cons trains the round trip C(E(D(z))) to agree with C(z), never
    C(z) towards the round trip: its soft target C(z) carries no gradient."""
    model.eval()
    z = model.encoder(torch.randn(4, N_GENES)).detach().requires_grad_()
    (ours,) = torch.autograd.grad(consistency_loss(model, z), z)
    target = torch.softmax(model.classifier(z), -1).detach()
    rec_logits = model.classifier(model.encoder(model.decoder(z)))
    (expected,) = torch.autograd.grad(-(target * torch.log_softmax(rec_logits, -1)).sum(-1).mean(), z)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_transition_starts_as_identity_plus_prompt(cfg):
    z, prompt = torch.randn(5, 8), torch.randn(5, 8)
    forward = TransitionBlock(8, cfg, direction=1)
    backward = TransitionBlock(8, cfg, direction=-1)
    assert torch.allclose(forward(z, prompt), z + prompt)
    assert torch.allclose(backward(forward(z, prompt), prompt), z, atol=1e-6)


def test_correction_scale_moves_predictions_between_the_anchor_and_the_transition(cfg):
    from regina_cli.config import build_config

    torch.manual_seed(0)
    gan = LatentCycleGAN(8, cfg)
    torch.nn.init.normal_(gan.forward_block.head.weight)  # a trained transition: not identity plus prompt
    z, prompt, anchor = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    full = gan(z, prompt)
    torch.testing.assert_close(gan.predict_latent(z, prompt, anchor), full)  # a fresh model keeps the whole move
    for scale in (0.0, 0.5):
        gan.correction_scale.fill_(scale)
        torch.testing.assert_close(gan.predict_latent(z, prompt, anchor), anchor + scale * (full - anchor))
    state = gan.state_dict()
    assert float(state["correction_scale"]) == 0.5  # saved with the weights, so `regina predict` uses it
    del state["correction_scale"]  # a run saved before the option existed predicts as it did then
    restored = LatentCycleGAN(8, cfg)
    restored.correction_scale.fill_(0.25)
    restored.load_state_dict(state)
    assert float(restored.correction_scale) == 1.0
    assert build_config(preset="original").gan.correction_scale == 1.0  # the first research code's T_fwd
    assert build_config().gan.correction_scale == 0.5


def test_gan_losses(cfg):
    torch.manual_seed(0)
    gan = LatentCycleGAN(8, cfg, prompt_genes=["U1", "U2"], learned_genes=["U1", "U2"])
    z_ctrl, z_pert, prompt = torch.randn(6, 8), torch.randn(6, 8) + 2, torch.randn(6, 8)
    assert cycle_loss(gan, z_ctrl, z_pert, prompt).item() < 1e-10  # exact inverses at init
    fake = gan(z_ctrl, prompt)
    l_d = discriminator_loss(gan.discriminator, z_pert, fake, prompt, real_target=0.9)
    real = gan.discriminator(z_pert, prompt)
    score = gan.discriminator(fake, prompt)
    expected = ((real - 0.9) ** 2).mean() + (score ** 2).mean()
    assert l_d.item() == pytest.approx(expected.item(), rel=1e-5)
    l_g = generator_loss(gan.discriminator, fake, prompt)
    assert l_g.item() == pytest.approx(((score - 1) ** 2).mean().item(), rel=1e-5)
    l_d.backward()
    assert all(p.grad is None for p in gan.forward_block.parameters())  # fake is detached in L_D
    noisy = discriminator_loss(gan.discriminator, z_pert, fake, prompt, noise_std=0.5,
                               generator=torch.Generator().manual_seed(0))
    assert noisy.item() != pytest.approx(l_d.item())


def test_residual_decoding_in_training_starts_from_the_prior_anchor(cfg, model):
    """With an expression prior, predict decodes anchor_x + D(T(z)) - D(anchor_z) (the control
    moved by the prior); training's L_pred must score that same prediction, not the one residual
    to the bare control, or phase 2 trains another model than the one that predicts."""
    from torch.nn import functional as F

    from regina_cli.config import GANConfig
    from regina_cli.model.losses import generator_losses

    torch.manual_seed(0)
    model.eval()
    gan = LatentCycleGAN(8, cfg, prompt_genes=["U1", "U2"], learned_genes=["U1", "U2"])
    z_ctrl, z_pert, prompt = torch.randn(6, 8), torch.randn(6, 8) + 1, torch.randn(6, 8)
    x_ctrl, x_pert = torch.randn(6, N_GENES), torch.randn(6, N_GENES)
    anchor_x = x_ctrl + torch.randn(6, N_GENES)  # the control plus the prior's change
    anchor_z = model.encoder(anchor_x).detach()
    out = generator_losses(gan, model.decoder, z_ctrl=z_ctrl, z_pert=z_pert, x_ctrl=x_ctrl, x_pert=x_pert,
                           prompt=prompt, anchor=(anchor_x, anchor_z),
                           cfg=GANConfig(lambda_moment=0.0, lambda_bulk=0.0, residual_decoding=True))
    with torch.no_grad():
        decode = model.decoder
        predicted = anchor_x + decode(gan.forward_block(z_ctrl, prompt)) - decode(anchor_z)
        expected = F.mse_loss(predicted, x_pert)
    assert out.terms["pred"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_gene_prompts_sum_learned_vectors_and_mapped_features(cfg):
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    gan = LatentCycleGAN(8, cfg, prompt_genes=["A", "B", "C"], gene_features=features, learned_genes=["C", "A"])
    prompts = gan.gene_prompts
    assert prompts.learned_genes == ["C", "A"] and prompts.learned.shape == (2, 8)
    idx = torch.tensor([[-1, -1], [0, -1], [0, 1], [2, -1]])
    out = gan.add_gene_prompts(torch.zeros(4, 8), idx)
    mapped = prompts.feature_map(features).detach()
    learned = prompts.learned.detach()
    assert torch.allclose(out[0], torch.zeros(8))
    assert torch.allclose(out[1], mapped[0] + learned[1], atol=1e-6)  # A: its feature map + its learned row
    assert torch.allclose(out[2], mapped[0] + learned[1] + mapped[1], atol=1e-6)  # B has no learned vector
    assert torch.allclose(out[3], mapped[2] + learned[0], atol=1e-6)
    hidden = gan.add_gene_prompts(torch.zeros(4, 8), idx, keep_learned=torch.zeros(4, 2, dtype=torch.bool))
    assert torch.allclose(hidden[3], mapped[2], atol=1e-6)  # prompt dropout hides the learned part only
    assert any(p is prompts.learned for p in gan.transition_parameters())
    assert any(p is prompts.feature_map.weight for p in gan.transition_parameters())
