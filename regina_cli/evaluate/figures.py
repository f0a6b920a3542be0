"""The evaluation's figures (PNG): metrics by subgroup, changes of example conditions, cells in PCA.

Example conditions are picked so they are typical, not flattering: in each subgroup of the scored
set, the condition whose `pearson_delta` (first model) is the subgroup's median; then the best and
the worst condition overall when fewer than four subgroups exist. Every panel says why it was
picked, and the genes a condition targets are marked in red.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from regina_cli import keys
from regina_cli.data.conditions import parse_condition
from regina_cli.evaluate.metrics import METRICS, gears_pearson
from regina_cli.io import atomic_path

N_EXAMPLES = 4
PLOT_METRICS = ("pearson_delta", "mse_top20_de", "discrimination_score_l1", "mmd_rbf")
SCATTER_GENES = 50
PCA_CELLS = 200
TARGET_COLOUR = "#d62728"
BY_SUBGROUP_PNG, TOP_DE_PNG, SCATTER_PNG, PCA_PNG = keys.PLOT_FILES


def colours(names: list[str]) -> dict[str, str]:
    """One colour per model or baseline, the same in every figure (red is kept for targets)."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def example_conditions(table: pd.DataFrame, model: str, on: str) -> list[tuple[str, str]]:
    """[(condition, why picked)]: the median condition of each subgroup, then the best and worst."""
    ours = table[(table["model"] == model) & (table["set"] == on)].dropna(subset=["pearson_delta"])
    ours = ours.sort_values(["pearson_delta", "condition"])
    picked: dict[str, str] = {}
    for group, frame in ours.groupby("subgroup", sort=True):
        median = frame.iloc[(len(frame) - 1) // 2]
        picked.setdefault(median["condition"], f"median pearson_delta of {group} (n={len(frame)})")
    for row, why in ((ours.iloc[-1:], "best pearson_delta"), (ours.iloc[:1], "worst pearson_delta")):
        if len(picked) < N_EXAMPLES and len(row) and row["condition"].iloc[0] not in picked:
            picked[row["condition"].iloc[0]] = f"{why} of all {len(ours)}"
    return list(picked.items())[:N_EXAMPLES]


def _savefig(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    return path


def _profiles_of(result, condition: str) -> dict[str, np.ndarray]:
    """Mean profile of every model and baseline that predicts `condition`."""
    out = {m.name: m.means[m.conditions.index(condition)] for m in result.models if condition in m.conditions}
    out.update({b: p[condition] for b, p in result.profiles.items() if condition in p})
    return out


def _targets(truth, condition: str) -> list[int]:
    return [truth.gene_index[g] for g in parse_condition(condition) if g in truth.gene_index]


def _delta_bars(ax, result, truth, condition: str, why: str, colour: dict, models: set) -> None:
    true_delta = truth.stats(condition).mean - truth.control_mean
    targets = _targets(truth, condition)
    genes = truth.de_indices(keys.UNS_RANK_GENES, condition, 20) or list(np.argsort(-np.abs(true_delta))[:20])
    genes = [g for g in targets if g not in genes] + list(genes)
    x = np.arange(len(genes))
    ax.bar(x, true_delta[genes], color="0.8", label="true")
    marked = [k for k, g in enumerate(genes) if g in targets]
    if marked:
        ax.bar(x[marked], true_delta[[genes[k] for k in marked]], fill=False, edgecolor=TARGET_COLOUR, linewidth=2,
               label="targeted gene")
    for name, profile in _profiles_of(result, condition).items():
        ax.plot(x, profile[genes] - truth.control_mean[genes], "o" if name in models else "_",
                markersize=5 if name in models else 10, markeredgewidth=2, color=colour[name], label=name)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(x, [truth.genes[g] for g in genes], rotation=60, fontsize=7)
    for label, g in zip(ax.get_xticklabels(), genes):
        if g in targets:
            label.set_color(TARGET_COLOUR)
            label.set_fontweight("bold")
    ax.set_ylabel("change vs control")
    ax.set_title(f"{condition}: top DE genes (targets in red) - {why}", fontsize=9)


def _scatter_r(pred: np.ndarray, true: np.ndarray) -> float:
    """The scatter's r, by the tables' definition (0 for a constant prediction such as no_change)."""
    a, b = (torch.as_tensor(x, dtype=torch.float64)[None] for x in (pred, true))
    return float(gears_pearson(a, b, torch.ones_like(a, dtype=torch.bool))[0])


def _delta_scatter(ax, result, truth, condition: str, why: str, colour: dict, models: set) -> None:
    true_delta = truth.stats(condition).mean - truth.control_mean
    targets = _targets(truth, condition)
    genes = list(np.argsort(-np.abs(true_delta))[:SCATTER_GENES])
    genes = [g for g in targets if g not in genes] + genes
    lo, hi = [], []
    for name, profile in _profiles_of(result, condition).items():
        pred = profile[genes] - truth.control_mean[genes]
        r = _scatter_r(pred, true_delta[genes])
        ax.scatter(true_delta[genes], pred, s=14 if name in models else 8, color=colour[name],
                   alpha=0.8 if name in models else 0.5, label=f"{name} (r={r:.2f})")
        lo.append(pred.min())
        hi.append(pred.max())
    for g in targets:  # a dotted line at the targeted gene's true change, named at the bottom
        ax.axvline(true_delta[g], color=TARGET_COLOUR, linewidth=0.8, linestyle=":")
        ax.annotate(truth.genes[g], (true_delta[g], 0.01), xycoords=("data", "axes fraction"), color=TARGET_COLOUR,
                    fontsize=7, fontweight="bold", rotation=90, ha="right", va="bottom")
    span = [min(lo + [true_delta[genes].min()]), max(hi + [true_delta[genes].max()])]
    ax.plot(span, span, color="black", linewidth=0.6)
    ax.axhline(0, color="0.6", linewidth=0.4)
    ax.axvline(0, color="0.6", linewidth=0.4)
    ax.set_xlabel("true change vs control")
    ax.set_ylabel("predicted change")
    ax.set_title(f"{condition}: top {SCATTER_GENES} genes by |true change|\n{why}", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")


def _principal_axes(centred: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Top-k principal axes [G, k] and explained variance shares, from the small cells x cells Gram
    matrix (a few hundred cells, thousands of genes) instead of a full SVD; the Gram product in the
    cells' float32 (a picture's precision), its eigenvectors in float64."""
    values, vectors = np.linalg.eigh((centred @ centred.T).astype(np.float64))
    values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    axes = centred.T @ vectors / np.sqrt(np.clip(values, 1e-12, None))
    signs = np.sign(axes[np.abs(axes).argmax(0), np.arange(k)])  # same picture on every BLAS
    return axes * signs, values / np.einsum("ij,ij->", centred, centred, dtype=np.float64)


def _pca_panel(ax, result, truth, condition: str, why: str, colour: dict, rng) -> bool:
    """Control, true and predicted cells in the first two principal components of all of them.

    The axes are fitted on every plotted group alike: fitted on the real cells only, a few hundred
    cells in thousands of dimensions, the real cells would look more spread than any other cells
    merely for having been fitted."""
    cell_models = [m for m in result.models if m.form == "cells" and condition in m.conditions]
    if not cell_models:
        return False

    def pick(rows):
        return rows if len(rows) <= PCA_CELLS else np.sort(rng.choice(rows, PCA_CELLS, replace=False))

    groups = {"control": (truth.cells(pick(truth.control_rows)), "0.75"),
              "true": (truth.cells(pick(truth.rows(condition))), "black")}
    for m in cell_models:
        cells = m.cells[m.conditions.index(condition)]
        groups[m.name] = (cells[pick(np.arange(len(cells)))], colour[m.name])
    stacked = np.vstack([g for g, _ in groups.values()]).astype(np.float32)
    centred = stacked - stacked.mean(0, dtype=np.float64).astype(np.float32)
    axes, explained = _principal_axes(centred)
    projected = centred @ axes
    ends = np.cumsum([0] + [len(cells) for cells, _ in groups.values()])
    for (name, (cells, shade)), start, end in zip(groups.items(), ends[:-1], ends[1:]):
        ax.scatter(*projected[start:end].T, s=5, color=shade, alpha=0.7, label=f"{name} ({len(cells)})")
    reach = np.abs(projected).max(0)
    for k, g in enumerate(_targets(truth, condition)):  # the targeted gene's direction in the PCA plane
        tip = axes[g] * reach / max(np.abs(axes[g]).max(), 1e-12) * 0.8
        ax.annotate("", xy=tip, xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": TARGET_COLOUR})
        ax.annotate(truth.genes[g], xy=tip, xytext=(4, 4 - 11 * k), textcoords="offset points", color=TARGET_COLOUR,
                    fontsize=8, fontweight="bold")
    ax.set_xlabel(f"PC1 ({explained[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({explained[1]:.1%})")
    ax.set_title(f"{condition}: predicted vs real cells\n{why}", fontsize=9)
    ax.legend(fontsize=6, markerscale=2)
    return True


def _boxes(ax, data: list[np.ndarray], positions: list[float], width: float, colour: str) -> None:
    """Box plots of `data` (quartile box, median, whiskers to the furthest point within 1.5 IQR,
    every value as a dot) drawn as four artists in all: Axes.boxplot makes eight per box, and their
    drawing was most of this figure's cost."""
    from matplotlib.cbook import boxplot_stats

    stats = boxplot_stats(data)
    x = np.asarray(positions)
    q1, q3 = np.array([s["q1"] for s in stats]), np.array([s["q3"] for s in stats])
    bars = ax.bar(x, q3 - q1, width * 0.85, bottom=q1, color=colour, alpha=0.6, edgecolor="black", linewidth=0.8)
    for bar in bars:  # a bar pins the axis at its base; a box must not (the margins stay as for lines)
        bar.sticky_edges.y.clear()
    low, high = np.array([s["whislo"] for s in stats]), np.array([s["whishi"] for s in stats])
    half = width * 0.85 / 2
    ax.vlines(np.r_[x, x], np.r_[low, q3], np.r_[q1, high], color="black", linewidth=0.8)
    ax.hlines(np.r_[[s["med"] for s in stats], low, high], np.r_[x - half, x - half / 2, x - half / 2],
              np.r_[x + half, x + half / 2, x + half / 2], color="black", linewidth=0.8)
    ax.scatter(np.repeat(x, [len(d) for d in data]), np.concatenate(data), s=6, color=colour, zorder=3)


def _by_subgroup(fig, table: pd.DataFrame, names: list[str], on: str, colour: dict) -> None:
    scored = table[table["set"] == on]
    metrics = [m for m in PLOT_METRICS if m in scored and scored[m].notna().any()]
    groups = sorted(scored["subgroup"].unique()) + ["overall"]
    axes = fig.subplots(2, 2, squeeze=False).ravel()
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    width = 0.8 / max(len(names), 1)
    for ax, m in zip(axes, metrics):
        for k, name in enumerate(names):
            frame = scored[scored["model"] == name]
            data = [frame.loc[frame["subgroup"] == g, m].dropna().to_numpy() if g != "overall"
                    else frame[m].dropna().to_numpy() for g in groups]
            positions = np.arange(len(groups)) + (k - (len(names) - 1) / 2) * width
            kept = [(p, d) for p, d in zip(positions, data) if len(d)]
            if not kept:
                continue
            _boxes(ax, [d for _, d in kept], [p for p, _ in kept], width, colour[name])
            for p, d in kept:
                ax.annotate(f"{len(d)}", (p, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                            fontsize=6, color=colour[name], rotation=90)
        ax.set_xticks(np.arange(len(groups)), groups, rotation=30, fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_title(f"{m} ({'higher' if METRICS[m].higher_is_better else 'lower'} is better)\n"
                     "numbers above: conditions per box", fontsize=8, pad=22)
    from matplotlib.patches import Patch

    handles = [Patch(color=colour[n], alpha=0.6, label=n) for n in names]
    fig.legend(handles=handles, loc="upper center", ncol=len(names), fontsize=8)


def _figure_legend(fig, axes) -> None:
    """One legend above all panels, with every entry any panel has (baselines differ by panel)."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="upper center", ncol=len(entries), fontsize=8,
               frameon=False)


def write_figures(result, truth, summary: dict, folder: Path) -> list[Path]:
    """All figures into `folder`; returns their paths in report order.

    Figures are drawn on matplotlib's Figure directly (Agg when saved): no pyplot, whose import
    and figure registry cost time and global state and buy nothing here."""
    from matplotlib.figure import Figure

    table, on = result.table, summary["on"]
    models = [m.name for m in result.models]
    names = models + [b for b in result.profiles if (table["model"] == b).any()]
    colour = colours(names)
    examples = example_conditions(table, models[0], on) or [(c, "first condition") for c in result.models[0].conditions[:1]]
    paths = []

    fig = Figure(figsize=(11, 8))
    _by_subgroup(fig, table, names, on, colour)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.08, top=0.88, hspace=0.5, wspace=0.18)
    paths.append(_savefig(fig, folder / BY_SUBGROUP_PNG))

    fig = Figure(figsize=(11, 3.2 * len(examples)))
    axes = fig.subplots(len(examples), 1, squeeze=False)
    for ax, (condition, why) in zip(axes[:, 0], examples):
        _delta_bars(ax, result, truth, condition, why, colour, set(models))
    _figure_legend(fig, axes.ravel())
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.08, top=1 - 0.45 / fig.get_figheight(), hspace=0.65)
    paths.append(_savefig(fig, folder / TOP_DE_PNG))

    fig = Figure(figsize=(4.2 * len(examples), 4.4))
    axes = fig.subplots(1, len(examples), squeeze=False)
    for ax, (condition, why) in zip(axes[0], examples):
        _delta_scatter(ax, result, truth, condition, why, colour, set(models))
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.86, wspace=0.25)
    paths.append(_savefig(fig, folder / SCATTER_PNG))

    if any(m.form == "cells" for m in result.models):
        rng = np.random.default_rng(summary["seed"])
        fig = Figure(figsize=(4.2 * len(examples), 4.4))
        axes = fig.subplots(1, len(examples), squeeze=False)
        drawn = [_pca_panel(ax, result, truth, c, why, colour, rng) for ax, (c, why) in zip(axes[0], examples)]
        for ax, ok in zip(axes[0], drawn):
            ax.set_visible(ok)
        fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.86, wspace=0.25)
        paths.append(_savefig(fig, folder / PCA_PNG))
    return paths
