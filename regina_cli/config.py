"""Configuration: dataclasses with commented defaults, named presets, YAML files and dotted
`--set section.key=value` overrides.

Every key carries its meaning in `field(metadata={"help": ...})`; `docs/configuration.md` is
generated from these (see `config_reference_markdown`) so the documentation cannot drift.
Unknown keys and wrongly typed values are errors, never silently ignored.

One module on purpose (over 400 lines): the dataclasses are the single reference of every key,
its default, meaning and allowed values; the presets, the layering rule, `validate` and the
generated reference all read them, and splitting them would spread one table over several files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from regina_cli.errors import ReginaError


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, low: float | None = None,
         high: float | None = None, open_low: bool = False, open_high: bool = False):
    """A config field: default, the one-line meaning shown in the generated docs, and its allowed
    values (`choices`, or a range `low`..`high`, open at an end when `open_low`/`open_high`),
    checked when a config is resolved (`validate`) so a bad value fails before any work starts."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "open_low": open_low,
            "open_high": open_high}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


_POSITIVE = dict(low=0, open_low=True)
_NON_NEGATIVE = dict(low=0)
_AT_LEAST_1 = dict(low=1)
_FRACTION = dict(low=0, high=1, open_high=True)


@dataclass
class ModelConfig:
    """Network shapes (defaults: the first research implementation's sizes, as in its dixit, adamson and norman runs)."""

    seq_len: int = _opt(16, "Tokens per cell; each token holds ceil(n_genes / seq_len) genes.", **_AT_LEAST_1)
    d_model: int = _opt(512, "Transformer width of encoder and decoder (a multiple of n_heads).", **_AT_LEAST_1)
    n_layers: int = _opt(4, "Pre-norm Transformer layers in the encoder and in the decoder.", **_AT_LEAST_1)
    n_heads: int = _opt(8, "Attention heads.", **_AT_LEAST_1)
    ff_mult: int = _opt(4, "Feed-forward width as a multiple of d_model.", **_AT_LEAST_1)
    z_dim: int = _opt(256, "Latent size (after the encoder's final LayerNorm).", **_AT_LEAST_1)
    dropout: float = _opt(0.1, "Dropout inside the Transformer layers.", **_FRACTION)
    classifier_hidden: int = _opt(128, "Hidden width of the spectral-normalised latent classifier.", **_AT_LEAST_1)
    classifier_dropout: float = _opt(0.2, "Dropout in the latent classifier.", **_FRACTION)
    transition_hidden: int = _opt(512, "Width of the forward/backward transition blocks.", **_AT_LEAST_1)
    transition_blocks: int = _opt(2, "Residual blocks in each transition block.", **_NON_NEGATIVE)
    discriminator_hidden: list = _opt([512, 256], "Hidden widths of the conditioned discriminator.")
    gene_knowledge: str = _opt("", "Prior gene knowledge for targets the screen does not measure: a file of gene "
                               "embeddings (CSV/TSV/Parquet/NPZ) or GO terms (TSV/GAF, GEARS' gene2go pickle), or "
                               "`go` for the file `regina fetch go` stored; empty: none (docs/knowledge.md).")


