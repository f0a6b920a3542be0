"""Turn per-condition scores into the evaluation's outputs: aggregates, files, terminal tables.

Aggregates are plain means over conditions (NaN-free conditions only), per subgroup of the scored
set and overall, each with its number of conditions (and, when the predictions say which prompt
each condition used, per prompt source). "Does a model beat a baseline?" is answered on the
conditions both cover, over the headline metrics (the rows of the table): `additive` only
predicts combinations, so comparing it with the model's mean over all conditions would be unfair
to one or the other.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from regina_cli import __version__, keys
from regina_cli.evaluate.metrics import METRICS
from regina_cli.io import atomic_path, write_json

OVERALL = "overall"
BY_PROMPT_SOURCE = "by_prompt_source"
HEADLINE = (
    "pearson_delta",
    "pearson_delta_top20_de",
    "mse_top20_de",
    "mse_top20_de_non_dropout",
    "frac_correct_direction_20",
    "nmse_top20_de",
    "pearson_delta_top20_abs",
    "frac_wrong_sign_top20_abs",
    "pearson_delta_pert",
    "discrimination_score_l1",
    "de_overlap_at_N",
    "mmd_rbf",
    "sliced_wasserstein",
    "energy_distance",
    "variance_pearson",
    "l1_means",
)
SUBGROUP_METRICS = ("pearson_delta", "mse_top20_de")
WIDTH = 80  # batch logs: every terminal table fits 80 columns


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


def aggregate(table: pd.DataFrame, on: str = "test") -> dict:
    """{model: {group: {"n_conditions": n, metric: mean}}}; `overall` = every condition of set `on`."""
    results = {}
    for model, frame in table.groupby("model", sort=False):
        groups = {group: _means(sub) for group, sub in frame.groupby("subgroup", sort=True)}
        scored = frame[frame["set"] == on]
        if len(scored):
            groups[OVERALL] = _means(scored)
        if keys.OBS_PROMPT_SOURCE in scored and (scored[keys.OBS_PROMPT_SOURCE].fillna("") != "").any():
            groups[BY_PROMPT_SOURCE] = {source: _means(sub) for source, sub
                                        in scored.groupby(keys.OBS_PROMPT_SOURCE, sort=True) if source}
        results[model] = groups
    return results


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if METRICS[metric].higher_is_better else a < b


def compare_with_baselines(table: pd.DataFrame, models: list[str], on: str = "test") -> dict:
    """{model: {baseline: ...}}: both means on the conditions of set `on` they share, and who wins
    (counted over the headline metrics both define)."""
    scored = table[table["set"] == on]
    out = {}
    for model_name in models:
        model = scored[scored["model"] == model_name].set_index("condition")
        by_baseline = {}
        for name, frame in scored[~scored["model"].isin(models)].groupby("model", sort=False):
            shared = frame.set_index("condition").index.intersection(model.index)
            if not len(shared):
                continue
            base, ours = frame.set_index("condition").loc[shared], model.loc[shared]
            per_metric = {}
            for m in _metric_columns(table):
                a, b = float(ours[m].mean()), float(base[m].mean())
                if not (math.isnan(a) or math.isnan(b)):
                    per_metric[m] = {"model": a, "baseline": b, "model_better": bool(_better(m, a, b)), "tie": a == b}
            headline = [m for m in HEADLINE if m in per_metric]
            by_baseline[name] = {"n_conditions": len(shared), "metrics": per_metric,
                                 "model_wins": sum(per_metric[m]["model_better"] for m in headline),
                                 "n_metrics": len(headline)}
        out[model_name] = by_baseline
    return out


def _versions() -> dict:
    from importlib.metadata import version

    return {"regina": __version__, **{p: version(p) for p in ("torch", "numpy", "scipy", "pandas", "anndata")}}


def write_report(result, context: dict, out: Path, *, truth, plots: bool = True) -> dict:
    """Write per_condition.csv, metrics.json, report.html and plots/*.png into `out`; return the summary."""
    out = Path(out)
    table = result.table
    names = [m.name for m in result.models]
    summary = {
        **context,
        "versions": _versions(),
        "metrics": {m: {"higher_is_better": i.higher_is_better, "kind": i.kind, "description": i.description}
                    for m, i in METRICS.items()},
        "results": aggregate(table, context["on"]),
        "comparison": compare_with_baselines(table, names, context["on"]),
    }
    summary = _finite_or_none(summary)
    if plots:
        from regina_cli.evaluate import figures, html

        written = figures.write_figures(result, truth, summary, out / keys.PLOTS_DIR)
        summary["plots"] = [str(p.relative_to(out)) for p in written]
        html.write_html(summary, written, out / keys.REPORT_FILE)
        summary["report"] = keys.REPORT_FILE
    with atomic_path(out / keys.PER_CONDITION_FILE) as tmp:
        table.to_csv(tmp, index=False)  # shortest exact decimals: means match metrics.json
    write_json(out / keys.METRICS_FILE, summary)
    return summary


# --- shared by the terminal and the HTML tables ----------------------------------------------
def fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def ordered(summary: dict) -> tuple[list[str], list[str]]:
    """Model names in file order, then baselines in the order asked for (metrics.json sorts keys)."""
    models = [m["name"] for m in summary["models"]]
    baselines = [b for b in summary["baselines"] if any(b in c for c in summary["comparison"].values())]
    return models, baselines


def headline_rows(summary: dict) -> list[dict]:
    """One row per headline metric that some model defines: value per model and per baseline,
    each baseline value with the first model's verdict on their shared conditions (better, worse, tie)."""
    models, baselines = ordered(summary)
    first = summary["comparison"].get(models[0], {})
    rows = []
    for m in HEADLINE:
        values = {name: summary["results"].get(name, {}).get(OVERALL, {}).get(m) for name in models}
        if all(v is None for v in values.values()):
            continue
        for b in baselines:
            entry = first.get(b, {}).get("metrics", {}).get(m)
            verdict = None if entry is None else ("tie" if entry["tie"] else "better" if entry["model_better"] else "worse")
            values[b] = None if entry is None else (entry["baseline"], verdict)
        rows.append({"metric": m, "arrow": "↑" if METRICS[m].higher_is_better else "↓", "values": values})
    return rows


def headline_headers(summary: dict) -> list[str]:
    """Column headers of the headline table: each name over the number of conditions its values
    are means over (a baseline's: those it shares with the first model), so that a baseline
    scored on a few conditions (additive: combinations only) is not read as comparable at a glance."""
    models, baselines = ordered(summary)
    n = {m: summary["results"].get(m, {}).get(OVERALL, {}).get("n_conditions", 0) for m in models}
    n.update({b: entry["n_conditions"] for b, entry in summary["comparison"].get(models[0], {}).items()})
    return [f"{name}\nn={n[name]}" if name in n else name for name in models + baselines]


def wins(summary: dict, model: str, baseline: str, shown: list[str]) -> str:
    entry = summary["comparison"].get(model, {}).get(baseline)
    if entry is None:
        return "-"
    compared = [m for m in shown if m in entry["metrics"]]
    return f"{sum(entry['metrics'][m]['model_better'] for m in compared)}/{len(compared)}"


# --- terminal --------------------------------------------------------------------------------
def _chunks(label_width: int, widths: list[int]) -> list[list[int]]:
    """Split value columns into groups whose table (labels repeated) fits WIDTH columns; a column
    takes its width plus one space of padding and one of separation."""
    groups, current, used = [], [], label_width
    for i, w in enumerate(widths):
        if current and used + w + 2 > WIDTH:
            groups.append(current)
            current, used = [], label_width
        current.append(i)
        used += w + 2
    return groups + [current] if current else groups


def _tables(title: str, labels: list[str], headers: list[str], rows: list[list[str]], caption: str = ""):
    """Rich tables: label columns + value columns, split so each fits WIDTH columns, nothing cut."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    plain = [[Text.from_markup(c).plain for c in row] for row in rows]
    n_labels = len(labels)
    label_width = sum(max([len(labels[k])] + [len(r[k]) for r in plain]) + 2 for k in range(n_labels))
    widths = [max([len(line) for line in h.split("\n")] + [len(r[n_labels + i]) for r in plain])
              for i, h in enumerate(headers)]
    groups = _chunks(label_width, widths)
    out = []
    for g, group in enumerate(groups):
        part = f" ({g + 1}/{len(groups)})" if len(groups) > 1 else ""
        table = Table(title=title + part, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False,
                      caption=caption if g == len(groups) - 1 else None, title_justify="left",
                      caption_justify="left")
        for label in labels:
            table.add_column(label, no_wrap=True)
        for i in group:
            table.add_column(headers[i], justify="right", no_wrap=True, min_width=widths[i])
        for row in rows:
            table.add_row(*row[:n_labels], *[row[n_labels + i] for i in group])
        out.append(table)
    return out


def genes_scored_notice(summary: dict) -> str | None:
    """What to say when not every gene of the dataset was scored (None: all were), for the command
    and the API alike."""
    if summary["n_genes_scored"] == summary["n_genes_dataset"]:
        return None
    return (f"scored on the {summary['n_genes_scored']} of {summary['n_genes_dataset']} genes that every "
            "prediction file shares with the dataset")


def summary_tables(summary: dict) -> list:
    """Rich tables: models and baselines (green = first model better on the same conditions), wins,
    subgroups, prompt sources. Each fits 80 columns."""
    models, baselines = ordered(summary)
    rows = headline_rows(summary)
    shown = [r["metric"] for r in rows]
    headers = headline_headers(summary)
    body = []
    for r in rows:
        cells = [fmt(r["values"][m]) for m in models]
        for b in baselines:
            v = r["values"][b]
            cells.append("-" if v is None else fmt(v[0]) if v[1] == "tie" else f"[green]{fmt(v[0])}[/]"
                         if v[1] == "better" else f"[red]{fmt(v[0])}*[/]")  # the star: for a file, without colour
        body.append([f"{r['metric']} {r['arrow']}", *cells])
    for model in models:
        body.append([f"{model} wins", *([""] * len(models)), *[wins(summary, model, b, shown) for b in baselines]])
    n = summary["results"].get(models[0], {}).get(OVERALL, {}).get("n_conditions", 0)
    genes = (f", {summary['n_genes_scored']} of {summary['n_genes_dataset']} genes"
             if summary["n_genes_scored"] != summary["n_genes_dataset"] else "")
    title = f"{summary['dataset']} / {summary['split']}: {n} {summary['on']} conditions{genes}"
    caption = (f"baselines: green = {models[0]} better on the same conditions, red and * = baseline better, "
               "plain = tie")
    tables = _tables(title, ["metric"], headers, body, caption)

    names = models + baselines
    groups = sorted({g for name in names for g in summary["results"].get(name, {}) if g not in (OVERALL, BY_PROMPT_SOURCE)})
    grouped = []
    for g in groups + [OVERALL]:
        label = f"{g} ({summary['results'].get(models[0], {}).get(g, {}).get('n_conditions', 0)})"
        for k, m in enumerate(SUBGROUP_METRICS):
            grouped.append([label if k == 0 else "", m,
                            *[fmt(summary["results"].get(name, {}).get(g, {}).get(m)) for name in names]])
    tables += _tables("by subgroup (n = conditions of the first model)", ["subgroup (n)", "metric"], names, grouped)

    sources = {name: summary["results"][name][BY_PROMPT_SOURCE] for name in models
               if BY_PROMPT_SOURCE in summary["results"].get(name, {})}
    if sources:
        by_source = []
        for name, groups_ in sources.items():
            for source, values in groups_.items():
                by_source.append([name, f"{source} ({values['n_conditions']})",
                                  *[fmt(values.get(m)) for m in SUBGROUP_METRICS]])
        tables += _tables("by prompt source", ["model", "prompt source (n)"], list(SUBGROUP_METRICS), by_source)
    return tables
