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

import torch

from regina_cli import keys
from regina_cli.config import ReginaConfig
from regina_cli.data.conditions import condition_genes, is_control
from regina_cli.data.knowledge import resolve_knowledge
from regina_cli.engine import checkpoint as ckpt
from regina_cli.engine import expression_prior, gan_validation, gene_prompts
from regina_cli.engine.condition_stats import ConditionStats, condition_stats
from regina_cli.engine.expression_prior import PRIOR_DIM, observed_genes
from regina_cli.engine.distributed import (DistContext, broadcast_state, check_process_count, data_parallel,
                                           parameter_checksum, run_distributed)
from regina_cli.engine.early_stopping import BestTracker, PatienceStopper
from regina_cli.engine.loop import (EpochBatches, amp_context, compile_modules, fit, scaled_lr, seed_everything,
                                    steps_per_epoch)
from regina_cli.engine.progress import TrainingProgress
from regina_cli.engine.run_config import check_fixed_shapes, resolve_run_config
from regina_cli.engine.run_meta import config_sha256, phase2_inputs, prepare_run_dir, read_trained_meta, write_meta
from regina_cli.errors import ReginaError
from regina_cli.model.gan import decode_prediction, prior_anchor
from regina_cli.model.prompt import condition_prompt

LATENT_CHUNK = 4096


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
    validate_initial = True  # the untrained transition (identity + prompt, or the prior) is a candidate too

    def __init__(self, autoencoder, gan, cells, config: ReginaConfig, ctx: DistContext,
                 val_plan: gan_validation.ValidationPlan | None, latents: torch.Tensor,
                 stats: ConditionStats | None = None):
        """`latents`: E(X) of every cell (`encode_all`); `stats`: the training conditions'
        statistics (`condition_stats`), needed by the moment and pseudo-bulk terms."""
        from regina_cli.model import losses

        self.losses = losses
        self.ae, self.gan, self.cells, self.config, self.ctx = autoencoder, gan, cells, config, ctx
        g = config.gan
        global_batch = g.batch_size * ctx.world_size
        betas = (g.beta1, g.beta2)
        fused = ctx.device.type == "cuda"

        def optimizer(params, rate, clip=0.0):  # each step averages over processes, then clips (data_parallel)
            rate = scaled_lr(rate, g.lr_scale_batch, global_batch)
            return data_parallel(torch.optim.AdamW(params, lr=rate, betas=betas, fused=fused), ctx, clip=clip)

        self.gen_optimizer = optimizer(gan.transition_parameters(), g.lr, g.grad_clip)
        self.dec_optimizer = optimizer(autoencoder.decoder.parameters(), g.decoder_lr, g.grad_clip)
        self.disc_optimizer = optimizer(gan.discriminator_parameters(), g.discriminator_lr)
        self._optimizers = {"transitions": self.gen_optimizer, "decoder": self.dec_optimizer,
                            "discriminator": self.disc_optimizer}
        self._schedulers = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(g.max_epochs, 1))
                            for k, o in self._optimizers.items()}
        seed = config.runtime.seed + ctx.rank
        self.pair_generator = torch.Generator(ctx.device).manual_seed(seed)
        self.noise_generator = torch.Generator(ctx.device).manual_seed(seed + 1)
        self.dropout_generator = torch.Generator(ctx.device).manual_seed(seed + 2)
        self.train_index = phase_train_index(cells, val_plan.held_out if val_plan is not None else [])
        self.batch_size = g.batch_size
        self.cells_per_step = g.batch_size
        self.val_plan = val_plan
        self.latents = latents
        self.stats = stats
        self.train_prior = None  # [C, G] cross-fitted expression priors, set when the GAN has a prior
        if val_plan is not None:
            self._val_shift = gan_validation.group_latent_shift(val_plan, latents, cells)
        self._last_disc = torch.zeros((), device=ctx.device)
        self._noise = g.instance_noise

    def modules(self):
        return {"gan": self.gan, "decoder": self.ae.decoder}

    def optimizers(self):
        return self._optimizers

    def schedulers(self):
        return self._schedulers

    def generators(self):
        return {"pairing": self.pair_generator, "noise": self.noise_generator, "prompt_dropout": self.dropout_generator}

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.train_index), self.batch_size, self.ctx)

    def begin_epoch(self, epoch: int) -> None:
        self.gan.train()
        self.ae.decoder.train()
        self._noise = instance_noise_std(self.config.gan, epoch)
        self._batches = EpochBatches(self.cells, self.train_index, self.batch_size,
                                     seed=self.config.runtime.seed, epoch=epoch, ctx=self.ctx)
        self._epoch_offset = (epoch - 1) * self.steps_per_epoch()

    def condition_prompt(self, x_ctrl: torch.Tensor, z_ctrl: torch.Tensor, codes: torch.Tensor,
                         keep_learned: torch.Tensor | None = None, anchor_z: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt for controls `x_ctrl` (latents `z_ctrl`, from the cache) under conditions `codes`."""
        cells = self.cells
        return condition_prompt(self.ae.encoder, self.gan, x_ctrl, cells.target_idx[codes], cells.prompt_idx[codes],
                                cells.n_targets[codes], self.config.gan, z_ctrl=z_ctrl, keep_learned=keep_learned,
                                anchor_z=anchor_z)

    def anchor(self, x_ctrl: torch.Tensor, z_ctrl: torch.Tensor, codes: torch.Tensor, *, training: bool):
        """(cell, latent) that residual decoding starts from: the control, or with an expression
        prior the control plus the condition's prior (cross-fitted for training conditions)."""
        if self.gan.expression_prior is None:
            return x_ctrl, z_ctrl
        if training:
            prior = self.train_prior[codes]
        else:
            prior = self.gan.expression_prior(self.cells.target_idx[codes], self.cells.prompt_idx[codes])
        return prior_anchor(self.ae.encoder, x_ctrl, z_ctrl, prior)

    def _keep_learned(self, codes: torch.Tensor) -> torch.Tensor | None:
        """Prompt dropout: which targets' learned vectors this step keeps (None: all)."""
        p = self.config.gan.prompt_dropout
        if p <= 0:
            return None
        shape = self.cells.prompt_idx[codes].shape
        return torch.rand(shape, generator=self.dropout_generator, device=self.ctx.device) >= p

    def train_step(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        g = self.config.gan
        idx, x_pert = self._batches.get(step)
        codes = self.cells.condition_codes[idx]
        ctrl = self.cells.control_partners(idx, self.pair_generator)
        x_ctrl = self.cells.rows(ctrl)
        z_ctrl, z_pert = self.latents[ctrl], self.latents[idx]
        noise = dict(noise_std=self._noise, generator=self.noise_generator)
        discriminators = (self.gan.discriminator, self.gan.control_discriminator)
        with amp_context(self.ctx.device, self.config.runtime.amp):
            anchor = self.anchor(x_ctrl, z_ctrl, codes, training=True)
            prompt = self.condition_prompt(x_ctrl, z_ctrl, codes, self._keep_learned(codes), anchor_z=anchor[1])
            for d in discriminators:
                d.requires_grad_(False)
            out = self.losses.generator_losses(self.gan, self.ae.decoder, z_ctrl=z_ctrl, z_pert=z_pert, x_ctrl=x_ctrl,
                                               x_pert=x_pert, prompt=prompt, cfg=g, codes=codes, stats=self.stats,
                                               anchor=anchor, **noise)
        self.gen_optimizer.zero_grad(set_to_none=True)
        self.dec_optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        self.gen_optimizer.step()
        self.dec_optimizer.step()
        for d in discriminators:
            d.requires_grad_(True)
        if (self._epoch_offset + step - 1) % g.discriminator_every == 0:  # steps 1, 1+N, ...
            with amp_context(self.ctx.device, self.config.runtime.amp):
                disc = self.losses.discriminator_losses(self.gan, z_ctrl=z_ctrl, z_pert=z_pert, prompt=prompt.detach(),
                                                        cfg=g, **out.extra, **noise)
            self.disc_optimizer.zero_grad(set_to_none=True)
            disc.backward()
            self.disc_optimizer.step()
            self._last_disc = disc.detach()
        return {**{k: v.float() for k, v in out.logged().items()}, "disc": self._last_disc.float()}

    def end_epoch(self, epoch: int) -> None:
        for scheduler in self._schedulers.values():
            scheduler.step()

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, float]:
        self.gan.eval()
        self.ae.decoder.eval()
        means = gan_validation.group_means(self.val_plan, self.cells, self._predict, seed=self.config.runtime.seed + 7,
                                           match_control_mean=self.config.gan.match_control_mean)
        self.gan.train()
        self.ae.decoder.train()
        self.scores = gan_validation.score(self.val_plan, means, self._val_shift)
        return self.scores.as_dict()

    def _predict(self, rows: torch.Tensor, controls: torch.Tensor, groups: torch.Tensor,
                 shift: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """For cells `rows` started from `controls` (their expression moved by `shift`, see
        `gan.match_control_mean`): the predicted expression, the prompt, the predicted latent
        shift, and the decoded control latent plus the real shift of the condition (`groups`),
        the autoencoder ceiling."""
        x_ctrl, z_ctrl = self.cells.rows(controls), self.latents[controls]
        if shift is not None:
            x_ctrl = x_ctrl + shift
        codes = self.cells.condition_codes[rows]
        residual = self.config.gan.residual_decoding
        with amp_context(self.ctx.device, self.config.runtime.amp):
            anchor_x, anchor_z = self.anchor(x_ctrl, z_ctrl, codes, training=False)
            prompt = self.condition_prompt(x_ctrl, z_ctrl, codes, anchor_z=anchor_z)
            z_pred = self.gan.forward_block(z_ctrl, prompt)
            decoded = decode_prediction(self.ae.decoder, torch.cat([z_pred, z_ctrl + self._val_shift[groups]]),
                                        anchor_x=torch.cat([anchor_x, x_ctrl]), anchor_z=torch.cat([anchor_z, z_ctrl]),
                                        residual=residual)
        expression, ceiling = decoded.float().chunk(2)
        return {"expression": expression, "ceiling": ceiling, "prompt": prompt.float(),
                "latent_shift": (z_pred - z_ctrl).float()}

    def weights(self) -> dict[str, torch.Tensor]:
        return ckpt.state_dict_to_cpu(torch.nn.ModuleDict({"gan": self.gan, "decoder": self.ae.decoder}))


def phase_train_index(cells, held_out: list[str]) -> torch.Tensor:
    """The perturbed training cells phase 2 trains on: all but those of held-out conditions."""
    index = cells.train_perturbed_idx
    if not held_out:
        return index
    codes = torch.as_tensor([cells.conditions.index(c) for c in held_out], device=cells.device)
    return index[~torch.isin(cells.condition_codes[index], codes)]


@torch.no_grad()
def encode_all(encoder, cells, amp: str) -> torch.Tensor:
    """Latents of every cell [n_cells, z_dim] (float32): the encoder is frozen and in eval mode
    in phase 2, so E(X) of a real cell never changes and is computed once, not every step."""
    latents = None
    for idx, x in cells.batches(torch.arange(cells.n_cells, device=cells.device), LATENT_CHUNK, shuffle=False):
        with amp_context(cells.device, amp):
            z = encoder(x).float()
        if latents is None:
            latents = torch.empty((cells.n_cells, z.shape[1]), dtype=torch.float32, device=cells.device)
        latents[idx] = z
    return latents


# --- Public entry point -------------------------------------------------------------------------------
def train_gan(
    run_dir: str | Path,
    *,
    config: ReginaConfig | None = None,
    data_dir: str | Path | None = None,
    gpus: int = 1,
    device: str = "auto",
    resume: bool = False,
    progress: str = "auto",
) -> dict:
    """Train phase 2 on top of `run_dir/ae/`; writes `run_dir/gan/` and returns a summary.

    `config`: a resolved config (`run_config.resolve_run_config`); by default phase 1's (or, when
    resuming, phase 2's saved one).
    """
    read_trained_meta(ckpt.ae_paths(run_dir))  # a clear error before anything starts
    if config is None:
        config, _ = resolve_run_config(keys.GAN_DIR, run_dir, resume=resume)
    check_fixed_shapes(keys.GAN_DIR, run_dir, config, resume=resume)
    check_process_count(gpus, device)
    provenance = {**phase2_inputs(run_dir, data_dir, resume=resume), keys.CONFIG_SHA256: config_sha256(config)}
    kwargs = dict(run_dir=str(run_dir), config=config, resume=resume, progress=progress,
                  data_dir=None if data_dir is None else str(data_dir), provenance=provenance)
    return run_distributed(_train_gan_process, kwargs, gpus=gpus, device=device)


def _train_gan_process(ctx: DistContext, *, run_dir, config: ReginaConfig, data_dir, resume, progress,
                       provenance) -> dict:
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.split import load_split
    from regina_cli.data.tensors import CellTensors
    from regina_cli.model.autoencoder import Autoencoder

    g = config.gan
    ae_paths, paths = ckpt.ae_paths(run_dir), ckpt.gan_paths(run_dir)
    ae_meta = read_trained_meta(ae_paths)
    split_obj = load_split(ae_meta.dataset, ae_meta.split, data_dir)
    adata = read_dataset(ae_meta.dataset, data_dir, backed=True)
    prepare_run_dir(paths, dataset=ae_meta.dataset, genes=ae_meta.gene_names, resume=resume)
    seed_everything(config.runtime.seed + ctx.rank)
    knowledge = resolve_knowledge(config.model.gene_knowledge, data_dir) if config.model.gene_knowledge else None
    known = (expression_prior.knowledge_genes(knowledge, ae_meta.gene_names, condition_genes(split_obj.train))
             if knowledge is not None else [])
    prompt_genes, learned_genes = gene_prompts.prompt_gene_names(split_obj.train, ae_meta.gene_names, g, known)
    cells = CellTensors.from_anndata(
        adata, split_obj, device=ctx.device, device_data=config.runtime.device_data,
        chunk_cells=config.runtime.stream_chunk_cells, genes=ae_meta.gene_names, prompt_genes=prompt_genes)
    if len(cells.train_perturbed_idx) == 0:  # before the plan, which may fall back on training cells
        raise ReginaError(f"split {ae_meta.split} has no perturbed training cells")
    plan = gan_validation.build_plan(cells, adata, seed=config.runtime.seed, holdout=g.validation_holdout)

    autoencoder = Autoencoder(cells.n_genes, len(ae_meta.label_classes), config.model)
    autoencoder.load_state_dict(ckpt.load_torch(ae_paths.model))
    autoencoder.to(ctx.device)
    for frozen in (autoencoder.encoder, autoencoder.classifier):
        frozen.requires_grad_(False)
        frozen.eval()
    latents = encode_all(autoencoder.encoder, cells, config.runtime.amp)
    phase, built = build_phase(autoencoder, cells, config, ctx, plan, latents, prompt_genes=prompt_genes,
                               learned_genes=learned_genes, knowledge=knowledge)
    gan = phase.gan
    broadcast_state(gan, ctx)
    compile_modules([autoencoder.encoder, autoencoder.decoder], config.runtime.compile, ctx.device)

    meta = ae_meta.for_phase(
        keys.GAN_DIR, prompt_genes=prompt_genes, learned_genes=learned_genes,
        prior_observed_genes=built["observed_genes"],
        gene_knowledge=None if knowledge is None else {"source": knowledge.source, "kind": knowledge.kind,
                                                       "sha256": knowledge.sha256(), "genes_used": len(known)},
        gene_features=gene_prompts.feature_source(g), prompt_value=g.prompt_value,
        validation_conditions_scored=plan.conditions, validation_source=plan.source, held_out_conditions=plan.held_out,
        top20_de_source=plan.de_source, n_train_pairs_per_epoch=int(len(phase.train_index)),
        selection=gan_validation.SELECTION_METRIC, world_size=ctx.world_size, notes=cells.notes,
        n_train_cells=None, n_val_cells=None, dense_on_device=None, **provenance)
    if ctx.is_main:
        ckpt.write_config(paths, config)
        write_meta(paths, meta)
    adata.file.close()  # CellTensors holds what it needs (and its own file handle when streaming)
    bar = TrainingProgress("train-gan", max_epochs=g.max_epochs, mode=progress if ctx.is_main else "silent")
    if plan.source != gan_validation.FROM_VALIDATION:
        bar.message(f"note: validating on {plan.source}")

    metric = gan_validation.SELECTION_METRIC
    summary = fit(phase, ctx, paths, max_epochs=g.max_epochs,
                  stopper=PatienceStopper(metric=metric, patience=g.patience),
                  best=BestTracker(metric, "max"), progress=bar, resume=resume)
    best = best_epoch_scores(paths, summary["best_epoch"])
    summary.update({"run_dir": str(paths.run_dir), "phase": paths.phase, "selection": metric,
                    "parameter_checksum": parameter_checksum(gan), "prompt_fit": built["prompt_fit"],
                    "diagnostics": best.as_dict() if best else {}, "warnings": best.warnings() if best else []})
    if ctx.is_main:
        write_meta(paths, meta.trained(summary))
    cells.close()
    return summary


def build_phase(autoencoder, cells, config: ReginaConfig, ctx: DistContext,
                plan: gan_validation.ValidationPlan | None, latents: torch.Tensor, *, prompt_genes: list[str],
                learned_genes: list[str], knowledge=None) -> tuple[CycleGANPhase, dict]:
    """Phase 2 ready to train: the condition statistics, the cycle-GAN with its gene prompts, the
    expression prior (fitted, cross-fitted for training, knowledge rows) and the prompts' start."""
    stats = condition_stats(cells, latents, phase_train_index(cells, plan.held_out if plan is not None else []))
    observed = observed_genes(cells, stats) if prior_dim(config) else []
    gan = build_gan(autoencoder, cells, config, prompt_genes, learned_genes, len(observed))
    train_prior = None
    if gan.expression_prior is not None:
        reference = plan.reference if plan is not None else gan_validation.training_control_mean(cells)
        train_prior = expression_prior.fit_expression_prior(gan.expression_prior, cells, stats, reference,
                                                            prompt_genes, seed=config.runtime.seed)
        if knowledge is not None:
            expression_prior.fill_knowledge_embeddings(gan.expression_prior, knowledge, cells.genes, prompt_genes)
    fitted = initialise_prompts(gan, autoencoder.encoder, cells, latents, stats, config, train_prior)
    phase = CycleGANPhase(autoencoder, gan, cells, config, ctx, plan, latents, stats)
    phase.train_prior = train_prior
    if gan.expression_prior is not None:
        fitted = {**fitted, "prior_linear_weight": float(gan.expression_prior.linear_weight),
                  "prior_self_effect": float(gan.expression_prior.self_effect)}
    return phase, {"observed_genes": observed, "prompt_fit": fitted}


def build_gan(autoencoder, cells, config: ReginaConfig, prompt_genes: list[str], learned_genes: list[str],
              n_observed: int = 0):
    """The cycle-GAN with its gene-prompt table (co-expression features when configured)."""
    from regina_cli.model.gan import LatentCycleGAN

    features = None
    if config.gan.gene_features == "coexpression":
        features = gene_prompts.coexpression_features(cells, prompt_genes, config.gan.gene_feature_dim,
                                                      seed=config.runtime.seed)
    return LatentCycleGAN(autoencoder.z_dim, config.model, prompt_genes=prompt_genes, gene_features=features,
                          learned_genes=learned_genes, n_genes=cells.n_genes, prior_dim=prior_dim(config),
                          prior_observed=n_observed).to(cells.device)


def prior_dim(config: ReginaConfig) -> int:
    """Width of the expression prior's gene embedding (0: no prior)."""
    return PRIOR_DIM if config.gan.expression_prior != "none" else 0


@torch.no_grad()
def initialise_prompts(gan, encoder, cells, latents, stats: ConditionStats, config: ReginaConfig,
                       train_prior: torch.Tensor | None = None) -> dict:
    """Scale the encoder prompt (`gan.prompt_scale`), then fit the gene prompts to what the encoder
    prompt (and the expression prior's latent offset) leave of the real latent shifts of the genes
    perturbed alone in training (`engine.gene_prompts`); returns what was set. Nothing to fit
    (small learned vectors, no features, raw scale) costs no encoder pass."""
    g = config.gan
    needed = (g.prompt_scale == "matched" or g.learned_prompt_init == "shift"
              or gan.gene_prompts.feature_map is not None)
    if not needed:
        return {"encoder_prompt_scale": float(gan.encoder_prompt_scale)}
    codes = [c for c, name in enumerate(cells.conditions) if stats.counts[c] > 0 and not is_control(name)]
    encoder_prompts, prior_prompts = gene_prompts.mean_encoder_prompts(
        encoder, cells, latents, codes, g, seed=config.runtime.seed,
        priors=None if train_prior is None else train_prior[codes])
    shifts = stats.latent_shift[codes]
    measured = (cells.target_idx[codes] >= 0).any(1)
    if g.prompt_scale == "matched" and bool(measured.any()):
        ratio = shifts[measured].norm(dim=1).mean() / encoder_prompts[measured].norm(dim=1).mean().clamp_min(1e-12)
        gan.encoder_prompt_scale.fill_(float(ratio))
    residual = shifts - encoder_prompts * gan.encoder_prompt_scale - prior_prompts
    singles = gene_prompts.single_conditions(cells, codes)
    position = {code: row for row, code in enumerate(codes)}
    fitted = gene_prompts.initialise_gene_prompts(
        gan, {gene: residual[position[code]] for gene, code in singles.items()}, learned_init=g.learned_prompt_init)
    return {**fitted, "encoder_prompt_scale": float(gan.encoder_prompt_scale)}


def best_epoch_scores(paths, epoch: int) -> gan_validation.ValidationScores | None:
    """The validation scores and diagnostics of epoch `epoch`, read back from history.csv."""
    rows = [r for r in ckpt.read_history(paths) if int(r["epoch"]) == epoch]
    if not rows:
        return None
    names = list(gan_validation.ValidationScores.__dataclass_fields__)
    return gan_validation.ValidationScores(*(float(rows[0][f"val_{n}"]) for n in names))
