"""`regina evaluate`: score a prediction file against a dataset's held-out conditions."""

from __future__ import annotations

from pathlib import Path

import typer

from regina_cli import keys
from regina_cli.cli.app import app
from regina_cli.cli.common import DataDirOpt, emit_result, info, show, user_errors
from regina_cli.cli.options import check_data_dir, check_out_folder, check_seed


@app.command("evaluate")
@user_errors
def evaluate_command(
    name: str = typer.Argument(..., help="Dataset name (data/<name>/perturb_processed.h5ad)."),
    predictions: Path = typer.Option(..., "--predictions", help="Prediction .h5ad: cells or one mean row per condition."),
    split: str = typer.Option(None, "--split", help="Split <mode>_<seed>, e.g. simulation_1 (default: the one `regina predict` recorded, else the only one)."),
    out: Path = typer.Option(None, "--out", help="Output folder (default: eval/ beside the predictions)."),
    baselines: str = typer.Option("all", "--baselines", help="all, none, or a list: no_change,train_mean,additive,linear."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots."),
    condition_key: str = typer.Option("condition", "--condition-key", help="obs column holding the condition labels."),
    seed: int = typer.Option(0, "--seed", help="Seed for cell subsampling and random projections."),
    true_cells: int = typer.Option(100, "--true-cells", min=2, help="True cells per condition for MMD, energy and sliced Wasserstein."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    allow_stale: bool = typer.Option(
        False, "--allow-stale", help="Score predictions whose run's dataset or split changed since (refused "
        "otherwise), with a warning."),
    data_dir: Path = DataDirOpt,
) -> None:
    """Precision metrics (GEARS-comparable), distribution metrics and baselines; metrics.json, per_condition.csv, plots."""
    from regina_cli.data.provenance import check_predictions
    from regina_cli.evaluate.report import summary_tables
    from regina_cli.evaluate.run import evaluate

    check_seed(seed)
    check_out_folder(out or predictions.parent / keys.EVAL_DIR, keys.METRICS_FILE)
    check_data_dir(data_dir, writes=False)
    for warning in check_predictions(name, predictions, split, data_dir, allow_stale=allow_stale):
        info(f"[bold yellow]warning:[/] {warning}")

    summary = evaluate(
        name, predictions, split=split, out=out, baselines=baselines, plots=plots,
        condition_key=condition_key, data_dir=data_dir, seed=seed, device=device, max_true_cells=true_cells,
    )
    if summary["n_skipped_not_in_dataset"]:
        shown = ", ".join(summary["skipped_not_in_dataset"][:5])
        info(f"[yellow]warning:[/] skipped {summary['n_skipped_not_in_dataset']} predicted condition(s) "
             f"not in {name}: {shown}")
    if summary["n_test_conditions_not_predicted"]:
        info(f"[yellow]warning:[/] {summary['n_test_conditions_not_predicted']} test condition(s) have no prediction")
    if summary["prediction_form"] == "means":
        info("predictions are mean profiles (one row per condition): distribution metrics need cells and are left out")
    idle = [b for b in summary["baselines"] if b not in summary["comparison"]]
    if idle:
        info(f"baseline(s) with no test condition they can predict: {', '.join(idle)} "
             "(additive needs both singles in training; linear needs measured target genes)")
    for table in summary_tables(summary):
        show(table)
    info(f"wrote {summary['out']}")
    emit_result(summary)