@dataclass
class AEConfig:
    """Phase 1: regularised autoencoder with latent classifier (L_AE in the method)."""

    batch_size: int = _opt(64, "Cells per optimisation step (per process).", low=2)
    max_epochs: int = _opt(100, "Upper bound on epochs; consistency early stopping usually ends sooner.", **_AT_LEAST_1)
    lr: float = _opt(1e-4, "AdamW learning rate of encoder and decoder.", **_POSITIVE)
    weight_decay: float = _opt(1e-3, "AdamW weight decay.", **_NON_NEGATIVE)
    grad_clip: float = _opt(0.5, "Gradient norm clip (0 disables).", **_NON_NEGATIVE)
    classifier_lr: float = _opt(1e-3, "AdamW learning rate of the latent classifier (L_sg step).", **_POSITIVE)
    lr_scale_batch: bool = _opt(False, "Scale learning rates linearly with the global batch (batch_size x processes) / 64 (large-batch GPU runs).")
    lambda_mse: float = _opt(1.5, "Weight of the reconstruction loss L_MSE.", **_NON_NEGATIVE)
    lambda_center: float = _opt(0.5, "Weight of the center loss L_CE.", **_NON_NEGATIVE)
    lambda_reg: float = _opt(1e-4, "Weight of the latent regulariser L_reg.", **_NON_NEGATIVE)
    lambda_clf: float = _opt(1.0, "Weight of L_CLF (classification through the encoder).", **_NON_NEGATIVE)
    lambda_cons: float = _opt(0.0, "Weight of L_cons as a training term (0: monitoring only, as in the method).", **_NON_NEGATIVE)
    consistency_patience: int = _opt(5, "Stop after this many epochs in a row in which validation L_cons increased.", **_AT_LEAST_1)
    consistency_min_delta: float = _opt(1e-4, "An increase smaller than this does not count as an increase.", **_NON_NEGATIVE)
    min_epochs: int = _opt(3, "Never stop before this many epochs.", **_NON_NEGATIVE)
    selection: str = _opt("variance_preservation", "Best-checkpoint criterion on validation: variance_preservation or val_mse.",
                           choices=("variance_preservation", "val_mse"))


