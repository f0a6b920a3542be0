"""`regina predict`: cells for any perturbation, seen or unseen, from a trained run.

For each condition: draw control cells of the cell types the condition was measured in, encode
them, build the perturbation prompt, apply the forward transition, decode. All conditions go
through the networks together in large batches on the device, so a whole test set (Norman:
~100 conditions x 100 cells) is a handful of forward passes.

Cells per condition (`n_cells`) are shared between the condition's cell types in proportion to
its real cells, so predicted and real populations have the same mix; a condition with no real
cells (a new combination, say) is spread evenly over every cell type that has controls.

Each condition's prompt source is recorded (`prompt_sources`): `learned` (every target has a
learned prompt vector, which by default, `gan.learned_prompts=unmeasured`, only training targets the
screen does not measure have), `measured` (the targets without one are measured genes, seen or
unseen, prompted through the encoder) or `knowledge` (a target known only through prior
knowledge). The file is written by `engine.prediction_file`.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from regina_cli import keys
from regina_cli.data.conditions import canonical_condition, control_labels, is_control, parse_condition
from regina_cli.engine import prediction_file
from regina_cli.engine.prediction_file import FileOptions
from regina_cli.errors import ReginaError

BATCH_CELLS = 4096
CONDITION_SETS = ("test", "val", "all")
MEMORY_SHARE = 0.5  # predictions may take this share of the free memory (host and device)


@dataclass
class PredictionResult:
    path: Path
    n_conditions: int
    n_cells: int
    n_new_conditions: int  # conditions without real cells in the dataset
    skipped: list[str]  # conditions of `test`/`val`/`all` whose targets the model cannot know
    sources: dict[str, str]  # condition -> prompt source (learned, measured, knowledge)
    device: str
    seconds: float
    warnings: list[str] = field(default_factory=list)  # a stale run used with allow_stale
    clipped: bool = False  # negative values set to 0 (asked for, or the run's choice at train-gan)
    replaced: bool = False  # a file was at `path` before (scores made from it no longer match)

    @property
    def skipped_warning(self) -> str | None:
        """What to tell the user about `skipped` (None: nothing was)."""
        if not self.skipped:
            return None
        return (f"skipped {len(self.skipped)} condition(s) whose targets are neither measured nor perturbed in "
                f"training nor in the run's gene knowledge: {', '.join(self.skipped)}")

    @property
    def all_warnings(self) -> list[str]:
        """Everything to warn about (a stale run, skipped conditions), for the command and the API alike."""
        return [*self.warnings, *filter(None, [self.skipped_warning])]


def predict(run_dir: str | Path, conditions: str | Sequence[str], *, n_cells: int = 100, seed: int = 0,
            out: str | Path | None = None, device: str = "auto", data_dir: str | Path | None = None,
            options: FileOptions | None = None, allow_stale: bool = False,
            cell_types: str | Sequence[str] | None = None) -> Path:
    """Write predictions for `conditions` ("test", "val", "all", "A+ctrl,A+B" or a list); returns the file."""
    return run_prediction(run_dir, conditions, n_cells=n_cells, seed=seed, out=out, device=device,
                          data_dir=data_dir, options=options, allow_stale=allow_stale, cell_types=cell_types).path


def run_prediction(run_dir: str | Path, conditions: str | Sequence[str], *, n_cells: int = 100, seed: int = 0,
                   out: str | Path | None = None, device: str = "auto", data_dir: str | Path | None = None,
                   options: FileOptions | None = None, allow_stale: bool = False,
                   cell_types: str | Sequence[str] | None = None) -> PredictionResult:
    """`predict` plus what the CLI reports (counts, device, time). A run whose dataset, split,
    labels, config or phase-1 weights changed after training is refused (`allow_stale`: warned).
    `cell_types` ("K562,RPE1" or a list): predict only in these cell types (default: each
    condition's measured mix, see `sample_plan`)."""
    from regina_cli.checks import check_data_dir
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.split import load_split
    from regina_cli.engine.run_meta import check_run_current, run_data_dir
    from regina_cli.engine.trained import load_trained
    from regina_cli.io import write_h5ad

    started = time.perf_counter()
    options = options or FileOptions()
    conditions = condition_list(conditions)
    chosen_types = cell_type_list(cell_types)
    check_request(n_cells, seed, out, options)
    run_dir = Path(run_dir)
    data_dir = run_data_dir(run_dir, data_dir)
    check_data_dir(data_dir, writes=False)
    warnings = check_run_current(run_dir, data_dir, allow_stale=allow_stale)
    trained = load_trained(run_dir, device=device)
    if trained.gan is None:
        raise ReginaError(f"{run_dir} has no trained phase 2; run `regina train-gan --run {run_dir}` first")
    meta = trained.meta
    if options.clip is None:
        options = replace(options, clip=options.sparsify or bool((meta.training or {}).get("clip_predictions", False)))
    genes, prompt_genes = list(meta.gene_names), trained.gan.prompt_genes
    adata = read_dataset(meta.dataset, data_dir, backed=True)  # before its split: a missing dataset is the fix to name
    try:
        split = load_split(meta.dataset, meta.split, data_dir, allow_stale=allow_stale)
        if [str(g) for g in adata.var_names] != genes:
            raise ReginaError(f"dataset {meta.dataset!r} no longer has the genes {run_dir} was trained "
                              "on; re-fetch the same dataset")
        requested = resolve_conditions(conditions, split, adata.obs[keys.OBS_CONDITION].astype(str).unique())
        skipped = []
        if isinstance(conditions, str) and conditions in CONDITION_SETS:
            # A whole set may hold genes the model knows nothing about: skip those, say which.
            skipped = [c for c in requested if unknown_targets(c, genes, prompt_genes)]
            requested = [c for c in requested if c not in skipped]
            if not requested:
                raise ReginaError(f"none of the {len(skipped)} {conditions!r} conditions can be predicted: "
                                  "their targets are neither measured nor perturbed in training nor in the "
                                  "run's gene knowledge")
        check_targets(requested, genes, prompt_genes)
        check_memory(len(requested) * n_cells, len(genes), trained.device)
        plan = sample_plan(adata.obs, requested, split.train, n_cells, seed, cell_types=chosen_types)
        x_pred, reconstruction = _run_networks(trained, adata, plan, requested, genes)
        controls = read_controls(adata, plan, every_training_control=trained.config.gan.match_control_mean)
    finally:
        adata.file.close()
    path = Path(out) if out is not None else run_dir / keys.PREDICTIONS_FILE
    sources = prompt_sources(requested, genes, trained.gan.gene_prompts.learned_genes)
    predictions = prediction_file.build(
        x_pred, plan, requested, genes, sources=sources, reconstruction=reconstruction, controls=controls,
        options=options, provenance={
            "run": str(run_dir), "dataset": meta.dataset, "split": meta.split, "seed": seed,
            "cells_per_condition": n_cells, "cell_types": ",".join(chosen_types) if chosen_types else "as measured",
            "prompt_value": trained.config.gan.prompt_value,
            "decoding": "residual: X_ctrl + D(T(z)) - D(z)" if trained.config.gan.residual_decoding
            else "D(T(z_ctrl, prompt))", "skipped_conditions": list(skipped), "stale": warnings,
            **{k: v for k, v in meta.hashes().items() if v}})
    replaced = path.exists()
    write_h5ad(predictions, path)
    return PredictionResult(path=path, n_conditions=len(requested), n_cells=int(len(plan)),
                            n_new_conditions=plan.n_new, skipped=skipped, sources=sources,
                            device=str(trained.device), seconds=time.perf_counter() - started, warnings=warnings,
                            clipped=options.clip, replaced=replaced)


def check_memory(n_rows: int, n_genes: int, device) -> None:
    """Refuse, with the memory it would need, a prediction that cannot fit (dense float32 rows
    on the host, plus the working copy on the device)."""
    from regina_cli.data.memory import free_memory_bytes

    need = 2 * n_rows * n_genes * 4
    free = min(free_memory_bytes(torch.device("cpu")), free_memory_bytes(device))
    if need > MEMORY_SHARE * free:
        raise ReginaError(f"{n_rows:,} predicted cells x {n_genes:,} genes need about {need / 2**30:.1f} GiB, more "
                          f"than half of the {free / 2**30:.1f} GiB free; lower --cells or predict fewer "
                          "conditions per call (--conditions-file)")


def condition_list(conditions) -> str | list[str]:
    """`conditions` as a string, or a list (from Python any list-like of strings: an Index, say)."""
    if isinstance(conditions, str):
        return conditions
    if isinstance(conditions, Iterable) and not isinstance(conditions, (bytes, dict)):
        listed = list(conditions)
        if all(isinstance(c, str) for c in listed):
            return listed
    raise ReginaError(f"--conditions takes test, val, all or conditions such as A+ctrl,A+B (a string, or a list "
                      f"of strings), not {conditions!r}")


def check_request(n_cells: int, seed: int, out, options: FileOptions) -> None:
    """The options of a prediction, checked before anything is read (the command line and the
    Python API alike)."""
    from regina_cli.checks import check_out_file, check_seed, is_whole

    if not is_whole(n_cells) or n_cells < 1:
        raise ReginaError(f"--cells must be at least 1 (a whole number), not {n_cells!r}")
    check_seed(seed)
    check_out_file(None if out is None else Path(out))
    if options.clip not in (None, True, False):
        raise ReginaError(f"clip takes True, False or None (the run's choice), not {options.clip!r}")
    if options.sparsify and options.clip is False:
        raise ReginaError("--sparsify sets negative values to 0 (a sparse matrix stores zeros), so it cannot keep "
                          "them: drop --no-clip or --sparsify")


# --- Which conditions ---------------------------------------------------------------------------
def resolve_conditions(conditions: str | Sequence[str], split, data_conditions: Sequence[str]) -> list[str]:
    """`test` / `all` from the run's split, else the given labels, normalised and de-duplicated.

    A label the dataset uses is kept as spelled (so predictions match the real cells), in any
    order of its targets; any other is written in GEARS's spelling ("A" -> "A+ctrl") with its
    targets sorted, so "B+A" and "A+B" are one condition with one label and one draw of control
    cells, in one request or in two jobs. Spaces around the targets are dropped.
    """
    if isinstance(conditions, str):
        if conditions.strip().lower() == "train":  # else read as gene `train`, "not among the measured genes"
            raise ReginaError("--conditions takes the sets test, val and all (train, val and test together), or "
                              "conditions such as A+ctrl,A+B; not train")
        if conditions in CONDITION_SETS:
            chosen = {"test": split.test, "val": split.val}.get(conditions, [*split.train, *split.val, *split.test])
            chosen = [c for c in chosen if not is_control(c)]
            if not chosen:
                raise ReginaError(f"the run's split has no perturbed {conditions!r} conditions; "
                                  "name them with --conditions A+ctrl,A+B")
            return list(dict.fromkeys(chosen))
        conditions = [c for c in conditions.split(",")]
    by_genes = {frozenset(parse_condition(c)): c for c in data_conditions}
    out = []
    for raw in conditions:
        label = raw.strip()
        if not label:
            continue
        control = label.lower() in control_labels()  # `ctrl`, and `control`, `NTC`, ... as fetch reads them
        if control or is_control(label):
            what = "is the control condition" if control else "names no target gene"
            raise ReginaError(f"{label!r} {what}, not a perturbation; name perturbations like A+ctrl or A+B")
        genes = [g.strip() for g in parse_condition(label)]  # the dataset's spelling when it measured these targets,
        if len(set(genes)) < len(genes):
            twice = next(g for g in genes if genes.count(g) > 1)
            raise ReginaError(f"{label!r} names {twice} twice; a gene is perturbed once ({twice}+ctrl)")
        out.append(by_genes.get(frozenset(genes)) or canonical_condition(sorted(genes)))  # else sorted
    if not out:
        raise ReginaError("no conditions given; use --conditions test, all, or A+ctrl,A+B")
    return list(dict.fromkeys(out))


def read_conditions_file(path: str | Path) -> list[str]:
    """One condition per line (UTF-8, a byte-order mark allowed); blank lines and `#` comments are
    skipped."""
    from regina_cli.checks import check_input_file

    path = Path(path)
    check_input_file(path, "conditions file", stream=True)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ReginaError(f"conditions file {path} is not a text file (one condition per line)") from None
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [line for line in lines if line]


def unknown_targets(condition: str, genes: Sequence[str], prompt_genes: Sequence[str]) -> list[str]:
    """Targets that are neither measured nor in the run's gene-prompt table."""
    known = set(genes) | set(prompt_genes)
    return [g for g in parse_condition(condition) if g not in known]


def check_targets(conditions: Sequence[str], genes: Sequence[str], prompt_genes: Sequence[str]) -> None:
    """Every target must be a measured gene or have a gene prompt."""
    for condition in conditions:
        for gene in unknown_targets(condition, genes, prompt_genes):
            parts = [p for p in re.split(r"[_\s;/|]+", gene) if p]
            if len(parts) > 1 and all(p in {*genes, *prompt_genes} for p in parts):  # `A_B`: another tool's separator
                hint = f"write a combination as {'+'.join(parts)}"
            else:
                close = close_names(gene, [*genes, *prompt_genes])
                hint = f"close names: {', '.join(close)}" if close else "check the spelling"
            raise ReginaError(
                f"gene {gene!r} (condition {condition!r}) is not among the {len(genes)} measured genes "
                f"and the run has no prompt for it (not perturbed in training, not in its gene knowledge); {hint}"
            )


def close_names(gene: str, names: Sequence[str], n: int = 5) -> list[str]:
    """Known names closest to `gene`, ignoring case (symbols are often typed in lower case)."""
    by_upper = {name.upper(): name for name in names}
    return [by_upper[m] for m in difflib.get_close_matches(gene.upper(), list(by_upper), n=n, cutoff=0.6)]


# --- Which control cells ------------------------------------------------------------------------
@dataclass
class SamplePlan:
    """One row of `cells` per predicted cell: `condition_index`, `cell_type` and `control_row`
    (the dataset row of the control it starts from, named `control_names`); `n_new` counts the
    conditions without real cells in the dataset."""

    cells: pd.DataFrame
    control_names: np.ndarray
    n_new: int
    control_pools: dict[str, np.ndarray]  # cell type -> dataset rows of its training controls

    def __len__(self) -> int:
        return len(self.cells)


def cell_type_list(cell_types: str | Sequence[str] | None) -> list[str] | None:
    """--cell-types as a list (a comma-separated string, or a list from Python); None: not given."""
    if cell_types is None:
        return None
    if isinstance(cell_types, str):
        cell_types = cell_types.split(",")
    if not (isinstance(cell_types, (list, tuple)) and all(isinstance(t, str) for t in cell_types)):
        raise ReginaError(f"cell_types takes a comma-separated string or a list of names, not {cell_types!r}")
    chosen = list(dict.fromkeys(t.strip() for t in cell_types if t.strip()))
    if not chosen:
        raise ReginaError("--cell-types is empty: name at least one cell type, or leave it out")
    return chosen


def sample_plan(obs: pd.DataFrame, conditions: Sequence[str], train_conditions: Sequence[str],
                n_cells: int, seed: int, cell_types: list[str] | None = None) -> SamplePlan:
    """Which control cell each predicted cell starts from, per condition and cell type: in the
    condition's measured cell-type mix, or for a condition never measured in the training
    controls' proportions; with `cell_types`, only in those (a condition measured in none of them
    in their controls' proportions: a perturbation moved to another cell type).

    Controls come from the training controls of the same cell type, drawn with replacement
    only when a cell type has fewer controls than cells requested. Each condition draws from its
    own stream (the seed and its name), so its cells do not depend on what else is asked: a
    request split over jobs predicts what the whole request does.
    """
    condition = obs[keys.OBS_CONDITION].astype(str).to_numpy()
    cell_type = (obs[keys.OBS_CELL_TYPE].astype(str).to_numpy() if keys.OBS_CELL_TYPE in obs
                 else np.full(len(obs), "all"))
    train = set(train_conditions)
    control_conds = [c for c in pd.unique(condition) if is_control(c) and c in train]
    control_rows = np.flatnonzero(np.isin(condition, control_conds))
    if len(control_rows) == 0:
        raise ReginaError("the dataset has no training control cells to start predictions from")
    pools = {t: control_rows[cell_type[control_rows] == t] for t in pd.unique(cell_type[control_rows])}
    if cell_types is not None:
        unknown = [t for t in cell_types if t not in pools]
        if unknown:
            raise ReginaError(f"--cell-types: {', '.join(map(repr, unknown))} has no training control cells to "
                              f"start from; cell types with them: {', '.join(map(str, sorted(pools)))}")
        pools = {t: pools[t] for t in cell_types}
    counts = pd.crosstab(condition, cell_type)
    parts, n_new = [], 0
    for c_idx, cond in enumerate(conditions):
        measured = cond in counts.index
        n_new += not measured
        # Cell types the condition was measured in (and that have controls to start from).
        weights = counts.loc[cond, counts.columns.isin(list(pools))] if measured else pd.Series(dtype=float)
        if weights.sum() == 0:  # never measured: in the training controls' proportions
            weights = pd.Series({t: len(pools[t]) for t in sorted(pools)})
        rng = np.random.default_rng([seed, _name_key(cond)])
        for ct, k in _allocate(weights, n_cells).items():
            picks = rng.choice(pools[ct], size=k, replace=k > len(pools[ct]))
            parts.append(pd.DataFrame({"condition_index": c_idx, "cell_type": ct, "control_row": picks}))
    cells = pd.concat(parts, ignore_index=True)
    return SamplePlan(cells, np.asarray(obs.index)[cells["control_row"].to_numpy()].astype(str), n_new, pools)


def _name_key(condition: str) -> int:
    """A condition's name as a stable 64-bit number (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.sha256(condition.encode()).digest()[:8], "little")


def _allocate(weights: pd.Series, total: int) -> dict[str, int]:
    """Split `total` cells over cell types in proportion to `weights` (largest remainder)."""
    weights = weights[weights > 0].astype(float)
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(int)
    remainder = total - counts.sum()
    order = np.argsort(-(share - counts).to_numpy(), kind="stable")[:remainder]
    counts.iloc[order] += 1
    return counts.to_dict()


def prompt_sources(conditions: Sequence[str], genes: Sequence[str], learned_genes: Sequence[str]) -> dict[str, str]:
    """condition -> `learned` (every target has a learned prompt vector: `gan.learned_prompts`),
    `measured` (the targets without one are measured genes, prompted through the encoder) or
    `knowledge` (a target known only through prior knowledge)."""
    measured, learned = set(genes), set(learned_genes)
    out = {}
    for condition in conditions:
        targets = set(parse_condition(condition))
        out[condition] = ("learned" if targets <= learned else "measured" if targets - learned <= measured
                          else "knowledge")
    return out


def matched_control_shifts(adata, plan: SamplePlan, controls: torch.Tensor, control_pos: torch.Tensor,
                           device) -> torch.Tensor:
    """[N, G]: per predicted cell, what moves its condition's control draw (per cell type) onto
    the mean of all the training controls of that cell type (`gan.match_control_mean`)."""
    from regina_cli.data.rows import RowReader
    from regina_cli.engine.gan_validation import mean_matching_offsets

    types = sorted(plan.control_pools)
    reader = RowReader(adata)
    try:
        type_means = torch.stack([torch.from_numpy(_mean_of_rows(reader, plan.control_pools[t])) for t in types])
    finally:
        reader.close()
    type_means = type_means.to(device)
    type_code = torch.as_tensor(np.array(pd.Categorical(plan.cells["cell_type"], categories=types).codes), device=device)
    cond = torch.as_tensor(plan.cells["condition_index"].to_numpy(), device=device)
    n_conditions = int(cond.max()) + 1
    keys = cond * len(types) + type_code
    positions = torch.arange(len(plan), device=device)
    chunks = ((p, controls[control_pos[p]]) for p in positions.split(BATCH_CELLS))
    offsets = mean_matching_offsets(chunks, keys, n_conditions * len(types), type_means.repeat(n_conditions, 1))
    return offsets[keys]


def _mean_of_rows(reader, rows: np.ndarray) -> np.ndarray:
    rows = np.sort(rows)
    total = sum(reader.read(chunk).astype(np.float64).sum(0) for chunk in np.array_split(rows, -(-len(rows) // 4096)))
    return total / len(rows)


def read_controls(adata, plan: SamplePlan, *, every_training_control: bool):
    """The control cells appended to the predictions: (rows of X, their obs). With
    `every_training_control` (`gan.match_control_mean`) every training control of the predicted
    cell types, whose mean each prediction was moved onto: the few hundred cells drawn miss that
    mean for rare genes, and `rank_genes_groups` against them called those genes changed in every
    condition. Else the distinct control cells the predictions started from."""
    from regina_cli.data.rows import RowReader

    if every_training_control:
        pools = [plan.control_pools[t] for t in pd.unique(plan.cells["cell_type"])]
        rows = np.unique(np.concatenate(pools))
    else:
        rows = np.unique(plan.cells["control_row"].to_numpy())
    reader = RowReader(adata)
    try:
        x = reader.read(rows)
    finally:
        reader.close()
    return x, adata.obs.iloc[rows]


# --- Networks --------------------------------------------------------------------------------------
@torch.no_grad()
def _run_networks(trained, adata, plan: SamplePlan, conditions, genes) -> tuple[np.ndarray, np.ndarray]:
    """(predicted cells [N, G], the mean decoded control of each condition [C, G]: the model's
    own reconstruction with no perturbation applied, the honest `reconstruction` baseline)."""
    from regina_cli.data.rows import RowReader
    from regina_cli.data.tensors import condition_targets
    from regina_cli.model.gan import decode_prediction, prior_anchor
    from regina_cli.model.prompt import condition_prompt

    ae, gan = trained.autoencoder.eval(), trained.gan.eval()
    device = next(ae.parameters()).device
    unique_rows, inverse = np.unique(plan.cells["control_row"].to_numpy(), return_inverse=True)
    reader = RowReader(adata)
    controls = torch.from_numpy(reader.read(unique_rows)).to(device)
    reader.close()
    target_idx, prompt_idx, n_targets, _ = condition_targets(conditions, genes, gan.prompt_genes)
    target_idx, prompt_idx, n_targets = (torch.as_tensor(a, device=device) for a in (target_idx, prompt_idx, n_targets))
    control_pos = torch.as_tensor(inverse, device=device)
    cond_of_row = torch.as_tensor(plan.cells["condition_index"].to_numpy(), device=device)
    cfg = trained.config.gan
    shifts = matched_control_shifts(adata, plan, controls, control_pos, device) if cfg.match_control_mean else None
    # each predicted cell's cell type as a row of the prior's cell_type_change (-1: a type training did not see)
    cell_type = torch.as_tensor(pd.Categorical(plan.cells["cell_type"], categories=trained.meta.prior_cell_types
                                               or []).codes.astype(np.int64), device=device)
    out = np.empty((len(plan), len(genes)), dtype=np.float32)
    reconstruction = torch.zeros((len(conditions), len(genes)), dtype=torch.float64, device=device)
    for start in range(0, len(plan), BATCH_CELLS):
        sl = slice(start, start + BATCH_CELLS)
        c = cond_of_row[sl]
        x_ctrl = controls[control_pos[sl]]
        z_ctrl = ae.encoder(x_ctrl)
        if shifts is not None:
            x_ctrl = x_ctrl + shifts[sl]
        prior = None if gan.expression_prior is None else gan.expression_prior(target_idx[c], prompt_idx[c],
                                                                               cell_type[sl])
        anchor_x, anchor_z = prior_anchor(ae.encoder, x_ctrl, z_ctrl, prior)
        prompt = condition_prompt(ae.encoder, gan, x_ctrl, target_idx[c], prompt_idx[c], n_targets[c], cfg,
                                  z_ctrl=z_ctrl, anchor_z=anchor_z)
        decoded = decode_prediction(ae.decoder, torch.cat([gan.predict_latent(z_ctrl, prompt, anchor_z), z_ctrl]),
                                    anchor_x=torch.cat([anchor_x, x_ctrl]), anchor_z=torch.cat([anchor_z, z_ctrl]),
                                    residual=cfg.residual_decoding).float()
        pred, rec = decoded.chunk(2)
        out[sl] = pred.cpu().numpy()
        reconstruction.index_add_(0, c, rec.double())
    counts = torch.bincount(cond_of_row, minlength=len(conditions)).clamp_min(1).unsqueeze(1)
    return out, (reconstruction / counts).float().cpu().numpy()
