"""Phase 2: the latent cycle-GAN that maps control latents to perturbed ones, per perturbation.

Every step takes a batch of perturbed training cells and pairs each with a fresh random
training control of the same cell type (no true pairing exists). With the phase-1 encoder
and classifier frozen (so the latents of real cells are computed once and cached):
  prompt  = E(X_ctrl) - E(X_fake)   (targets set to prompt_value * n_targets; + learned
            embeddings of unmeasured targets), the same for both directions
  fake_p  = T_fwd(z_ctrl, prompt),  fake_c = T_bwd(z_pert, prompt)
  L_gen   = l_cycle L_cycle + l_adv (L_G(fwd) + L_G(bwd)) + l_anchor (MSE(D(z_ctrl), X_ctrl)
            + MSE(D(z_pert), X_pert)) + l_pred MSE(D(fake_p), X_pert)
updates both transition blocks and the decoder (which keeps training at `decoder_lr`); every
`discriminator_every`-th step both conditioned discriminators take a least-squares L_D step
with smoothed real targets and decaying instance noise. Learning rates follow a cosine
schedule over `max_epochs`.

Validation predicts every usable validation condition (seen or unseen genes, singles or
combinations: only the prompt changes) from controls of the same cell types and compares mean
deltas against the control mean: Pearson over all genes (the original's selection and
stopping metric) and over the condition's top-20 DE genes (GEARS's list), both recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from regina_cli import keys
from regina_cli.config import ReginaConfig, apply_overrides, parse_set
from regina_cli.engine import checkpoint as ckpt
from regina_cli.engine.distributed import (DistContext, average_gradients, broadcast_state,
                                           check_process_count, run_distributed)
from regina_cli.engine.early_stopping import BestTracker, PatienceStopper
from regina_cli.engine.loop import amp_context, fit
from regina_cli.engine.progress import TrainingProgress
from regina_cli.engine.train_ae import (EpochBatches, compile_modules, parameter_checksum,
                                        prepare_run_dir, scaled_lr, seed_everything, steps_per_epoch)
from regina_cli.errors import ReginaError
from regina_cli.evaluate.metrics import pearson
from regina_cli.model.gan import decode_prediction

SELECTION_METRIC = "pearson_delta"  # the original's criterion; top-20 DE is recorded beside it
VAL_CELLS_PER_CONDITION = 256
VAL_CHUNK = 4096
TOP_DE = 20
# Phase-1 network shapes: phase 2 reloads those weights, so these keys cannot change.
AE_SHAPE_KEYS = ("seq_len", "d_model", "n_layers", "n_heads", "ff_mult", "z_dim", "classifier_hidden")


def instance_noise_std(cfg, epoch: int) -> float:
    """`instance_noise` until `noise_decay_start`, then linearly down to 0 at `noise_decay_end`."""
    if epoch <= cfg.noise_decay_start:
        return cfg.instance_noise
    if epoch >= cfg.noise_decay_end:
        return 0.0
    span = cfg.noise_decay_end - cfg.noise_decay_start
    return cfg.instance_noise * (cfg.noise_decay_end - epoch) / span


class CycleGANPhase:
    """Phase-2 math for the shared epoch loop (`engine.loop.fit`)."""

    name = keys.GAN_DIR
    loss_names = ["total", "cycle", "adv", "anchor", "pred", "disc"]

    def __init__(self, autoencoder, gan, cells, config: ReginaConfig, ctx: DistContext, val_plan: dict,
                 latents: torch.Tensor | None = None):
        """`latents`: E(X) of every cell when already at hand; computed here otherwise."""
        from regina_cli.engine import prompt
        from regina_cli.model import losses

        self.losses, self.prompt = losses, prompt
        self.ae, self.gan, self.cells, self.config, self.ctx = autoencoder, gan, cells, config, ctx
        g = config.gan
        global_batch = g.batch_size * ctx.world_size
        betas = (g.beta1, g.beta2)
        fused = ctx.device.type == "cuda"
        lr = lambda value: scaled_lr(value, g.lr_scale_batch, global_batch)  # noqa: E731
        self.gen_params = gan.transition_parameters()
        self.dec_params = list(autoencoder.decoder.parameters())
        self.disc_params = gan.discriminator_parameters()
        self.gen_optimizer = torch.optim.AdamW(self.gen_params, lr=lr(g.lr), betas=betas, fused=fused)
        self.dec_optimizer = torch.optim.AdamW(self.dec_params, lr=lr(g.decoder_lr), betas=betas, fused=fused)
        self.disc_optimizer = torch.optim.AdamW(self.disc_params, lr=lr(g.discriminator_lr), betas=betas, fused=fused)
        self._optimizers = {"transitions": self.gen_optimizer, "decoder": self.dec_optimizer,
                            "discriminator": self.disc_optimizer}
        self._schedulers = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(g.max_epochs, 1))
                            for k, o in self._optimizers.items()}
        seed = config.runtime.seed + ctx.rank
        self.pair_generator = torch.Generator(ctx.device).manual_seed(seed)
        self.noise_generator = torch.Generator(ctx.device).manual_seed(seed + 1)
        self.train_index = cells.train_perturbed_idx
        self.batch_size = g.batch_size
        self.cells_per_step = g.batch_size
        self.val_plan = val_plan
        self.latents = latents if latents is not None else encode_all(autoencoder.encoder, cells, config.runtime.amp)
        self._last_disc = torch.zeros((), device=ctx.device)
        self._noise = g.instance_noise

    def modules(self):
        return {"gan": self.gan, "decoder": self.ae.decoder}

    def optimizers(self):
        return self._optimizers

    def schedulers(self):
        return self._schedulers

    def generators(self):
        return {"pairing": self.pair_generator, "noise": self.noise_generator}

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.train_index), self.batch_size, self.ctx)

    def begin_epoch(self, epoch: int) -> None:
        self.gan.train()
        self.ae.decoder.train()
        self._noise = instance_noise_std(self.config.gan, epoch)
        self._batches = EpochBatches(self.cells, self.train_index, self.batch_size,
                                     seed=self.config.runtime.seed, epoch=epoch, ctx=self.ctx)
        self._epoch_offset = (epoch - 1) * self.steps_per_epoch()

    def condition_prompt(self, x_ctrl: torch.Tensor, z_ctrl: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The prompt for controls `x_ctrl` (latents `z_ctrl`, from the cache) under conditions
        `codes`: E(X_ctrl) - E(X_fake) (`engine.prompt.build_prompt`, so the frozen encoder runs
        once per step, on X_fake only) plus the learned unmeasured-gene embeddings."""
        cells = self.cells
        with torch.no_grad():
            base = self.prompt.build_prompt(self.ae.encoder, x_ctrl, cells.target_idx[codes],
                                            self.config.gan.prompt_value, n_targets=cells.n_targets[codes],
                                            z_ctrl=z_ctrl)
        return self.gan.add_unmeasured(base, cells.unmeasured_idx[codes])

    def train_step(self, epoch: int, step: int) -> torch.Tensor:
        g, L = self.config.gan, self.losses
        idx, x_pert = self._batches.get(step)
        codes = self.cells.condition_codes[idx]
        ctrl = self.cells.control_partners(idx, self.pair_generator)
        x_ctrl = self.cells.rows(ctrl)
        z_ctrl, z_pert = self.latents[ctrl], self.latents[idx]
        noise = dict(noise_std=self._noise, generator=self.noise_generator)
        with amp_context(self.ctx.device, self.config.runtime.amp):
            prompt = self.condition_prompt(x_ctrl, z_ctrl, codes)
            fake_pert = self.gan.forward_block(z_ctrl, prompt)
            fake_ctrl = self.gan.backward_block(z_pert, prompt)
            self.gan.discriminator.requires_grad_(False)
            self.gan.control_discriminator.requires_grad_(False)
            adv = (L.generator_loss(self.gan.discriminator, fake_pert, prompt, **noise)
                   + L.generator_loss(self.gan.control_discriminator, fake_ctrl, prompt, **noise))
            cycle = L.cycle_loss(self.gan, z_ctrl, z_pert, prompt, fake_pert=fake_pert, fake_ctrl=fake_ctrl)
            decoded = self.ae.decoder(torch.cat([z_ctrl, z_pert, fake_pert])).float()
            rec_ctrl, rec_pert, pred = decoded.chunk(3)
            if g.residual_decoding:  # same as model.gan.decode_prediction, reusing rec_ctrl
                pred = x_ctrl + pred - rec_ctrl
            anchor = F.mse_loss(rec_ctrl, x_ctrl) + F.mse_loss(rec_pert, x_pert)
            pred_mse = F.mse_loss(pred, x_pert)
            total = g.lambda_cycle * cycle + g.lambda_adv * adv + g.lambda_anchor * anchor + g.lambda_pred * pred_mse
        self.gen_optimizer.zero_grad(set_to_none=True)
        self.dec_optimizer.zero_grad(set_to_none=True)
        total.backward()
        average_gradients(self.gen_params + self.dec_params, self.ctx)
        self.gen_optimizer.step()
        self.dec_optimizer.step()
        self.gan.discriminator.requires_grad_(True)
        self.gan.control_discriminator.requires_grad_(True)
        if (self._epoch_offset + step - 1) % max(g.discriminator_every, 1) == 0:  # steps 1, 1+N, ...
            self._last_disc = self._discriminator_step(z_ctrl, z_pert, fake_pert, fake_ctrl, prompt.detach(), noise)
        return torch.stack([total, cycle, adv, anchor, pred_mse, self._last_disc]).detach().float()

    def _discriminator_step(self, z_ctrl, z_pert, fake_pert, fake_ctrl, prompt, noise) -> torch.Tensor:
        g, L = self.config.gan, self.losses
        with amp_context(self.ctx.device, self.config.runtime.amp):
            loss = (L.discriminator_loss(self.gan.discriminator, z_pert, fake_pert.detach(), prompt,
                                         real_target=g.real_target, **noise)
                    + L.discriminator_loss(self.gan.control_discriminator, z_ctrl, fake_ctrl.detach(), prompt,
                                           real_target=g.real_target, **noise))
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.disc_params, self.ctx)
        self.disc_optimizer.step()
        return loss.detach()

    def end_epoch(self, epoch: int) -> None:
        for scheduler in self._schedulers.values():
            scheduler.step()

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, float]:
        self.gan.eval()
        self.ae.decoder.eval()
        plan, cells, dev = self.val_plan, self.cells, self.ctx.device
        n_groups = len(plan["conditions"])
        pred_sum = torch.zeros((n_groups, cells.n_genes), dtype=torch.float64, device=dev)
        generator = torch.Generator(dev).manual_seed(self.config.runtime.seed + 7)  # same controls each epoch
        for rows, groups in zip(plan["rows"].split(VAL_CHUNK), plan["groups"].split(VAL_CHUNK)):
            codes = cells.condition_codes[rows]
            ctrl = cells.control_partners(rows, generator)
            x_ctrl, z_ctrl = cells.rows(ctrl), self.latents[ctrl]
            with amp_context(dev, self.config.runtime.amp):
                prompt = self.condition_prompt(x_ctrl, z_ctrl, codes)
                pred = decode_prediction(self.ae.decoder, self.gan.forward_block(z_ctrl, prompt),
                                         x_ctrl=x_ctrl, z_ctrl=z_ctrl,
                                         residual=self.config.gan.residual_decoding).double()
            pred_sum.index_add_(0, groups, pred)
        self.gan.train()
        self.ae.decoder.train()
        delta_pred = pred_sum / plan["counts"].unsqueeze(1) - plan["reference"]
        delta_true = plan["delta_true"]
        k = min(TOP_DE, cells.n_genes)  # a screen of fewer than 20 genes ranks all of them
        top = plan["top_de"][:, :k]
        top = torch.where(top >= 0, top, delta_true.abs().topk(k, dim=1).indices)
        values = torch.stack([
            pearson(delta_pred, delta_true).nanmean(),
            pearson(delta_pred.gather(1, top), delta_true.gather(1, top)).nanmean(),
            ((delta_pred - delta_true) ** 2).mean(),
        ])
        pearson_all, pearson_top, mse = values.tolist()
        return {"pearson_delta": pearson_all, "pearson_delta_top20_de": pearson_top, "mse_delta": mse}

    def weights(self) -> dict[str, torch.Tensor]:
        return ckpt.state_dict_to_cpu(torch.nn.ModuleDict({"gan": self.gan, "decoder": self.ae.decoder}))


