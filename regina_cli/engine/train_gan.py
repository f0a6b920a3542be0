"""Phase 2 (`regina train-gan`): set up and run the latent cycle-GAN that maps control latents to
perturbed ones, per perturbation (the step itself is `engine/gan_phase.CycleGANPhase`).

With the phase-1 encoder and classifier frozen (the latents of real cells are computed once):
  prompt  = E(X_ctrl) - E(X_fake)  (or its negative, `gan.prompt_sign`), the targets' gene prompts
            (`engine/gene_prompts`), and with an expression prior its latent offset
  T_fwd, T_bwd trained with the method's L_cycle and L_G against two conditioned discriminators
            (L_D every `discriminator_every`-th step), plus the decoded-prediction, anchor,
            per-condition moment and pseudo-bulk terms (`model.losses.generator_losses`)
  prediction = X_ctrl + prior + D(T_fwd(z_ctrl)) - D(E(X_ctrl + prior)) with the defaults, the
            method's D(T_fwd(z_ctrl)) with `--preset original`

Set-up (`build_phase`): per-condition statistics, the gene-prompt table, the expression prior
(fitted on the training pseudo-bulk, cross-fitted for training conditions, knowledge rows for
unmeasured genes), the prompts' starting values. Validation (`engine/gan_validation`) scores the
predictable validation conditions, or training conditions held out of phase 2; the untrained
transition is scored as epoch 0; the best epoch by validation pearson_delta is kept, a trained
one only where it beats epoch 0 by more than `gan.selection_se` standard errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from regina_cli import keys
from regina_cli.config import ReginaConfig
from regina_cli.data.conditions import condition_genes, is_control
from regina_cli.data.knowledge import TOP_K, resolve_knowledge
from regina_cli.data.provenance import file_sha256
from regina_cli.engine import checkpoint as ckpt
from regina_cli.engine import clip_choice, correction_choice, expression_prior, gan_validation, gene_prompts
from regina_cli.engine.condition_stats import ConditionStats, condition_stats
from regina_cli.engine.distributed import (DistContext, broadcast_floats, broadcast_state, check_process_count,
                                           check_run_free, parameter_checksum, run_distributed)
from regina_cli.engine.early_stopping import BestTracker, PatienceStopper
from regina_cli.engine.expression_prior import PRIOR_DIM, observed_genes
from regina_cli.engine.gan_phase import CycleGANPhase, encode_all, phase_train_index
from regina_cli.engine.loop import check_resume_trains, compile_modules, finished_summary, fit, seed_everything
from regina_cli.engine.progress import TrainingProgress
from regina_cli.engine.run_config import check_fixed_shapes, resolve_run_config
from regina_cli.engine.run_meta import (check_resume, config_sha256, phase2_inputs, prepare_run_dir,
                                       read_trained_meta, run_data_dir, trained_data_dir, write_meta)
from regina_cli.errors import ReginaError
from regina_cli.io import check_writable_folder


def train_gan(
    run_dir: str | Path,
    *,
    config: ReginaConfig | None = None,
    data_dir: str | Path | None = None,
    gpus: int = 1,
    device: str = "auto",
    resume: bool = False,
    progress: str = "auto",
    announce: Callable[[], None] = lambda: None,
) -> dict:
    """Train phase 2 on top of `run_dir/ae/`; writes `run_dir/gan/` and returns a summary.

    `config`: a resolved config (`run_config.resolve_run_config`); by default phase 1's (or, when
    resuming, phase 2's saved one). `announce`: as in `train_ae.train_autoencoder`.
    """
    check_run_free(run_dir)
    read_trained_meta(ckpt.ae_paths(run_dir))  # a clear error before anything starts
    data_dir = run_data_dir(run_dir, data_dir)
    if config is None:  # resolving checks the shapes the run fixed
        config, _ = resolve_run_config(keys.GAN_DIR, run_dir, resume=resume)
    else:
        check_fixed_shapes(keys.GAN_DIR, run_dir, config, resume=resume)
    check_process_count(gpus, device)
    provenance = {**phase2_inputs(run_dir, data_dir, resume=resume), keys.CONFIG_SHA256: config_sha256(config)}
    check_resume_trains(ckpt.gan_paths(run_dir), config, config.gan.max_epochs, resume=resume)
    if (finished := finished_summary(ckpt.gan_paths(run_dir), config, config.gan.max_epochs, resume=resume)) is not None:
        return finished
    kwargs = dict(run_dir=str(run_dir), config=config, resume=resume, progress=progress,
                  data_dir=None if data_dir is None else str(data_dir), provenance=provenance)
    check_writable_folder(run_dir)
    announce()
    recheck = partial(check_resume, ckpt.gan_paths(run_dir), resume=resume)  # under the lock: trained meanwhile?
    return run_distributed(_train_gan_process, kwargs, gpus=gpus, device=device, run_dir=run_dir, recheck=recheck)


@dataclass
class PhaseSetup:
    """What `train-gan` builds before its first step (`setup_phase`)."""

    phase: CycleGANPhase
    built: dict  # `build_phase`'s second value
    plan: gan_validation.ValidationPlan | None
    cells: object  # data.tensors.CellTensors
    adata: object  # the screen, opened backed
    ae_meta: object  # phase 1's engine.run_meta.RunMeta
    knowledge: object | None
    known: list[str]  # genes the knowledge places
    prompt_genes: list[str]
    learned_genes: list[str]


def setup_phase(ctx: DistContext, run_dir, config: ReginaConfig, data_dir) -> PhaseSetup:
    """Phase 2 of `run_dir` as `train-gan` starts it, before any step and without writing anything:
    the data, the frozen phase-1 model, the validation plan (with its training hold-out, if any)
    and `build_phase`. Benchmarks read the untrained model's tables from it."""
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.split import load_split
    from regina_cli.data.tensors import CellTensors
    from regina_cli.model.autoencoder import Autoencoder

    g = config.gan
    ae_paths = ckpt.ae_paths(run_dir)
    ae_meta = read_trained_meta(ae_paths)
    split_obj = load_split(ae_meta.dataset, ae_meta.split, data_dir)
    adata = read_dataset(ae_meta.dataset, data_dir, backed=True)
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
    plan = gan_validation.build_plan(cells, adata, seed=config.runtime.seed, holdout=g.validation_holdout,
                                     min_conditions=g.validation_min_conditions)

    autoencoder = Autoencoder(cells.n_genes, len(ae_meta.label_classes), config.model)
    autoencoder.load_state_dict(ckpt.load_torch(ae_paths.model))
    autoencoder.to(ctx.device)
    for frozen in (autoencoder.encoder, autoencoder.classifier):
        frozen.requires_grad_(False)
        frozen.eval()
    latents = encode_all(autoencoder.encoder, cells, config.runtime.amp)
    phase, built = build_phase(autoencoder, cells, config, ctx, plan, latents, prompt_genes=prompt_genes,
                               learned_genes=learned_genes, knowledge=knowledge)
    return PhaseSetup(phase, built, plan, cells, adata, ae_meta, knowledge, known, prompt_genes, learned_genes)


