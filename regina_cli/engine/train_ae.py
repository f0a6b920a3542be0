"""Phase 1: the regularised autoencoder (encoder E, decoder D, latent classifier C).

One optimisation step, as the method describes it:
  L_AE = l_mse L_MSE + l_center L_CE + l_reg L_reg + l_clf L_CLF  -> encoder, decoder, centers
  L_sg = CE(C(sg[E(X)]), c)                                       -> classifier only
Both are summed into one backward pass (L_sg sees a detached latent, so the encoder gets
only L_AE's gradient, and the classifier gets L_sg's plus L_CLF's, as the method says); the
autoencoder's AdamW (gradient clipped) and the classifier's own AdamW then step.

Every epoch ends with validation on the held-out conditions' cells: L_cons = CE(C(z),
C(E(D(z)))), reconstruction MSE, variance preservation (Pearson of per-gene standard deviations
of real and reconstructed cells) and classifier accuracy. L_cons drives early stopping
(`ConsistencyStopper`); `ae.selection` picks the best epoch.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from regina_cli import keys
from regina_cli.config import ReginaConfig
from regina_cli.data.conditions import condition_genes
from regina_cli.engine import checkpoint as ckpt
from regina_cli.engine.distributed import (DistContext, average_gradients, broadcast_state,
                                           check_process_count, run_distributed)
from regina_cli.engine.early_stopping import BestTracker, ConsistencyStopper
from regina_cli.engine.loop import amp_context, fit
from regina_cli.engine.progress import TrainingProgress
from regina_cli.errors import ReginaError

# ae.selection -> (validation metric, direction). Variance preservation is the original's
# criterion: a reconstruction that keeps each gene's spread keeps perturbation effects, where
# plain MSE favours blurry, mean-like reconstructions.
SELECTION = {"variance_preservation": ("variance_preservation", "max"), "val_mse": ("mse", "min")}
VAL_CHUNK = 4096


def seed_everything(seed: int) -> None:
    """Seed every random stream; also flush denormal floats to zero, which on CPUs otherwise
    slow small matmuls down tenfold once tiny gradients appear (measured in phase 2)."""
    torch.set_flush_denormal(True)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def scaled_lr(lr: float, enabled: bool, global_batch: int) -> float:
    """Linear learning-rate scaling for large batches (Goyal et al. 2017), reference batch 64."""
    return lr * global_batch / 64 if enabled else lr


class EpochBatches:
    """One epoch of (row indices, expression) batches from `CellTensors.batches`, by step.

    The shuffle depends on (seed, epoch) only, so a resumed run and every rank see the same
    order without storing it; `get(step)` skips the batches a mid-epoch resume already did.
    """

    def __init__(self, cells, index: torch.Tensor, batch_size: int, *, seed: int, epoch: int, ctx: DistContext):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self._iterator = cells.batches(index, batch_size, generator=generator, rank=ctx.rank,
                                       world_size=ctx.world_size)
        self._position = 0

    def get(self, step: int):
        while self._position < step:
            batch = next(self._iterator)
            self._position += 1
        return batch


def steps_per_epoch(n_cells: int, batch_size: int, ctx: DistContext) -> int:
    """Full batches per rank (the last partial batch is dropped: BatchNorm needs > 1 cell)."""
    share = n_cells // ctx.world_size
    if share < 2:
        raise ReginaError(f"only {n_cells} training cells for {ctx.world_size} process(es); "
                          "use a larger split or fewer --gpus")
    return max(1, share // batch_size)


def compile_modules(modules, enabled: bool, device: torch.device) -> None:
    """torch.compile the forward of each module in place (state_dict keys stay unchanged)."""
    if enabled and device.type == "cuda":
        for module in modules:
            module.forward = torch.compile(module.forward)


class AutoencoderPhase:
    """Phase-1 math for the shared epoch loop (`engine.loop.fit`)."""

    name = keys.AE_DIR
    loss_names = ["total", "mse", "center", "reg", "clf", "sg", "clf_acc"]

    def __init__(self, model, cells, config: ReginaConfig, ctx: DistContext):
        from regina_cli.model import losses

        self.losses = losses
        self.model, self.cells, self.config, self.ctx = model, cells, config, ctx
        ae = config.ae
        global_batch = ae.batch_size * ctx.world_size
        centers = list(model.center_loss.parameters())
        center_ids = {id(p) for p in centers}
        fused = ctx.device.type == "cuda"
        self.ae_params = model.autoencoder_parameters()
        self.ae_optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.ae_params if id(p) not in center_ids]},
             {"params": centers, "weight_decay": 0.0}],  # decay would pull centers to the origin
            lr=scaled_lr(ae.lr, ae.lr_scale_batch, global_batch), weight_decay=ae.weight_decay, fused=fused)
        self.clf_params = list(model.classifier.parameters())
        self.clf_optimizer = torch.optim.AdamW(
            self.clf_params, lr=scaled_lr(ae.classifier_lr, ae.lr_scale_batch, global_batch),
            weight_decay=ae.weight_decay, fused=fused)
        self.train_index = cells.train_idx
        self.val_index = cells.val_idx
        self.batch_size = ae.batch_size
        self.cells_per_step = ae.batch_size
        self.amp = config.runtime.amp
        self._batches = None

    def modules(self):
        return {"autoencoder": self.model}

    def optimizers(self):
        return {"autoencoder": self.ae_optimizer, "classifier": self.clf_optimizer}

    def schedulers(self):
        return {}

    def generators(self):
        return {}

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.train_index), self.batch_size, self.ctx)

    def begin_epoch(self, epoch: int) -> None:
        self.model.train()
        self._batches = EpochBatches(self.cells, self.train_index, self.batch_size,
                                     seed=self.config.runtime.seed, epoch=epoch, ctx=self.ctx)

    def train_step(self, epoch: int, step: int) -> torch.Tensor:
        idx, x = self._batches.get(step)
        labels = self.cells.labels[idx]
        with amp_context(self.ctx.device, self.amp):
            terms = self.losses.ae_losses(self.model, x, labels, self.config.ae)
            sg = self.losses.classifier_sg_loss(self.model, terms.latent, labels)
        self.ae_optimizer.zero_grad(set_to_none=True)
        self.clf_optimizer.zero_grad(set_to_none=True)
        (terms.total + sg).backward()
        average_gradients(self.ae_params + self.clf_params, self.ctx)
        if self.config.ae.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.ae_params, self.config.ae.grad_clip, foreach=True)
        self.ae_optimizer.step()
        self.clf_optimizer.step()
        accuracy = (terms.logits.argmax(1) == labels).float().mean()
        return torch.stack([terms.total, terms.mse, terms.center, terms.reg, terms.clf, sg, accuracy]).detach()

    def end_epoch(self, epoch: int) -> None:
        pass

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, float]:
        """Validation metrics over every validation cell, in chunks, with one read-back."""
        self.model.eval()
        n_genes = self.cells.n_genes
        dev = self.ctx.device
        sums = {k: torch.zeros(n_genes, dtype=torch.float64, device=dev) for k in ("x", "x2", "r", "r2")}
        sq_err = torch.zeros((), dtype=torch.float64, device=dev)
        cons = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.float64, device=dev)
        n = 0
        for idx, x in self.cells.batches(self.val_index, VAL_CHUNK, shuffle=False):
            with amp_context(dev, self.amp):
                z = self.model.encoder(x)
                rec = self.model.decoder(z).float()
                cons += self.losses.consistency_loss(self.model, z).double() * len(idx)
                correct += (self.model.classifier(z).argmax(1) == self.cells.labels[idx]).sum()
            x64, r64 = x.double(), rec.double()
            sums["x"] += x64.sum(0)
            sums["x2"] += (x64**2).sum(0)
            sums["r"] += r64.sum(0)
            sums["r2"] += (r64**2).sum(0)
            sq_err += ((r64 - x64) ** 2).sum()
            n += len(idx)
        self.model.train()
        std_real = _std(sums["x"], sums["x2"], n)
        std_rec = _std(sums["r"], sums["r2"], n)
        values = torch.stack([sq_err / (n * n_genes), cons / n, _pearson(std_real, std_rec), correct / n])
        mse, cons_v, vp, acc = values.tolist()
        return {"mse": mse, "cons": cons_v, "variance_preservation": vp, "clf_acc": acc}

    def weights(self) -> dict[str, torch.Tensor]:
        return ckpt.state_dict_to_cpu(self.model)


def _std(s: torch.Tensor, s2: torch.Tensor, n: int) -> torch.Tensor:
    return ((s2 - s * s / n) / max(n - 1, 1)).clamp_min(0).sqrt()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)


# --- Public entry point ------------------------------------------------------------------------------
def train_autoencoder(
    name: str,
    *,
    split: str,
    labels: str,
    run_dir: str | Path,
    config: ReginaConfig,
    data_dir: str | Path | None = None,
    gpus: int = 1,
    device: str = "auto",
    resume: bool = False,
    progress: str = "auto",
) -> dict:
    """Train phase 1 on dataset `name`; writes `run_dir/ae/` and returns a summary.

    `progress`: "auto" (rich bar on a terminal, plain lines otherwise), "plain" or "silent".
    With `gpus` > 1 it runs that many data-parallel processes (or joins an existing torchrun /
    Slurm launch).
    """
    check_process_count(gpus, device)
    kwargs = dict(name=name, split=split, labels=labels, run_dir=str(run_dir), config=config,
                  data_dir=None if data_dir is None else str(data_dir), resume=resume, progress=progress)
    return run_distributed(_train_ae_process, kwargs, gpus=gpus, device=device)


def _train_ae_process(ctx: DistContext, *, name, split, labels, run_dir, config: ReginaConfig,
                      data_dir, resume, progress) -> dict:
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.label import load_labels
    from regina_cli.data.split import load_split
    from regina_cli.data.tensors import CellTensors
    from regina_cli.model.autoencoder import Autoencoder

    if config.ae.selection not in SELECTION:  # before any data is read or file written
        raise ReginaError(f"ae.selection takes {' or '.join(SELECTION)}, not {config.ae.selection!r}")
    paths = ckpt.ae_paths(run_dir)
    split_obj = load_split(name, split, data_dir)
    label_series = load_labels(name, labels, data_dir)
    adata = read_dataset(name, data_dir, backed=True)
    genes = [str(g) for g in adata.var_names]
    prepare_run_dir(paths, dataset=name, genes=genes, resume=resume)
    seed_everything(config.runtime.seed + ctx.rank)
    cells = CellTensors.from_anndata(
        adata, split_obj, label_series, device=ctx.device, device_data=config.runtime.device_data,
        chunk_cells=config.runtime.stream_chunk_cells)
    adata.file.close()  # CellTensors holds what it needs (and its own file handle when streaming)
    if len(cells.val_idx) == 0:
        raise ReginaError(f"split {split} has no validation cells; choose a split with validation conditions")
    if len(cells.label_classes) < 2:
        raise ReginaError(f"labels {labels!r} have a single class; the latent classifier needs two or more")
    model = Autoencoder(cells.n_genes, len(cells.label_classes), config.model).to(ctx.device)
    broadcast_state(model, ctx)
    compile_modules([model.encoder, model.decoder], config.runtime.compile, ctx.device)

    meta = {"dataset": name, "split": split, "labels": labels, "gene_names": genes,
            "label_classes": cells.label_classes, "cell_types": cells.cell_types,
            "conditions": cells.conditions, "train_conditions": list(split_obj.train),
            "val_conditions": list(split_obj.val), "test_conditions": list(split_obj.test),
            "perturbed_genes": sorted(condition_genes(cells.conditions)),
            "n_train_cells": int(len(cells.train_idx)), "n_val_cells": int(len(cells.val_idx)),
            "dense_on_device": cells.dense, "world_size": ctx.world_size,
            "selection": config.ae.selection, "notes": cells.notes}
    if ctx.is_main:
        ckpt.write_config(paths, config)
        ckpt.write_meta(paths, {**meta, "status": "training"})

    metric, mode = SELECTION[config.ae.selection]
    phase = AutoencoderPhase(model, cells, config, ctx)
    stopper = ConsistencyStopper(patience=config.ae.consistency_patience,
                                 min_delta=config.ae.consistency_min_delta, min_epochs=config.ae.min_epochs)
    bar = TrainingProgress("train-ae", max_epochs=config.ae.max_epochs,
                           mode=progress if ctx.is_main else "silent")
    summary = fit(phase, ctx, paths, max_epochs=config.ae.max_epochs, stopper=stopper,
                  best=BestTracker(metric, mode), progress=bar, resume=resume)
    summary.update({"run_dir": str(paths.run_dir), "phase": paths.phase, "selection": config.ae.selection,
                    "parameter_checksum": parameter_checksum(model)})
    if ctx.is_main:
        ckpt.write_meta(paths, {**meta, "status": "trained", "training": summary})
    cells.close()
    return summary


def prepare_run_dir(paths: ckpt.PhasePaths, *, dataset: str, genes: list[str], resume: bool) -> None:
    """A fresh phase needs an empty directory; a resumed one must match the data."""
    ckpt.check_run_matches(paths, dataset=dataset, gene_names=genes)
    if not resume and (paths.last.is_file() or paths.model.is_file()):
        raise ReginaError(f"{paths.dir} already holds a trained {paths.phase} phase; pass --resume "
                          f"to continue it or choose another --run")


def parameter_checksum(module: torch.nn.Module) -> float:
    """One number per model (sum of all weights): equal on every rank when ranks stay in sync."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in module.parameters()).item())


