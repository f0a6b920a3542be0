"""A trained run, loaded for prediction: the phase-1 autoencoder, the phase-2 cycle-GAN with
its fine-tuned decoder, the metadata and the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from regina_cli.config import ReginaConfig
from regina_cli.engine import checkpoint as ckpt
from regina_cli.devices import resolve_device
from regina_cli.engine.run_meta import RunMeta, read_trained_meta


@dataclass
class TrainedRun:
    run_dir: Path
    autoencoder: torch.nn.Module
    gan: torch.nn.Module | None
    meta: RunMeta  # phase 2's when trained (it repeats phase 1's fields), else phase 1's
    config: ReginaConfig
    device: torch.device

    def __repr__(self) -> str:
        """One line: a notebook cell would print the networks, metadata and config whole."""
        phases = "ae, gan" if self.gan is not None else "ae"
        return (f"TrainedRun(run_dir={str(self.run_dir)!r}, dataset={self.meta.dataset!r}, split={self.meta.split!r}, "
                f"phases={phases!r}, device={str(self.device)!r})")


def load_trained(run_dir: str | Path, *, device: str = "auto") -> TrainedRun:
    """Load the best weights of `run_dir` in eval mode. The decoder is phase 2's when phase 2
    was trained (it keeps training there), else phase 1's; `.gan` is None without phase 2. A
    phase that was interrupted is refused (its `model.pt` is an intermediate best)."""
    from regina_cli.model.autoencoder import Autoencoder
    from regina_cli.engine.train_gan import prior_covariation, prior_dim, prior_neighbours
    from regina_cli.model.gan import LatentCycleGAN

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    ae_paths, gan_paths = ckpt.ae_paths(run_dir), ckpt.gan_paths(run_dir)
    meta = read_trained_meta(ae_paths)
    config = ckpt.read_config(ae_paths)
    autoencoder = Autoencoder(len(meta.gene_names), len(meta.label_classes), config.model)
    autoencoder.load_state_dict(ckpt.load_torch(ae_paths.model))
    gan = None
    if gan_paths.meta.is_file():
        meta = read_trained_meta(gan_paths)
        config = ckpt.read_config(gan_paths)
        genes = meta.prompt_genes or []
        features = torch.zeros(len(genes), config.gan.gene_feature_dim if config.gan.gene_features != "none" else 0)
        gan = LatentCycleGAN(autoencoder.z_dim, config.model, prompt_genes=genes, gene_features=features,
                             learned_genes=meta.learned_genes or [], n_genes=len(meta.gene_names),
                             prior_dim=prior_dim(config), prior_observed=len(meta.prior_observed_genes or []),
                             prior_neighbours=prior_neighbours(config, bool(meta.gene_knowledge)),
                             prior_covariation=prior_covariation(config),
                             prior_cell_types=len(meta.prior_cell_types or []))
        container = torch.nn.ModuleDict({"gan": gan, "decoder": autoencoder.decoder})
        container.load_state_dict(ckpt.load_torch(gan_paths.model))
        gan.to(dev).eval()
    autoencoder.to(dev).eval()
    return TrainedRun(run_dir, autoencoder, gan, meta, config, dev)