def _train_gan_process(ctx: DistContext, *, run_dir, config: ReginaConfig, data_dir, resume, progress,
                       provenance) -> dict:
    g = config.gan
    paths = ckpt.gan_paths(run_dir)
    ae_meta = read_trained_meta(ckpt.ae_paths(run_dir))
    prepare_run_dir(paths, dataset=ae_meta.dataset, genes=ae_meta.gene_names, resume=resume)
    setup = setup_phase(ctx, run_dir, config, data_dir)
    phase, plan, cells, knowledge = setup.phase, setup.plan, setup.cells, setup.knowledge
    autoencoder, gan = phase.ae, phase.gan
    correction = held_out = None
    if ctx.is_main and g.correction_choice and gan.expression_prior is not None and g.correction_scale > 0:
        correction, held_out = correction_choice.choose_correction(phase, held_out=clip_choice.cross_fitted_start(g))
    elif ctx.is_main and clip_choice.cross_fitted_start(g):
        held_out = phase.cross_fitted_scores()
    prior_alone = broadcast_floats([float(correction_choice.prior_alone(correction))], ctx)[0] > 0
    max_epochs = 0 if prior_alone else g.max_epochs  # the transition cannot move what is predicted
    if ctx.is_main and resume:
        phase.remember_start()
    broadcast_state(gan, ctx)
    compile_modules([autoencoder.encoder, autoencoder.decoder], config.runtime.compile, ctx.device)

    meta = ae_meta.for_phase(
        keys.GAN_DIR, prompt_genes=setup.prompt_genes, learned_genes=setup.learned_genes,
        prior_observed_genes=setup.built["observed_genes"],
        prior_cell_types=list(cells.cell_types) if prior_cell_types(config, cells) else None,
        gene_knowledge=None if knowledge is None else {"source": knowledge.source, "kind": knowledge.kind,
                                                       "sha256": knowledge.sha256(), "genes_used": len(setup.known)},
        gene_features=gene_prompts.feature_source(g), prompt_value=g.prompt_value,
        validation_conditions_scored=plan.conditions, validation_source=plan.source, held_out_conditions=plan.held_out,
        top20_de_source=plan.de_source, n_train_pairs_per_epoch=int(len(phase.train_index)),
        selection=gan_validation.SELECTION_METRIC, world_size=ctx.world_size, notes=cells.notes,
        n_train_cells=None, n_val_cells=None, dense_on_device=None, data_dir=trained_data_dir(data_dir), **provenance)
    if ctx.is_main:
        ckpt.write_config(paths, config)
        write_meta(paths, meta)
    setup.adata.file.close()  # CellTensors holds what it needs (and its own file handle when streaming)
    bar = TrainingProgress("train-gan", max_epochs=max_epochs, mode=progress if ctx.is_main else "silent")
    if plan.source != gan_validation.FROM_VALIDATION:
        bar.message(f"note: validating on {plan.source}")
    if prior_alone:
        bar.message("note: the expression prior alone scored higher than with the transition's correction on the "
                    "conditions predicted unseen, so predictions are the prior, decoded, and phase 2 trains nothing "
                    "(gan.correction_choice=false trains at gan.correction_scale)")

    metric = gan_validation.SELECTION_METRIC
    summary = fit(phase, ctx, paths, max_epochs=max_epochs,
                  stopper=PatienceStopper(metric=metric, patience=g.patience),
                  best=BestTracker(metric, "max"), progress=bar, resume=resume)
    if prior_alone:
        summary["stop_reason"] = f"correction_choice: {correction_choice.PRIOR_ALONE}"
    best = best_epoch_scores(paths, summary["best_epoch"])
    prior_kept = summary["best_epoch"] == 0 and g.expression_prior != "none"
    clip_evidence = clip_choice.evidence(best, len(plan.conditions), held_out)
    summary.update({"run_dir": str(paths.run_dir), "phase": paths.phase, "selection": metric,
                    "parameter_checksum": parameter_checksum(gan), "prompt_fit": setup.built["prompt_fit"],
                    "diagnostics": best.as_dict() if best else {}, "clip_evidence": clip_evidence,
                    "clip_predictions": clip_choice.clip_chosen(clip_evidence), "correction_choice": correction,
                    "warnings": ((best.warnings(prior_kept=prior_kept) if best else [])
                                 + untrained_kept(summary, g.expression_prior, g.selection_se))})
    if ctx.is_main:
        write_meta(paths, meta.trained(summary, gan_model_sha256=file_sha256(paths.model)))
    cells.close()
    return summary