@torch.no_grad()
def encode_all(encoder, cells, amp: str) -> torch.Tensor:
    """Latents of every cell [n_cells, z_dim] (float32): the encoder is frozen and in eval mode
    in phase 2, so E(X) of a real cell never changes and is computed once, not every step."""
    latents = None
    for idx, x in cells.batches(torch.arange(cells.n_cells, device=cells.device), VAL_CHUNK, shuffle=False):
        with amp_context(cells.device, amp):
            z = encoder(x).float()
        if latents is None:
            latents = torch.empty((cells.n_cells, z.shape[1]), dtype=torch.float32, device=cells.device)
        latents[idx] = z
    return latents


# --- Validation plan ------------------------------------------------------------------------------------
def validation_plan(cells, adata, *, seed: int) -> dict:
    """Which validation cells to predict (at most VAL_CELLS_PER_CONDITION per usable condition,
    fixed for the run), their condition groups and top-20 DE, and what does not change from
    epoch to epoch: each group's reference (mean of its cells' cell-type control means) and
    true mean delta against it, so validation reads the real cells once, not every epoch.

    A validation condition is usable when each target is measured or has a learned prompt.
    When none is (e.g. a screen whose targets are all unmeasured, and held-out genes have no
    learned prompt), the training conditions are scored instead, and `source` says so.
    """
    source = "validation conditions"
    rows, groups, conditions = _condition_groups(cells, cells.val_perturbed_idx, seed)
    if not conditions:
        source = "training conditions (no validation condition is predictable: its targets are unmeasured)"
        rows, groups, conditions = _condition_groups(cells, cells.train_perturbed_idx, seed)
    dev = cells.device
    as_long = lambda a: torch.as_tensor(np.concatenate(a), dtype=torch.long, device=dev)  # noqa: E731
    plan_rows, plan_groups = as_long(rows), as_long(groups)
    counts = torch.as_tensor([len(r) for r in rows], dtype=torch.float64, device=dev)
    control_mean = control_means(cells)
    true_sum = torch.zeros((len(conditions), cells.n_genes), dtype=torch.float64, device=dev)
    ref_sum = torch.zeros_like(true_sum)
    for chunk, chunk_groups in zip(plan_rows.split(VAL_CHUNK), plan_groups.split(VAL_CHUNK)):
        true_sum.index_add_(0, chunk_groups, cells.rows(chunk).double())
        ref_sum.index_add_(0, chunk_groups, control_mean[cells.cell_type_codes[chunk]])
    reference = ref_sum / counts.unsqueeze(1)
    return {
        "source": source, "conditions": conditions, "rows": plan_rows, "groups": plan_groups,
        "counts": counts, "reference": reference, "delta_true": true_sum / counts.unsqueeze(1) - reference,
        "top_de": torch.as_tensor(top_de_indices(adata, conditions, cells.genes), device=dev),
    }


