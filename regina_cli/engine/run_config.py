"""The configuration a training phase runs with, resolved by one rule for both phases.

    base    = the phase's saved config when resuming, else (phase 2) phase 1's saved config,
              else (phase 1) the preset: `--preset`, the dataset's name if it is a preset,
              or sizes fitted to its gene count
    config  = base -> `--config FILE` -> `--set key=value` -> command flags (`--max-epochs`, ...)

The result is validated (`config.validate`) and checked against what the run already fixed: the
phase-1 network shapes (phase 2 and a resumed phase 1 reload those weights) and the phase-2
shapes when resuming phase 2. Every check runs before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from regina_cli import keys
from regina_cli.config import PRESETS, ReginaConfig, layered, preset_config
from regina_cli.engine import checkpoint as ckpt
from regina_cli.engine.run_meta import check_phase1_kept, read_trained_meta
from regina_cli.errors import ReginaError

# Network shapes each phase's weights are saved with.
AE_SHAPE_KEYS = ("seq_len", "d_model", "n_layers", "n_heads", "ff_mult", "z_dim", "classifier_hidden")
GAN_SHAPE_KEYS = ("transition_hidden", "transition_blocks", "discriminator_hidden")
# Phase-2 settings applied once, when it starts: they shape or fit what its checkpoint holds (the
# expression prior, the prompts' table and scale, the held-out conditions, the kept correction), so
# a resume that changed one would crash on the saved tensors or silently keep the old value.
GAN_START_KEYS = ("prompt_value", "modality", "prompt_sign", "prompt_scale", "gene_features", "gene_feature_dim",
                  "learned_prompts", "learned_prompt_init", "validation_holdout", "validation_min_conditions",
                  "residual_decoding", "match_control_mean", "expression_prior", "knowledge_neighbours",
                  "covariation_components", "covariation_cells", "prior_mean", "prior_per_gene", "prior_cell_types",
                  "covariation_skip", "knockdown_scale", "correction_scale", "correction_choice")


@dataclass
class ConfigRequest:
    """What the user asked for, before resolution (all optional)."""

    preset: str | None = None
    config_file: str | Path | None = None
    overrides: list[str] | dict | str | None = None  # one `section.key=value` may come as a plain string
    flags: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.overrides, str):  # read as a list, it would be one override per character
            self.overrides = [self.overrides]


def phase_flags(section: str, **values) -> dict:
    """Typed command-line shortcuts (`--max-epochs N` -> {section: {"max_epochs": N}}), None skipped."""
    chosen = {k: v for k, v in values.items() if v is not None}
    return {section: chosen} if chosen else {}


def resolve_training_config(phase: str, run_dir: str | Path, *, dataset: str | None = None, resume: bool = False,
                            data_dir: str | Path | None = None, preset: str | None = None,
                            config_file: str | Path | None = None, overrides: list[str] | dict | str | None = None,
                            max_epochs: int | None = None, batch_size: int | None = None,
                            gene_knowledge: str | None = None) -> tuple[ReginaConfig, str]:
    """`resolve_run_config` for what `train-ae`/`train-gan` (and `regina.train_ae`/`train_gan`) take:
    their shortcuts (`--max-epochs`, `--batch-size` of the phase's section, `--gene-knowledge`)
    become flags here, so the command line and the Python API cannot layer them differently."""
    flags = {**phase_flags(phase, max_epochs=max_epochs, batch_size=batch_size),
             **phase_flags("model", gene_knowledge=gene_knowledge)}
    request = ConfigRequest(preset=preset, config_file=config_file, overrides=overrides, flags=flags)
    return resolve_run_config(phase, run_dir, request, dataset=dataset, resume=resume, data_dir=data_dir)


def resolve_run_config(phase: str, run_dir: str | Path, request: ConfigRequest | None = None, *,
                       dataset: str | None = None, resume: bool = False,
                       data_dir: str | Path | None = None) -> tuple[ReginaConfig, str]:
    """(config, where its base came from) for `phase` ("ae" or "gan") of `run_dir`."""
    request = request or ConfigRequest()
    base, source = _base(phase, Path(run_dir), request, dataset, resume, data_dir)
    config = layered(base, config_file=request.config_file, overrides=request.overrides, flags=request.flags)
    check_fixed_shapes(phase, run_dir, config, resume=resume)
    return config, source


def _base(phase, run_dir, request, dataset, resume, data_dir) -> tuple[ReginaConfig, str]:
    paths = ckpt.PhasePaths(run_dir, phase)
    if resume and paths.config.is_file():
        if request.preset is not None:
            raise ReginaError(f"--preset applies to a new run; {run_dir} keeps its saved config "
                              "(change single keys with --set)")
        return ckpt.read_config(paths), f"resumed from {paths.config}"
    if phase == keys.GAN_DIR:
        read_trained_meta(ckpt.ae_paths(run_dir))
        return ckpt.read_config(ckpt.ae_paths(run_dir)), f"phase 1 of {run_dir}"
    preset = request.preset if request.preset is not None else (dataset if dataset in PRESETS else None)
    if preset is not None:
        return preset_config(preset), f"preset {preset}"
    from regina_cli.data.dataset import gene_count

    n_genes = gene_count(dataset, data_dir)
    return preset_config(n_genes=n_genes), f"sized for {n_genes} genes"


def check_fixed_shapes(phase: str, run_dir: str | Path, config: ReginaConfig, *, resume: bool) -> None:
    """Refuse shape changes the saved weights cannot take (a one-line error naming the key)."""
    if phase == keys.GAN_DIR and resume:
        check_phase1_kept(run_dir)
    fixed = []
    ae_config = ckpt.ae_paths(run_dir).config
    if (phase == keys.GAN_DIR or resume) and ae_config.is_file():
        fixed.append((ckpt.read_config(ckpt.ae_paths(run_dir)), AE_SHAPE_KEYS, "the phase-1 run", "train-ae"))
    gan_config = ckpt.gan_paths(run_dir).config
    if phase == keys.GAN_DIR and resume and gan_config.is_file():
        fixed.append((ckpt.read_config(ckpt.gan_paths(run_dir)), GAN_SHAPE_KEYS, "the phase-2 run", "train-gan"))
    for saved, names, owner, command in fixed:
        for name in names:
            if getattr(config.model, name) != getattr(saved.model, name):
                raise ReginaError(f"model.{name} is fixed by {owner} in {run_dir}; train a new run with "
                                  f"`regina {command}` to change it")
    if phase == keys.GAN_DIR and resume and gan_config.is_file():
        saved = ckpt.read_config(ckpt.gan_paths(run_dir))
        for name in GAN_START_KEYS:
            if getattr(config.gan, name) != getattr(saved.gan, name):
                raise ReginaError(f"gan.{name} was set when phase 2 of {run_dir} started ({getattr(saved.gan, name)}): "
                                  "its saved weights were built with it, so a resume keeps it; train a new --run to "
                                  "change it")
    if phase == keys.GAN_DIR and ae_config.is_file():
        check_phase1_settings(run_dir, config, ckpt.read_config(ckpt.ae_paths(run_dir)))


def check_phase1_settings(run_dir, config: ReginaConfig, phase1: ReginaConfig) -> None:
    """`train-gan` cannot apply phase-1 training settings (`ae.*`): phase 1 ran with its own, and
    a different value in phase 2's config would misstate how the run was trained."""
    for item in fields(phase1.ae):
        if getattr(config.ae, item.name) != getattr(phase1.ae, item.name):
            raise ReginaError(f"ae.{item.name} is a phase-1 setting, used by the phase-1 run in {run_dir}; "
                              "train a new run with `regina train-ae` to change it")
