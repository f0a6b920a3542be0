"""Training throughput (cells/s) of phase 1 and phase 2 at Norman's shape, with the real engine.

Synthetic data of Norman's size (91,205 cells x 5,045 genes, 105 single + 131 double
perturbations, a control population) goes through the same `CellTensors` and the same
`AutoencoderPhase` / `CycleGANPhase` steps that `regina train-ae` / `train-gan` run, with the
norman preset (original sizes). Only optimisation steps are timed (after warm-up), with the
device synchronised at both ends of the timed window.

    python benchmarks/train_throughput.py --device cuda --batch-size 4096 --amp bf16 --compile
    python benchmarks/train_throughput.py --device cpu --cells 8192 --steps 3

The original research code moved ~775 (phase 1) and ~1,050 (phase 2) cells/s on one H100.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

NORMAN = {"cells": 91_205, "genes": 5_045, "singles": 105, "doubles": 131, "controls": 7_353}


def synthetic_screen(n_cells: int, n_genes: int, seed: int = 0):
    """AnnData (dense X, GEARS obs) and a Split shaped like Norman; values are log-normal-ish."""
    import anndata as ad

    from regina_cli.data.split import Split

    rng = np.random.default_rng(seed)
    genes = [f"G{i:05d}" for i in range(n_genes)]
    singles = [f"{genes[i]}+ctrl" for i in range(NORMAN["singles"])]
    doubles = [f"{genes[rng.integers(NORMAN['singles'])]}+{genes[NORMAN['singles'] + i]}"
               for i in range(NORMAN["doubles"])]
    perturbations = singles + doubles
    n_ctrl = max(2, round(n_cells * NORMAN["controls"] / NORMAN["cells"]))
    condition = np.array(["ctrl"] * n_ctrl + list(rng.choice(perturbations, n_cells - n_ctrl)))
    x = np.log1p(rng.gamma(0.3, 2.0, size=(n_cells, n_genes)).astype(np.float32))
    obs = pd.DataFrame({"condition": condition, "cell_type": "K562"},
                       index=[f"cell{i}" for i in range(n_cells)])
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))
    perturbations = [p for p in perturbations if p in set(condition)]  # a small screen misses some
    n_val = len(perturbations) // 10
    split = Split(dataset="synthetic", mode="simulation", seed=seed, train_gene_frac=0.75,
                  train=["ctrl"] + perturbations[n_val:], val=perturbations[:n_val], test=[],
                  subgroups={})
    return adata, split


def timed_steps(phase, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for `steps` optimisation steps after `warmup` untimed ones (epochs roll over)."""
    state = {"epoch": 0, "step": 0, "n": 0}

    def one_step():
        if state["step"] == state["n"]:
            state["epoch"] += 1
            phase.begin_epoch(state["epoch"])
            state["step"], state["n"] = 0, phase.steps_per_epoch()
        state["step"] += 1
        return phase.train_step(state["epoch"], state["step"])

    for _ in range(warmup):
        one_step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        one_step()  # loss terms stay on the device: no host sync inside the window
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, *, cells_n: int, genes_n: int, batch: int, steps: int, warmup: int,
            preset: str = "norman", amp: str = "auto", compile_: bool = False, phases=("ae", "gan"),
            overrides: list[str] = (), data=None) -> dict:
    """Training cells/s of each phase in `phases` (and the peak GPU memory of each, in GiB),
    on synthetic data of the given shape (or `data` = (adata, split), reused between calls)."""
    from regina_cli.config import build_config
    from regina_cli.data.tensors import CellTensors
    from regina_cli.engine.distributed import DistContext
    from regina_cli.engine.gene_prompts import prompt_gene_names
    from regina_cli.engine.loop import compile_modules, seed_everything
    from regina_cli.engine.train_ae import AutoencoderPhase
    from regina_cli.engine.train_gan import build_phase
    from regina_cli.model.autoencoder import Autoencoder

    config = build_config(preset=preset, overrides=[
        f"ae.batch_size={batch}", f"gan.batch_size={batch}", f"runtime.amp={amp}",
        f"runtime.compile={str(compile_).lower()}", "runtime.device_data=always", *overrides])
    seed_everything(0)
    ctx = DistContext(0, 0, 1, device)
    adata, split = data if data is not None else synthetic_screen(cells_n, genes_n)
    rng = np.random.default_rng(1)
    labels = pd.Series(rng.choice(["Homeostasis", "Stressed"], adata.n_obs, p=[0.7, 0.3]), index=adata.obs_names)
    genes = [str(g) for g in adata.var_names]
    prompt_genes, learned_genes = prompt_gene_names(split.train, genes, config.gan)
    cells = CellTensors.from_anndata(adata, split, labels, device=device, device_data="always",
                                     prompt_genes=prompt_genes)
    model = Autoencoder(cells.n_genes, len(cells.label_classes), config.model).to(device)
    compile_modules([model.encoder, model.decoder], config.runtime.compile, device)
    results = {}
    if "ae" in phases:
        reset_peak(device)
        seconds = timed_steps(AutoencoderPhase(model, cells, config, ctx), steps, warmup, device)
        results["ae"] = {"cells_per_s": steps * batch / seconds, "peak_gib": peak_gib(device)}
    if "gan" in phases:
        for frozen in (model.encoder, model.classifier):
            frozen.requires_grad_(False)
            frozen.eval()
        # Training caches E(X) of every cell once (the encoder is frozen); that one-off pass is
        # not a training step, so random latents of the right shape stand in for it here.
        latents = torch.randn(cells.n_cells, model.z_dim, device=device)
        phase, _ = build_phase(model, cells, config, ctx, None, latents, prompt_genes=prompt_genes,
                               learned_genes=learned_genes)
        reset_peak(device)
        seconds = timed_steps(phase, steps, warmup, device)
        results["gan"] = {"cells_per_s": steps * batch / seconds, "peak_gib": peak_gib(device)}
    return results


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=None, help="cells per step (default: 4096 GPU, 64 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 GPU, 1 CPU)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    parser.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder (GPU)")
    parser.add_argument("--cells", type=int, default=NORMAN["cells"])
    parser.add_argument("--genes", type=int, default=NORMAN["genes"])
    parser.add_argument("--preset", default="norman")
    parser.add_argument("--phase", default="both", choices=["ae", "gan", "both"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    args = parser.parse_args()

    from regina_cli.devices import resolve_device

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch_size or (4096 if gpu else 64)
    steps = args.steps or (30 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; data: {args.cells:,} cells x {args.genes:,} genes on the device; preset {args.preset}; "
          f"batch {batch}; amp {args.amp}; compile {args.compile}; {steps} timed steps after {warmup} warm-up")
    phases = ("ae", "gan") if args.phase == "both" else (args.phase,)
    results = measure(device, cells_n=args.cells, genes_n=args.genes, batch=batch, steps=steps, warmup=warmup,
                      preset=args.preset, amp=args.amp, compile_=args.compile, phases=phases,
                      overrides=args.overrides)
    for phase, result in results.items():
        memory = f"; peak GPU memory {result['peak_gib']:.1f} GiB" if result["peak_gib"] is not None else ""
        print(f"phase {'1 (train-ae)' if phase == 'ae' else '2 (train-gan)'}: {result['cells_per_s']:,.0f} "
              f"training cells/s{memory}")


if __name__ == "__main__":
    main()
