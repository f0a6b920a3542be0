"""`regina train-ae` (phase 1) and `regina train-gan` (phase 2): parse, call the engine, summarise."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from regina_cli import keys
from regina_cli.cli.app import app
from regina_cli.cli.common import (ConfigOpt, DataDirOpt, RunDataDirOpt, SetOpt, emit_result, info, is_quiet,
                                   run_directory, show, user_errors)

GpusOpt = typer.Option(1, "--gpus", help="Data-parallel processes (GPUs; CPU processes with --device cpu). "
                       "Under torchrun or srun, joins the existing launch instead.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
ResumeOpt = typer.Option(False, "--resume", help="Continue from last.pt exactly (optimisers, RNG, epoch).")


@app.command("train-ae")
@user_errors
def train_ae_command(
    name: str = typer.Argument(..., help="Dataset name, as given to `regina fetch`."),
    split: str = typer.Option(..., "--split", help="Split as `regina split` named it: <mode>_<seed>, e.g. simulation_1 "
                                "(simulation_1_0.5 at --train-gene-frac 0.5)."),
    labels: str = typer.Option(..., "--labels", help="Label method, as given to `regina label` (stress, cell-cycle, obs:COL)."),
    run: Optional[Path] = typer.Option(None, "--run", parser=run_directory, help="Run directory (default: runs/<NAME>)."),
    config_file: Optional[Path] = ConfigOpt,
    preset: Optional[str] = typer.Option(None, "--preset", help="original, norman, adamson, dixit or demo (default: the "
                                         "dataset's name if it is one, else sizes fitted to the gene count)."),
    overrides: Optional[List[str]] = SetOpt,
    gpus: int = GpusOpt,
    device: str = DeviceOpt,
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="Shortcut for --set ae.max_epochs=N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Shortcut for --set ae.batch_size=N (per process)."),
    gene_knowledge: Optional[str] = typer.Option(
        None, "--gene-knowledge", "--gene-embeddings",
        help="Gene embeddings or GO terms for targets the screen does not measure (a file, or `go`); "
        "shortcut for --set model.gene_knowledge=SPEC. Used by phase 2.", show_default=False),
    resume: bool = ResumeOpt,
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Phase 1: train the regularised autoencoder with its latent classifier."""
    from regina_cli.engine.run_config import resolve_training_config
    from regina_cli.engine.train_ae import train_autoencoder

    run_dir = run or Path(keys.DEFAULT_RUNS_DIR) / name
    config, source = resolve_training_config(
        keys.AE_DIR, run_dir, dataset=name, resume=resume, data_dir=data_dir, preset=preset, config_file=config_file,
        overrides=overrides, max_epochs=max_epochs, batch_size=batch_size, gene_knowledge=gene_knowledge)
    m, ae = config.model, config.ae
    summary = train_autoencoder(name, split=split, labels=labels, run_dir=run_dir, config=config,
                                data_dir=data_dir, gpus=gpus, device=device, resume=resume,
                                progress=_progress_mode(), announce=lambda: info(
                                    f"model ({source}): {m.seq_len} tokens, d_model {m.d_model}, {m.n_layers} "
                                    f"layers, {m.n_heads} heads, z_dim {m.z_dim}; batch {ae.batch_size}, up to "
                                    f"{ae.max_epochs} epochs, lr {ae.lr:g}"))
    _report("train-ae", summary, run_dir / keys.AE_DIR)


