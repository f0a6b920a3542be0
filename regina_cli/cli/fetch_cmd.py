"""`regina fetch`: download, import or simulate a dataset into data/<name>/perturb_processed.h5ad."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from regina_cli.cli.app import app
from regina_cli.cli.common import DataDirOpt, emit_result, info, is_quiet, show, user_errors

# Names repeated here (not imported) so that `regina --help` loads nothing heavy;
# tests/test_data_demo.py checks they equal regina_cli.data.fetch.DATASETS.
_DATASETS = "demo, norman, adamson, dixit, replogle_k562_essential, replogle_rpe1_essential"


def _summary(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for field, value in rows:
        table.add_row(field, value)
    show(table)


def _show_go(result) -> None:
    _summary(f"GO annotation: {result.action}", [
        ("genes annotated", f"{result.n_genes:,}"),
        ("GO terms", f"{result.n_terms:,}"),
        ("source", result.source),
        ("path", result.path),
        ("sha256", result.sha256),
    ])
    info("use it with --gene-knowledge go")
    emit_result(result.as_dict(), paths=("path",))


@app.command("fetch")
@user_errors
def fetch_command(
    name: str = typer.Argument(
        ..., help=f"Dataset name: {_DATASETS}, or any name with --from; `go` fetches GEARS' GO annotation."
    ),
    data_dir: Path = DataDirOpt,
    source: str = typer.Option(
        None, "--from", help="Import a local copy (.h5ad, .zip or folder; go: gene2go pickle) or download this URL instead.",
        show_default=False,
    ),
    force: bool = typer.Option(False, "--force", help="Fetch again even if the dataset is present."),
    control: list[str] = typer.Option(
        None, "--control", help="Extra label that marks control cells (repeatable); "
        "ctrl, control, non-targeting are always recognised.", show_default=False,
    ),
    condition_key: str = typer.Option(
        None, "--condition-key", help="obs column holding the perturbation (default: condition).",
        show_default=False,
    ),
    cell_type_key: str = typer.Option(
        None, "--cell-type-key", help="obs column holding the cell type (default: cell_type).",
        show_default=False,
    ),
    separator: str = typer.Option(
        None, "--separator", help="Separator between genes of a combination, e.g. _ for A_B (+ always works).",
        show_default=False,
    ),
    n_top_genes: int = typer.Option(
        None, "--n-top-genes", help="Keep the N most variable genes, plus every measured target gene.",
        show_default=False,
    ),
    gene_list: Path = typer.Option(
        None, "--gene-list", help="Keep the genes listed in FILE (one per line), plus every measured target gene.",
        show_default=False,
    ),
    cells: int = typer.Option(None, "--cells", help="demo: number of cells [4000].", show_default=False),
    genes: int = typer.Option(None, "--genes", help="demo: number of genes [1000].", show_default=False),
    singles: int = typer.Option(None, "--singles", help="demo: single perturbations [40].", show_default=False),
    doubles: int = typer.Option(None, "--doubles", help="demo: double perturbations [30].", show_default=False),
    cell_types: int = typer.Option(None, "--cell-types", help="demo: cell types [1].", show_default=False),
    seed: int = typer.Option(None, "--seed", help="demo: simulation seed [0].", show_default=False),
    drop_targets: float = typer.Option(
        None, "--drop-targets", help="demo: fraction of the targets left out of the measured genes [0].",
        show_default=False,
    ),
) -> None:
    """Put dataset NAME at <data-dir>/NAME/perturb_processed.h5ad (GEARS layout, SHA-256 recorded)."""
    import sys

    from regina_cli.data.fetch import GO, check_go_options, fetch, fetch_go
    from regina_cli.data.importer import ImportOptions

    demo = {
        key: value
        for key, value in dict(
            n_cells=cells, n_genes=genes, n_singles=singles, n_doubles=doubles, n_cell_types=cell_types, seed=seed,
            drop_targets=drop_targets,
        ).items()
        if value is not None
    }
    options = ImportOptions(control=control, condition_key=condition_key, separator=separator,
                            cell_type_key=cell_type_key, n_top_genes=n_top_genes, gene_list=gene_list)
    progress = sys.stderr.isatty() and not is_quiet()
    if name == GO:
        check_go_options(options, others=bool(demo))
        _show_go(fetch_go(data_dir=data_dir, source=source, force=force, log=info, progress=progress))
        return
    result = fetch(
        name, data_dir=data_dir, source=source, force=force, options=options, demo=demo, log=info,
        progress=progress,
    )
    _summary(f"{result.name}: {result.action}", [
        ("cells", f"{result.n_cells:,}"),
        ("genes", f"{result.n_genes:,}"),
        ("control cells", f"{result.n_controls:,}"),
        ("single perturbations", str(result.n_singles)),
        ("combinations", str(result.n_doubles)),
        ("cell types", ", ".join(result.cell_types)),
        ("normalisation", result.normalisation),
        ("source", result.source),
        ("path", result.path),
        ("sha256", result.sha256),
    ])
    for note in result.notes if result.action == "already present" else ():
        info(note)
    emit_result(result.as_dict(), paths=("path",))