@dataclass
class GANConfig:
    """Phase 2: latent cycle-GAN with perturbation prompts."""

    batch_size: int = _opt(64, "Control/perturbed pairs per step (per process).", low=2)
    max_epochs: int = _opt(100, "Upper bound on epochs; 0 trains nothing and keeps the untrained start (epoch 0: "
                                "the expression prior, which needs gan.expression_prior), validated and saved as a "
                                "trained run would be.", **_NON_NEGATIVE)
    patience: int = _opt(10, "Stop after this many epochs without a better validation Pearson delta.", **_AT_LEAST_1)
    lr: float = _opt(4e-4, "AdamW learning rate of the transition blocks.", **_POSITIVE)
    beta1: float = _opt(0.5, "AdamW beta1 (transitions and discriminator).", **_FRACTION)
    beta2: float = _opt(0.999, "AdamW beta2 (transitions and discriminator).", **_FRACTION)
    decoder_lr: float = _opt(5e-5, "Learning rate of the decoder, which keeps training in phase 2 (0 freezes it).", **_NON_NEGATIVE)
    discriminator_lr: float = _opt(4e-4, "AdamW learning rate of the discriminator.", **_POSITIVE)
    discriminator_every: int = _opt(5, "Update the discriminator every N-th step.", **_AT_LEAST_1)
    real_target: float = _opt(0.9, "Target for real latents in L_D (one-sided label smoothing).", low=0, high=1, open_low=True)
    instance_noise: float = _opt(0.1, "Std of instance noise added to discriminator inputs.", **_NON_NEGATIVE)
    noise_decay_start: int = _opt(20, "Epoch at which instance noise starts decaying linearly.", **_NON_NEGATIVE)
    noise_decay_end: int = _opt(80, "Epoch at which instance noise reaches zero (not before noise_decay_start).", **_NON_NEGATIVE)
    lambda_cycle: float = _opt(5.0, "Weight of the cycle loss L_cycle.", **_NON_NEGATIVE)
    lambda_adv: float = _opt(0.5, "Weight of the generator loss L_G (the first research code: 3.5, preset original).", **_NON_NEGATIVE)
    lambda_anchor: float = _opt(1.0, "Weight of the reconstruction anchor (decode real latents).", **_NON_NEGATIVE)
    lambda_pred: float = _opt(1.0, "Weight of MSE between decoded prediction and the perturbed cell.", **_NON_NEGATIVE)
    lambda_moment: float = _opt(1.0, "Weight of per-condition latent moment matching: mean and spread of T_fwd(z_ctrl) "
                                "against the real perturbed latents of the same condition (needs no pairing).",
                                **_NON_NEGATIVE)
    lambda_bulk: float = _opt(1.0, "Weight of per-condition pseudo-bulk matching: the mean decoded prediction of a "
                              "condition against the mean of its real cells.", **_NON_NEGATIVE)
    grad_clip: float = _opt(0.5, "Gradient norm clip of the transitions and the decoder (0 disables; the first "
                            "research code clipped at 0.5).", **_NON_NEGATIVE)
    prompt_value: float = _opt(-1.0, "Value written into every targeted gene of X_fake (times the number of targets); "
                               "its sign follows gan.modality unless that is as_given.")
    modality: str = _opt("as_given", "What the screen does to its targets: interference or knockout (X_fake's targets "
                         "are set to -|prompt_value|), activation (+|prompt_value|), or as_given (prompt_value as written).",
                         choices=("as_given", "interference", "knockout", "activation"))
    prompt_sign: str = _opt("perturbation", "Encoder prompt direction: method (Z_ctrl - Z_fake, as the method text writes "
                            "it) or perturbation (Z_fake - Z_ctrl, towards X_fake, as the first research code ran "
                            "it).", choices=("method", "perturbation"))
    prompt_scale: str = _opt("raw", "Encoder prompt scale: raw, or matched (rescaled once so its mean norm over the "
                             "training conditions equals that of their real latent shifts).", choices=("raw", "matched"))
    gene_features: str = _opt("none", "Gene representation mapped into the prompt by a learned layer, so genes never "
                              "perturbed in training get a prompt: none, or coexpression (each measured gene's "
                              "loadings on the principal components of the training cells).",
                              choices=("none", "coexpression"))
    gene_feature_dim: int = _opt(32, "Principal components in the co-expression gene representation.", **_AT_LEAST_1)
    learned_prompts: str = _opt("unmeasured", "Genes with a learned prompt vector: unmeasured (perturbed in training "
                                "but not measured, whose encoder prompt is empty) or perturbed (every gene perturbed "
                                "in training).", choices=("unmeasured", "perturbed"))
    learned_prompt_init: str = _opt("small", "Initial learned prompt vectors: small (0.01 x noise) or shift (the "
                                    "part of the gene's mean latent shift in its training condition that the rest of "
                                    "the prompt does not explain; useful without an expression prior).",
                                    choices=("small", "shift"))
    prompt_dropout: float = _opt(0.0, "Probability of hiding a gene's learned prompt vector in a training step, so "
                                 "the rest of the prompt must carry the condition alone (as for unseen genes).",
                                 **_FRACTION)
    validation_holdout: float = _opt(0.2, "When fewer than gan.validation_min_conditions validation conditions can be "
                                     "predicted, hold out this share of the training perturbations (at least 2) from "
                                     "phase 2 and validate on them too; 0 validates on what there is (the training "
                                     "conditions themselves when nothing else).", **_FRACTION)
    validation_min_conditions: int = _opt(1, "Fewest predictable validation conditions that model selection trusts "
                                          "alone; below it the gan.validation_holdout share of training perturbations "
                                          "joins them. 1 (only when none is predictable) by default: the hold-out also "
                                          "leaves the prior without those conditions, which costs small screens "
                                          "(McFaline 0.644 -> 0.581 at 3; benchmarks/results/knowledge.md).", **_AT_LEAST_1)
    residual_decoding: bool = _opt(True, "Predict X_ctrl + D(T(z)) - D(z) instead of the method's D(T(z)) (cancels decoder error).")
    match_control_mean: bool = _opt(True, "Shift the control cells drawn for each condition (and cell type) so their "
                                     "mean is the mean of all training controls of that cell type: a 100-cell draw "
                                     "otherwise adds its sampling noise to every predicted mean change. Used in "
                                     "validation and by `regina predict`; with residual decoding only.")
    expression_prior: str = _opt("linear", "An expression-space prior the transition corrects: none, or linear (the "
                                 "gene-embedding linear model of the training pseudo-bulk, Ahlmann-Eltze et al. 2025; "
                                 "predictions become X_ctrl + prior + D(T(z)) - D(z + E(X_ctrl + prior) - z), and "
                                 "training sees each training condition's prior fitted without it). Needs "
                                 "gan.residual_decoding.", choices=("none", "linear"))
    knowledge_neighbours: bool = _opt(True, "With model.gene_knowledge and an expression prior: also move each "
                                      "target not perturbed alone in training towards the observed effects of its "
                                      "most similar trained genes, by a weight chosen on held-out training genes (0 "
                                      "where they do not predict). On by default: on the demo's validation "
                                      "conditions it raised pearson_delta from 0.464 to 0.476 with the co-variation "
                                      "term (0.409 to 0.429 without it; seeds 1-3, higher in each; "
                                      "docs/knowledge.md).")
    covariation_components: int = _opt(32, "With an expression prior: principal components of the training "
                                       "controls whose gene co-variation moves the genes that co-vary with a measured "
                                       "target along with its knock-down, by a weight chosen on held-out training "
                                       "genes (0 where it does not predict; 0 here turns the term off). On the demo's "
                                       "validation conditions pearson_delta rose from 0.409 to 0.464 (seeds 1-3; "
                                       "benchmarks/README.md).", **_NON_NEGATIVE)
    covariation_cells: str = _opt("within", "Cells whose co-variation the co-variation term reads: controls (the "
                                  "training controls), training (the controls and the perturbed training cells, each "
                                  "centred on its cell type's mean, so the training perturbations' effects join the "
                                  "co-variation) or within (the same cells, each centred on its own condition's mean "
                                  "in its cell type: co-variation within conditions only). Each fold of the fit reads "
                                  "only the conditions it may see. within by default: on training conditions held out "
                                  "of phase 2 the demo scored 0.561 against 0.528 (training) and 0.516 (controls; "
                                  "higher in 9 of 9 runs), Papalexi 0.333 against 0.335 and 0.334 (the folds give the "
                                  "term little weight there); demo validation 0.523 against 0.497 (training) and 0.494 "
                                  "(controls; benchmarks/README.md).",
                                  choices=("controls", "training", "within"))
    prior_mean: str = _opt("conditions", "How the prior's mean change (its start for an unseen target) averages the "
                           "training conditions: conditions (each counts once), cells (each condition by its cell "
                           "count, as the train_mean baseline pools them), or chosen (the share pooled over cells, "
                           "0, 0.5 or 1, chosen by the folds on held-out measured training targets). conditions by "
                           "default: on training conditions held out of phase 2, cells scored 0.305 against 0.301 on "
                           "Papalexi (0.350 against 0.301 on its strongest responders, lower on the moderate ones) "
                           "and 0.485 against 0.490 on the demo; chosen 0.338 against 0.330 on Papalexi (0.387 "
                           "against 0.332 on its strongest responders; higher in 6 of 15 runs, lower in 6) and 0.516 "
                           "against 0.519 on the demo (benchmarks/README.md).",
                           choices=("conditions", "cells", "chosen"))
    prior_per_gene: bool = _opt(True, "With an expression prior: the mean change an unseen target starts from "
                                "counts each training combination's change divided by its number of targets (the "
                                "change of one gene), instead of whole, which starts every unseen single from a "
                                "change inflated by the combinations'. A screen of singles is the same either way. "
                                "On the demo (split seeds 1-3) level in pearson_delta (validation 0.494 against "
                                "0.496, held-out training conditions 0.517 against 0.519) with predictions less "
                                "alike (validation collapse index 0.331 against 0.362, truth 0.194; "
                                "benchmarks/README.md).")
    prior_cell_types: bool = _opt(True, "With an expression prior, on a screen of several cell types (obs "
                                  "cell_type): fit the prior on each condition's change within each cell type, "
                                  "averaged over the types in the controls' proportions, and give each predicted "
                                  "cell its own type's departure from that average (per target). false: pooled "
                                  "changes, in which a condition's cell-type mix passes for its effect. A screen of "
                                  "one cell type is the same either way. On McFaline with GO knowledge (split seeds 1-3, one "
                                  "validation condition each) validation pearson_delta 0.688 against 0.669 (training "
                                  "conditions predicted from priors fitted without them 0.662 against 0.651, higher in "
                                  "3 of 3 seeds); both stay below train_mean matched to the cell lines (benchmarks/README.md).")
    covariation_skip: int = _opt(4, "Leading principal components of the cells the co-variation term reads left "
                                 "out of it: the axes every gene moves on (cell cycle, stress, depth), which would "
                                 "give every knock-down one shared shift. 0 keeps them (controls: demo validation "
                                 "0.420 instead of 0.464 at 2). 4 with gan.covariation_cells=within: against 2, "
                                 "level in pearson_delta on held-out training conditions (demo 0.560 against 0.561, "
                                 "Papalexi 0.335 against 0.333, higher in 7 of 15 runs and lower in 1) and demo "
                                 "validation (0.524 against 0.523), with predictions less alike (validation "
                                 "collapse index 0.252 against 0.335, truth 0.194; benchmarks/README.md).",
                                 **_NON_NEGATIVE)
    knockdown_scale: float = _opt(2.0, "With an expression prior: a measured unseen target's own entry is this times "
                                  "the median change of the measured training targets in their own conditions: how "
                                  "much the knock-down counts against the shared mean change. On training conditions "
                                  "held out of phase 2, 2 scored 0.330 against 0.325 at 1 on Papalexi (higher in 9 of "
                                  "15 runs, lower in 3) and 0.497 against 0.490 on the demo (9 of 9); 4 scored 0.331 "
                                  "and 0.488.", **_POSITIVE)
    selection_se: float = _opt(1.0, "A trained epoch replaces the untrained start (epoch 0: with a prior, the prior "
                               "itself) only when its validation pearson_delta is higher by more than this many "
                               "standard errors of the per-condition differences (the one-standard-error rule: the "
                               "simpler model unless the evidence is clear; with fewer than 2 validation conditions "
                               "there is none, and epoch 0 is kept). 0 keeps the best epoch, the method's rule "
                               "(preset original).", low=0)
    correction_scale: float = _opt(0.5, "How much of the transition's move from its anchor latent (E(X_ctrl + prior), "
                                   "or z_ctrl without a prior) a prediction keeps: 1 is T_fwd(z_ctrl) as trained (the "
                                   "method; preset original), 0 the anchor itself (with a prior, "
                                   "X_ctrl + prior). Used by validation and `regina predict`; training always learns "
                                   "the whole move. 0.5 by default: on training conditions held out of phase 2 it "
                                   "scored 0.325 against 0.301 for 1 on Papalexi (higher in 14 of 15 runs) and 0.4900 "
                                   "against 0.4902 on the demo (benchmarks/README.md).", low=0, high=1)
    correction_choice: bool = _opt(True, "With an expression prior: before training, keep gan.correction_scale or 0 "
                                   "(the prior alone), whichever the untrained model scores higher on the conditions "
                                   "it predicts unseen (validation, and training conditions from the prior fitted "
                                   "without each), pooled; recorded in gan/meta.json (training.correction_choice). "
                                   "On by default: on training conditions held out of phase 2 it scored 0.336 against "
                                   "0.329 on Papalexi (0 kept in 12 of 15 runs) and 0.5187 against 0.5190 on the demo; "
                                   "McFaline with GO knowledge test 0.701 against 0.683 (0 kept in 3/3 seeds; "
                                   "benchmarks/README.md).")
    lr_scale_batch: bool = _opt(False, "Scale learning rates linearly with the global batch (batch_size x processes) / 64.")


