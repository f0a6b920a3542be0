"""GEARS' split modes, draw for draw, and subgroups for the modes GEARS gives none.

GEARS results are only comparable when the held-out conditions are the same, so the generated
modes reproduce `gears.data_utils.DataSplitter` as driven by `PertData.prepare_split` draw for
draw (same legacy NumPy generator, same seeding points, same fractions, same order of the
candidate lists), without importing gears. `tests/test_split_gears.py` checks this against
cell-gears itself. `data/split.py` builds, saves and checks splits on top of this.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from regina_cli.data.conditions import condition_genes, is_combination, is_control, parse_condition
from regina_cli.errors import ReginaError

MODES = ("simulation", "simulation_single", "combo_seen0", "combo_seen1", "combo_seen2", "single", "no_test")
SIMULATION_MODES = ("simulation", "simulation_single")  # those that hold out genes: train_gene_frac applies
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


def complete_subgroups(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    return {g: sorted(groups.get(g, [])) for g in SUBGROUPS}
