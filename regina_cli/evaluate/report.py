"""Turn per-condition scores into the evaluation's outputs: aggregates, files, a table, plots.

Aggregates are plain means over conditions (NaN-free conditions only), per test subgroup and
overall, each with its number of conditions. "Does the model beat a baseline?" is answered on
the conditions both cover: `additive` only predicts combinations, so comparing it with the
model's mean over all conditions would be unfair to one or the other.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from regina_cli import __version__, keys
from regina_cli.data.split import SUBGROUPS
from regina_cli.evaluate.baselines import BASELINES
from regina_cli.evaluate.metrics import METRICS
from regina_cli.io import atomic_path, write_json

MODEL = "regina"
OVERALL = "overall"
OTHER_SUBGROUP = "test"  # a test condition outside GEARS's four subgroups
TEST_SUBGROUPS = (*SUBGROUPS, OTHER_SUBGROUP)
HEADLINE = (
    "pearson_delta",
    "pearson_delta_top20_de",
    "mse_top20_de",
    "mse_top20_de_non_dropout",
    "frac_correct_direction_20",
    "nmse_top20_de",
    "pearson_delta_top20_abs",
    "frac_wrong_sign_top20_abs",
    "mmd_rbf",
    "sliced_wasserstein",
    "energy_distance",
    "variance_pearson",
    "l1_means",
)
SUBGROUP_METRICS = ("pearson_delta", "mse_top20_de")
PLOT_METRICS = ("pearson_delta", "pearson_delta_top20_de", "mse_top20_de_non_dropout", "mmd_rbf")
PLOTS_DIR = "plots"
N_EXAMPLE_CONDITIONS = 4


def _finite_or_none(value):
    """JSON has no NaN: undefined metrics are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _finite_or_none(value.item())
    return value


def _metric_columns(table: pd.DataFrame) -> list[str]:
    return [m for m in METRICS if m in table.columns]


def _means(frame: pd.DataFrame) -> dict:
    out = {"n_conditions": int(frame["condition"].nunique())}
    out.update({m: float(frame[m].mean()) for m in _metric_columns(frame)})  # pandas skips NaN
    return out


def aggregate(table: pd.DataFrame) -> dict:
    """{model: {group: {"n_conditions": n, metric: mean}}}; `overall` = every test condition."""
    results = {}
    for model, frame in table.groupby("model", sort=False):
        groups = {}
        for group, sub in frame.groupby("subgroup", sort=True):
            groups[group] = _means(sub)
        test = frame[frame["subgroup"].isin(TEST_SUBGROUPS)]
        if len(test):
            groups[OVERALL] = _means(test)
        results[model] = groups
    return results


def compare_with_baselines(table: pd.DataFrame) -> dict:
    """Per baseline, on the test conditions it shares with the model: both means and who wins."""
    test = table[table["subgroup"].isin(TEST_SUBGROUPS)]
    model = test[test["model"] == MODEL].set_index("condition")
    out = {}
    for name, frame in test[test["model"] != MODEL].groupby("model", sort=False):
        shared = frame.set_index("condition").index.intersection(model.index)
        if not len(shared):
            continue
        base = frame.set_index("condition").loc[shared]
        ours = model.loc[shared]
        per_metric = {}
        for m in _metric_columns(table):
            a, b = float(ours[m].mean()), float(base[m].mean())
            if math.isnan(a) or math.isnan(b):
                continue
            better = a > b if METRICS[m].higher_is_better else a < b
            per_metric[m] = {MODEL: a, name: b, "model_better": bool(better)}
        wins = sum(v["model_better"] for v in per_metric.values())
        out[name] = {"n_conditions": len(shared), "metrics": per_metric, "model_wins": wins,
                     "n_metrics": len(per_metric)}
    return out


def _versions() -> dict:
    from importlib.metadata import version

    return {"regina": __version__, **{p: version(p) for p in ("torch", "numpy", "scipy", "pandas", "anndata")}}


def write_report(result, context: dict, out: Path, *, truth, preds, plots: bool = True) -> dict:
    """Write per_condition.csv, metrics.json and (optionally) PNG plots into `out`; return the summary."""
    out = Path(out)
    table = result.table
    summary = {
        **context,
        "versions": _versions(),
        "metrics": {m: {"higher_is_better": i.higher_is_better, "kind": i.kind, "description": i.description}
                    for m, i in METRICS.items()},
        "results": aggregate(table),
        "comparison": compare_with_baselines(table),
    }
    if plots:
        summary["plots"] = [str(p.relative_to(out)) for p in write_plots(result, truth, preds, out / PLOTS_DIR)]
    with atomic_path(out / keys.PER_CONDITION_FILE) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    summary = _finite_or_none(summary)
    write_json(out / keys.METRICS_FILE, summary)
    return summary