@dataclass
class RuntimeConfig:
    """Where and how to run; does not change the model."""

    seed: int = _opt(0, "Seed for weights, pairing and sampling (rank is added per process).", low=0, high=2**31 - 1)
    amp: str = _opt("auto", "Mixed precision: auto (bf16 on GPUs that support it), bf16 or off.",
                     choices=("auto", "bf16", "off"))
    compile: bool = _opt(False, "torch.compile the encoder and decoder (GPU only). Pays at Norman's size (H200, "
                         "batch 8,192: phase 1 58,000 -> 78,000 cells/s, phase 2 26,000 -> 33,000) after "
                         "about a minute of compiling; on a small screen the compiling is most of the run.")
    device_data: str = _opt("auto", "Keep the training matrix on the device: auto (when it fits), always or never (stream).",
                             choices=("auto", "always", "never"))
    stream_chunk_cells: int = _opt(8192, "Cells read at a time when streaming from the h5ad.", **_AT_LEAST_1)


@dataclass
class ReginaConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = get_type_hints(ReginaConfig)

# --- Presets ---------------------------------------------------------------------------------
# Each preset is a dict of overrides on the defaults (which are the original sizes). Loss
# weights: adamson and dixit are the original's two presets; norman used adamson's.
_ADAMSON = {
    "ae": {"lambda_mse": 1.5, "lambda_center": 0.5, "lambda_clf": 1.0, "lambda_reg": 1e-4},
    "gan": {"lambda_cycle": 5.0, "lambda_adv": 3.5, "prompt_value": -1.0},
}
# Phase 2 as the first research code ran it (its recorded settings): its loss weights (adamson's), plain
# decoding D(T(z)), the prompt E(X_fake) - E(X_ctrl), generator clipping at 0.5, the discriminator every
# 5th step, the reconstruction anchor logged but not in the loss; none of the later additions.
ORIGINAL_PHASE2 = {
    "lambda_cycle": 5.0, "lambda_adv": 3.5, "lambda_pred": 1.0, "lambda_anchor": 0.0, "lambda_moment": 0.0,
    "lambda_bulk": 0.0, "grad_clip": 0.5, "discriminator_every": 5, "prompt_value": -1.0, "modality": "as_given",
    "prompt_sign": "perturbation", "prompt_scale": "raw", "gene_features": "none", "learned_prompts": "unmeasured",
    "learned_prompt_init": "small", "prompt_dropout": 0.0, "validation_holdout": 0.0, "residual_decoding": False,
    "match_control_mean": False, "expression_prior": "none", "correction_scale": 1.0, "correction_choice": False,
    "selection_se": 0.0,
}
PRESETS: dict[str, dict] = {
    "original": {"ae": _ADAMSON["ae"], "gan": ORIGINAL_PHASE2},
    "adamson": _ADAMSON,
    "norman": _ADAMSON,
    "dixit": {
        "ae": {"lambda_mse": 3.0, "lambda_center": 0.5, "lambda_clf": 0.1, "lambda_reg": 1e-4},
        "gan": {"lambda_cycle": 1.0, "lambda_adv": 0.1, "prompt_value": -0.1},
    },
    # The demo is a two-minute tour on 2 CPU cores: a narrow model, 15 epochs a phase. Phase 1 at
    # batch 64 (4x the steps of batch 256 in the same epochs) lifted the autoencoder ceiling on
    # validation (demo seed 1) from 0.21 to 0.35 pearson_delta.
    "demo": {
        "model": {
            "d_model": 32, "n_layers": 2, "n_heads": 2, "ff_mult": 2, "z_dim": 32,
            "classifier_hidden": 32, "transition_hidden": 128, "discriminator_hidden": [64, 32],
        },
        "ae": {"batch_size": 64, "max_epochs": 15, "lr": 1e-3, "min_epochs": 5},
        "gan": {"batch_size": 256, "max_epochs": 15, "lr": 1e-3, "discriminator_lr": 1e-3,
                "decoder_lr": 1e-4, "patience": 8, "noise_decay_start": 3, "noise_decay_end": 12,
                "lambda_pred": 5.0},
    },
}