def _condition_groups(cells, index: torch.Tensor, seed: int):
    rng = np.random.default_rng(seed)
    cells_np = index.cpu().numpy()
    codes = cells.condition_codes.cpu().numpy()[cells_np]
    usable = cells.usable.cpu().numpy()
    rows, groups, conditions = [], [], []
    for code in np.unique(codes):
        if not usable[code]:
            continue
        members = cells_np[codes == code]
        if len(members) > VAL_CELLS_PER_CONDITION:
            members = np.sort(rng.choice(members, VAL_CELLS_PER_CONDITION, replace=False))
        rows.append(members)
        groups.append(np.full(len(members), len(conditions)))
        conditions.append(cells.conditions[code])
    return rows, groups, conditions


def control_means(cells) -> torch.Tensor:
    """Mean expression of the training controls of each cell type [n_cell_types, G] (float64)."""
    controls = cells.train_idx[cells.is_control[cells.train_idx]]
    sums = torch.zeros((len(cells.cell_types), cells.n_genes), dtype=torch.float64, device=cells.device)
    counts = torch.zeros(len(cells.cell_types), dtype=torch.float64, device=cells.device)
    for idx, x in cells.batches(controls, VAL_CHUNK, shuffle=False):
        types = cells.cell_type_codes[idx]
        sums.index_add_(0, types, x.double())
        counts.index_add_(0, types, torch.ones(len(idx), dtype=torch.float64, device=cells.device))
    overall = sums.sum(0) / counts.sum()
    return torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1).unsqueeze(1), overall)


