"""Train/val/test splits of a screen's conditions, identical to cell-gears' own splits.

GEARS results are only comparable when the held-out conditions are the same, so the generated
modes reproduce `gears.data_utils.DataSplitter` as driven by `PertData.prepare_split` draw for
draw (same legacy NumPy generator, same seeding points, same fractions, same order of the
candidate lists), without importing gears. `tests/test_split_gears.py` checks this against
cell-gears itself.

Subgroups: GEARS defines them for `simulation` only (`combo_seen0/1/2`, `unseen_single`,
relative to its training genes). For the other modes and for user split files they are derived
from the genes targeted by training conditions, so evaluation can always aggregate by subgroup.

Provenance: a split file records the SHA-256 of the dataset it was made from, and its content
hash (`Split.sha256`) is what labels and runs record in turn. A split is never silently
replaced by different content (`--force`), and one made from another version of the dataset is
refused when loaded.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from regina_cli import keys
from regina_cli.data.conditions import condition_genes, is_combination, is_control, parse_condition
from regina_cli.data.provenance import content_sha256, dataset_sha256, refuse_replacing
from regina_cli.data.safe_pickle import is_pickle, safe_loads
from regina_cli.errors import ReginaError
from regina_cli.io import write_json

MODES = ("simulation", "simulation_single", "combo_seen0", "combo_seen1", "combo_seen2", "single", "no_test")
CUSTOM_MODE = "custom"  # a user's own split dict (`--split-file`)
SETS = ("train", "val", "test")
SUBGROUPS = ("combo_seen0", "combo_seen1", "combo_seen2", "unseen_single")
SUBGROUP_KEYS = ("test_subgroup", "val_subgroup")

DEFAULT_SEED = 1
DEFAULT_TRAIN_GENE_FRAC = 0.75
# Fixed GEARS defaults (PertData.prepare_split / DataSplitter.split_data):
COMBO_SEEN2_TRAIN_FRAC = 0.75  # share of seen-2 combinations kept for training (simulation)
VAL_GENE_FRAC = 0.9  # simulation modes: val is a second simulation split of train at 0.9/0.9
HELD_OUT_FRAC = 0.1  # combo_seen*/single: test fraction; every other mode: val fraction


@dataclass(frozen=True)
class Split:
    """Conditions of each set plus the test/val subgroups; `name` is `<mode>_<seed>`, or for a
    user's split file `custom_<first 8 hex digits of its sets' hash>` (two files never share one)."""

    dataset: str
    mode: str
    seed: int
    train_gene_frac: float | None
    train: list[str]
    val: list[str]
    test: list[str]
    subgroups: dict[str, dict[str, list[str]]]

    @property
    def name(self) -> str:
        if self.mode == CUSTOM_MODE:
            return f"{CUSTOM_MODE}_{content_sha256({s: sorted(getattr(self, s)) for s in SETS})[:8]}"
        return f"{self.mode}_{self.seed}"

    def sha256(self) -> str:
        """Hash of what the split says (not of how the file spells it): labels and runs record it."""
        return content_sha256(self.to_dict())

    def set_of(self, condition: str) -> str | None:
        """`train`, `val`, `test`, or None for a condition left out of the split."""
        for set_name in SETS:
            if condition in getattr(self, set_name):
                return set_name
        return None

    def subgroup_of(self, condition: str) -> str | None:
        """The subgroup (`combo_seen2`, `unseen_single`, ...) of a val/test condition."""
        for groups in self.subgroups.values():
            for subgroup, conditions in groups.items():
                if condition in conditions:
                    return subgroup
        return None

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "mode": self.mode,
            "seed": self.seed,
            "train_gene_frac": self.train_gene_frac,
            **{s: sorted(getattr(self, s)) for s in SETS},
            "subgroup": {k: {g: sorted(v) for g, v in self.subgroups[k].items()} for k in SUBGROUP_KEYS},
        }

    @classmethod
    def from_dict(cls, obj: dict) -> "Split":
        return cls(
            dataset=obj["dataset"],
            mode=obj["mode"],
            seed=int(obj["seed"]),
            train_gene_frac=obj.get("train_gene_frac"),
            **{s: list(obj[s]) for s in SETS},
            subgroups={k: {g: list(v) for g, v in obj["subgroup"][k].items()} for k in SUBGROUP_KEYS},
        )


# --- GEARS DataSplitter, draw for draw ---------------------------------------------------------


def _is_single(p: str) -> bool:
    return len(parse_condition(p)) == 1


def _genes_of(perts: Iterable[str]) -> list[str]:
    """Sorted unique targeted genes (GEARS `get_genes_from_perts`, i.e. `np.unique`)."""
    return sorted(condition_genes(perts))


def _perts_with_genes(genes: Iterable[str], perts: Sequence[str], kind: str) -> list[str]:
    """Singles or combinations of `perts` that target any of `genes`, in `perts` order."""
    genes = set(genes)
    keep = _is_single if kind == "single" else is_combination
    return [p for p in perts if keep(p) and genes.intersection(parse_condition(p))]


def _n_in(p: str, genes: set[str]) -> int:
    return sum(g in genes for g in parse_condition(p))


def _choice(rng: np.random.RandomState, items: Sequence[str], size: int, *, replace: bool) -> list[str]:
    """`np.random.choice(items, size, replace)`, identical draws, returning Python strings."""
    return [items[i] for i in rng.choice(len(items), size, replace=replace)]


def _simulation_split(perts: Sequence[str], gene_frac: float, combo_frac: float, seed: int):
    """GEARS `get_simulation_split`: hold out whole genes, then some seen-2 combinations."""
    genes = _genes_of(perts)
    train_genes = set(_choice(np.random.RandomState(seed), genes, int(len(genes) * gene_frac), replace=False))
    ood_genes = set(genes) - train_genes

    combos_seen = _perts_with_genes(train_genes, perts, "combo")
    combo_seen1 = [p for p in combos_seen if _n_in(p, train_genes) == 1]
    seen2_pool = sorted(set(combos_seen) - set(combo_seen1))
    combo_train = _choice(np.random.RandomState(seed), seen2_pool, int(len(seen2_pool) * combo_frac), replace=False)
    combo_seen2 = sorted(set(seen2_pool) - set(combo_train))
    unseen_single = _perts_with_genes(ood_genes, perts, "single")
    combo_seen0 = [p for p in _perts_with_genes(ood_genes, perts, "combo") if _n_in(p, train_genes) == 0]

    train = _perts_with_genes(train_genes, perts, "single") + combo_train
    held_out = combo_seen1 + combo_seen2 + unseen_single + combo_seen0
    subgroups = {"combo_seen0": combo_seen0, "combo_seen1": combo_seen1,
                 "combo_seen2": combo_seen2, "unseen_single": unseen_single}
    return train, held_out, subgroups


def _simulation_single_split(perts: Sequence[str], gene_frac: float, seed: int):
    """GEARS `get_simulation_split_single`: hold out whole genes; singles only."""
    if any(is_combination(p) for p in perts):
        raise ReginaError("mode simulation_single needs a screen without combinations: use --mode simulation")
    genes = _genes_of(perts)
    train_genes = set(_choice(np.random.RandomState(seed), genes, int(len(genes) * gene_frac), replace=False))
    return _perts_with_genes(train_genes, perts, "single"), _perts_with_genes(set(genes) - train_genes, perts, "single")


def _split_list(perts: Sequence[str], rng: np.random.RandomState, mode: str, size: float):
    """GEARS `get_split_list` for one draw; `mode` selects its `split_type`/`seen` branch.

    Returns (kept, held_out); conditions in neither are dropped from the split, as in GEARS.
    """
    singles = [p for p in perts if _is_single(p)]
    combos = [p for p in perts if is_combination(p)]
    # GEARS always draws the test genes (with replacement), even in branches that ignore them.
    test_genes = set(_choice(rng, _genes_of(perts), int(len(singles) * size), replace=True))
    dropped: list[str] = []
    if mode == "single":
        held_out = _perts_with_genes(test_genes, perts, "single")
        dropped = _perts_with_genes(test_genes, perts, "combo")
    elif mode == "no_test":
        held_out = _choice(rng, perts, int(len(perts) * size), replace=True)
    elif mode == "combo_seen2":
        held_out = _choice(rng, combos, int(len(combos) * size), replace=True)
    else:  # combo_seen0 / combo_seen1: combos of test genes with more unseen genes are dropped
        max_seen = 0 if mode == "combo_seen0" else 1
        candidates = _perts_with_genes(test_genes, perts, "combo")
        dropped = [p for p in candidates if len(parse_condition(p)) - _n_in(p, test_genes) > max_seen]
        held_out = _perts_with_genes(test_genes, perts, "single") + [p for p in candidates if p not in dropped]
    excluded = set(held_out) | set(dropped)
    return [p for p in perts if p not in excluded], held_out


def gears_split(conditions: Sequence[str], mode: str, seed: int, train_gene_frac: float = DEFAULT_TRAIN_GENE_FRAC):
    """The split cell-gears' `PertData.prepare_split(mode, seed, train_gene_frac)` makes.

    `conditions`: the dataset's conditions in order of first appearance in obs (GEARS draws
    from lists in that order). Returns ({set: [conditions]}, GEARS subgroups or None).
    """
    if mode not in MODES:
        raise ReginaError(f"unknown split mode {mode!r}: choose one of {', '.join(MODES)}")
    perts = [c for c in dict.fromkeys(conditions) if not is_control(c)]
    too_many = [p for p in perts if len(parse_condition(p)) > 2]
    if too_many:
        raise ReginaError(f"GEARS splits handle at most two genes per condition ({too_many[0]!r}); pass --split-file")
    subgroups = None
    test: list[str] = []
    if mode == "simulation":
        train, test, test_sub = _simulation_split(perts, train_gene_frac, COMBO_SEEN2_TRAIN_FRAC, seed)
        train, val, val_sub = _simulation_split(train, VAL_GENE_FRAC, VAL_GENE_FRAC, seed)
        subgroups = {"test_subgroup": test_sub, "val_subgroup": val_sub}
    elif mode == "simulation_single":
        train, test = _simulation_single_split(perts, train_gene_frac, seed)
        train, val = _simulation_single_split(train, VAL_GENE_FRAC, seed)
    elif mode == "no_test":
        train, val = _split_list(perts, np.random.RandomState(seed), mode, HELD_OUT_FRAC)
    else:
        rng = np.random.RandomState(seed)  # one stream for both draws, as split_data seeds once
        train, test = _split_list(perts, rng, mode, HELD_OUT_FRAC)
        train, val = _split_list(train, rng, mode, HELD_OUT_FRAC)

    # prepare_split reads the sets back from obs after mapping train, val, test, then ctrl->train.
    assigned = {c: "train" for c in train} | {c: "val" for c in val} | {c: "test" for c in test}
    assigned |= {c: "train" for c in conditions if is_control(c)}
    sets = {s: [c for c in dict.fromkeys(conditions) if assigned.get(c) == s] for s in SETS}
    return sets, subgroups


# --- Subgroups for modes where GEARS gives none ------------------------------------------------


def derived_subgroups(train: Iterable[str], held_out: Iterable[str]) -> dict[str, list[str]]:
    """Classify held-out conditions by how many of their genes a training condition targets.

    A held-out single whose gene is trained on inside a combination is in no subgroup.
    """
    seen = condition_genes(train)
    groups: dict[str, list[str]] = {g: [] for g in SUBGROUPS}
    for c in held_out:
        genes = parse_condition(c)
        n_seen = sum(g in seen for g in genes)
        if len(genes) == 1 and n_seen == 0:
            groups["unseen_single"].append(c)
        elif len(genes) == 2:
            groups[f"combo_seen{n_seen}"].append(c)
    return groups


def _complete(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    return {g: sorted(groups.get(g, [])) for g in SUBGROUPS}


# --- User split files --------------------------------------------------------------------------


def read_split_file(path: str | Path) -> dict:
    """A user's {train, val, test} dict from JSON or a GEARS split pickle."""
    path = Path(path)
    if not path.is_file():
        raise ReginaError(f"split file {path} not found")
    raw = path.read_bytes()
    try:
        obj = safe_loads(raw) if is_pickle(raw) else json.loads(raw)
    except (pickle.UnpicklingError, ValueError, EOFError) as exc:
        raise ReginaError(f"split file {path} is neither JSON nor a GEARS split pickle ({exc})") from None
    if not isinstance(obj, dict) or any(s not in obj for s in SETS):
        raise ReginaError(f"split file {path} must be a dict with keys train, val and test")
    return obj


def validate_user_split(obj: dict, conditions: Sequence[str], source: str) -> dict[str, list[str]]:
    """Check a user's split against the dataset: known conditions, no overlap, nothing empty."""
    known = set(conditions)
    sets: dict[str, list[str]] = {}
    for s in SETS:
        values = obj[s]
        if isinstance(values, str) or not isinstance(values, Iterable):
            raise ReginaError(f"{source}: '{s}' must be a list of conditions")
        sets[s] = sorted({str(v) for v in values})
        unknown = [c for c in sets[s] if c not in known]
        if unknown:
            raise ReginaError(
                f"{source}: {len(unknown)} {s} condition(s) not in the dataset, e.g. {', '.join(unknown[:3])}"
            )
    for i, a in enumerate(SETS):
        for b in SETS[i + 1 :]:
            both = sorted(set(sets[a]) & set(sets[b]))
            if both:
                raise ReginaError(f"{source}: {len(both)} condition(s) in both {a} and {b}, e.g. {both[0]}")
    controls = sorted(c for c in known if is_control(c))
    misplaced = [c for c in controls if c in sets["val"] or c in sets["test"]]
    if misplaced:
        raise ReginaError(f"{source}: control condition {misplaced[0]!r} must be in train, as in GEARS")
    sets["train"] = sorted(set(sets["train"]) | set(controls))
    for s in SETS:
        if not [c for c in sets[s] if not is_control(c)]:
            raise ReginaError(f"{source}: the {s} set has no perturbed condition")
    return sets


# --- Building, saving and loading --------------------------------------------------------------


def make_split(
    name: str,
    conditions: Sequence[str],
    *,
    mode: str = "simulation",
    seed: int = DEFAULT_SEED,
    train_gene_frac: float = DEFAULT_TRAIN_GENE_FRAC,
    user_split: dict | None = None,
    source: str = "split file",
) -> Split:
    """A `Split` for a dataset's conditions (obs order): GEARS's for `mode`, or a user's dict."""
    if not 0.0 < train_gene_frac < 1.0:
        raise ReginaError(f"--train-gene-frac must lie strictly between 0 and 1, got {train_gene_frac}")
    conditions = [str(c) for c in conditions]
    gears_groups, frac = None, None
    if user_split is not None:
        sets, mode = validate_user_split(user_split, conditions, source), CUSTOM_MODE
    else:
        sets, gears_groups = gears_split(conditions, mode, seed, train_gene_frac)
        frac = train_gene_frac if mode.startswith("simulation") else None
        required = ("train", "val") if mode == "no_test" else SETS
        for s in required:
            if not [c for c in sets[s] if not is_control(c)]:
                raise ReginaError(
                    f"mode {mode} with seed {seed} leaves the {s} set of {name} empty "
                    f"({len(conditions)} conditions): choose another --mode, or give --split-file"
                )
    if gears_groups is not None:
        subgroups = {k: _complete(gears_groups[k]) for k in SUBGROUP_KEYS}
    else:
        subgroups = {
            "test_subgroup": _complete(derived_subgroups(sets["train"], sets["test"])),
            "val_subgroup": _complete(derived_subgroups(sets["train"], sets["val"])),
        }
    seed = 0 if mode == CUSTOM_MODE else int(seed)  # a user's split is named by its content
    return Split(name, mode, seed, frac, *(sorted(sets[s]) for s in SETS), subgroups)


def save_split(split: Split, data_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """Write the split with the dataset's SHA-256; replacing a split of other content needs `force`."""
    path = keys.split_file(split.dataset, split.name, data_dir)
    if path.is_file() and not force:
        try:
            same = Split.from_dict(json.loads(path.read_text())).sha256() == split.sha256()
        except (ValueError, KeyError, TypeError):
            same = False
        if not same:
            refuse_replacing(path, "choose another --seed")
    write_json(path, {**split.to_dict(), keys.DATASET_SHA256: dataset_sha256(split.dataset, data_dir)})
    return path


def load_split(name: str, split: str, data_dir: str | Path | None = None) -> Split:
    """The split `<mode>_<seed>` written by `regina split`, checked against the dataset's SHA-256."""
    path = keys.split_file(name, split, data_dir)
    mode, _, seed = split.rpartition("_")
    remake = f"regina split {name} --mode {mode} --seed {seed}" if mode in MODES and seed.isdigit() else (
        f"regina split {name} --mode MODE --seed SEED` (split names are <mode>_<seed>, e.g. simulation_1"
    )
    if not path.is_file():
        raise ReginaError(f"split {split!r} of {name} not found at {path}: run `{remake}`")
    try:
        obj = json.loads(path.read_text())
        loaded = Split.from_dict(obj)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReginaError(f"split file {path} is damaged ({exc}): run `regina split` again") from None
    recorded, current = obj.get(keys.DATASET_SHA256), dataset_sha256(name, data_dir)
    if recorded and current and recorded != current:
        raise ReginaError(f"split file {path} was made from another version of dataset {name} (SHA-256 "
                          f"{recorded[:12]}, now {current[:12]}): run `{remake} --force` to remake it")
    return loaded


