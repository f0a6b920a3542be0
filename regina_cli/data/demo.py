"""`regina fetch demo`: a seeded simulated Perturb-seq screen in GEARS layout, no network needed.

Why a simulation and not a bundled real file: the demo must be small, free to redistribute, and
have known structure, so that the whole pipeline can be run and sanity-checked in a minute on a
laptop. The generative model follows the usual picture of a CRISPR screen:

* cells draw UMI counts (Poisson) from gene proportions set by a baseline, a few dozen gene
  programs (co-regulated gene modules) whose activities vary from cell to cell, a cell-cycle
  phase (S and G2/M programs over the standard marker genes) and a stress program over
  HSP*/DNAJ*/ATF*/ERN*/EIF2*/CEBP* genes;
* a single perturbation knocks its target down (or up, activation-style) with a per-cell
  efficiency and shifts a few programs, so its effect propagates to downstream genes; some
  perturbations also raise stress, which is what `regina label --method stress` picks up;
* a double perturbation adds the two singles' effects, and for some pairs the programs respond
  non-additively (synergy, buffering, or a new program switched on);
* counts are normalised to 10,000 per cell and log1p-transformed, stored as CSR float32.

Everything is vectorised and generated in fixed-size chunks of cells (bounded memory, and the
output is identical for a given seed). The default (4,000 x 1,000) takes about two seconds;
Norman's shape (91k cells x 5,045 genes, 105 singles, 131 doubles) took 88 CPU-seconds on one
core (66 s simulation, mostly Poisson draws; 22 s GEARS DE) and 5 GB of memory.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from regina_cli import __version__, keys
from regina_cli.data.conditions import canonical_condition
from regina_cli.data.gears_de import add_gears_de
from regina_cli.data.importer import TARGET_SUM
from regina_cli.errors import ReginaError

# Stress genes of the demo: real symbols, each starting with one of the prefixes that
# `regina label --method stress` scores (checked by tests/test_data_demo.py).
STRESS_GENES = (
    "HSPA1A HSPA1B HSPA5 HSPA8 HSPA9 HSP90AA1 HSP90AB1 HSP90B1 HSPB1 HSPD1 HSPE1 HSPH1 "
    "DNAJA1 DNAJB1 DNAJB9 DNAJC3 ATF3 ATF4 ATF5 ATF6 ERN1 EIF2AK3 EIF2AK4 EIF2S1 CEBPB CEBPG CEBPZ"
).split()


def marker_genes() -> tuple[list[str], list[str], list[str]]:
    """(stress, S-phase, G2/M) genes; the cell-cycle lists are the ones `regina label` ships."""
    from regina_cli.data.label import cell_cycle_genes

    s_phase, g2m_phase = cell_cycle_genes()
    return STRESS_GENES, s_phase, g2m_phase


PHASES = ("G1", "S", "G2M")  # same class names as `regina label --method cell-cycle`
PHASE_COLUMN = "simulated_phase"
MIN_CELLS_PER_CONDITION = 3  # per cell type; scanpy's t-test needs at least two
_CHUNK = 4096  # cells generated at once: bounds memory, and fixes the random stream


def _gene_names(n_genes: int, markers: list[str], rng: np.random.Generator) -> np.ndarray:
    generic = [f"G{i:05d}" for i in range(1, n_genes - len(markers) + 1)]
    return rng.permutation(np.array(generic + markers))


def _programs(genes: np.ndarray, n_programs: int, rng: np.random.Generator) -> np.ndarray:
    """Gene loadings [programs, genes]: stress, S, G2/M, then random co-regulated modules."""
    loadings = np.zeros((n_programs, len(genes)), dtype=np.float32)
    for row, members in enumerate(marker_genes()):
        mask = np.isin(genes, members)
        loadings[row, mask] = rng.uniform(0.8, 1.6, mask.sum())
    for row in range(3, n_programs):
        members = rng.random(len(genes)) < 0.06
        loadings[row, members] = rng.normal(0.0, 0.7, members.sum())
    return loadings


def _sparse_shift(n_programs: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """A perturbation's effect on program activities: 1-3 generic programs, random signs."""
    shift = np.zeros(n_programs, dtype=np.float32)
    hit = rng.choice(np.arange(3, n_programs), size=rng.integers(1, 4), replace=False)
    shift[hit] = rng.normal(0.0, scale, len(hit)) + np.sign(rng.normal(size=len(hit))) * scale
    return shift


