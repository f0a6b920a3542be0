"""What phase 2 knows about each condition before it trains, from the cached latents and cells.

Per condition (all codes of `CellTensors`): the mean and spread of its real latents, its mean
expression (pseudo-bulk) and its mean latent shift from the controls, computed over the cells
phase 2 trains on. These are the targets of the per-condition moment and pseudo-bulk terms, the
starting point of the learned gene prompts, and the reference of the collapse diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 4096


@dataclass
class ConditionStats:
    """Per condition code c (rows), on the training device; rows of conditions without cells
    in `index` are zero with `counts[c] == 0`."""

    counts: torch.Tensor  # [C]
    latent_mean: torch.Tensor  # [C, z]
    latent_std: torch.Tensor  # [C, z]
    expression_mean: torch.Tensor  # [C, G]
    control_latent_mean: torch.Tensor  # [z]: mean latent of the training controls

    @property
    def latent_shift(self) -> torch.Tensor:
        """[C, z]: mean latent of each condition minus the training controls' mean latent."""
        return self.latent_mean - self.control_latent_mean


def expression_sums(cells, rows: torch.Tensor, keys: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[n_keys, G] float64 sums of the expression of cells `rows`, each cell added to the row its
    key gives (`keys`: one per cell of `cells`), read in chunks of CHUNK cells."""
    sums = torch.zeros((n_keys, cells.n_genes), dtype=torch.float64, device=cells.device)
    for chunk, x in cells.batches(rows, CHUNK, shuffle=False):
        sums.index_add_(0, keys[chunk], x.double())
    return sums


def condition_stats(cells, latents: torch.Tensor, index: torch.Tensor) -> ConditionStats:
    """Statistics of the cells `index` grouped by condition (plus the training controls)."""
    n_codes, dev = len(cells.conditions), cells.device
    codes = cells.condition_codes[index]
    counts = torch.zeros(n_codes, dtype=torch.float64, device=dev).index_add_(
        0, codes, torch.ones(len(index), dtype=torch.float64, device=dev))
    z = latents[index].double()
    z_sum = torch.zeros((n_codes, z.shape[1]), dtype=torch.float64, device=dev).index_add_(0, codes, z)
    z_sq = torch.zeros_like(z_sum).index_add_(0, codes, z * z)
    x_sum = expression_sums(cells, index, cells.condition_codes, n_codes)
    n = counts.clamp_min(1).unsqueeze(1)
    mean = z_sum / n
    std = (z_sq / n - mean * mean).clamp_min(0).sqrt()
    controls = cells.train_idx[cells.is_control[cells.train_idx]]
    return ConditionStats(counts=counts.float(), latent_mean=mean.float(), latent_std=std.float(),
                          expression_mean=(x_sum / n).float(),
                          control_latent_mean=latents[controls].double().mean(0).float())