def auto_preset(n_genes: int) -> dict:
    """Model and schedule sized to the gene count, for datasets without a named preset.

    Keeps the original's 16 tokens and scales width with the token size, so a screen of a
    few thousand cells and ~500 genes trains both phases on 2 CPU cores in minutes.
    """
    tokens = 16
    width = 2 ** max(6, min(9, math.ceil(math.log2(max(n_genes, 1) / tokens)) + 1))
    layers = 2 if width < 256 else 4
    return {
        "model": {
            "seq_len": tokens, "d_model": width, "n_layers": layers, "n_heads": max(2, width // 64),
            "z_dim": min(256, width), "classifier_hidden": min(128, width),
            "transition_hidden": min(512, 2 * width),
            "discriminator_hidden": [min(512, 2 * width), min(256, width)],
        },
        "ae": {"batch_size": 128, "max_epochs": 40, "lr": 5e-4},
        "gan": {"batch_size": 128, "max_epochs": 40, "lr": 5e-4, "patience": 8,
                "noise_decay_start": 5, "noise_decay_end": 30},
    }


# --- Building a config -----------------------------------------------------------------------
def _coerce(section: str, key: str, value: Any, target_type: Any) -> Any:
    name = f"{section}.{key}"
    if target_type is bool:
        if isinstance(value, bool):
            return value
        raise ReginaError(f"config key {name} takes true or false, not {value!r}")
    if target_type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        raise ReginaError(f"config key {name} takes a number, not {value!r}")
    if target_type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ReginaError(f"config key {name} takes a whole number, not {value!r}")
    if target_type is str:
        return _coerce_text(name, value)
    if target_type is list:
        if isinstance(value, list):
            return list(value)
        raise ReginaError(f"config key {name} takes a list like [512, 256], not {value!r}")
    return value


def _coerce_text(name: str, value: Any) -> str:
    """YAML null (an empty value) means "none", i.e. ""; a YAML boolean or number is refused
    because str() would turn `off` into 'False', a value the user never wrote."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise ReginaError(
        f"config key {name} takes text, not {value!r}; quote the value (e.g. 'off') "
        "so YAML does not read it as a boolean or number"
    )


def apply_overrides(config: ReginaConfig, overrides: dict) -> ReginaConfig:
    """Return a copy of `config` with nested `{section: {key: value}}` overrides applied."""
    config = dataclasses.replace(
        config, **{s: dataclasses.replace(getattr(config, s)) for s in SECTIONS}
    )
    if not isinstance(overrides, dict):
        raise ReginaError("a config file must be a mapping of sections (model, ae, gan, runtime)")
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise ReginaError(
                f"unknown config section {section!r}; known sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ReginaError(f"config section {section!r} must be a mapping of key: value")
        target = getattr(config, section)
        hints = get_type_hints(type(target))
        for key, value in values.items():
            if key not in hints:
                raise ReginaError(
                    f"unknown config key {section}.{key}; known keys: {', '.join(hints)}"
                )
            setattr(target, key, _coerce(section, key, value, hints[key]))
    return config


def parse_set(assignments: list[str] | None) -> dict:
    """Turn `["ae.lr=1e-3", "model.discriminator_hidden=[256,128]"]` into nested overrides."""
    nested: dict = {}
    for item in assignments or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ReginaError(f"--set takes section.key=value (e.g. ae.lr=1e-3), not {item!r}")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ReginaError(f"--set {item!r}: cannot read the value ({exc.problem})") from None
        nested.setdefault(section, {})[key] = value
    return nested


def yaml_problem(exc: yaml.YAMLError) -> str:
    """YAML's complaint on one line: what is wrong and where (its own message spans several
    lines, with a caret under the text)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def load_yaml(path: str | Path) -> dict:
    from regina_cli.checks import check_input_file

    path = Path(path)
    check_input_file(path, "config file", stream=True)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except UnicodeDecodeError:
        raise ReginaError(f"config file {path} is not a text file (YAML)") from None
    except yaml.YAMLError as exc:
        raise ReginaError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ReginaError(f"config file {path} must be a mapping of sections")
    return data