def _design(genes, markers, base, n_programs: int, n_singles: int, n_doubles: int, rng):
    """Conditions with their program shifts [conditions, programs] and direct effects on targets.

    Targets are drawn among the better-expressed half of the non-marker genes, as screens target
    genes that are expressed (a knock-down of a silent gene shows nothing).
    Returns (conditions, program_shift, target_effect [conditions, genes], interactions).
    """
    generic = ~np.isin(genes, markers)
    candidates = np.flatnonzero(generic & (base >= np.median(base[generic])))
    if len(candidates) < n_singles:
        raise ReginaError(f"--genes is too small for {n_singles} single perturbations: raise --genes")
    targets = rng.choice(candidates, size=n_singles, replace=False)
    direction = np.where(rng.random(n_singles) < 0.75, -1.0, 1.0)  # mostly knock-down
    strength = rng.uniform(1.2, 2.5, n_singles) * direction
    single_shift = np.stack([_sparse_shift(n_programs, rng, 1.0) for _ in range(n_singles)])
    stressful = rng.random(n_singles) < 0.35
    single_shift[stressful, 0] += rng.uniform(1.0, 2.5, stressful.sum()).astype(np.float32)

    all_pairs = [(a, b) for a in range(n_singles) for b in range(a + 1, n_singles)]
    if n_doubles > len(all_pairs):
        raise ReginaError(f"{n_singles} singles give at most {len(all_pairs)} doubles: lower --doubles")
    pairs = [all_pairs[i] for i in rng.choice(len(all_pairs), size=n_doubles, replace=False)]

    conditions = [keys.CTRL] + [canonical_condition([genes[t]]) for t in targets]
    shifts = [np.zeros(n_programs, np.float32)] + list(single_shift)
    effect = np.zeros((1 + n_singles + n_doubles, len(genes)), dtype=np.float32)
    effect[np.arange(1, n_singles + 1), targets] = strength
    interactions = {}
    for row, (a, b) in enumerate(pairs, start=1 + n_singles):
        condition = canonical_condition([genes[targets[a]], genes[targets[b]]])
        shift = single_shift[a] + single_shift[b]
        kind = rng.choice(["additive", "additive", "synergy", "buffering", "neomorphic"])
        if kind == "synergy":
            shift = shift * 1.8
        elif kind == "buffering":
            shift = shift * 0.3
        elif kind == "neomorphic":
            shift = shift + _sparse_shift(n_programs, rng, 1.5)
        conditions.append(condition)
        shifts.append(shift.astype(np.float32))
        effect[row, [targets[a], targets[b]]] = strength[[a, b]]
        interactions[condition] = str(kind)
    return np.array(conditions), np.stack(shifts), effect, interactions


