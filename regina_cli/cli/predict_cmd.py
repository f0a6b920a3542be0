"""`regina predict`: predicted cells for seen and unseen perturbations from a trained run."""

from __future__ import annotations

from pathlib import Path

import typer

from regina_cli.cli.app import app
from regina_cli.cli.common import DataDirOpt, emit_result, info, user_errors
from regina_cli.errors import ReginaError


@app.command("predict")
@user_errors
def predict_command(
    run: Path = typer.Option(..., "--run", help="Run directory with trained ae/ and gan/ phases."),
    conditions: str = typer.Option(
        "test", "--conditions",
        help="test, all (the run's split), or a comma-separated list such as KLF1+ctrl,KLF1+CEBPA.",
    ),
    conditions_file: Path = typer.Option(
        None, "--conditions-file", help="File with one condition per line (instead of --conditions).",
        show_default=False,
    ),
    cells: int = typer.Option(100, "--cells", help="Predicted cells per condition."),
    seed: int = typer.Option(0, "--seed", help="Seed for drawing the control cells."),
    out: Path = typer.Option(
        None, "--out", help="Output h5ad (default: <run>/predictions.h5ad).", show_default=False
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    data_dir: Path = DataDirOpt,
) -> None:
    """Predict cells for each condition: control cells -> encoder -> prompt -> forward transition -> decoder."""
    from regina_cli.engine.predict import read_conditions_file, run_prediction

    if conditions_file is not None and conditions != "test":
        raise ReginaError("give either --conditions or --conditions-file, not both")
    chosen = read_conditions_file(conditions_file) if conditions_file is not None else conditions
    result = run_prediction(run, chosen, n_cells=cells, seed=seed, out=out, device=device, data_dir=data_dir)
    extra = (f", {result.n_new_conditions} never measured in the data"
             if result.n_new_conditions else "")
    info(f"predicted {result.n_cells} cells for {result.n_conditions} conditions{extra} on {result.device} "
         f"in {result.seconds:.1f} s")
    if result.skipped:
        info(f"[yellow]skipped {len(result.skipped)} condition(s) whose targets are neither measured nor "
             f"perturbed in training:[/] {', '.join(result.skipped)}")
    info(f"wrote {result.path}")
    emit_result({"predictions": str(result.path), "conditions": result.n_conditions, "cells": result.n_cells,
                 "new_conditions": result.n_new_conditions, "skipped": result.skipped,
                 "device": result.device,
                 "seconds": round(result.seconds, 3)})
