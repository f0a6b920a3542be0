"""`regina split`: train/val/test conditions, identical to cell-gears' splits for a mode and seed."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from regina_cli.cli.app import app
from regina_cli.cli.common import DataDirOpt, emit_result, info, show, user_errors
from regina_cli.errors import ReginaError

# Defaults repeated here (not imported) so that `regina --help` does not load numpy/pandas;
# tests/test_split.py checks they equal regina_cli.data.split's.
_MODES = "simulation, simulation_single, combo_seen0, combo_seen1, combo_seen2, single, no_test"


@app.command("split")
@user_errors
def split_command(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Dataset name (a folder of the data dir, see `regina fetch`)."),
    mode: str = typer.Option("simulation", "--mode", help=f"GEARS split mode: {_MODES}."),
    seed: int = typer.Option(1, "--seed", help="Split seed (same seed, same split as cell-gears)."),
    train_gene_frac: float = typer.Option(
        0.75, "--train-gene-frac", help="Simulation modes: share of perturbed genes seen in training (a share "
        "other than 0.75 names the split <mode>_<seed>_<share>, e.g. simulation_1_0.5)."
    ),
    split_file: Path = typer.Option(
        None, "--split-file", help="Use your own {train, val, test} dict (JSON or GEARS pickle) instead; "
        "it is saved as custom_<hash of its content>.", show_default=False,
    ),
    gene_knowledge: str = typer.Option(
        None, "--gene-knowledge", help="Gene knowledge (a file, or `go` after `regina fetch go`) to count "
        "conditions whose unmeasured targets it makes predictable.", show_default=False,
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing split of other content (runs built on it become stale)."
    ),
    data_dir: Path = DataDirOpt,
) -> None:
    """Split the conditions of dataset NAME into train/val/test and write splits/<split>.json; the
    split's name (<mode>_<seed>, e.g. simulation_1) is what later steps take as --split."""
    from regina_cli.data.split import split_dataset

    given = [option for option in ("seed", "mode", "train_gene_frac")
             if ctx.get_parameter_source(option).name == "COMMANDLINE"]
    if split_file is not None and given:
        raise ReginaError(f"--{given[0].replace('_', '-')} does not apply to --split-file: a user's split is "
                          "named by its content, and its sets are the file's")
    outcome = split_dataset(
        name, mode=mode, seed=seed, train_gene_frac=train_gene_frac, split_file=split_file, data_dir=data_dir,
        gene_knowledge=gene_knowledge, force=force,
    )
    split = outcome.split
    table = Table(title=f"{name}: split {split.name}")
    columns = ("set", "subgroup", "conditions", "cells", "unmeasured", "unpredictable")
    for column in columns:
        table.add_column(column, justify="left" if column in ("set", "subgroup") else "right")
    for row in outcome.summary:
        table.add_row(*(str(row[column]) for column in columns))
    show(table)
    if outcome.n_unassigned:
        info(f"{outcome.n_unassigned} condition(s) are in no set (GEARS leaves them out in mode {split.mode})")
    for warning in outcome.warnings:
        info(f"[yellow]warning:[/] {warning}")
    done = f"wrote {outcome.path}" if outcome.written else f"{outcome.path} already holds this split (nothing written)"
    info(f"{done}; later steps take it as --split {split.name}")
    emit_result({"split": split.name, "path": str(outcome.path), "written": outcome.written, "summary": outcome.summary,
                 "unassigned_conditions": outcome.n_unassigned, "warnings": outcome.warnings}, paths=("path",))