def top_de_indices(adata, conditions: list[str], genes: list[str]) -> np.ndarray:
    """GEARS's `top_non_dropout_de_20` genes per condition as gene indices [K, 20]; -1 where
    the dataset has no list (then validation ranks genes by the true |delta| instead)."""
    out = np.full((len(conditions), TOP_DE), -1, dtype=np.int64)
    de = adata.uns.get(keys.UNS_TOP_DE_20, {}) or {}
    if keys.OBS_CONDITION_NAME not in adata.obs:
        return out
    obs = adata.obs[[keys.OBS_CONDITION, keys.OBS_CONDITION_NAME]].astype(str)
    most_common = obs.groupby(keys.OBS_CONDITION)[keys.OBS_CONDITION_NAME].agg(lambda s: s.value_counts().index[0])
    gene_pos = {g: i for i, g in enumerate(genes)}  # `genes` are adata.var_names (CellTensors checks)
    for k, condition in enumerate(conditions):
        listed = de.get(most_common.get(condition, ""), [])
        idx = [gene_pos.get(str(g), -1) for g in list(listed)[:TOP_DE]]
        idx = [i for i in idx if i >= 0]
        if len(idx) == TOP_DE:
            out[k] = idx
    return out


# --- Public entry point -------------------------------------------------------------------------------
def resolve_gan_config(run_dir: str | Path, overrides: list[str] | dict | None, *, resume: bool) -> ReginaConfig:
    """Phase-1 config (or the phase-2 one when resuming) plus overrides; AE shapes are fixed."""
    ae_config = ckpt.read_config(ckpt.ae_paths(run_dir))
    gan_paths = ckpt.gan_paths(run_dir)
    base = ckpt.read_config(gan_paths) if resume and gan_paths.config.is_file() else ae_config
    nested = overrides if isinstance(overrides, dict) else parse_set(overrides)
    config = apply_overrides(base, nested or {})
    changed = [k for k in AE_SHAPE_KEYS if getattr(config.model, k) != getattr(ae_config.model, k)]
    if changed:
        raise ReginaError(f"model.{changed[0]} is fixed by the phase-1 run; train a new run with "
                          f"`regina train-ae` to change it")
    return config