def build_phase(autoencoder, cells, config: ReginaConfig, ctx: DistContext,
                plan: gan_validation.ValidationPlan | None, latents: torch.Tensor, *, prompt_genes: list[str],
                learned_genes: list[str], knowledge=None) -> tuple[CycleGANPhase, dict]:
    """Phase 2 ready to train: the condition statistics, the cycle-GAN with its gene prompts, the
    expression prior (fitted, cross-fitted for training, knowledge rows) and the prompts' start."""
    index = phase_train_index(cells, plan.held_out if plan is not None else [])
    stats = condition_stats(cells, latents, index)
    observed = observed_genes(cells, stats) if prior_dim(config) else []
    gan = build_gan(autoencoder, cells, config, prompt_genes, learned_genes, len(observed),
                    knowledge_given=knowledge is not None)
    train_prior = None
    if gan.expression_prior is not None:
        reference = plan.reference if plan is not None else gan_validation.training_control_mean(cells)
        prior_stats = stats
        if prior_cell_types(config, cells):
            prior_stats = expression_prior.average_over_cell_types(gan.expression_prior, cells, stats, index, reference)
        train_prior = expression_prior.fit_expression_prior(gan.expression_prior, cells, prior_stats, reference,
                                                            prompt_genes, seed=config.runtime.seed,
                                                            knowledge=knowledge,
                                                            covariation_skip=config.gan.covariation_skip,
                                                            covariation_cells=config.gan.covariation_cells,
                                                            prior_mean=config.gan.prior_mean,
                                                            prior_per_gene=config.gan.prior_per_gene,
                                                            knockdown_scale=config.gan.knockdown_scale)
        if knowledge is not None:
            expression_prior.fill_knowledge_embeddings(gan.expression_prior, knowledge, cells.genes, prompt_genes)
    fitted = initialise_prompts(gan, autoencoder.encoder, cells, latents, stats, config, train_prior)
    phase = CycleGANPhase(autoencoder, gan, cells, config, ctx, plan, latents, stats)
    phase.train_prior = train_prior
    if (prior := gan.expression_prior) is not None:
        fitted = {**fitted, "prior_linear_weight": float(prior.linear_weight),
                  "prior_self_effect": float(prior.self_effect),
                  "prior_knockdown_entry": float(prior.self_effect * prior.knockdown_scale),
                  "prior_knowledge_weight": float(prior.knowledge_weight),
                  "prior_covariation_weight": float(prior.covariation_weight),
                  "prior_mean_pooling": float(prior.mean_pooling)}
    return phase, {"observed_genes": observed, "prompt_fit": fitted}


