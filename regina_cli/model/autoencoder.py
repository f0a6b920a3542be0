"""Phase 1 networks: tokenised Transformer encoder E, decoder D, latent classifier C, center loss.

A cell's expression vector is too wide for dense layers to be cheap, so it is cut into
`seq_len` tokens of `token_width = ceil(n_genes / seq_len)` genes each (zero-padded at the end)
and processed by pre-norm Transformer layers. The padding exists only inside these modules:
`Decoder.forward` removes it, so no loss or metric ever sees a padded position.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from regina_cli.config import ModelConfig


def token_width(n_genes: int, seq_len: int) -> int:
    """Genes per token: the expression vector is zero-padded to `seq_len * token_width`."""
    return math.ceil(n_genes / seq_len)


def _transformer(cfg: ModelConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model=cfg.d_model,
        nhead=cfg.n_heads,
        dim_feedforward=cfg.ff_mult * cfg.d_model,
        dropout=cfg.dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    # Pre-norm stacks end with one LayerNorm so the next projection sees normalised tokens.
    return nn.TransformerEncoder(
        layer, num_layers=cfg.n_layers, norm=nn.LayerNorm(cfg.d_model), enable_nested_tensor=False
    )


class Encoder(nn.Module):
    """E: expression [B, n_genes] -> latent z [B, z_dim] (LayerNorm-ed)."""

    def __init__(self, n_genes: int, cfg: ModelConfig):
        super().__init__()
        self.n_genes = n_genes
        self.seq_len = cfg.seq_len
        self.token_width = token_width(n_genes, cfg.seq_len)
        self.token_proj = nn.Linear(self.token_width, cfg.d_model)
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.seq_len, cfg.d_model) * 0.02)
        self.transformer = _transformer(cfg)
        self.to_latent = nn.Linear(cfg.seq_len * cfg.d_model, cfg.z_dim)
        self.latent_norm = nn.LayerNorm(cfg.z_dim)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad [B, n_genes] to [B, seq_len, token_width]."""
        pad = self.seq_len * self.token_width - self.n_genes
        return F.pad(x, (0, pad)).view(x.shape[0], self.seq_len, self.token_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.token_proj(self.tokens(x)) + self.pos_embedding
        h = self.transformer(h)
        return self.latent_norm(self.to_latent(h.flatten(1)))


class Decoder(nn.Module):
    """D: latent z [B, z_dim] -> expression [B, n_genes]; padded genes are cut off."""

    def __init__(self, n_genes: int, cfg: ModelConfig):
        super().__init__()
        self.n_genes = n_genes
        self.seq_len = cfg.seq_len
        self.d_model = cfg.d_model
        self.token_width = token_width(n_genes, cfg.seq_len)
        self.from_latent = nn.Linear(cfg.z_dim, cfg.seq_len * cfg.d_model)
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.seq_len, cfg.d_model) * 0.02)
        self.transformer = _transformer(cfg)
        self.token_out = nn.Linear(cfg.d_model, self.token_width)

    def forward_padded(self, z: torch.Tensor) -> torch.Tensor:
        """[B, seq_len * token_width], padding included (only for inspection and tests)."""
        h = self.from_latent(z).view(z.shape[0], self.seq_len, self.d_model) + self.pos_embedding
        return self.token_out(self.transformer(h)).flatten(1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_padded(z)[:, : self.n_genes]


class LatentClassifier(nn.Module):
    """C: spectral-normalised MLP z -> hidden -> classes (BatchNorm, LeakyReLU(0.2), dropout).

    Spectral normalisation bounds each layer's Lipschitz constant, so the classifier cannot
    reach a confident answer through a tiny move in latent space; the latent must carry the
    class information itself.
    """

    def __init__(self, z_dim: int, n_classes: int, cfg: ModelConfig):
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Linear(z_dim, cfg.classifier_hidden)),
            nn.BatchNorm1d(cfg.classifier_hidden),
            nn.LeakyReLU(0.2),
            nn.Dropout(cfg.classifier_dropout),
            spectral_norm(nn.Linear(cfg.classifier_hidden, n_classes)),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class CenterLoss(nn.Module):
    """L_CE: pulls each latent towards a learnable center of its class.

    The centers are ordinary parameters updated by the autoencoder's optimiser through the
    gradient of this loss: for class k that gradient is the mean offset of the class's latents
    from c_k, so the centers follow the class means (Wen et al. 2016's moving-average update,
    with the optimiser's learning rate as the rate). Keep them out of weight decay, which would
    pull them to the origin.

    The squared distance is divided by the batch's total latent variance (a Fisher-style ratio):
    plain distances could be shrunk to zero by scaling the whole latent down (the decoder would
    compensate), which clusters nothing. The ratio is small only when classes are compact
    *relative to* the spread between them, which is what the method asks for.
    """

    def __init__(self, n_classes: int, z_dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.zeros(n_classes, z_dim))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        within = (z - self.centers[labels]).pow(2).sum(1).mean()
        total = (z - z.mean(0, keepdim=True)).pow(2).sum(1).mean()
        return within / (total + 1e-6)


class Autoencoder(nn.Module):
    """Phase 1 model: `.encoder` (E), `.decoder` (D), `.classifier` (C), `.center_loss`."""

    def __init__(self, n_genes: int, n_classes: int, cfg: ModelConfig):
        super().__init__()
        self.n_genes = n_genes
        self.n_classes = n_classes
        self.encoder = Encoder(n_genes, cfg)
        self.decoder = Decoder(n_genes, cfg)
        self.classifier = LatentClassifier(cfg.z_dim, n_classes, cfg)
        self.center_loss = CenterLoss(n_classes, cfg.z_dim)

    @property
    def z_dim(self) -> int:
        return self.encoder.latent_norm.normalized_shape[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, x_rec) for a batch of cells."""
        z = self.encoder(x)
        return z, self.decoder(z)

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """Encoder, decoder and centers: what the L_AE optimiser updates."""
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.center_loss.parameters()]