def train_gan(
    run_dir: str | Path,
    *,
    config_overrides: list[str] | dict | None = None,
    data_dir: str | Path | None = None,
    gpus: int = 1,
    device: str = "auto",
    resume: bool = False,
    progress: str = "auto",
) -> dict:
    """Train phase 2 on top of `run_dir/ae/`; writes `run_dir/gan/` and returns a summary."""
    ckpt.read_meta(ckpt.ae_paths(run_dir))  # a clear error before anything starts
    config = resolve_gan_config(run_dir, config_overrides, resume=resume)
    check_process_count(gpus, device)
    kwargs = dict(run_dir=str(run_dir), config=config, resume=resume, progress=progress,
                  data_dir=None if data_dir is None else str(data_dir))
    return run_distributed(_train_gan_process, kwargs, gpus=gpus, device=device)


def _train_gan_process(ctx: DistContext, *, run_dir, config: ReginaConfig, data_dir, resume, progress) -> dict:
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.split import load_split
    from regina_cli.data.tensors import CellTensors
    from regina_cli.model.autoencoder import Autoencoder
    from regina_cli.model.gan import LatentCycleGAN

    ae_paths, paths = ckpt.ae_paths(run_dir), ckpt.gan_paths(run_dir)
    ae_meta = ckpt.read_meta(ae_paths)
    name, split = ae_meta["dataset"], ae_meta["split"]
    split_obj = load_split(name, split, data_dir)
    adata = read_dataset(name, data_dir, backed=True)
    prepare_run_dir(paths, dataset=name, genes=ae_meta["gene_names"], resume=resume)
    seed_everything(config.runtime.seed + ctx.rank)
    cells = CellTensors.from_anndata(
        adata, split_obj, device=ctx.device, device_data=config.runtime.device_data,
        chunk_cells=config.runtime.stream_chunk_cells, genes=ae_meta["gene_names"])
    if len(cells.train_perturbed_idx) == 0:  # before the plan, which may fall back on training cells
        raise ReginaError(f"split {split} has no perturbed training cells")
    plan = validation_plan(cells, adata, seed=config.runtime.seed)

    autoencoder = Autoencoder(cells.n_genes, len(ae_meta["label_classes"]), config.model)
    autoencoder.load_state_dict(ckpt.load_torch(ae_paths.model))
    autoencoder.to(ctx.device)
    for frozen in (autoencoder.encoder, autoencoder.classifier):
        frozen.requires_grad_(False)
        frozen.eval()
    gan = LatentCycleGAN(autoencoder.z_dim, config.model, unmeasured_genes=cells.unmeasured_genes).to(ctx.device)
    broadcast_state(gan, ctx)
    compile_modules([autoencoder.encoder, autoencoder.decoder], config.runtime.compile, ctx.device)

    meta = {key: ae_meta[key] for key in ("dataset", "split", "labels", "gene_names", "label_classes",
                                          "cell_types", "conditions", "train_conditions",
                                          "val_conditions", "test_conditions", "perturbed_genes")}
    meta.update({"unmeasured_genes": cells.unmeasured_genes, "prompt_value": config.gan.prompt_value,
                 "validation_conditions_scored": plan["conditions"], "validation_source": plan["source"],
                 "top20_de_source": _de_source(plan), "n_train_pairs_per_epoch": int(len(cells.train_perturbed_idx)),
                 "selection": SELECTION_METRIC, "world_size": ctx.world_size, "notes": cells.notes})
    if ctx.is_main:
        ckpt.write_config(paths, config)
        ckpt.write_meta(paths, {**meta, "status": "training"})
    adata.file.close()  # CellTensors holds what it needs (and its own file handle when streaming)
    bar = TrainingProgress("train-gan", max_epochs=config.gan.max_epochs, mode=progress if ctx.is_main else "silent")
    if plan["source"] != "validation conditions":
        bar.message(f"note: validating on {plan['source']}")

    phase = CycleGANPhase(autoencoder, gan, cells, config, ctx, plan)
    summary = fit(phase, ctx, paths, max_epochs=config.gan.max_epochs,
                  stopper=PatienceStopper(metric=SELECTION_METRIC, patience=config.gan.patience),
                  best=BestTracker(SELECTION_METRIC, "max"), progress=bar, resume=resume)
    summary.update({"run_dir": str(paths.run_dir), "phase": paths.phase, "selection": SELECTION_METRIC,
                    "parameter_checksum": parameter_checksum(gan)})
    if ctx.is_main:
        ckpt.write_meta(paths, {**meta, "status": "trained", "training": summary})
    cells.close()
    return summary


def _de_source(plan: dict) -> str:
    missing = int((plan["top_de"][:, 0] < 0).sum())
    if missing == 0:
        return keys.UNS_TOP_DE_20
    return f"{keys.UNS_TOP_DE_20} ({missing} conditions without a list ranked by true |delta|)"
