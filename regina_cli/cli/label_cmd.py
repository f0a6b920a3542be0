"""`regina label`: one cell-state class per cell for the latent classifier."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from regina_cli.cli.app import app
from regina_cli.cli.common import DataDirOpt, emit_result, info, show, user_errors


@app.command("label")
@user_errors
def label_command(
    name: str = typer.Argument(..., help="Dataset name (a folder of the data dir, see `regina fetch`)."),
    method: str = typer.Option(..., "--method", help="stress, cell-cycle, or obs:<column> (an existing obs column)."),
    quantile: float = typer.Option(
        None, "--quantile", help="stress: share of training cells labelled Homeostasis (default 0.7).",
        show_default=False,
    ),
    split: str = typer.Option(
        None, "--split", help="Fit on the training cells of this split (<mode>_<seed>, e.g. "
        "simulation_1; simulation_1_0.5 at --train-gene-frac 0.5).",
        show_default=False,
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing labels file of other content (runs built on it become stale)."
    ),
    data_dir: Path = DataDirOpt,
) -> None:
    """Label every cell of dataset NAME and write labels/<method>[@<split>].csv (columns cell, cell_state)."""
    from regina_cli.data.label import label_dataset

    outcome = label_dataset(name, method, quantile=quantile, split=split, data_dir=data_dir, force=force)
    info(f"fitted on {outcome.fitted_on}")
    if "threshold" in outcome.labels.details:
        details = outcome.labels.details
        info(f"stress threshold {details['threshold']:.4f} (quantile {details['quantile']}) "
             f"over {len(details['markers'])} marker genes")
    table = Table(title=f"{name}: {method} class balance")
    columns = list(outcome.balance[0])
    for column in columns:
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in outcome.balance:
        table.add_row(*(f"{row[c]:.1%}" if c == "share" else str(row[c]) for c in columns))
    show(table)
    for warning in outcome.warnings:
        info(f"[yellow]warning:[/] {warning}")
    info(f"wrote {outcome.path}")
    emit_result({"labels": str(outcome.path), "method": method, "fitted_on": outcome.fitted_on,
                 "balance": outcome.balance, "warnings": list(outcome.warnings), **outcome.labels.details},
                paths=("labels",))