def conditions_in_order(obs: pd.DataFrame) -> list[str]:
    """The dataset's conditions in order of first appearance, the order GEARS draws from."""
    if keys.OBS_CONDITION not in obs:
        raise ReginaError(f"the dataset has no obs['{keys.OBS_CONDITION}'] column: re-import it with `regina fetch`")
    return [str(c) for c in pd.unique(obs[keys.OBS_CONDITION].astype(str))]


def split_summary(split: Split, cells_per_condition: dict[str, int], measured_genes: Sequence[str],
                  knowledge=None) -> list[dict]:
    """Rows (set, subgroup, conditions, cells, unmeasured, unpredictable) for the summary table.

    unmeasured: conditions with a target the screen does not measure; unpredictable: those with a
    target that is neither measured, nor perturbed in training, nor known to `knowledge`.
    """
    from regina_cli.data.knowledge import predictability

    def row(set_name: str, subgroup: str, conditions: list[str]) -> dict:
        cells = sum(cells_per_condition.get(c, 0) for c in conditions)
        counts = predictability(conditions, measured_genes, split.train, knowledge)
        return {"set": set_name, "subgroup": subgroup, "conditions": len(conditions), "cells": cells,
                "unmeasured": counts["unmeasured"], "unpredictable": counts["unpredictable"]}

    rows = []
    for set_name in SETS:
        rows.append(row(set_name, "all", getattr(split, set_name)))
        if set_name != "train":
            groups = split.subgroups[f"{set_name}_subgroup"]
            rows.extend(row(set_name, g, groups[g]) for g in SUBGROUPS if groups[g])
    return rows


