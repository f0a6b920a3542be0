"""Train/val/test splits of a screen's conditions: `regina split`, split files, and checks.

Generated modes are identical to cell-gears' own splits (`data/gears_split.py`, draw for draw);
user split files (`--split-file`, JSON or a GEARS pickle) are read without running code and
checked against the dataset.

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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from regina_cli import keys
from regina_cli.data.conditions import is_control
from regina_cli.data.gears_split import (  # noqa: F401  (the split vocabulary, re-exported)
    CUSTOM_MODE, DEFAULT_SEED, DEFAULT_TRAIN_GENE_FRAC, MODES, SETS, SIMULATION_MODES, SUBGROUP_KEYS, SUBGROUPS,
    complete_subgroups, derived_subgroups, gears_split)
from regina_cli.checks import check_data_dir, check_seed, check_share
from regina_cli.data.provenance import content_sha256, dataset_sha256, refuse_replacing, unchanged_dataset_sha256
from regina_cli.data.safe_pickle import is_pickle, safe_loads
from regina_cli.errors import ReginaError
from regina_cli.io import write_json

SPLIT_NAME = re.compile(rf"^({'|'.join(MODES)})_(\d+)(?:_([0-9.e-]+))?$")


def split_name(mode: str, seed: int, train_gene_frac: float | None = None) -> str:
    """`<mode>_<seed>` (`simulation_1`); a simulation mode at a share of training genes other than
    GEARS' default adds it, spelled as in GEARS' own file names (`norman_simulation_1_0.5.pkl`):
    `simulation_1_0.5`. Two shares are two splits, and every name made at the default stays."""
    if mode in SIMULATION_MODES and train_gene_frac not in (None, DEFAULT_TRAIN_GENE_FRAC):
        return f"{mode}_{seed}_{train_gene_frac}"
    return f"{mode}_{seed}"


def parse_split_name(split: str) -> tuple[str, int, float | None] | None:
    """(mode, seed, share of training genes or None) that `split_name` turns into `split`; None
    for any other name (a user's `custom_<hash>`, a typo)."""
    found = SPLIT_NAME.match(split)
    if found is None:
        return None
    mode, seed, frac = found[1], int(found[2]), found[3]
    try:
        parsed = (mode, seed, None if frac is None else float(frac))
    except ValueError:
        return None
    return parsed if split_name(*parsed) == split else None


@dataclass(frozen=True)
class Split:
    """Conditions of each set plus the test/val subgroups; `name` is `split_name`'s
    (`simulation_1`, `simulation_1_0.5`), or for a user's split file `custom_<first 8 hex digits of
    its sets' hash>` (two files never share one)."""

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
        return split_name(self.mode, self.seed, self.train_gene_frac)

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


# --- User split files --------------------------------------------------------------------------


def read_split_file(path: str | Path | dict) -> dict:
    """A user's {train, val, test} dict from JSON or a GEARS split pickle (from Python: the dict itself)."""
    from regina_cli.checks import check_input_file

    if isinstance(path, dict):
        obj, what = path, "split_file"
    else:
        path, what = Path(path), f"split file {path}"
        check_input_file(path, "split file", "not found", stream=True)
        raw = path.read_bytes()
        try:
            obj = safe_loads(raw) if is_pickle(raw) else json.loads(raw)
        except (pickle.UnpicklingError, ValueError, EOFError) as exc:
            raise ReginaError(f"split file {path} is neither JSON nor a GEARS split pickle ({exc})") from None
    if not isinstance(obj, dict) or any(s not in obj for s in SETS):
        raise ReginaError(f"{what} must be a dict with keys train, val and test")
    return obj


def _set_lists(obj: dict) -> dict[str, list[str]]:
    """Each set of a split dict as a sorted list of condition names (TypeError: not a list)."""
    sets: dict[str, list[str]] = {}
    for s in SETS:
        values = obj[s]
        if isinstance(values, str) or not isinstance(values, Iterable):
            raise TypeError(f"'{s}' must be a list of conditions")
        sets[s] = sorted({str(v) for v in values})
    return sets


def _sets_problem(sets: dict[str, list[str]]) -> str | None:
    """What makes a split unusable whatever the dataset: a condition in two sets (a test
    condition trained on), or a control outside train. None when there is nothing."""
    for i, a in enumerate(SETS):
        for b in SETS[i + 1 :]:
            both = sorted(set(sets[a]) & set(sets[b]))
            if both:
                return f"{len(both)} condition(s) in both {a} and {b}, e.g. {both[0]}"
    misplaced = sorted(c for s in ("val", "test") for c in sets[s] if is_control(c))
    if misplaced:
        return f"control condition {misplaced[0]!r} must be in train, as in GEARS"
    return None


def validate_user_split(obj: dict, conditions: Sequence[str], source: str) -> dict[str, list[str]]:
    """Check a user's split against the dataset: known conditions, no overlap, nothing empty."""
    known = set(conditions)
    try:
        sets = _set_lists(obj)
    except TypeError as exc:
        raise ReginaError(f"{source}: {exc}") from None
    for s in SETS:
        unknown = [c for c in sets[s] if c not in known]
        if unknown:
            raise ReginaError(
                f"{source}: {len(unknown)} {s} condition(s) not in the dataset, e.g. {', '.join(unknown[:3])}"
            )
    if (problem := _sets_problem(sets)) is not None:
        raise ReginaError(f"{source}: {problem}")
    sets["train"] = sorted(set(sets["train"]) | {c for c in known if is_control(c)})
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
    check_share(train_gene_frac, "--train-gene-frac")
    conditions = [str(c) for c in conditions]
    gears_groups, frac = None, None
    if user_split is not None:
        sets, mode = validate_user_split(user_split, conditions, source), CUSTOM_MODE
    else:
        sets, gears_groups = gears_split(conditions, mode, seed, train_gene_frac)
        frac = train_gene_frac if mode in SIMULATION_MODES else None
        required = ("train", "val") if mode == "no_test" else SETS
        for s in required:
            if not [c for c in sets[s] if not is_control(c)]:
                raise ReginaError(
                    f"mode {mode} with seed {seed} leaves the {s} set of {name} empty "
                    f"({len(conditions)} conditions): choose another --mode, or give --split-file"
                )
    if gears_groups is not None:
        subgroups = {k: complete_subgroups(gears_groups[k]) for k in SUBGROUP_KEYS}
    else:
        subgroups = {
            "test_subgroup": complete_subgroups(derived_subgroups(sets["train"], sets["test"])),
            "val_subgroup": complete_subgroups(derived_subgroups(sets["train"], sets["val"])),
        }
    seed = 0 if mode == CUSTOM_MODE else int(seed)  # a user's split is named by its content
    return Split(name, mode, seed, frac, *(sorted(sets[s]) for s in SETS), subgroups)


def _saved(path: Path) -> dict:
    """A split file's content as saved ({} when absent or unreadable)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _same_sets(saved: dict, split: Split) -> bool:
    try:
        return Split.from_dict(saved).sha256() == split.sha256()
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def save_split(split: Split, data_dir: str | Path | None = None, *, force: bool = False,
               made_from: str | None = None) -> bool:
    """Write the split with the dataset's SHA-256; replacing a split of other content needs `force`.
    `made_from`: the SHA-256 taken before the dataset's conditions were read, refused if the
    dataset changed since (None: the split is of the dataset as it is now).
    False: the file already held this split of the dataset as it is now, and nothing was written
    (a read-only folder will do, and the command says so instead of "wrote")."""
    path = keys.split_file(split.dataset, split.name, data_dir)
    current = (dataset_sha256(split.dataset, data_dir) if made_from is None else
               unchanged_dataset_sha256(split.dataset, data_dir, made_from, "splitting"))
    saved = _saved(path)
    same = _same_sets(saved, split)
    if same and saved.get(keys.DATASET_SHA256) == current:
        return False
    if path.is_file() and not same and not force:
        refuse_replacing(path, "choose another --seed")
    write_json(path, {**split.to_dict(), keys.SPLIT_NAME: split.name, keys.DATASET_SHA256: current})
    return True


def load_split(name: str, split: str, data_dir: str | Path | None = None, *, allow_stale: bool = False) -> Split:
    """The split named `split` (`split_name`'s, or `custom_<hash>`) written by `regina split`,
    checked before anything uses it: no condition in two sets, controls in train, and the name
    its content gives (a copied or hand-edited file under another split's name is refused);
    and against the dataset's SHA-256 (`allow_stale`: not; the caller warns that the dataset
    changed, as `--allow-stale` promises)."""
    path = keys.split_file(name, split, data_dir)
    remake, hint = remake_command(name, split), ""
    if remake is None:
        remake = f"regina split {name} --mode MODE --seed SEED"
        hint = (" (split names are <mode>_<seed>, e.g. simulation_1, plus _<train-gene-frac> when that is not "
                f"{DEFAULT_TRAIN_GENE_FRAC}, e.g. simulation_1_0.5)")
    if not path.is_file():
        raise ReginaError(f"split {split!r} of {name} not found at {path}: run `{remake}`{hint}")
    fix = (f"run `{remake} --force`" if parse_split_name(split) else
           f"run `regina split {name} --split-file FILE` again with the file it was made from")
    try:
        obj = json.loads(path.read_text())
        loaded = Split.from_dict(obj)
        problem = _sets_problem(_set_lists(obj))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReginaError(f"split file {path} is damaged ({exc}): {fix}") from None
    if problem is not None:
        raise ReginaError(f"split file {path} is damaged ({problem}): {fix}")
    named = obj.get(keys.SPLIT_NAME)  # files name themselves; an older version's did not, and may
    # then be at the name of before a share other than 0.75 was named apart. The dataset's name is
    # not compared: a copied dataset folder keeps its splits; its hash is.
    names = {loaded.name} if named else {loaded.name, split_name(loaded.mode, loaded.seed)}
    if split not in names or named not in (None, loaded.name):
        raise ReginaError(f"split file {path} holds split {loaded.name}, not {split} (copied or renamed by hand?): {fix}")
    recorded, current = obj.get(keys.DATASET_SHA256), dataset_sha256(name, data_dir)
    if recorded and current and recorded != current and not allow_stale:
        if loaded.name != split:  # an older version's file at a share that is now named apart
            hint = (f" (it holds what is now split {loaded.name}, made by an older version; to keep that one, "
                    f"run `{remake_command(name, loaded.name)}` and pass --split {loaded.name})")
        raise ReginaError(f"split file {path} was made from another version of dataset {name} (SHA-256 "
                          f"{recorded[:12]}, now {current[:12]}): run `{remake} --force`{hint} to remake it")
    return loaded


def check_split_conditions(split: Split, data_conditions: set[str]) -> None:
    """The split's train/val conditions must be the dataset's (one made for another dataset, or
    edited by hand, is refused before anything is fitted on it)."""
    missing = sorted((set(split.train) | set(split.val)) - data_conditions)
    if missing:
        raise ReginaError(
            f"the split lists {len(missing)} train/val conditions that are not in the data "
            f"(e.g. {', '.join(missing[:3])}); it was made for another dataset: re-run `regina split`"
        )


def remake_command(name: str, split: str) -> str | None:
    """The `regina split` command that makes the split named `split`; None for a name it cannot make."""
    parsed = parse_split_name(split)
    if parsed is None:
        return None
    mode, seed, frac = parsed
    return f"regina split {name} --mode {mode} --seed {seed}" + ("" if frac is None else f" --train-gene-frac {frac}")


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
    written: bool = True  # False: the file already held this split (`save_split`)


def unpredictable_warning(summary: list[dict], knowledge_given: bool) -> str | None:
    """The warning for a test set with conditions no model can predict, with the fix."""
    test = next(r for r in summary if r["set"] == "test" and r["subgroup"] == "all")
    if not test["unpredictable"]:
        return None
    fix = ("pass a gene knowledge file that covers those genes" if knowledge_given else
           "pass --gene-knowledge FILE (gene embeddings or GO terms) at train-ae (the run keeps it for predict), "
           "or run `regina fetch go` and pass --gene-knowledge go")
    return (f"{test['unpredictable']} of {test['conditions']} test conditions are unpredictable: a target is "
            f"neither measured, nor perturbed in training, nor known to the gene knowledge; {fix}")


def split_dataset(
    name: str,
    *,
    mode: str = "simulation",
    seed: int = DEFAULT_SEED,
    train_gene_frac: float = DEFAULT_TRAIN_GENE_FRAC,
    split_file: str | Path | dict | None = None,
    data_dir: str | Path | None = None,
    gene_knowledge: str | None = None,
    force: bool = False,
) -> SplitOutcome:
    """`regina split`: read the dataset's conditions, make the split, write it atomically.

    `split_file`: a user's split (a file, or from Python the dict); `gene_knowledge` (a path or
    `go`) only informs the summary of predictable conditions; `force` replaces an existing split
    of other content (runs built on it become stale).
    """
    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.knowledge import resolve_knowledge

    check_seed(seed)
    made = split_file is None and keys.split_file(name, split_name(mode, seed, train_gene_frac), data_dir).is_file()
    check_data_dir(data_dir, writes=not made)  # the same split again writes nothing: a read-only folder will do
    if split_file is None and mode not in MODES:
        raise ReginaError(f"unknown split mode {mode!r}: choose one of {', '.join(MODES)}")
    user_split = read_split_file(split_file) if split_file is not None else None
    knowledge = resolve_knowledge(gene_knowledge, data_dir) if gene_knowledge is not None else None
    read_sha256 = dataset_sha256(name, data_dir)  # before the read: checked again before the file names it
    adata = read_dataset(name, data_dir, backed=True)
    try:
        obs, measured = adata.obs, list(adata.var_names)
    finally:
        if adata.isbacked:
            adata.file.close()
    conditions = conditions_in_order(obs)
    split = make_split(
        name, conditions, mode=mode, seed=seed, train_gene_frac=train_gene_frac,
        user_split=user_split, source="split_file" if isinstance(split_file, dict) else str(split_file),
    )
    written = save_split(split, data_dir, force=force, made_from=read_sha256)
    path = keys.split_file(split.dataset, split.name, data_dir)
    counts = obs[keys.OBS_CONDITION].astype(str).value_counts().to_dict()
    assigned = set(split.train) | set(split.val) | set(split.test)
    summary = split_summary(split, counts, measured, knowledge)
    warning = unpredictable_warning(summary, knowledge is not None)
    return SplitOutcome(split, path, summary, sum(c not in assigned for c in conditions),
                        [warning] if warning else [], written)