def build_gan(autoencoder, cells, config: ReginaConfig, prompt_genes: list[str], learned_genes: list[str],
              n_observed: int = 0, *, knowledge_given: bool = False):
    """The cycle-GAN with its gene-prompt table (co-expression features when configured)."""
    from regina_cli.model.gan import LatentCycleGAN

    features = None
    if config.gan.gene_features == "coexpression":
        features = gene_prompts.coexpression_features(cells, prompt_genes, config.gan.gene_feature_dim,
                                                      seed=config.runtime.seed)
    gan = LatentCycleGAN(autoencoder.z_dim, config.model, prompt_genes=prompt_genes, gene_features=features,
                         learned_genes=learned_genes, n_genes=cells.n_genes, prior_dim=prior_dim(config),
                         prior_observed=n_observed,
                         prior_neighbours=prior_neighbours(config, knowledge_given),
                         prior_covariation=prior_covariation(config),
                         prior_cell_types=len(cells.cell_types) if prior_cell_types(config, cells) else 0
                         ).to(cells.device)
    gan.correction_scale.fill_(config.gan.correction_scale)
    return gan


def prior_cell_types(config: ReginaConfig, cells) -> bool:
    """Whether the expression prior works per cell type (`gan.prior_cell_types`, several types)."""
    return bool(prior_dim(config)) and config.gan.prior_cell_types and len(cells.cell_types) > 1


def prior_dim(config: ReginaConfig) -> int:
    """Width of the expression prior's gene embedding (0: no prior)."""
    return PRIOR_DIM if config.gan.expression_prior != "none" else 0


def prior_covariation(config: ReginaConfig) -> int:
    """Control principal components the prior's co-variation term keeps (0: no prior or the term off)."""
    return config.gan.covariation_components if prior_dim(config) else 0


def prior_neighbours(config: ReginaConfig, knowledge_given: bool) -> int:
    """Knowledge neighbours kept per prompt-table gene in the prior (0: the term is off)."""
    return TOP_K if knowledge_given and config.gan.knowledge_neighbours else 0


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
        priors=None if train_prior is None else train_prior[codes], prior_module=gan.expression_prior)
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


def untrained_kept(summary: dict, expression_prior: str, standard_errors: float = 0.0) -> list[str]:
    """A sentence when no trained epoch beat the untrained transition (epoch 0; by more than
    `standard_errors`, `gan.selection_se`): the kept weights then carry nothing phase-2 training
    learned, which a user should not have to infer."""
    if summary["best_epoch"] != 0 or summary["epochs"] < 1:
        return []
    start = "the expression prior and the untrained transition" if expression_prior != "none" else \
        "the untrained transition"
    unit = "standard error" if standard_errors == 1 else "standard errors"
    margin = f" by more than {standard_errors:g} {unit} (gan.selection_se)" if standard_errors > 0 else ""
    return [f"no training epoch beat epoch 0 on validation{margin} ({summary['epochs']} trained): the kept weights "
            f"are those of {start}, so predictions carry nothing phase-2 training learned"]


def best_epoch_scores(paths, epoch: int) -> gan_validation.ValidationScores | None:
    """The validation scores and diagnostics of epoch `epoch`, read back from history.csv."""
    rows = [r for r in ckpt.read_history(paths) if int(r["epoch"]) == epoch]
    if not rows:
        return None
    names = list(gan_validation.ValidationScores.__dataclass_fields__)
    return gan_validation.ValidationScores(*(float(rows[0].get(f"val_{n}") or "nan") for n in names))
