"""`regina evaluate`: score prediction files (REGINA's or another tool's) against a dataset's held-out conditions."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from regina_cli import keys
from regina_cli.cli.app import app
from regina_cli.cli.common import DataDirOpt, emit_result, info, show, user_errors


IDLE_REASONS = {"additive": "needs combinations whose singles were both trained",
                "linear": "needs measured target genes", "train_mean": "needs perturbed training cells"}


@app.command("evaluate")
@user_errors
def evaluate_command(
    name: str = typer.Argument(..., help="Dataset name (data/<name>/perturb_processed.h5ad)."),
    predictions: List[Path] = typer.Option(
        ..., "--predictions", metavar="FILE", help="Predictions: .h5ad (cells or one mean row per condition), .csv/.tsv (a condition "
        "column, one column per gene) or a GEARS-style dict-of-means .pkl. Repeat to compare several models.",
    ),
    model_name: Optional[List[str]] = typer.Option(
        None, "--model-name", metavar="NAME", help="Name of the model in every table, file and plot; once per --predictions "
        "(default: regina for `regina predict` files, else the file name).", show_default=False,
    ),
    split: str = typer.Option(None, "--split", help="Split <mode>_<seed>, e.g. simulation_1 (simulation_1_0.5 at --train-gene-frac 0.5; default: the one `regina predict` recorded, else the only one)."),
    on: str = typer.Option("test", "--on", help="Score the split's test or val conditions (tune models on val)."),
    out: Path = typer.Option(None, "--out", help="Output folder (default: eval/ beside the first predictions file)."),
    baselines: str = typer.Option(
        "all", "--baselines", help="all, none, or a list: no_change,train_mean,additive,linear. A file `regina "
        "predict` wrote adds its own `reconstruction` (its decoded controls) whatever this says."),
    baseline_cell_types: str = typer.Option(
        "matched", "--baseline-cell-types", help="On a screen of several cell types (obs cell_type): matched fits "
        "each baseline per cell type and mixes the types as each condition's cells are mixed, as `regina predict` "
        "draws its controls, and so is Systema's reference of pearson_delta_pert (every model's); pooled fits them "
        "on all cells, as GEARS does (then the mix alone is credited to REGINA). A screen of one cell type is the "
        "same either way."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write report.html and PNG figures."),
    condition_key: str = typer.Option("condition", "--condition-key", help="Column holding the condition labels."),
    separator: str = typer.Option("+", "--separator", help="Gene separator of combinations in the labels (GEARS "
                                  "output: _ for A_B)."),
    seed: int = typer.Option(0, "--seed", help="Seed for cell subsampling and random projections."),
    true_cells: int = typer.Option(100, "--true-cells", min=2, help="True cells per condition for MMD, energy and sliced Wasserstein."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0: the cores the load average says "
                                "are idle, at least 1)."),
    allow_stale: bool = typer.Option(
        False, "--allow-stale", help="Score predictions whose run's dataset or split changed since, or that "
        "`predict --allow-stale` made (refused otherwise), with a warning."),
    data_dir: Path = DataDirOpt,
) -> None:
    """Precision (GEARS-comparable), cell-eval, distribution and DE metrics against baselines; writes
    metrics.json, per_condition.csv, report.html and plots/."""
    from regina_cli.evaluate.report import genes_scored_notice, summary_tables
    from regina_cli.evaluate.run import evaluate

    warnings = []

    def warn(message: str) -> None:
        info(f"[bold yellow]warning:[/] {message}")
        warnings.append(message)

    summary = evaluate(
        name, list(predictions), split=split, out=out, baselines=baselines, plots=plots, condition_key=condition_key,
        separator=separator, model_name=model_name, on=on, data_dir=data_dir, seed=seed, device=device,
        max_true_cells=true_cells, threads=threads, allow_stale=allow_stale, baseline_cell_types=baseline_cell_types,
        warn=warn,
    )
    for model in summary["models"]:
        if model["form"] == "means":
            info(f"{model['name']}: mean profiles (one row per condition); distribution and DE metrics need cells "
                 "and are left out")
        elif model["cells_per_condition"] < keys.STEADY_MEAN_CELLS:
            info(f"{model['name']}: {model['cells_per_condition']} predicted cells per condition (median); each "
                 "predicted mean change carries their sampling noise, the baselines' exact means do not: for "
                 f"pearson_delta and the other mean metrics predict {keys.STEADY_MEAN_CELLS} (`--cells "
                 f"{keys.STEADY_MEAN_CELLS}`)")
    if notice := genes_scored_notice(summary):
        info(notice)
    if matched := summary["baselines_matched_to_cell_types"]:
        info(f"baselines fitted per cell type ({', '.join(matched)}) and mixed as each condition's cells are "
             "(--baseline-cell-types pooled: as GEARS)")
    idle = [b for b in summary["baselines"] if not any(b in c for c in summary["comparison"].values())]
    if idle:
        why = "; ".join(f"{b} {IDLE_REASONS[b]}" for b in idle if b in IDLE_REASONS)
        info(f"baseline(s) with no {on} condition they can predict: {', '.join(idle)}" + (f" ({why})" if why else ""))
    for table in summary_tables(summary):
        show(table)
    # The written file names are relative to the output folder; the terminal and --json name them from here.
    out_dir = Path(summary["out"])
    info(f"wrote {out_dir}" + (f" (open {out_dir / summary['report']})" if summary.get("report") else ""))
    emit_result({**summary, "warnings": warnings,  # report and plots present (null, []) with --no-plots too
                 "report": str(out_dir / summary["report"]) if summary.get("report") else None,
                 "plots": [str(out_dir / p) for p in summary.get("plots", [])]},
                paths=("out", "report", "plots"))
