"""The phase-2 math for the shared epoch loop: `CycleGANPhase` (one training step of the latent
cycle-GAN, its optimisers and validation), and the cached latents it trains on.

Every step takes a batch of perturbed training cells and pairs each with a fresh random training
control of the same cell type (no true pairing exists); the losses are `model.losses`'
`generator_losses` and `discriminator_losses`. `engine/train_gan.py` sets the phase up and runs it.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from regina_cli import keys
from regina_cli.config import ReginaConfig
from regina_cli.engine import checkpoint as ckpt
from regina_cli.engine import gan_validation
from regina_cli.engine.condition_stats import ConditionStats
from regina_cli.engine.distributed import DistContext, data_parallel
from regina_cli.engine.loop import EpochBatches, amp_context, scaled_lr, steps_per_epoch
from regina_cli.model.gan import decode_prediction, prior_anchor
from regina_cli.model.prompt import condition_prompt

LATENT_CHUNK = 4096
# Trained-on conditions scored after each epoch (`fit_*`), drawn once per run: on a large screen
# scoring all of them would cost a sizeable share of an epoch (Papalexi's 13 take 3.9 s against
# 21-36 s of training an epoch, on one CPU thread).
FIT_CONDITIONS = 32


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
        # decoder_lr 0 freezes the decoder: its weights then need no gradients (the step still
        # back-propagates through it to the transitions)
        autoencoder.decoder.requires_grad_(g.decoder_lr > 0)
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
        self.start_pearson = None  # [K] the untrained model's validation pearson_delta per condition
        self._fit_plans = {}  # max_conditions -> (training plan, its true latent shifts) or None, built once
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

    def anchor(self, x_ctrl: torch.Tensor, z_ctrl: torch.Tensor, codes: torch.Tensor, controls: torch.Tensor, *,
               training: bool):
        """(cell, latent) that residual decoding starts from: the control (rows `controls`), or with
        an expression prior the control plus the condition's prior in the control's cell type
        (cross-fitted for training conditions)."""
        prior_module = self.gan.expression_prior
        if prior_module is None:
            return x_ctrl, z_ctrl
        target_idx, prompt_idx = self.cells.target_idx[codes], self.cells.prompt_idx[codes]
        cell_type = self.cells.cell_type_codes[controls]
        if training:
            prior = prior_module.with_cell_type(self.train_prior[codes], target_idx, prompt_idx, cell_type)
        else:
            prior = prior_module(target_idx, prompt_idx, cell_type)
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
            anchor = self.anchor(x_ctrl, z_ctrl, codes, ctrl, training=True)
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
    def validation_means(self) -> dict:
        """The validation conditions' predicted means as the model is now (`gan_validation.group_means`)."""
        with self._evaluating():
            return gan_validation.group_means(self.val_plan, self.cells, self._predict,
                                              seed=self.config.runtime.seed + 7,
                                              match_control_mean=self.config.gan.match_control_mean)

    def validation_scores(self, means: dict | None = None) -> gan_validation.ValidationScores:
        """The validation scores of `means` (default: the model as it is now)."""
        return gan_validation.score(self.val_plan, self.validation_means() if means is None else means,
                                    self._val_shift)

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, float]:
        means = self.validation_means()
        self.scores = self.validation_scores(means)
        per_condition = gan_validation.condition_pearson(self.val_plan, means)
        if epoch == 0 and self.start_pearson is None:  # the untrained model (validate_initial): the start
            self.start_pearson = per_condition
        ok = epoch == 0 or gan_validation.selectable(per_condition, self.start_pearson, self.config.gan.selection_se)
        return {**self.scores.as_dict(), **self._fit_scores(),
                gan_validation.SELECTION_METRIC: self.scores.pearson_delta if ok else float("-inf")}

    def _fit_scores(self) -> dict[str, float]:
        """How well the model predicts the conditions it trains on, each from the prior fitted
        without it (`fit_*`; none without an expression prior): whether training fits them at all,
        which validation alone cannot tell apart from fitting them in a way that does not carry over."""
        fit = self.cross_fitted_scores(FIT_CONDITIONS)
        if fit is None:
            return {}
        return {"fit_pearson_delta": fit[0].pearson_delta, "fit_collapse_index": fit[0].collapse_index}

    @contextmanager
    def _evaluating(self):
        """The transition and decoder in eval mode for a prediction pass, back in training mode after."""
        self.gan.eval()
        self.ae.decoder.eval()
        try:
            yield
        finally:
            self.gan.train()
            self.ae.decoder.train()

    @torch.no_grad()
    def remember_start(self) -> None:
        """Score the untrained model's validation conditions one by one: what a trained epoch must
        beat (`gan.selection_se`). Called before training, also when resuming, where the model is
        rebuilt untrained from the same seed before the saved state is loaded."""
        self.start_pearson = None
        self.validate(0)

    @torch.no_grad()
    def cross_fitted_scores(self, max_conditions: int | None = None
                            ) -> tuple[gan_validation.ValidationScores, int] | None:
        """The scores of phase 2's perturbed training conditions, each predicted from the prior
        fitted without it (the cross-fitted table) by the model as it is now, and how many
        conditions: before training, held-out predictions of many more conditions than validation
        has (`engine.clip_choice`); after each epoch, what training fitted (`fit_*`, at most
        `max_conditions` of them, a seeded draw). None without an expression prior or a usable
        training condition."""
        if self.train_prior is None:
            return None
        if max_conditions not in self._fit_plans:  # the conditions and their truth stay the same every epoch
            plan = gan_validation.training_plan(self.cells, self.train_index, seed=self.config.runtime.seed,
                                                max_conditions=max_conditions)
            self._fit_plans[max_conditions] = None if plan is None else \
                (plan, gan_validation.group_latent_shift(plan, self.latents, self.cells))
        if self._fit_plans[max_conditions] is None:
            return None
        plan, shift = self._fit_plans[max_conditions]
        predict = partial(self._predict, latent_shift=shift, cross_fitted=True)
        with self._evaluating():
            means = gan_validation.group_means(plan, self.cells, predict, seed=self.config.runtime.seed + 7,
                                               match_control_mean=self.config.gan.match_control_mean)
        return gan_validation.score(plan, means, shift), len(plan.conditions)

    def _predict(self, rows: torch.Tensor, controls: torch.Tensor, groups: torch.Tensor,
                 shift: torch.Tensor | None = None, *, latent_shift: torch.Tensor | None = None,
                 cross_fitted: bool = False) -> dict[str, torch.Tensor]:
        """For cells `rows` started from `controls` (their expression moved by `shift`, see
        `gan.match_control_mean`): the predicted expression (as decoded, and clipped at 0), the
        prompt, the predicted latent shift, and the decoded control latent plus the real shift of
        the condition (`groups` of the validation plan, or rows of `latent_shift`), the
        autoencoder ceiling. `cross_fitted`: training conditions, from the priors fitted without them."""
        x_ctrl, z_ctrl = self.cells.rows(controls), self.latents[controls]
        if shift is not None:
            x_ctrl = x_ctrl + shift
        latent_shift = self._val_shift if latent_shift is None else latent_shift
        codes = self.cells.condition_codes[rows]
        residual = self.config.gan.residual_decoding
        with amp_context(self.ctx.device, self.config.runtime.amp):
            anchor_x, anchor_z = self.anchor(x_ctrl, z_ctrl, codes, controls, training=cross_fitted)
            prompt = self.condition_prompt(x_ctrl, z_ctrl, codes, anchor_z=anchor_z)
            z_pred = self.gan.predict_latent(z_ctrl, prompt, anchor_z)
            decoded = decode_prediction(self.ae.decoder, torch.cat([z_pred, z_ctrl + latent_shift[groups]]),
                                        anchor_x=torch.cat([anchor_x, x_ctrl]), anchor_z=torch.cat([anchor_z, z_ctrl]),
                                        residual=residual)
        expression, ceiling = decoded.float().chunk(2)
        return {"expression": expression, "clipped": expression.clamp_min(0), "ceiling": ceiling,
                "prompt": prompt.float(), "latent_shift": (z_pred - z_ctrl).float()}

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