def layered(base: ReginaConfig, *, config_file: str | Path | None = None,
            overrides: list[str] | dict | None = None, flags: dict | None = None) -> ReginaConfig:
    """`base`, then a YAML file, then `--set` overrides (strings or nested dict), then typed CLI
    flags (`{"ae": {"max_epochs": 5}}`); the result is validated. The one layering rule every
    command uses, for a fresh run and a resumed one alike."""
    config = base
    if config_file is not None:
        config = apply_overrides(config, load_yaml(config_file))
    nested = overrides if isinstance(overrides, dict) else parse_set(overrides)
    config = apply_overrides(config, nested)
    config = apply_overrides(config, flags or {})
    validate(config)
    return config


def preset_config(preset: str | None = None, n_genes: int | None = None) -> ReginaConfig:
    """Defaults with a named preset, else with sizes fitted to `n_genes`, else plain defaults."""
    config = ReginaConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ReginaError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return apply_overrides(config, PRESETS[preset])
    if n_genes is not None:
        return apply_overrides(config, auto_preset(n_genes))
    return config


def build_config(
    *,
    preset: str | None = None,
    n_genes: int | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | dict | None = None,
    flags: dict | None = None,
) -> ReginaConfig:
    """Defaults, then the preset (named, or sized to `n_genes`), then a file, `--set`, flags."""
    return layered(preset_config(preset, n_genes), config_file=config_file, overrides=overrides, flags=flags)


