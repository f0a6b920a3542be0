"""Refactors must not change what training computes.

Both phases train 2 epochs on a small fixed screen with a fixed seed on CPU, and the SHA-256 of
the resulting weights must equal the one recorded from the code before the engine refactor
(issue 8). The screen is generated here with its own seeded generator, not by the demo
simulator, so that changes to the simulator do not move the reference. The config pins every
setting that shapes training, so a later change of a default does not move it either.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from regina_cli import keys
from regina_cli.config import build_config
from regina_cli.engine import checkpoint as ckpt

# Recorded from commit bef88b5 (before the engine refactor) with this file's data and config.
AE_WEIGHTS_SHA256 = "e3ca47555486e3e94990b630a66d6709420f2c0313fa71efea6ce1c7442e92d7"
GAN_WEIGHTS_SHA256 = "db45de0c3482285d128c1511e6d74f7ed81bc9c46523d1e675d669d399fc6d6e"

SETTINGS = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.z_dim=16", "model.ff_mult=2",
            "model.classifier_hidden=16", "model.transition_hidden=32", "model.discriminator_hidden=[32,16]",
            "ae.batch_size=32", "ae.lr=0.003", "ae.max_epochs=2", "gan.batch_size=32", "gan.max_epochs=2",
            "gan.discriminator_every=2", "gan.lambda_adv=0.5", "gan.lambda_pred=5.0", "runtime.seed=3"]


def fixed_screen():
    """300 cells x 48 genes: controls, 8 singles, 2 doubles, a two-class obs label."""
    from anndata import AnnData

    from regina_cli.data.gears_de import add_gears_de

    rng = np.random.default_rng(12345)
    genes = [f"GENE{i:02d}" for i in range(48)]
    conditions = ["ctrl"] + [f"GENE{i:02d}+ctrl" for i in range(8)] + ["GENE00+GENE01", "GENE02+GENE03"]
    cond = np.concatenate([np.zeros(80, int), np.repeat(np.arange(1, len(conditions)), 22)])
    effects = rng.normal(0, 0.8, (len(conditions), len(genes))) * (rng.random((len(conditions), len(genes))) < 0.2)
    effects[0] = 0
    base = rng.normal(1.0, 0.5, len(genes))
    x = np.clip(base + effects[cond] + rng.normal(0, 0.4, (len(cond), len(genes))), 0, None).astype(np.float32)
    obs = pd.DataFrame({keys.OBS_CONDITION: np.array(conditions)[cond], keys.OBS_CELL_TYPE: "k562",
                        "state": np.where(rng.random(len(cond)) < 0.4, "a", "b")},
                       index=[f"c{i}" for i in range(len(cond))])
    adata = AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame({keys.VAR_GENE_NAME: genes}, index=genes))
    add_gears_de(adata)
    return adata


def weights_sha256(path) -> str:
    state = torch.load(path, weights_only=True)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_both_phases_train_to_the_recorded_weights(tmp_path):
    from regina_cli.data.dataset import write_dataset
    from regina_cli.data.label import label_dataset
    from regina_cli.data.split import split_dataset
    from regina_cli.engine.train_ae import train_autoencoder
    from regina_cli.engine.train_gan import train_gan

    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    write_dataset(fixed_screen(), "fixed", data_dir)
    split_dataset("fixed", mode="simulation", seed=1, data_dir=data_dir)
    label_dataset("fixed", "obs:state", split="simulation_1", data_dir=data_dir)
    config = build_config(preset="demo", overrides=SETTINGS)
    train_autoencoder("fixed", split="simulation_1", labels="obs:state", run_dir=run_dir, config=config,
                      data_dir=data_dir, device="cpu", progress="silent")
    train_gan(run_dir, data_dir=data_dir, device="cpu", progress="silent")
    ae_sha = weights_sha256(ckpt.ae_paths(run_dir).model)
    gan_sha = weights_sha256(ckpt.gan_paths(run_dir).model)
    assert (ae_sha, gan_sha) == (AE_WEIGHTS_SHA256, GAN_WEIGHTS_SHA256)
