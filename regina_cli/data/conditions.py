"""GEARS condition labels: "ctrl", "A+ctrl" (or "ctrl+A"), "A+B".

One parser so every step agrees on which genes a condition targets.
"""

from __future__ import annotations

from typing import Iterable

from regina_cli.keys import CTRL, GENE_SEPARATOR

# Control labels other tools write, matched without case: the importer and evaluate read them all as "ctrl".
CONTROL_LABELS = ("ctrl", "control", "non-targeting", "nontargeting", "non_targeting", "NTC")


def control_labels(extra: Iterable[str] = ()) -> set[str]:
    """`CONTROL_LABELS` and `extra` (a user's `--control`), lower case, for matching without case."""
    return {c.lower() for c in (*CONTROL_LABELS, *extra)}


def parse_condition(condition: str) -> tuple[str, ...]:
    """Targeted genes of a condition in label order: "A+ctrl" -> ("A",), "ctrl" -> ()."""
    return tuple(g for g in str(condition).split(GENE_SEPARATOR) if g and g != CTRL)


def is_control(condition: str) -> bool:
    return len(parse_condition(condition)) == 0


def is_combination(condition: str) -> bool:
    return len(parse_condition(condition)) > 1


def condition_genes(conditions: Iterable[str]) -> set[str]:
    """Every gene targeted by any of `conditions`."""
    return {g for c in conditions for g in parse_condition(c)}


def canonical_condition(genes: Iterable[str]) -> str:
    """GEARS spelling for a set of targets: () -> "ctrl", (A,) -> "A+ctrl", (A, B) -> "A+B"."""
    genes = list(genes)
    if not genes:
        return CTRL
    if len(genes) == 1:
        return f"{genes[0]}{GENE_SEPARATOR}{CTRL}"
    return GENE_SEPARATOR.join(genes)


def gears_condition_names(conditions: Iterable[str], condition_names: Iterable[str]) -> dict[str, str]:
    """condition -> GEARS `condition_name`, mapped as GEARS does (`dict(zip(...))` over cells, so
    the last cell's name wins); the key into its per-condition DE lists."""
    return dict(zip(map(str, conditions), map(str, condition_names)))
