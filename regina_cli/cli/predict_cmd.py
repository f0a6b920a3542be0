"""`regina predict`: predicted cells for seen and unseen perturbations from a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from regina_cli import keys
from regina_cli.cli.app import app
from regina_cli.cli.common import RunDataDirOpt, emit_result, info, run_directory, user_errors
from regina_cli.errors import ReginaError


@app.command("predict")
@user_errors
def predict_command(
    run: Path = typer.Option(..., "--run", parser=run_directory,
                             help="Run directory with trained ae/ and gan/ phases."),
    conditions: Optional[str] = typer.Option(
        None, "--conditions", show_default=False,
        help="test, val, all (the run's split), or a comma-separated list such as KLF1+ctrl,KLF1+CEBPA "
        "(default: test).",
    ),
    conditions_file: Path = typer.Option(
        None, "--conditions-file", help="File with one condition per line (instead of --conditions).",
        show_default=False,
    ),
    cells: int = typer.Option(100, "--cells", help=f"Predicted cells per condition ({keys.STEADY_MEAN_CELLS} when "
                              "scoring mean changes: fewer leave sampling noise in each condition's mean)."),
    seed: int = typer.Option(0, "--seed", help="Seed for drawing the control cells."),
    cell_types: Optional[str] = typer.Option(
        None, "--cell-types", show_default=False,
        help="Predict only in these cell types (comma-separated, as in obs cell_type), e.g. a perturbation "
        "measured in K562 predicted in RPE1 (default: each condition's measured cell-type mix; a condition never "
        "measured in the training controls' proportions)."),
    out: Path = typer.Option(
        None, "--out", help="Output h5ad (default: <run>/predictions.h5ad).", show_default=False
    ),
    with_controls: bool = typer.Option(
        True, "--with-controls/--no-controls",
        help="Append real control cells (condition = the dataset's control label): every training control of "
        "the predicted cell types, the mean the predictions were matched to (gan.match_control_mean), so "
        "rank_genes_groups and cell-eval run on the file directly."),
    clip: Optional[bool] = typer.Option(
        None, "--clip/--no-clip", show_default=False,
        help="Set negative predicted values to 0 (the data's range), or keep them. Default: what scored higher at "
        "train-gan on the conditions it predicted unseen (gan/meta.json: training.clip_predictions, training.clip_evidence)."),
    sparsify: bool = typer.Option(
        False, "--sparsify", help="Clip, zero values below half the data's smallest non-zero value, store X sparse."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    allow_stale: bool = typer.Option(
        False, "--allow-stale", help="Predict from a run whose dataset, split, labels or config changed after "
        "training (refused otherwise), with a warning."),
    data_dir: Path = RunDataDirOpt,
) -> None:
    """Predict cells for each condition: control cells -> encoder -> prompt -> forward transition -> decoder."""
    from regina_cli.engine.prediction_file import FileOptions
    from regina_cli.engine.predict import read_conditions_file, run_prediction

    if conditions_file is not None and conditions is not None:
        raise ReginaError("give either --conditions or --conditions-file, not both")
    if conditions_file is not None:
        chosen = read_conditions_file(conditions_file)
    else:  # an empty --conditions is not "unset": run_prediction says no conditions were given
        chosen = "test" if conditions is None else conditions
    options = FileOptions(with_controls=with_controls, clip=clip, sparsify=sparsify)
    result = run_prediction(run, chosen, n_cells=cells, seed=seed, out=out, device=device, data_dir=data_dir,
                            options=options, allow_stale=allow_stale, cell_types=cell_types)
    warnings = result.all_warnings
    for warning in warnings:
        info(f"[bold yellow]warning:[/] {warning}")
    extra = (f", {result.n_new_conditions} never measured in the data"
             if result.n_new_conditions else "")
    info(f"predicted {result.n_cells} cells for {result.n_conditions} conditions{extra} on {result.device} "
         f"in {result.seconds:.1f} s")
    by_source = {}
    for condition, source in result.sources.items():
        by_source.setdefault(source, []).append(condition)
    info("prompt sources: " + "; ".join(f"{source} {len(c)}" for source, c in sorted(by_source.items())))
    chosen_by = "as asked" if clip is not None or sparsify else "the run's choice at train-gan"
    info(f"negative values {'set to 0' if result.clipped else 'kept as decoded'} ({chosen_by}; --clip/--no-clip)")
    info(f"wrote {result.path}" + (" (replacing the predictions there: scores made from them may no longer match)"
                                   if result.replaced else ""))
    emit_result({"predictions": str(result.path), "conditions": result.n_conditions, "cells": result.n_cells,
                 "new_conditions": result.n_new_conditions, "skipped": result.skipped, "sources": result.sources,
                 "device": result.device, "warnings": warnings, "clipped": result.clipped, "replaced": result.replaced,
                 "seconds": round(result.seconds, 3)}, paths=("predictions",))