@dataclass(frozen=True)
class SplitOutcome:
    split: Split
    path: Path
    summary: list[dict]
    n_unassigned: int  # dataset conditions in no set (GEARS drops some in combo/single modes)
    warnings: list[str]


def unpredictable_warning(summary: list[dict], knowledge_given: bool) -> str | None:
    """The warning for a test set with conditions no model can predict, with the fix."""
    test = next(r for r in summary if r["set"] == "test" and r["subgroup"] == "all")
    if not test["unpredictable"]:
        return None
    fix = ("pass a gene knowledge file that covers those genes" if knowledge_given else
           "pass --gene-knowledge FILE (gene embeddings or GO terms) at train-ae and predict, "
           "or run `regina fetch go` and pass --gene-knowledge go")
    return (f"{test['unpredictable']} of {test['conditions']} test conditions are unpredictable: a target is "
            f"neither measured, nor perturbed in training, nor known to the gene knowledge; {fix}")


def split_dataset(
    name: str,
    *,
    mode: str = "simulation",
    seed: int = DEFAULT_SEED,
    train_gene_frac: float = DEFAULT_TRAIN_GENE_FRAC,
    split_file: str | Path | None = None,
    data_dir: str | Path | None = None,
    gene_knowledge: str | None = None,
    force: bool = False,
) -> SplitOutcome:
    """`regina split`: read the dataset's conditions, make the split, write it atomically.

    `gene_knowledge` (a path or `go`) only informs the summary of predictable conditions;
    `force` replaces an existing split of other content (runs built on it become stale).
    """
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.knowledge import resolve_knowledge

    if split_file is None and mode not in MODES:
        raise ReginaError(f"unknown split mode {mode!r}: choose one of {', '.join(MODES)}")
    user_split = read_split_file(split_file) if split_file is not None else None
    knowledge = resolve_knowledge(gene_knowledge, data_dir) if gene_knowledge is not None else None
    adata = read_dataset(name, data_dir, backed=True)
    try:
        obs, measured = adata.obs, list(adata.var_names)
    finally:
        if adata.isbacked:
            adata.file.close()
    conditions = conditions_in_order(obs)
    split = make_split(
        name, conditions, mode=mode, seed=seed, train_gene_frac=train_gene_frac,
        user_split=user_split, source=str(split_file),
    )
    path = save_split(split, data_dir, force=force)
    counts = obs[keys.OBS_CONDITION].astype(str).value_counts().to_dict()
    assigned = set(split.train) | set(split.val) | set(split.test)
    summary = split_summary(split, counts, measured, knowledge)
    warning = unpredictable_warning(summary, knowledge is not None)
    return SplitOutcome(split, path, summary, sum(c not in assigned for c in conditions),
                        [warning] if warning else [])