# --- Configuration for a dataset -----------------------------------------------------------------------
def dataset_gene_count(name: str, data_dir: str | Path | None = None) -> int:
    """Genes in a fetched dataset, read from the h5ad header (no matrix load, no checksum)."""
    import h5py

    path = keys.dataset_file(name, data_dir)
    if not path.is_file():
        raise ReginaError(f"dataset {name!r} not found at {path}: run `regina fetch {name}` first")
    with h5py.File(path, "r") as fh:
        x = fh["X"]
        return int(x.shape[1] if isinstance(x, h5py.Dataset) else x.attrs["shape"][1])


def resolve_ae_config(name: str, *, preset: str | None = None, config_file: str | Path | None = None,
                      overrides: list[str] | None = None, data_dir: str | Path | None = None,
                      resume_from: str | Path | None = None) -> tuple[ReginaConfig, str]:
    """The run's config and where its sizes come from: the saved config of the run being
    resumed, else `--preset`, else the preset named like the dataset (norman, adamson, dixit,
    demo), else sizes fitted to the dataset's gene count. File and `--set` apply on top."""
    from regina_cli.config import PRESETS, apply_overrides, build_config, load_yaml, parse_set

    saved = ckpt.ae_paths(resume_from).config if resume_from is not None else None
    if saved is not None and saved.is_file():
        config = ckpt.read_config(ckpt.ae_paths(resume_from))
        if config_file is not None:
            config = apply_overrides(config, load_yaml(config_file))
        return apply_overrides(config, parse_set(overrides)), f"resumed from {saved}"
    if preset is None and name in PRESETS:
        preset = name
    if preset is not None:
        return build_config(preset=preset, config_file=config_file, overrides=overrides), f"preset {preset}"
    n_genes = dataset_gene_count(name, data_dir)
    config = build_config(n_genes=n_genes, config_file=config_file, overrides=overrides)
    return config, f"sized for {n_genes} genes"