def _one_of(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]


def _range_error(value: float, meta: dict) -> str | None:
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["open_low"] and value == low)):
        return f"{'>' if meta['open_low'] else '>='} {low:g}"
    if high is not None and (value > high or (meta["open_high"] and value == high)):
        return f"{'<' if meta['open_high'] else '<='} {high:g}"
    return None


def validate(config: ReginaConfig) -> None:
    """Every value within its allowed set or range, and the rules that tie keys together."""
    for section in SECTIONS:
        part = getattr(config, section)
        for f in dataclasses.fields(part):
            value, meta, name = getattr(part, f.name), f.metadata, f"{section}.{f.name}"
            if meta.get("choices") and value not in meta["choices"]:
                raise ReginaError(f"config key {name} takes {_one_of(meta['choices'])}, not {value!r}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise ReginaError(f"config key {name} must be a finite number, not {value!r}")
                bound = _range_error(value, meta)
                if bound:
                    raise ReginaError(f"config key {name} must be {bound}, not {value:g}")
    hidden = config.model.discriminator_hidden
    if not hidden or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in hidden):
        raise ReginaError(f"config key model.discriminator_hidden takes a list of positive widths like [512, 256], "
                          f"not {hidden!r}")
    if config.model.d_model % config.model.n_heads:
        raise ReginaError(f"model.d_model ({config.model.d_model}) must be a multiple of model.n_heads "
                          f"({config.model.n_heads})")
    if config.model.gene_knowledge and config.gan.expression_prior == "none":
        raise ReginaError("model.gene_knowledge reaches predictions through the expression prior: set "
                          "gan.expression_prior=linear too")
    if config.gan.match_control_mean and not config.gan.residual_decoding:
        raise ReginaError("gan.match_control_mean moves the control cells that residual decoding starts from: "
                          "set gan.residual_decoding=true too")
    if config.gan.max_epochs == 0 and config.gan.expression_prior == "none":
        raise ReginaError("gan.max_epochs=0 keeps phase 2's untrained start, which is a model only with an expression "
                          "prior: set gan.expression_prior=linear or train at least 1 epoch")
    if config.gan.expression_prior != "none" and not config.gan.residual_decoding:
        raise ReginaError("gan.expression_prior decodes around the prior: set gan.residual_decoding=true too")
    if config.gan.noise_decay_end < config.gan.noise_decay_start:
        raise ReginaError("gan.noise_decay_end must not be before gan.noise_decay_start")


