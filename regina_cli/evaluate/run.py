"""`regina evaluate` as a Python function: score predictions and baselines against a held-out split.

Flow: truth (dataset) + split -> prediction files lined up on their shared genes -> baselines fitted
on the training conditions -> precision metrics for every model in one batch -> distribution and
DE metrics per condition -> metrics.json, per_condition.csv, report.html and plots.

Baselines produce mean profiles, not cells. To give them distribution metrics that are comparable
with a model's, each baseline's cells are the very control cells the (first) model started from
(obs `control_cell`; when the file has none, a seeded draw of control cells, in the condition's
cell-type mix where the baselines are matched, from a stream of its own), shifted by the
baseline's predicted change. `no_change` is then literally the control cells. A prediction file
may ship its own baseline: varm['reconstruction'] (the model's decoded controls, no perturbation
applied), scored like the others under the name `reconstruction`. When the predictions are mean
profiles (GEARS form) nothing has cells and only precision metrics exist.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from regina_cli import keys
from regina_cli.data.conditions import parse_condition
from regina_cli.devices import available_cpus, resolve_device
from regina_cli.errors import ReginaError
from regina_cli.io import atomic_dir
from regina_cli.evaluate.baselines import baseline_profiles, parse_baselines, perturbed_reference, training_data
from regina_cli.evaluate.cell_type_baselines import condition_mix, matched_baselines, screen_cell_types
from regina_cli.evaluate.de import Moments, de_ranks, overlap_metrics
from regina_cli.evaluate.distribution import (PredictedCells, TrueCells, column_mean_var, distribution_metrics,
                                              random_projections)
from regina_cli.evaluate.metrics import (DE_METRICS, DE_SIZES, DISTRIBUTION_METRICS, POOLED_METRICS, PRECISION_METRICS, TOP_K,
                                         GeneSets, discrimination_score, precision_metrics)
from regina_cli.evaluate.predictions import CELLS, Predictions

# True cells per condition for the pairwise distribution metrics (MMD, energy, sliced Wasserstein):
# up to 100, as the original evaluation did; their cost grows with its square. Means and standard
# deviations always use every true cell.
MAX_TRUE_CELLS = 100
TARGET_SETS = ("test", "val")
BASELINE_CELL_TYPES = ("matched", "pooled")
MIN_PREDICTED_CELLS = 2  # fewer predicted cells of a condition get no distribution or DE metrics
RECONSTRUCTION = keys.VARM_RECONSTRUCTION


def _padded(lists: list[list[int]], width: int, device):
    index = torch.zeros(len(lists), max(width, 1), dtype=torch.long)
    valid = torch.zeros_like(index, dtype=torch.bool)
    for row, items in enumerate(lists):
        index[row, : len(items)] = torch.tensor(items, dtype=torch.long)
        valid[row, : len(items)] = True
    return index.to(device), valid.to(device)


def de_gene_sets(truth, conditions: list[str], device) -> GeneSets:
    """The GEARS DE gene selections of `conditions` as padded tensors (see metrics.GeneSets)."""
    de = [truth.de_indices(keys.UNS_RANK_GENES, c, TOP_K) for c in conditions]
    nd = [truth.de_indices(keys.UNS_TOP_DE_20, c, TOP_K) for c in conditions]

    def masks(key):
        return torch.from_numpy(np.stack([truth.gene_mask(key, c) for c in conditions])).to(device)

    return GeneSets(*_padded(de, TOP_K, device), *_padded(nd, max(map(len, nd), default=0), device),
                    masks(keys.UNS_NON_DROPOUT_IDX), masks(keys.UNS_NON_ZEROS_IDX))


def _t(a, device, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def score_precision(profiles: np.ndarray, truth, conditions: list[str], gene_sets: GeneSets, device,
                    perturbed_reference: np.ndarray | None = None) -> dict:
    """Precision metrics for mean profiles [C, G] of `conditions`: {metric: np.ndarray[C]};
    `perturbed_reference` [G] or [C, G]: the average training perturbation (`baselines.perturbed_reference`;
    per condition when matched to its cell-type mix)."""
    stats = [truth.stats(c) for c in conditions]
    out = precision_metrics(
        _t(profiles, device), _t(np.stack([s.mean for s in stats]), device), _t(truth.control_mean, device), gene_sets,
        _t(np.stack([s.std for s in stats]), device), torch.from_numpy(np.stack([s.all_zero for s in stats])).to(device),
        None if perturbed_reference is None else _t(perturbed_reference, device),
    )
    return {m: v.cpu().numpy() for m, v in out.items()}


def _subsample(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return rows if len(rows) <= limit else np.sort(rng.choice(rows, limit, replace=False))


def _control_rows(truth, names: np.ndarray | None, n: int, rng: np.random.Generator,
                  mix: dict[str, float] | None = None, cell_types: np.ndarray | None = None) -> np.ndarray:
    """The control cells a prediction came from, else a seeded draw of `n` control cells: in the
    cell-type `mix` given (each dataset cell's type in `cell_types`), else from all controls."""
    if names is not None:
        index = truth.adata.obs_names.get_indexer(names)
        if (index >= 0).all():
            return index
    pool = truth.control_rows
    if not mix:
        return rng.choice(pool, n, replace=n > len(pool))
    kinds = rng.choice(list(mix), n, p=np.array(list(mix.values())) / sum(mix.values()))
    rows = np.empty(n, dtype=np.int64)
    for kind in mix:
        drawn, of_kind = kinds == kind, pool[cell_types[pool] == kind]
        rows[drawn] = rng.choice(of_kind, int(drawn.sum()), replace=drawn.sum() > len(of_kind))
    return rows


@dataclass
class Scorer:
    """A model or a baseline: what it predicts for which conditions, and its DE reference."""

    name: str
    conditions: list[str]
    profiles: np.ndarray  # [C, G] mean profiles
    reference_mean: np.ndarray  # [G] the predicted control mean its changes are measured from
    model: Predictions | None = None  # None for a baseline
    # a baseline matched to cell types: condition -> control cell type -> predicted change
    type_changes: dict[str, dict[str, np.ndarray]] | None = None
    cells: dict[str, dict] = field(default_factory=dict)  # condition -> {metric: value}
    moments: dict[str, tuple] = field(default_factory=dict)  # condition -> (target, reference) rows


def _moments_row(mean: torch.Tensor, std: torch.Tensor, n: int):
    return mean.double(), std.double() ** 2, n


def _control_moments(cells: np.ndarray, device):
    mean, var = column_mean_var(torch.from_numpy(cells).to(device))
    return mean.double(), var.double(), len(cells)


def score_cells(scorers: list[Scorer], truth, *, seed: int, device, max_true_cells: int,
                cell_types: np.ndarray | None = None) -> None:
    """Distribution metrics and DE moments of every scorer that has (or borrows) cells, in place.
    A baseline matched to cell types (`cell_types`: each dataset cell's) moves each borrowed control
    cell by its own type's predicted change."""
    rng = np.random.default_rng(seed)
    draws = np.random.default_rng([seed, 1])  # the baselines' controls: the true cells' sample stays the same
    projections = random_projections(len(truth.genes), seed, device=device)
    control_mean = torch.as_tensor(truth.control_mean, dtype=torch.float32, device=device)
    models = [s for s in scorers if s.model is not None and s.model.form == CELLS]
    baselines = [s for s in scorers if s.model is None]
    truth_controls = _moments_row(_t(truth.control.mean, device), _t(truth.control.std, device), len(truth.control_rows))
    references = {s.name: truth_controls if s.model.predicted_controls is None
                  else _control_moments(s.model.predicted_controls, device) for s in models}
    for condition in sorted({c for s in models for c in s.conditions}):
        stats = truth.stats(condition)
        sample = torch.from_numpy(truth.cells(_subsample(stats.rows, max_true_cells, rng))).to(device)
        reference = TrueCells.build(sample, projections, mean=_t(stats.mean, device, torch.float32),
                                    std=_t(stats.std, device, torch.float32))
        first = None
        for scorer in models:
            if condition not in scorer.model.conditions:
                continue
            i = scorer.model.conditions.index(condition)
            if len(scorer.model.cells[i]) < MIN_PREDICTED_CELLS:  # no spread, no test: left out (NaN)
                continue
            cells = torch.from_numpy(scorer.model.cells[i]).to(device)
            predicted = PredictedCells.build(cells, reference)
            scorer.cells[condition] = distribution_metrics(predicted, reference)
            scorer.moments[condition] = (_moments_row(predicted.mean, predicted.std, len(cells)), references[scorer.name])
            first = first or (scorer.model, i)
        covered = [s for s in baselines if condition in s.conditions]
        if not covered or first is None:
            continue
        model, i = first
        mix = None if cell_types is None else condition_mix(truth, cell_types, condition)
        rows = _control_rows(truth, model.control_cells[i], len(model.cells[i]), draws, mix, cell_types)
        controls = PredictedCells.build(torch.from_numpy(truth.cells(rows)).to(device), reference)
        unshifted = _moments_row(controls.mean, controls.std, len(rows))
        for scorer in covered:
            if scorer.type_changes is not None:
                present, types = np.unique(cell_types[rows], return_inverse=True)
                changes = scorer.type_changes[condition]
                shifts = torch.as_tensor(np.stack([changes[t] for t in present]), dtype=torch.float32, device=device)
                moved = controls.shifted_by_type(shifts, torch.as_tensor(types, device=device), reference)
                scorer.cells[condition] = distribution_metrics(moved, reference)
                scorer.moments[condition] = (_moments_row(moved.mean, moved.std, len(rows)), unshifted)
                continue
            j = scorer.conditions.index(condition)
            shift = torch.as_tensor(scorer.profiles[j], dtype=torch.float32, device=device) - control_mean
            scorer.cells[condition] = distribution_metrics(controls.shifted(shift, reference), reference)
            scorer.moments[condition] = ((unshifted[0] + shift.double(), unshifted[1], len(rows)), unshifted)


def _stack(rows: list[tuple]) -> Moments:
    return Moments(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                   torch.tensor([r[2] for r in rows], dtype=torch.float64, device=rows[0][0].device))


def score_de(scorer: Scorer, truth_ranks: dict[str, tuple]) -> dict[str, dict[str, float]]:
    """cell-eval's overlap/precision at N of one scorer's DE genes against the true DE genes."""
    covered = [c for c in scorer.conditions if c in scorer.moments]
    if not covered:
        return {}
    rank, n = de_ranks(_stack([scorer.moments[c][0] for c in covered]), _stack([scorer.moments[c][1] for c in covered]))
    true_rank = torch.stack([truth_ranks[c][0] for c in covered])
    n_true = torch.stack([truth_ranks[c][1] for c in covered])
    values = {m: v.cpu().numpy() for m, v in overlap_metrics(true_rank, n_true, rank, n, DE_SIZES).items()}
    return {c: {m: float(values[m][j]) for m in DE_METRICS} for j, c in enumerate(covered)}


def true_de_ranks(truth, conditions: list[str], device) -> dict[str, tuple]:
    """Every condition's true DE genes against all control cells (pdex's `ref` mode)."""
    if not conditions:
        return {}
    stats = [truth.stats(c) for c in conditions]
    target = Moments(_t(np.stack([s.mean for s in stats]), device), _t(np.stack([s.std for s in stats]) ** 2, device),
                     _t([len(s.rows) for s in stats], device))
    c = len(conditions)
    control = Moments(_t(truth.control.mean, device).expand(c, -1), (_t(truth.control.std, device) ** 2).expand(c, -1),
                      _t([len(truth.control_rows)] * c, device))
    rank, n = de_ranks(target, control)
    return {cond: (rank[i], n[i]) for i, cond in enumerate(conditions)}


def score_discrimination(scorer: Scorer, truth, pool: list[str], device) -> np.ndarray:
    """cell-eval's discrimination_score_l1 of a scorer's conditions among every scored condition."""
    position = {c: i for i, c in enumerate(pool)}
    true_delta = _t(np.stack([truth.stats(c).mean for c in pool]) - truth.control_mean, device)
    pred_delta = _t(scorer.profiles - scorer.reference_mean, device)
    targets = [[truth.gene_index[g] for g in parse_condition(c) if g in truth.gene_index] for c in scorer.conditions]
    index, valid = _padded(targets, max(map(len, targets), default=0), device)
    rows = torch.tensor([position[c] for c in scorer.conditions], device=device)
    return discrimination_score(pred_delta, true_delta, rows, index, valid.to(torch.float64)).cpu().numpy()


def subgroup_of(split, condition: str, on: str = "test") -> str:
    """GEARS subgroup of a condition of the scored set (`on`); the set name for the others."""
    set_name = split.set_of(condition)
    if set_name == on:
        return split.subgroup_of(condition) or on
    return set_name or "unsplit"


@dataclass
class Evaluation:
    table: pd.DataFrame  # one row per (condition, model)
    profiles: dict[str, dict[str, np.ndarray]]  # baseline -> condition -> mean profile
    models: list[Predictions]
    matched_cell_types: list[str] = field(default_factory=list)  # the baselines' cell types (empty: pooled)
    borrowed: dict[str, list[str]] = field(default_factory=dict)  # baseline -> cell types given the pooled change


def _rows_of(gene_sets: GeneSets, rows: list[int]) -> GeneSets:
    return GeneSets(*(getattr(gene_sets, f.name)[rows] for f in fields(GeneSets)))


def _reconstructions(models: list[Predictions]) -> dict[str, dict[str, np.ndarray]]:
    shipped = [m for m in models if m.reconstruction]
    if len(shipped) == 1:
        return {RECONSTRUCTION: shipped[0].reconstruction}
    return {f"{RECONSTRUCTION}_{m.name}": m.reconstruction for m in shipped}


def _scorers(models: list[Predictions], profiles: dict, conditions: list[str], control_mean,
             type_changes: dict) -> list[Scorer]:
    out = []
    for m in models:
        reference = control_mean if m.predicted_controls is None else m.predicted_controls.mean(0, dtype=np.float64)
        out.append(Scorer(m.name, m.conditions, m.means, reference, m))
    for name, by_condition in profiles.items():
        covered = [c for c in conditions if c in by_condition]
        if covered:
            out.append(Scorer(name, covered, np.stack([by_condition[c] for c in covered]), control_mean,
                              type_changes=type_changes.get(name)))
    return out


def _baselines(names: list[str], truth, train, conditions: list[str], cell_types: np.ndarray | None) -> tuple:
    """(profiles, changes per cell type, Systema's reference per condition, cell types that took
    the pooled change): pooled (GEARS) without `cell_types`, else matched to each condition's
    cell-type mix (cell_type_baselines.py)."""
    pooled = perturbed_reference(train)
    if cell_types is None:
        return baseline_profiles(names, train, conditions), {}, {c: pooled for c in conditions}, {}
    matched = matched_baselines(names, truth, train, conditions, cell_types)
    return (matched.profiles, matched.changes, {c: matched.references.get(c, pooled) for c in conditions},
            matched.borrowed)


def evaluate_loaded(truth, split, models: list[Predictions], *, baselines: list[str], seed: int = 0,
                    device="cpu", max_true_cells: int = MAX_TRUE_CELLS, on: str = "test",
                    match_cell_types: bool = True) -> Evaluation:
    """The engine without file I/O, for notebooks (a test checks it scores as the command does).
    `match_cell_types`: on a screen of several cell types, fit the baselines per cell type and mix
    them as each condition's cells are mixed (False: pooled, as GEARS)."""
    device = torch.device(device)
    conditions = sorted({c for m in models for c in m.conditions})
    train = training_data(truth, split.train)
    truth.prepare(conditions)
    cell_types = screen_cell_types(truth) if match_cell_types else None
    profiles, type_changes, references, borrowed = _baselines(baselines, truth, train, conditions, cell_types)
    profiles = {**profiles, **_reconstructions(models)}
    gene_sets = de_gene_sets(truth, conditions, device)
    position = {c: i for i, c in enumerate(conditions)}
    scorers = _scorers(models, profiles, conditions, truth.control_mean, type_changes)
    with torch.inference_mode():
        precision = {}
        for s in scorers:
            subset = _rows_of(gene_sets, [position[c] for c in s.conditions])
            rows = [references[c] for c in s.conditions]
            reference = None if any(r is None for r in rows) else np.stack(rows)
            precision[s.name] = score_precision(s.profiles, truth, s.conditions, subset, device, reference)
            precision[s.name]["discrimination_score_l1"] = score_discrimination(s, truth, conditions, device)
        score_cells(scorers, truth, seed=seed, device=device, max_true_cells=max_true_cells, cell_types=cell_types)
        true_ranks = true_de_ranks(truth, sorted({c for s in scorers for c in s.moments}), device)
        de = {s.name: score_de(s, true_ranks) for s in scorers}

    with_prompts = any(m.prompt_source for m in models)
    rows = []
    for s in scorers:
        for j, condition in enumerate(s.conditions):
            row = {"condition": condition, "model": s.name, "set": split.set_of(condition) or "unsplit",
                   "subgroup": subgroup_of(split, condition, on)}
            if with_prompts:
                row[keys.OBS_PROMPT_SOURCE] = s.model.prompt_source.get(condition, "") if s.model else ""
            # cells scored by the distribution metrics; 0 when only mean profiles exist
            row["n_cells"] = s.moments[condition][0][2] if condition in s.moments else 0
            row.update({m: float(precision[s.name][m][j]) for m in PRECISION_METRICS + POOLED_METRICS})
            cells = s.cells.get(condition, {})
            row.update({m: cells.get(m, float("nan")) for m in DISTRIBUTION_METRICS})
            row.update({m: de[s.name].get(condition, {}).get(m, float("nan")) for m in DE_METRICS})
            rows.append(row)
    matched = [] if cell_types is None else sorted(set(cell_types[truth.control_rows]))
    return Evaluation(pd.DataFrame(rows), profiles, models, matched, borrowed)


MAX_THREADS = 1024  # above the cores is allowed: a fixed --threads reruns bit-identically on a smaller allocation


def check_options(*, seed, max_true_cells, threads, model_name) -> None:
    """Options checked before anything is read (the command line and the Python API alike)."""
    from regina_cli.checks import check_seed, is_whole

    check_seed(seed)
    if not is_whole(max_true_cells) or max_true_cells < 2:
        raise ReginaError(f"--true-cells must be a whole number of at least 2, not {max_true_cells!r}")
    if not is_whole(threads) or threads < 0:
        raise ReginaError(f"--threads must be a whole number of at least 0 (0: the idle cores), not {threads!r}")
    if threads > MAX_THREADS:  # thread pools that large fail to allocate (a MemoryError traceback)
        raise ReginaError(f"--threads {threads} is more than {MAX_THREADS}; this process may use "
                          f"{available_cpus()} CPU cores (0: the idle ones)")
    if any(not str(n).strip() for n in model_name_list(model_name) or []):
        raise ReginaError("--model-name must not be empty")


def _resolve_split(name: str, split: str | None, provenance: dict, data_dir) -> str:
    """--split, else the split `regina predict` recorded, else the dataset's only split."""
    if split:
        return split
    if isinstance(provenance.get("split"), str):
        return provenance["split"]
    folder = keys.dataset_dir(name, data_dir) / keys.SPLITS_DIR
    found = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise ReginaError(
        f"pass --split <mode>_<seed> (found {', '.join(found) if found else 'no splits'} in {folder}); "
        "`regina split NAME` writes one"
    )


def model_name_list(model_name: str | list[str] | tuple | None) -> list[str] | None:
    """--model-name as a list (one name may come as a plain string from Python); None when not given."""
    if model_name is None or isinstance(model_name, str):
        return None if model_name is None else [model_name]
    if not (isinstance(model_name, (list, tuple)) and all(isinstance(n, str) for n in model_name)):
        raise ReginaError(f"model_name takes a name or a list of names (text), not {model_name!r}")
    return list(model_name)


def model_names(raws, given: list[str] | None) -> list[str]:
    """--model-name values in file order; else `regina` for a file `regina predict` wrote, else the
    stem. A name given to several files makes them parts of one model (`readers.merge_parts`)."""
    from regina_cli.evaluate.baselines import BASELINES

    given = list(given or [])
    if given and len(given) != len(raws):
        raise ReginaError(f"give one --model-name per --predictions file ({len(raws)} files, {len(given)} names)")
    names = given or [("regina" if raw.provenance else raw.path.stem) for raw in raws]
    if not given and len(set(names)) != len(names):
        raise ReginaError(f"model names must differ ({', '.join(names)}); pass --model-name once per file "
                          "(the same name for the parts of one prediction, such as a job array's)")
    clash = [n for n in names if n in BASELINES or n.startswith(RECONSTRUCTION)]
    if clash:
        raise ReginaError(f"model name {clash[0]!r} is a baseline's name; pass another --model-name")
    return names


def models_of(raws, names: list[str]) -> tuple[list, list[str]]:
    """The files grouped into models by name, in first-appearance order (parts merged)."""
    from regina_cli.evaluate.readers import merge_parts

    order = list(dict.fromkeys(names))
    grouped = [[raw for raw, n in zip(raws, names) if n == name] for name in order]
    return [group[0] if len(group) == 1 else merge_parts(name, group) for name, group in zip(order, grouped)], order


def _in_dataset_spelling(truth, conditions: list[str]) -> set[str]:
    return {truth.resolve(c) or c for c in conditions}


def check_targets_predicted(models: list[Predictions], truth, targets: list[str], what: str) -> None:
    """A file that predicts none of the conditions scored would give a report without a score."""
    wanted = _in_dataset_spelling(truth, targets)
    for model in models:
        if not wanted & set(model.conditions):
            raise ReginaError(f"{model.path} predicts none of the {len(wanted)} {what}; predict them (`regina "
                              "predict --conditions test|val`) or choose the set with --on / --split")


def _model_context(model: Predictions, truth, targets: list[str]) -> dict:
    from regina_cli.data.provenance import recorded_staleness

    missing = sorted(_in_dataset_spelling(truth, targets) - set(model.conditions))
    genes = set(truth.dataset_genes)
    underscored = [c for c in model.skipped if "_" in c and all(g in genes for g in c.split("_"))]
    single = [c for c, x in zip(model.conditions, model.cells) if len(x) < MIN_PREDICTED_CELLS] \
        if model.form == CELLS else []
    provenance = {k: v.item() if isinstance(v, np.generic) else v for k, v in model.provenance.items()
                  if isinstance(v, (str, int, float, bool, np.generic))}
    return {
        "name": model.name, "path": model.path, "form": model.form, "n_conditions": len(model.conditions),
        "n_skipped_not_in_dataset": len(model.skipped), "skipped_not_in_dataset": model.skipped,
        "n_skipped_written_a_b": len(underscored), "n_single_cell_conditions": len(single),
        "scale_warning": model.scale_warning,
        "n_target_conditions_not_predicted": len(missing), "target_conditions_not_predicted": missing,
        "n_control_rows": model.n_control_rows, "has_prompt_source": bool(model.prompt_source),
        "cells_per_condition": int(np.median([len(c) for c in model.cells])) if model.form == CELLS else None,
        "provenance": provenance, "stale": recorded_staleness(model.provenance),
    }


def evaluate(
    name: str,
    predictions: str | Path | list,
    *,
    split: str | None = None,
    out: str | Path | None = None,
    baselines: str = "all",
    plots: bool = True,
    condition_key: str = keys.OBS_CONDITION,
    separator: str = keys.GENE_SEPARATOR,
    model_name: list[str] | str | None = None,
    on: str = "test",
    data_dir: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    max_true_cells: int = MAX_TRUE_CELLS,
    threads: int = 0,
    allow_stale: bool = False,
    baseline_cell_types: str = "matched",
    warn: Callable[[str], None] = lambda message: None,
) -> dict:
    """Score prediction files against dataset `name` on a split; write metrics, table, report, plots.

    `threads`: CPU threads (0: the idle cores, see threads.py). `allow_stale`: score predictions
    whose run's dataset or split changed since (refused otherwise: `provenance.check_predictions`).
    `baseline_cell_types`: `matched` fits the baselines per cell type on a screen of several
    (cell_type_baselines.py), `pooled` as GEARS does. `warn` hears each warning when it is found (the command line prints it in yellow, the Python
    API raises a UserWarning), so one given before an error is not lost. Returns the summary
    written to metrics.json plus `out` (the folder written).
    """
    from regina_cli.checks import check_data_dir, check_out_folder
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.provenance import check_predictions
    from regina_cli.data.split import load_split
    from regina_cli.evaluate import report
    from regina_cli.evaluate.pages import small_pages
    from regina_cli.evaluate.predictions import align, shared_genes
    from regina_cli.evaluate.readers import name_columns, read_predictions, with_dataset_ids
    from regina_cli.evaluate.threads import cpu_threads
    from regina_cli.evaluate.truth import Truth

    check_options(seed=seed, max_true_cells=max_true_cells, threads=threads, model_name=model_name)
    paths = [Path(p) for p in (predictions if isinstance(predictions, (list, tuple)) else [predictions])]
    out = Path(out) if out is not None else paths[0].parent / keys.EVAL_DIR
    check_out_folder(out, keys.METRICS_FILE, keys.EVAL_OUTPUTS)
    check_data_dir(data_dir, writes=False)
    heard = []  # every warning, also kept in metrics.json for whoever reads the files later

    def note(message: str) -> None:
        heard.append(message)
        warn(message)

    for path in paths:
        for warning in check_predictions(name, path, split, data_dir, allow_stale=allow_stale):
            note(warning)
    with cpu_threads(threads) as n_threads, small_pages():
        if on not in TARGET_SETS:
            raise ReginaError(f"--on must be one of {', '.join(TARGET_SETS)}, not {on!r}")
        if not separator:
            raise ReginaError("--separator must not be empty")
        if baseline_cell_types not in BASELINE_CELL_TYPES:
            raise ReginaError(f"--baseline-cell-types must be one of {', '.join(BASELINE_CELL_TYPES)}, "
                              f"not {baseline_cell_types!r}")
        baseline_names = parse_baselines(baselines)
        torch_device = resolve_device(device)
        # The dataset (checksum + read) and the prediction files are read side by side: both mostly
        # wait on hashing and HDF5 reads, which release the GIL.
        with ThreadPoolExecutor(max_workers=2) as pool:
            reads = [pool.submit(read_predictions, p, condition_key=condition_key, separator=separator)
                     for p in paths]
            adata = read_dataset(name, data_dir)
            dataset_genes = [str(g) for g in adata.var_names]
            raws = [with_dataset_ids(name_columns(r.result(), dataset_genes), adata) for r in reads]
        raws, names = models_of(raws, model_names(raws, model_name_list(model_name)))
        truth = Truth(adata, shared_genes(raws, dataset_genes))
        models = [align(raw, truth, n) for raw, n in zip(raws, names)]
        split_name = _resolve_split(name, split, models[0].provenance, data_dir)
        split_obj = load_split(name, split_name, data_dir, allow_stale=allow_stale)
        check_targets_predicted(models, truth, getattr(split_obj, on), f"{on} conditions of split {split_name}")
        result = evaluate_loaded(truth, split_obj, models, baselines=baseline_names, seed=seed,
                                 device=torch_device, max_true_cells=max_true_cells, on=on,
                                 match_cell_types=baseline_cell_types == "matched")
        context = {
            "dataset": name,
            "split": split_name,
            "on": on,
            "models": [_model_context(m, truth, getattr(split_obj, on)) for m in models],
            "condition_key": condition_key,
            "separator": separator,
            "n_genes_scored": len(truth.genes),
            "n_genes_dataset": len(dataset_genes),
            "seed": seed,
            "device": str(torch_device),
            "threads": n_threads,
            "max_true_cells": max_true_cells,
            "baselines": [b for b in result.profiles],
            "baseline_cell_types": baseline_cell_types,
            "baselines_matched_to_cell_types": result.matched_cell_types,
        }
        scored = [b for b in baseline_names if result.profiles.get(b)]
        mix_warnings = borrowed_warnings(result.borrowed) if result.matched_cell_types else \
            cell_type_mix_warning(truth, name, scored)
        for warning in [*model_warnings(context), *mix_warnings]:
            note(warning)
        context["warnings"] = heard
        with atomic_dir(out) as staging:  # every file appears at once, replacing the previous folder whole
            summary = report.write_report(result, context, staging, truth=truth, plots=plots)
        return {**summary, "out": str(out)}


def cell_type_mix_warning(truth, name: str, baselines: list[str]) -> list[str]:
    """A screen of several cell types: pearson_delta is the change from the mean of all controls
    (GEARS), so `regina predict`, which draws each condition's controls in that condition's own
    cell-type mix, is credited with the mix, and the pooled baselines are not."""
    types = screen_cell_types(truth)
    if types is None:
        return []
    n_types = len(set(types[truth.control_rows]))
    pooled = ", ".join(b for b in baselines if b != "no_change") or "the pooled baselines"
    return [f"{name} holds {n_types} cell types, and pearson_delta is the change from the mean of all its controls: "
            "predictions drawn in each condition's own cell-type mix (as `regina predict` draws them) are credited "
            f"with that mix, which no_change and {pooled}, pooled, do not have; `reconstruction` has the same mix "
            "and no perturbation, so judge REGINA against it (or leave out --baseline-cell-types pooled)"]


def borrowed_warnings(borrowed: dict[str, list[str]]) -> list[str]:
    """Matched baselines that took the pooled change in a cell type with too few training cells."""
    by_types: dict[tuple, list[str]] = {}
    for baseline, types in borrowed.items():
        by_types.setdefault(tuple(types), []).append(baseline)
    return [f"too few training cells of cell type(s) {', '.join(types)} for {', '.join(names)} of their own: there "
            "they predict the pooled change (from each type's own control mean)" for types, names in by_types.items()]


def model_warnings(context: dict) -> list[str]:
    """What is worth a warning about each model's predictions: conditions the dataset lacks,
    values on another scale, conditions of the scored set left unpredicted (from the evaluation's
    context, so that metrics.json can keep them)."""
    found = []
    for model in context["models"]:
        if model["n_skipped_not_in_dataset"]:
            shown = ", ".join(model["skipped_not_in_dataset"][:5])
            hint = ""
            if model["n_skipped_written_a_b"] and context["separator"] != "_":
                hint = (f"; {model['n_skipped_written_a_b']} of them are dataset genes joined by _ (GEARS writes "
                        "combinations A_B): pass --separator _")
            found.append(f"{model['name']}: skipped {model['n_skipped_not_in_dataset']} predicted condition(s) not "
                         f"in {context['dataset']}: {shown}{hint}")
        if model["n_single_cell_conditions"]:
            found.append(f"{model['name']}: {model['n_single_cell_conditions']} condition(s) have one predicted "
                         "cell, too few for the distribution and DE metrics, which are left out for them (a file of "
                         "mean profiles must hold one row per condition)")
        if model["scale_warning"]:
            found.append(f"{model['name']}: {model['scale_warning']}: predictions are scored against the dataset's "
                         "log1p of counts normalised per cell (normalize_total 1e4), so convert them first")
        if model["n_target_conditions_not_predicted"]:
            found.append(f"{model['name']}: {model['n_target_conditions_not_predicted']} {context['on']} "
                         "condition(s) have no prediction")
    return found
