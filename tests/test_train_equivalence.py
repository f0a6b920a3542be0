"""Refactors must not change what training computes.

Both phases train 2 epochs on a small fixed screen with a fixed seed on CPU, and the SHA-256 of
the final weights (`last.pt`, so validation, which only picks the best epoch, cannot move it)
must equal that of the code before the engine refactor (issue 8, commit bef88b5) trained the
same way. The screen is generated here with its own seeded generator, not by the demo
simulator, so that changes to the simulator do not move the reference. The config pins every
setting that shapes training, so a later change of a default does not move it either.

The reference is trained here, from that commit in the checkout's git history, not recorded: float
results on CPU depend on the machine's kernels (AVX2 and AVX-512 builds of the same ops round
differently), so a hash recorded on one machine failed on another while both codes agreed bit for
bit on each.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from regina_cli import keys
from regina_cli.config import build_config
from regina_cli.engine import checkpoint as ckpt

REFERENCE_COMMIT = "bef88b5"  # the last commit before the engine refactor

REFERENCE_SETTINGS = [
    "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.z_dim=16", "model.ff_mult=2",
    "model.classifier_hidden=16", "model.transition_hidden=32", "model.discriminator_hidden=[32,16]",
    "ae.batch_size=32", "ae.lr=0.003", "ae.max_epochs=2", "gan.batch_size=32", "gan.max_epochs=2",
    "gan.discriminator_every=2", "gan.lambda_adv=0.5", "gan.lambda_pred=5.0", "runtime.seed=3"]
SETTINGS = [*REFERENCE_SETTINGS,
            # the demo preset's values at the reference commit, and the behaviour of that code
            "ae.min_epochs=5", "gan.lr=1e-3", "gan.discriminator_lr=1e-3", "gan.decoder_lr=1e-4",
            "gan.noise_decay_start=3", "gan.noise_decay_end=12", "gan.lambda_cycle=5.0", "gan.lambda_anchor=1.0",
            "gan.lambda_moment=0", "gan.lambda_bulk=0", "gan.grad_clip=0", "gan.modality=as_given",
            "gan.prompt_value=-1.0", "gan.prompt_sign=method", "gan.prompt_scale=raw", "gan.gene_features=none",
            "gan.learned_prompts=unmeasured", "gan.learned_prompt_init=small", "gan.prompt_dropout=0",
            "gan.validation_holdout=0", "gan.residual_decoding=false", "gan.match_control_mean=false",
            "gan.expression_prior=none", "gan.real_target=0.9",
            "gan.instance_noise=0.1", "gan.correction_scale=1.0"]


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


# State added after the refactor whose pinned settings leave it neutral (checked below): a scale
# of exactly 1 multiplies nothing, and this screen measures every target, so no gene gets a prompt.
NEUTRAL_NEW_STATE = {"gan.encoder_prompt_scale": 1.0, "gan.correction_scale": 1.0}


def weights_sha256(path) -> str:
    """SHA-256 over every module's weights in a training checkpoint, by sorted name; tensors with
    no elements carry no weights and are skipped."""
    modules = torch.load(path, weights_only=True)["modules"]
    digest = hashlib.sha256()
    for module in sorted(modules):
        for name in sorted(modules[module]):
            tensor = modules[module][name]
            if tensor.numel() == 0:
                continue
            if f"{module}.{name}" in NEUTRAL_NEW_STATE:
                assert float(tensor) == NEUTRAL_NEW_STATE[f"{module}.{name}"]
                continue
            digest.update(f"{module}.{name}".encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_and_hash(folder: Path, settings: list[str]) -> tuple[str, str]:
    """Train both phases in `folder` and return the SHA-256 of each phase's final weights."""
    from regina_cli.data.dataset import write_dataset
    from regina_cli.data.label import label_dataset
    from regina_cli.data.split import split_dataset
    from regina_cli.engine.train_ae import train_autoencoder
    from regina_cli.engine.train_gan import train_gan

    torch.set_num_threads(1)
    data_dir, run_dir = folder / "data", folder / "run"
    write_dataset(fixed_screen(), "fixed", data_dir)
    split_dataset("fixed", mode="simulation", seed=1, data_dir=data_dir)
    label_dataset("fixed", "obs:state", split="simulation_1", data_dir=data_dir)
    config = build_config(preset="demo", overrides=settings)
    train_autoencoder("fixed", split="simulation_1", labels="obs:state", run_dir=run_dir, config=config,
                      data_dir=data_dir, device="cpu", progress="silent")
    train_gan(run_dir, data_dir=data_dir, device="cpu", progress="silent")
    return weights_sha256(ckpt.ae_paths(run_dir).last), weights_sha256(ckpt.gan_paths(run_dir).last)


def reference_code(folder: Path) -> Path:
    """The package as it was at REFERENCE_COMMIT, extracted from git history into `folder`."""
    repo = Path(__file__).resolve().parents[1]
    try:
        archive = subprocess.run(["git", "-C", str(repo), "archive", REFERENCE_COMMIT, "regina_cli"],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"commit {REFERENCE_COMMIT} is not in this checkout's git history (a clone has it)")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return folder


def hashes_in_fresh_interpreter(folder: Path, code: Path | None = None) -> tuple[str, str]:
    """Float results on CPU also depend on which kernels and thread pools earlier code in the same
    process initialised, so each training runs alone, with one thread; `code`: the package to import."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [sys.executable, __file__, str(folder)]
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
        args.append("--reference")
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ae_sha, gan_sha = done.stdout.split()[-2:]
    return ae_sha, gan_sha


def test_both_phases_train_to_the_weights_of_the_code_before_the_refactor(tmp_path):
    reference = hashes_in_fresh_interpreter(tmp_path / "then", reference_code(tmp_path / "code"))
    assert hashes_in_fresh_interpreter(tmp_path / "now") == reference


if __name__ == "__main__":
    print(*train_and_hash(Path(sys.argv[1]), REFERENCE_SETTINGS if "--reference" in sys.argv else SETTINGS))
