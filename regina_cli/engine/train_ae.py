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

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from regina_cli import keys
from regina_cli.config import ReginaConfig
from regina_cli.data.conditions import condition_genes
from regina_cli.data.knowledge import resolve_knowledge
from regina_cli.engine import checkpoint as ckpt
from regina_cli.engine.distributed import (DistContext, broadcast_state, check_process_count, check_run_free,
                                           data_parallel, parameter_checksum, run_distributed)
from regina_cli.engine.early_stopping import BestTracker, ConsistencyStopper
from regina_cli.engine.loop import (EpochBatches, amp_context, check_resume_trains, compile_modules, finished_summary,
                                    fit, scaled_lr, seed_everything, steps_per_epoch)
from regina_cli.engine.progress import TrainingProgress
from regina_cli.engine.run_config import check_fixed_shapes, resolve_run_config
from regina_cli.engine.run_meta import (RunMeta, check_resume, check_run_dir, config_sha256, phase1_inputs,
                                       prepare_run_dir, trained_data_dir, write_meta)
from regina_cli.errors import ReginaError, warnings_among
from regina_cli.io import check_writable_folder

# ae.selection -> (validation metric, direction). Variance preservation is the original's
# criterion: a reconstruction that keeps each gene's spread keeps perturbation effects, where
# plain MSE favours blurry, mean-like reconstructions.
SELECTION = {"variance_preservation": ("variance_preservation", "max"), "val_mse": ("mse", "min")}
VAL_CHUNK = 4096