def _allocate_cells(n_cells: int, n_conditions: int, n_cell_types: int, control_fraction: float, rng):
    """(condition code, cell type code) per cell: every cell type gets controls and every condition."""
    per_type = np.full(n_cell_types, n_cells // n_cell_types)
    per_type[: n_cells % n_cell_types] += 1
    codes, types = [], []
    for cell_type, n in enumerate(per_type):
        n_ctrl = max(MIN_CELLS_PER_CONDITION, int(round(n * control_fraction)))
        n_free = n - n_ctrl - MIN_CELLS_PER_CONDITION * (n_conditions - 1)
        if n_free < 0:
            raise ReginaError(
                f"{n_cells} cells are too few for {n_conditions - 1} perturbations: raise --cells"
            )
        weights = rng.lognormal(0.0, 0.5, n_conditions - 1)
        sizes = MIN_CELLS_PER_CONDITION + rng.multinomial(n_free, weights / weights.sum())
        codes.append(np.repeat(np.arange(n_conditions), np.concatenate([[n_ctrl], sizes])))
        types.append(np.full(n, cell_type))
    order = rng.permutation(n_cells)
    return np.concatenate(codes)[order], np.concatenate(types)[order]


def _simulate_counts_chunk(rng, base, loadings, program_shift, effect, cond, phase, n_programs):
    """Log-normalised expression of one chunk of cells, as CSR float32."""
    n = len(cond)
    efficiency = rng.beta(6.0, 2.0, n).astype(np.float32)  # knock-down works partly in some cells
    activity = rng.normal(0.0, 0.5, (n, n_programs)).astype(np.float32)  # cell-to-cell noise
    activity[:, 0] += rng.normal(0.0, 0.6, n).astype(np.float32)  # stress varies a lot
    activity[:, 1:3] *= 0.5  # the phase, not noise, drives the cell-cycle programs
    activity[:, 1] += np.where(phase == 1, 2.0, 0.0).astype(np.float32)  # S phase
    activity[:, 2] += np.where(phase == 2, 2.0, 0.0).astype(np.float32)  # G2/M phase
    activity += efficiency[:, None] * program_shift[cond]
    logits = base + activity @ loadings + efficiency[:, None] * effect[cond]
    logits -= logits.max(axis=1, keepdims=True)
    proportions = np.exp(logits)
    proportions /= proportions.sum(axis=1, keepdims=True)
    library = rng.lognormal(np.log(2.0 * base.shape[-1]), 0.35, n)
    counts = rng.poisson(proportions * library[:, None])
    rows, cols = np.nonzero(counts)  # row-major order: already CSR order
    values = counts[rows, cols].astype(np.float32)
    totals = np.maximum(counts.sum(axis=1), 1).astype(np.float32)
    values = np.log1p(values * (TARGET_SUM / totals)[rows]).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return sp.csr_matrix((values, cols.astype(np.int32), indptr), shape=counts.shape)


def simulate_screen(
    *,
    n_cells: int = 4000,
    n_genes: int = 1000,
    n_singles: int = 40,
    n_doubles: int = 30,
    n_cell_types: int = 1,
    control_fraction: float = 0.15,
    seed: int = 0,
) -> AnnData:
    """A simulated CRISPR screen in full GEARS layout (DE fields included); same seed, same data."""
    markers = [g for group in marker_genes() for g in group]
    if n_genes < len(markers) + n_singles:
        raise ReginaError(
            f"--genes must be at least {len(markers) + n_singles} "
            f"({len(markers)} marker genes plus one target per single perturbation)"
        )
    if n_singles < 2 or n_cell_types < 1 or not 0 < control_fraction < 1:
        raise ReginaError("the demo needs at least 2 singles, 1 cell type and a control fraction in (0, 1)")
    rng = np.random.default_rng(seed)
    genes = _gene_names(n_genes, markers, rng)
    n_programs = 3 + max(8, n_genes // 40)
    loadings = _programs(genes, n_programs, rng)
    base = rng.normal(0.0, 1.3, n_genes).astype(np.float32)
    conditions, program_shift, effect, interactions = _design(
        genes, markers, base, n_programs, n_singles, n_doubles, rng
    )
    cond, cell_type = _allocate_cells(n_cells, len(conditions), n_cell_types, control_fraction, rng)
    phase = rng.choice(len(PHASES), size=n_cells, p=[0.5, 0.3, 0.2])
    base_by_type = base + rng.normal(0.0, 0.3, (n_cell_types, n_genes)).astype(np.float32)

    chunks = []
    for start in range(0, n_cells, _CHUNK):
        rows = slice(start, start + _CHUNK)
        chunks.append(
            _simulate_counts_chunk(
                rng, base_by_type[cell_type[rows]], loadings, program_shift, effect,
                cond[rows], phase[rows], n_programs,
            )
        )
    type_names = ["simulated"] if n_cell_types == 1 else [f"simulated_{i + 1}" for i in range(n_cell_types)]
    obs = pd.DataFrame(
        {
            keys.OBS_CONDITION: conditions[cond],
            keys.OBS_CELL_TYPE: np.array(type_names)[cell_type],
            PHASE_COLUMN: np.array(PHASES)[phase],  # ground truth for `regina label`
        },
        index=[f"cell{i:06d}" for i in range(n_cells)],
    )
    var = pd.DataFrame({keys.VAR_GENE_NAME: genes}, index=pd.Index(genes))
    adata = AnnData(X=sp.vstack(chunks, format="csr"), obs=obs, var=var)
    add_gears_de(adata)
    adata.uns[keys.UNS_REGINA] = {
        "source": "demo",
        "regina_version": __version__,
        "normalisation": f"simulated counts, normalize_total(target_sum={TARGET_SUM:g}) + log1p",
        "simulation": {
            "seed": seed,
            "n_cells": n_cells,
            "n_genes": n_genes,
            "n_singles": n_singles,
            "n_doubles": n_doubles,
            "n_cell_types": n_cell_types,
            "control_fraction": control_fraction,
            "interactions": interactions,
        },
    }
    return adata