@app.command("train-gan")
@user_errors
def train_gan_command(
    run: Path = typer.Option(..., "--run", parser=run_directory,
                             help="Run directory holding a trained ae/ (from `regina train-ae`)."),
    config_file: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    gpus: int = GpusOpt,
    device: str = DeviceOpt,
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="Shortcut for --set gan.max_epochs=N (0: "
                                             "keep the expression prior, the untrained start, and train nothing)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Shortcut for --set gan.batch_size=N (per process)."),
    resume: bool = ResumeOpt,
    data_dir: Optional[Path] = RunDataDirOpt,
) -> None:
    """Phase 2: train the prompt-conditioned latent cycle-GAN on top of a phase-1 run."""
    from regina_cli.engine.run_config import resolve_training_config
    from regina_cli.engine.train_gan import train_gan

    config, source = resolve_training_config(keys.GAN_DIR, run, resume=resume, config_file=config_file,
                                             overrides=overrides, max_epochs=max_epochs, batch_size=batch_size)
    g = config.gan
    summary = train_gan(run, config=config, data_dir=data_dir, gpus=gpus, device=device, resume=resume,
                        progress=_progress_mode(), announce=lambda: info(
                            f"phase 2 ({source}): the expression prior, validated, no epoch trained (max_epochs 0)"
                            if not g.max_epochs else
                            f"phase 2 ({source}): batch {g.batch_size}, up to {g.max_epochs} epochs, lr {g.lr:g}, "
                            f"lambda cycle {g.lambda_cycle:g} / adv {g.lambda_adv:g} / pred {g.lambda_pred:g}"))
    _report("train-gan", summary, run / keys.GAN_DIR)


def _progress_mode() -> str:
    return "silent" if is_quiet() else "auto"


def _last_value(key: str, value: float | None) -> str:
    """A validation metric as the summary shows it; phase 2's selection score is -inf (history.csv)
    for an epoch that may not be kept, which the table says in words. The record in meta.json,
    which a resume with nothing left to train shows, holds -inf and NaN as null."""
    if key.endswith("_selectable") and (value is None or value == float("-inf")):
        return "- (not above epoch 0 by gan.selection_se standard errors: may not be kept)"
    return "-" if value is None else f"{value:.4g}"


def _evidence(evidence: dict | None, first: str, second: str) -> str:
    """A choice's evidence (`engine.clip_choice.evidence` and alike) in words: both scores per source."""
    from regina_cli.engine.clip_choice import LABELS

    return "; ".join(f"{LABELS.get(k, k)} {e[first]:.4f} / {e[second]:.4f} ({e['conditions']} conditions)"
                     for k, e in (evidence or {}).items()) or "nothing scored"


def _report(command: str, summary: dict, phase_dir: Path) -> None:
    if summary.get("nothing_to_resume"):
        info(f"{phase_dir} already finished ({summary['stop_reason']}): nothing to resume, nothing written; "
             "its record:")
    table = Table(title=f"{command}: {phase_dir}", show_header=False)
    table.add_row("stopped", summary["stop_reason"])
    table.add_row("epochs", str(summary["epochs"]))
    table.add_row("best epoch", f"{summary['best_epoch']} ({summary['best_metric']} = {summary['best_value']:.4f})")
    fit = summary.get("prompt_fit") or {}
    if "prior_linear_weight" in fit:
        table.add_row("expression prior", f"weights chosen on held-out training genes: linear "
                      f"{fit['prior_linear_weight']:g}, co-variation {fit['prior_covariation_weight']:g}, "
                      f"knowledge {fit['prior_knowledge_weight']:g}; a measured target's own entry "
                      f"{fit['prior_knockdown_entry']:.3g}")
    if "clip_predictions" in summary:
        found = _evidence(summary.get("clip_evidence"), "pearson_delta_clipped", "pearson_delta")
        table.add_row("predict clips at 0", f"{'yes' if summary['clip_predictions'] else 'no'} (pearson_delta "
                      f"clipped / as decoded: {found})")
    if correction := summary.get("correction_choice"):
        kept = ("0: predictions are the expression prior, decoded; the transition does not move them"
                if correction["correction_scale"] == 0 else f"{correction['correction_scale']:g}")
        found = _evidence(correction["evidence"], "pearson_delta", "pearson_delta_prior_alone")
        table.add_row("kept correction", f"{kept} (pearson_delta at {correction['configured']:g} / at 0: {found})")
    last = summary.get("last") or {}
    for key in sorted(k for k in last if k.startswith("val_")):
        table.add_row(f"last {key}", _last_value(key, last[key]))
    if "cells_per_s" in last:
        table.add_row("throughput", f"{last['cells_per_s']:,.0f} training cells/s")
    table.add_row("weights", str(phase_dir / keys.MODEL_FILE))
    show(table)
    for warning in summary.get("warnings", []):
        info(f"[yellow]warning:[/] {warning}")
    emit_result(summary, paths=("run_dir",))
