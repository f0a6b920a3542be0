"""report.html: one self-contained page (tables, figures inlined as base64 PNG) beside metrics.json.

It can be mailed or attached to a notebook as it is: nothing is loaded from elsewhere.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from regina_cli.evaluate.report import (BY_PROMPT_SOURCE, OVERALL, SUBGROUP_METRICS, fmt, headline_headers,
                                        headline_rows, ordered, wins)
from regina_cli.io import write_text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { white-space: pre-line; }
th:first-child, td:first-child { text-align: left; }
.better { color: #1a7f37; } .worse { color: #c62828; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0 1.2em; }
.note { color: #555; font-size: 0.9em; }
"""
CAPTIONS = {
    "metric_by_subgroup.png": "Each metric by subgroup: boxes over conditions (points = conditions), "
                              "the number above each box = conditions it holds.",
    "delta_top_de.png": "Mean change vs control on each example condition's top DE genes: grey bars = truth, "
                        "markers = models and baselines; targeted genes in red.",
    "delta_scatter.png": "Predicted vs true change per gene (top genes by |true change|); the diagonal is a "
                         "perfect prediction; targeted genes marked in red; r = Pearson over the plotted genes "
                         "(0 for a constant prediction such as no_change, as pearson_delta counts it).",
    "pca_cells.png": "Control, true and predicted cells in the first two principal components of all of "
                     "them; the red arrow is the targeted gene's direction.",
}


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline(summary: dict) -> str:
    models, baselines = ordered(summary)
    rows = headline_rows(summary)
    body = []
    for r in rows:
        cells = [f"{html.escape(r['metric'])} {r['arrow']}", *[fmt(r["values"][m]) for m in models]]
        for b in baselines:
            v = r["values"][b]
            cells.append("-" if v is None else f"<span class='{v[1]}'>{fmt(v[0])}</span>")
        body.append(cells)
    shown = [r["metric"] for r in rows]
    for model in models:
        body.append([f"{html.escape(model)} wins", *[""] * len(models), *[wins(summary, model, b, shown) for b in baselines]])
    return _table(["metric", *headline_headers(summary)], body)


def _grouped(summary: dict) -> str:
    models, baselines = ordered(summary)
    names = models + baselines
    results = summary["results"]
    groups = sorted({g for n in names for g in results.get(n, {}) if g not in (OVERALL, BY_PROMPT_SOURCE)}) + [OVERALL]
    rows = []
    for g in groups:
        for m in SUBGROUP_METRICS:
            cells = []
            for n in names:
                entry = results.get(n, {}).get(g, {})
                cells.append(f"{fmt(entry.get(m))} <span class='note'>n={entry.get('n_conditions', 0)}</span>"
                             if entry else "-")
            rows.append([html.escape(g), m, *cells])
    return _table(["subgroup", "metric", *names], rows)


def _prompt_sources(summary: dict) -> str:
    rows = []
    for model in ordered(summary)[0]:
        for source, values in summary["results"].get(model, {}).get(BY_PROMPT_SOURCE, {}).items():
            rows.append([html.escape(model), html.escape(source), str(values["n_conditions"]),
                         *[fmt(values.get(m)) for m in SUBGROUP_METRICS]])
    return "<h2>By prompt source</h2>" + _table(["model", "prompt source", "n", *SUBGROUP_METRICS], rows) if rows else ""


def _context(summary: dict) -> str:
    items = [f"dataset <b>{html.escape(summary['dataset'])}</b>, split <b>{html.escape(summary['split'])}</b>, "
             f"scored on the <b>{summary['on']}</b> conditions",
             f"{summary['n_genes_scored']} of {summary['n_genes_dataset']} genes scored"
             + (" (the genes every prediction file shares with the dataset)"
                if summary["n_genes_scored"] != summary["n_genes_dataset"] else "")]
    for m in summary["models"]:
        items.append(f"model <b>{html.escape(m['name'])}</b>: {html.escape(m['path'])} ({m['form']}, "
                     f"{m['n_conditions']} conditions, {m['n_target_conditions_not_predicted']} {summary['on']} "
                     f"conditions not predicted, {m['n_control_rows']} control rows)")
    matched = summary.get("baselines_matched_to_cell_types")
    items.append("baselines: " + (", ".join(summary["baselines"]) or "none")
                 + (f"; fitted per cell type ({html.escape(', '.join(matched))}) and mixed as each condition's "
                    "cells are" if matched else ""))
    items += [f"<b>warning:</b> {html.escape(w)}" for w in summary.get("warnings", [])]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = CAPTIONS.get(path.name, "")
    return f"<h3>{html.escape(path.stem)}</h3><p class='note'>{html.escape(caption)}</p>" \
           f"<img alt='{html.escape(path.name)}' src='data:image/png;base64,{data}'>"


def write_html(summary: dict, figures: list[Path], path: Path) -> None:
    first = ordered(summary)[0][0]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>REGINA evaluation: {html.escape(summary['dataset'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Evaluation of {html.escape(', '.join(m['name'] for m in summary['models']))} on "
        f"{html.escape(summary['dataset'])}</h1>",
        _context(summary),
        "<h2>Overall</h2>",
        f"<p class='note'>Means over the n conditions under each name; a baseline's n = the conditions it "
        f"shares with {html.escape(first)}, its values are means over those. Baseline columns: green = "
        f"{html.escape(first)} better on those conditions, red = baseline better, black = tie; 'wins' counts "
        "the metrics in this table.</p>",
        _headline(summary),
        "<h2>By subgroup</h2>",
        _grouped(summary),
        _prompt_sources(summary),
        "<h2>Figures</h2>",
        *[_figure(p) for p in figures],
        f"<p class='note'>Written by regina {html.escape(summary['versions']['regina'])}; every metric is defined "
        "in metrics.json and docs/evaluate.md.</p></body></html>",
    ]
    write_text(path, "\n".join(parts))