def config_from_dict(data: dict) -> ReginaConfig:
    """Rebuild a config saved as `config.yaml` in a run directory. Not validated here: it is the
    base that `layered` puts overrides on and then validates (a key added since the run was saved
    takes its default, which the overrides may need to complete)."""
    return apply_overrides(ReginaConfig(), data)


def to_yaml(config: ReginaConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _allowed(meta: dict) -> str:
    if meta.get("choices"):
        return ", ".join(f"`{c}`" for c in meta["choices"])
    parts = []
    if meta.get("low") is not None:
        parts.append(f"{'>' if meta['open_low'] else '>='} {meta['low']:g}")
    if meta.get("high") is not None:
        parts.append(f"{'<' if meta['open_high'] else '<='} {meta['high']:g}")
    return ", ".join(parts)


def config_reference_markdown() -> str:
    """Every key with type, default and meaning, generated from the dataclasses."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m regina_cli.config`; do not edit by hand. -->",
        "",
        "Set keys in a YAML file passed with `--config FILE`, or one at a time with",
        "`--set section.key=value` (repeatable; the value is read as YAML, so `--set",
        "model.discriminator_hidden=[256,128]` works). Order of precedence, lowest first:",
        "built-in defaults, the preset (`--preset`, else a model sized to the gene count),",
        "the config file, `--set`, then command flags such as `--max-epochs`. `train-gan` and",
        "`--resume` start from the run's saved config instead of a preset, with the same layers on",
        "top. Unknown keys, values outside the allowed set and network shapes that cannot work",
        "(d_model not a multiple of n_heads) are one-line errors before anything runs.",
        "",
        "Presets: " + ", ".join(f"`{p}`" for p in PRESETS) + ".",
        "",
    ]
    for section, cls in SECTIONS.items():
        lines += [f"## `{section}`", "", (cls.__doc__ or "").strip(), ""]
        lines += ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{section}.{f.name}` | {hints[f.name].__name__} | `{default}` | "
                         f"{_allowed(f.metadata)} | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