class AutoencoderPhase:
    """Phase-1 math for the shared epoch loop (`engine.loop.fit`)."""

    name = keys.AE_DIR

    def __init__(self, model, cells, config: ReginaConfig, ctx: DistContext):
        from regina_cli.model import losses

        self.losses = losses
        self.model, self.cells, self.config, self.ctx = model, cells, config, ctx
        ae = config.ae
        global_batch = ae.batch_size * ctx.world_size
        centers = list(model.center_loss.parameters())
        center_ids = {id(p) for p in centers}
        fused = ctx.device.type == "cuda"
        ae_params = model.autoencoder_parameters()
        self.ae_optimizer = data_parallel(torch.optim.AdamW(
            [{"params": [p for p in ae_params if id(p) not in center_ids]},
             {"params": centers, "weight_decay": 0.0}],  # decay would pull centers to the origin
            lr=scaled_lr(ae.lr, ae.lr_scale_batch, global_batch), weight_decay=ae.weight_decay, fused=fused),
            ctx, clip=ae.grad_clip)
        self.clf_optimizer = data_parallel(torch.optim.AdamW(
            model.classifier.parameters(), lr=scaled_lr(ae.classifier_lr, ae.lr_scale_batch, global_batch),
            weight_decay=ae.weight_decay, fused=fused), ctx)
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

    def train_step(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        idx, x = self._batches.get(step)
        labels = self.cells.labels[idx]
        with amp_context(self.ctx.device, self.amp):
            out = self.losses.ae_losses(self.model, x, labels, self.config.ae)
            sg = self.losses.classifier_sg_loss(self.model, out.extra["latent"], labels)
        self.ae_optimizer.zero_grad(set_to_none=True)
        self.clf_optimizer.zero_grad(set_to_none=True)
        (out.total + sg).backward()
        self.ae_optimizer.step()  # averages over processes and clips first (distributed.data_parallel)
        self.clf_optimizer.step()
        accuracy = (out.extra["logits"].argmax(1) == labels).float().mean()
        return {**out.logged(), "sg": sg.detach(), "clf_acc": accuracy}

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


def predictability_notes(split_obj, genes: list[str], config: ReginaConfig, data_dir) -> list[str]:
    """Say before training which validation and test conditions no prompt can reach (a target
    neither measured, nor perturbed in training, nor in `model.gene_knowledge`), with the fix."""
    from regina_cli.data.knowledge import predictability

    knowledge = resolve_knowledge(config.model.gene_knowledge, data_dir) if config.model.gene_knowledge else None
    notes = []
    targets = condition_genes([*split_obj.train, *split_obj.val, *split_obj.test])
    if knowledge is not None and not any(knowledge.knows(g) for g in [*genes, *targets]):
        notes.append(f"warning: gene knowledge {knowledge.source} names none of the dataset's {len(genes):,} genes "
                     "nor its targets "
                     f"(its genes look like {', '.join(knowledge.genes[:3])}; the dataset's like "
                     f"{', '.join(genes[:3])}): it cannot help any prediction; check that both use the same "
                     "gene identifiers")
    for set_name in ("val", "test"):
        counts = predictability(getattr(split_obj, set_name), genes, split_obj.train, knowledge)
        if not counts["unmeasured"]:
            continue
        line = (f"{set_name}: {counts['unmeasured']} of {counts['conditions']} conditions have unmeasured targets, "
                f"{counts['unpredictable']} of them unpredictable")
        if counts["unpredictable"]:
            line += (" (" + ", ".join(counts["unpredictable_conditions"][:5]) + "); "
                     + ("a knowledge file covering those genes fixes it" if knowledge else
                        "pass --gene-knowledge FILE (gene embeddings or GO terms), or `regina fetch go` and "
                        "--gene-knowledge go"))
        notes.append(f"warning: {line}" if counts["unpredictable"] and set_name == "test" else line)
    return notes


# --- Public entry point ------------------------------------------------------------------------------
def check_token_count(name: str, config: ReginaConfig, data_dir=None) -> None:
    """A token holds at least one gene: more tokens than genes would only add padding (and a
    model that may not fit in memory)."""
    from regina_cli.data.dataset import gene_count

    n_genes = gene_count(name, data_dir)
    if config.model.seq_len > n_genes:
        raise ReginaError(f"model.seq_len is {config.model.seq_len:,}, more than the {n_genes:,} genes of dataset "
                          f"{name}: a token holds at least one gene, so lower model.seq_len")


def train_autoencoder(
    name: str,
    *,
    split: str,
    labels: str,
    run_dir: str | Path,
    config: ReginaConfig | None = None,
    data_dir: str | Path | None = None,
    gpus: int = 1,
    device: str = "auto",
    resume: bool = False,
    progress: str = "auto",
    announce: Callable[[], None] = lambda: None,
) -> dict:
    """Train phase 1 on dataset `name`; writes `run_dir/ae/` and returns a summary.

    `config`: a resolved config (`run_config.resolve_run_config`); by default the one that rule
    gives with no options. `progress`: "auto" (rich bar on a terminal, plain lines otherwise),
    "plain" or "silent". With `gpus` > 1 it runs that many data-parallel processes (or joins an
    existing torchrun / Slurm launch). `announce` runs once every input is checked, before
    training starts (the CLI says what it trains there, so bad input gets its error line alone).
    """
    if config is None:  # resolving checks the shapes the run fixed
        config, _ = resolve_run_config(keys.AE_DIR, run_dir, dataset=name, resume=resume, data_dir=data_dir)
    else:
        check_fixed_shapes(keys.AE_DIR, run_dir, config, resume=resume)
    check_process_count(gpus, device)
    check_run_dir(run_dir)  # provenance: every input checked before anything is written
    check_run_free(run_dir)
    check_resume(ckpt.ae_paths(run_dir), resume=resume, split=split, labels=labels)
    provenance = phase1_inputs(name, split, labels, data_dir)
    check_token_count(name, config, data_dir)
    check_resume_trains(ckpt.ae_paths(run_dir), config, config.ae.max_epochs, resume=resume)
    check_resume(ckpt.ae_paths(run_dir), provenance, resume=resume)  # the config may change (shapes checked above)
    if config.model.gene_knowledge:  # read again by each process, for its notes; a bad file stops here
        resolve_knowledge(config.model.gene_knowledge, data_dir)
    finished = finished_summary(ckpt.ae_paths(run_dir), config, config.ae.max_epochs, resume=resume, dataset=name)
    if finished is not None:
        return finished
    provenance[keys.CONFIG_SHA256] = config_sha256(config)
    kwargs = dict(name=name, split=split, labels=labels, run_dir=str(run_dir), config=config,
                  data_dir=None if data_dir is None else str(data_dir), resume=resume, progress=progress,
                  provenance=provenance)
    check_writable_folder(run_dir)
    announce()
    recheck = partial(check_resume, ckpt.ae_paths(run_dir), resume=resume)  # under the lock: trained meanwhile?
    return run_distributed(_train_ae_process, kwargs, gpus=gpus, device=device, run_dir=run_dir, recheck=recheck)


def _train_ae_process(ctx: DistContext, *, name, split, labels, run_dir, config: ReginaConfig,
                      data_dir, resume, progress, provenance) -> dict:
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.label import load_labels
    from regina_cli.data.split import load_split
    from regina_cli.data.tensors import CellTensors
    from regina_cli.model.autoencoder import Autoencoder

    paths = ckpt.ae_paths(run_dir)
    split_obj = load_split(name, split, data_dir)
    label_series = load_labels(name, labels, data_dir, split=split)
    adata = read_dataset(name, data_dir, backed=True)
    genes = [str(g) for g in adata.var_names]
    notes = predictability_notes(split_obj, genes, config, data_dir)
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

    meta = RunMeta(
        phase=keys.AE_DIR, dataset=name, split=split, labels=labels, gene_names=genes,
        label_classes=cells.label_classes, cell_types=cells.cell_types, conditions=cells.conditions,
        train_conditions=list(split_obj.train), val_conditions=list(split_obj.val),
        test_conditions=list(split_obj.test), perturbed_genes=sorted(condition_genes(cells.conditions)),
        selection=config.ae.selection, world_size=ctx.world_size, notes=cells.notes,
        n_train_cells=int(len(cells.train_idx)), n_val_cells=int(len(cells.val_idx)), dense_on_device=cells.dense,
        data_dir=trained_data_dir(data_dir), **provenance)
    if ctx.is_main:
        ckpt.write_config(paths, config)
        write_meta(paths, meta)

    metric, mode = SELECTION[config.ae.selection]
    phase = AutoencoderPhase(model, cells, config, ctx)
    stopper = ConsistencyStopper(patience=config.ae.consistency_patience,
                                 min_delta=config.ae.consistency_min_delta, min_epochs=config.ae.min_epochs)
    bar = TrainingProgress("train-ae", max_epochs=config.ae.max_epochs,
                           mode=progress if ctx.is_main else "silent")
    for line in notes:
        bar.message(line)
    summary = fit(phase, ctx, paths, max_epochs=config.ae.max_epochs, stopper=stopper,
                  best=BestTracker(metric, mode), progress=bar, resume=resume)
    summary.update({"run_dir": str(paths.run_dir), "phase": paths.phase, "selection": config.ae.selection,
                    "parameter_checksum": parameter_checksum(model), "warnings": warnings_among(notes)})
    if ctx.is_main:
        write_meta(paths, meta.trained(summary))
    cells.close()
    return summary