# --- terminal --------------------------------------------------------------------------------
def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def summary_tables(summary: dict) -> list:
    """Rich tables: model vs each baseline (green = model better on the same conditions), subgroups."""
    from rich import box
    from rich.table import Table

    compact = {"box": box.SIMPLE_HEAD, "pad_edge": False, "padding": (0, 1, 0, 0)}  # fits 80 columns
    # metrics.json sorts its keys: put the model first and the baselines in the order asked for
    order = [MODEL] + list(summary["baselines"])
    results = {m: summary["results"][m] for m in order if m in summary["results"]}
    comparison = {b: summary["comparison"][b] for b in order if b in summary["comparison"]}
    overall = results.get(MODEL, {}).get(OVERALL, {})
    shown = [m for m in HEADLINE if overall.get(m) is not None]
    main = Table(title=f"{MODEL} vs baselines on {summary['dataset']} / {summary['split']} "
                       f"({overall.get('n_conditions', 0)} test conditions)", **compact)
    main.add_column("metric", no_wrap=True)
    main.add_column(MODEL, justify="right", style="bold", no_wrap=True)
    for name, comp in comparison.items():
        main.add_column(f"{name}\nn={comp['n_conditions']}", justify="right", no_wrap=True)
    for m in shown:
        cells = [f"{m} {'↑' if METRICS[m].higher_is_better else '↓'}", _fmt(overall[m])]
        for name, comp in comparison.items():
            entry = comp["metrics"].get(m)
            if entry is None:
                cells.append("-")
            else:
                colour = "green" if entry["model_better"] else "red"
                cells.append(f"[{colour}]{_fmt(entry[name])}[/]")
        main.add_row(*cells)
    if comparison:
        main.add_row("model wins (all metrics)", "", *[f"{c['model_wins']}/{c['n_metrics']}" for c in comparison.values()])
    main.caption = "baseline columns: green = model better on the same conditions, red = baseline better"

    groups = Table(title="by test subgroup", **compact)
    groups.add_column("subgroup (n)", no_wrap=True)
    groups.add_column("metric", no_wrap=True)
    for model in results:
        groups.add_column(model, justify="right", no_wrap=True)
    for g in sorted({g for r in results.values() for g in r if g != OVERALL}) + [OVERALL]:
        label = f"{g} ({results.get(MODEL, {}).get(g, {}).get('n_conditions', 0)})"
        for k, m in enumerate(SUBGROUP_METRICS):
            values = [_fmt(by_group.get(g, {}).get(m)) for by_group in results.values()]
            groups.add_row(label if k == 0 else "", m, *values, end_section=k == len(SUBGROUP_METRICS) - 1)
    return [main, groups]


# --- plots -----------------------------------------------------------------------------------
def _example_conditions(table: pd.DataFrame) -> list[str]:
    """One condition per test subgroup first (sorted, so runs agree), then any others."""
    ours = table[table["model"] == MODEL].sort_values(["subgroup", "condition"])
    picked = list(ours.groupby("subgroup", sort=True)["condition"].first())
    rest = [c for c in ours["condition"] if c not in picked]
    return (picked + rest)[:N_EXAMPLE_CONDITIONS]


def _colour(model: str) -> str:
    """The same colour for a model in every plot."""
    return f"C{([MODEL] + list(BASELINES)).index(model)}"


def _savefig(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    return path


def write_plots(result, truth, preds, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result.table
    paths = []
    conditions = _example_conditions(table)
    position = {c: i for i, c in enumerate(preds.conditions)}
    fig, axes = plt.subplots(len(conditions), 1, figsize=(11, 3 * len(conditions)), squeeze=False)
    for ax, condition in zip(axes[:, 0], conditions):
        true_delta = truth.stats(condition).mean - truth.control_mean
        genes = truth.de_indices(keys.UNS_RANK_GENES, condition, 20) or list(np.argsort(-np.abs(true_delta))[:20])
        x = np.arange(len(genes))
        ax.bar(x, true_delta[genes], color="0.75", label="true")
        ax.plot(x, preds.means[position[condition]][genes] - truth.control_mean[genes], "o", color=_colour(MODEL),
                label=MODEL)
        for name, profiles in result.profiles.items():
            if condition in profiles:
                ax.plot(x, profiles[condition][genes] - truth.control_mean[genes], "_", markersize=10,
                        markeredgewidth=2, color=_colour(name), label=name)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(x, [truth.genes[g] for g in genes], rotation=60, fontsize=7)
        ax.set_ylabel("change vs control")
        ax.set_title(f"{condition}: top DE genes", fontsize=9)
        ax.legend(fontsize=7, ncol=6, loc="best")
    fig.tight_layout()
    paths.append(_savefig(fig, folder / "delta_top_de.png"))
    plt.close(fig)

    results = aggregate(table)
    metrics = [m for m in PLOT_METRICS if table[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    groups = sorted({g for r in results.values() for g in r if g != OVERALL}) + [OVERALL]
    models = list(results)
    width = 0.8 / max(len(models), 1)
    for ax, m in zip(axes[0], metrics):
        for k, model in enumerate(models):
            values = [results[model].get(g, {}).get(m, np.nan) for g in groups]
            ax.bar(np.arange(len(groups)) + k * width, values, width, label=model, color=_colour(model))
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=30, fontsize=8)
        ax.set_title(f"{m} ({'higher' if METRICS[m].higher_is_better else 'lower'} is better)", fontsize=9)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=len(models), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    paths.append(_savefig(fig, folder / "metric_by_subgroup.png"))
    plt.close(fig)
    return paths
