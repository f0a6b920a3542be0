"""`regina fetch demo`: a seeded simulated Perturb-seq screen in GEARS layout, no network needed.

Why a simulation and not a bundled real file: the demo must be small, free to redistribute, and
have known structure, so that the whole pipeline can be run and sanity-checked in a minute on a
laptop. The generative model follows the usual picture of a CRISPR screen:

* cells draw UMI counts (Poisson) from gene proportions set by a baseline, a few dozen gene
  programs (co-regulated gene modules) whose activities vary from cell to cell, a cell-cycle
  phase (S and G2/M programs over the standard marker genes) and a stress program over
  HSP*/DNAJ*/ATF*/ERN*/EIF2*/CEBP* genes;
* a single perturbation knocks its target down (one modality, CRISPRi-style, as in a real
  screen) with a per-cell efficiency and lowers the programs the target itself belongs to, in
  proportion to the size of its loadings on them and the strength of the knock-down, plus a
  smaller idiosyncratic push on 1-3 random programs. Real screens look like this: knocking down
  members of one complex or pathway gives similar profiles (same programs, same sign), other
  targets give different ones, so conditions differ from each other (with one shared random
  shift they would not), and prior knowledge about a gene says something, but not everything,
  about its effect. Some perturbations also raise stress, which is what `regina label --method
  stress` picks up;
* a double perturbation adds the two singles' effects, and for some pairs the programs respond
  non-additively (synergy, buffering, or a new program switched on);
* counts are normalised to 10,000 per cell and log1p-transformed, stored as CSR float32.

Beside the screen, `regina fetch demo` writes `gene_knowledge.tsv`, a GO-like annotation whose
terms are the true programs (each membership annotated with probability 0.8, plus a few wrong
terms), so that knowledge-based prompts can be tested honestly; `--drop-targets FRAC` leaves
that fraction of the targets out of the measured genes (their conditions stay), as small gene
panels do in real screens.

Everything is vectorised and generated in fixed-size chunks of cells (bounded memory, and the
output is identical for a given seed). The default (4,000 x 1,000) takes about two seconds;
Norman's shape (91k cells x 5,045 genes, 105 singles, 131 doubles) took 88 CPU-seconds on one
core (66 s simulation, mostly Poisson draws; 22 s GEARS DE) and 5 GB of memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from regina_cli import __version__, keys
from regina_cli.checks import check_seed, is_number, is_whole
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


def _check_memory(n_cells: int, n_genes: int) -> None:
    """Refuse, with what it would need, a simulation that cannot fit in memory: the counts are
    mostly non-zero, and the sparse matrix is built from its chunks (a second copy)."""
    import torch

    from regina_cli.data.memory import free_memory_bytes

    need = 2 * SIMULATED_BYTES_PER_VALUE * n_cells * n_genes
    free = free_memory_bytes(torch.device("cpu"))
    if need > free / 2:
        raise ReginaError(f"simulating {n_cells:,} cells x {n_genes:,} genes needs about {need / 2**30:,.1f} GiB, "
                          f"more than half of the {free / 2**30:.1f} GiB free; lower --cells or --genes")


def marker_genes() -> tuple[list[str], list[str], list[str]]:
    """(stress, S-phase, G2/M) genes; the cell-cycle lists are the ones `regina label` ships."""
    from regina_cli.data.label import cell_cycle_genes

    s_phase, g2m_phase = cell_cycle_genes()
    return STRESS_GENES, s_phase, g2m_phase


PHASES = ("G1", "S", "G2M")  # same class names as `regina label --method cell-cycle`
PHASE_COLUMN = "simulated_phase"
MIN_CELLS_PER_CONDITION = 3  # per cell type; scanpy's t-test needs at least two
_CHUNK = 4096  # cells generated at once: bounds memory, and fixes the random stream
SIMULATED_BYTES_PER_VALUE = 8  # CSR: a float32 value and an int32 column index per stored count
TARGET_GAIN = 1.0  # norm of a target's program shift per unit of knock-down strength
IDIOSYNCRATIC_SCALE = 0.4  # the part of an effect that the target's programs do not explain
ANNOTATION_KEPT = 0.8  # synthetic annotation: chance that a true program membership is annotated
FALSE_TERMS_PER_GENE = 0.15  # synthetic annotation: mean number of wrong terms per gene


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
    """A random push on 1-3 generic programs, random signs (idiosyncratic or neomorphic effects)."""
    shift = np.zeros(n_programs, dtype=np.float32)
    hit = rng.choice(np.arange(3, n_programs), size=rng.integers(1, 4), replace=False)
    shift[hit] = rng.normal(0.0, scale, len(hit)) + np.sign(rng.normal(size=len(hit))) * scale
    return shift


def _pick_targets(genes, markers, base, loadings, n_singles: int, rng) -> np.ndarray:
    """Targets among the better-expressed half of the non-marker genes (screens target expressed
    genes: a knock-down of a silent gene shows nothing); each belongs to a generic program, so
    its effect follows what it does. A picked gene in no program joins one (small panels). A
    target is a positive member of its programs (their activity raises it), so a knock-down that
    lowers them lowers the target further instead of cancelling its own knock-down."""
    generic = ~np.isin(genes, markers)
    candidates = np.flatnonzero(generic & (base >= np.median(base[generic])))
    if len(candidates) < n_singles:
        raise ReginaError(f"--genes is too small for {n_singles} single perturbations: raise --genes")
    targets = rng.choice(candidates, size=n_singles, replace=False)
    lonely = targets[~loadings[3:, targets].any(axis=0)]
    rows = rng.integers(3, loadings.shape[0], len(lonely))
    loadings[rows, lonely] = rng.uniform(0.4, 1.0, len(lonely))
    loadings[3:, targets] = np.abs(loadings[3:, targets])
    return targets


@dataclass
class Design:
    """The simulated screen's hidden structure: programs, conditions and their true effects."""

    genes: np.ndarray
    base: np.ndarray  # baseline log-rate per gene
    loadings: np.ndarray  # [programs, genes]: stress, S, G2/M, then generic programs
    targets: np.ndarray  # gene index of each single perturbation's target
    conditions: np.ndarray
    program_shift: np.ndarray  # [conditions, programs]
    effect: np.ndarray  # [conditions, genes]: direct knock-down of the targets
    interactions: dict


def design_screen(rng: np.random.Generator, *, n_genes: int, n_singles: int, n_doubles: int) -> Design:
    """Genes, programs and conditions with their effects; no cell is simulated (cheap)."""
    markers = [g for group in marker_genes() for g in group]
    genes = _gene_names(n_genes, markers, rng)
    n_programs = 3 + max(8, n_genes // 40)
    loadings = _programs(genes, n_programs, rng)
    base = rng.normal(0.0, 1.3, n_genes).astype(np.float32)
    targets = _pick_targets(genes, markers, base, loadings, n_singles, rng)
    strength = -rng.uniform(1.2, 2.5, n_singles).astype(np.float32)  # knock-downs
    member = loadings[3:, targets].T  # the targets' own program memberships (>= 0)
    single_shift = np.zeros((n_singles, n_programs), dtype=np.float32)
    single_shift[:, 3:] = TARGET_GAIN * strength[:, None] * member / np.linalg.norm(member, axis=1, keepdims=True)
    single_shift += np.stack([_sparse_shift(n_programs, rng, IDIOSYNCRATIC_SCALE) for _ in range(n_singles)])
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
    return Design(genes, base, loadings, targets, np.array(conditions), np.stack(shifts), effect, interactions)


def program_terms(n_programs: int) -> list[str]:
    """GO-like term names of the programs (the synthetic annotation's vocabulary)."""
    return ["SIM:stress", "SIM:S_phase", "SIM:G2M_phase"] + [f"SIM:program_{p:03d}" for p in range(3, n_programs)]


def gene_annotation(design: Design, seed: int) -> str:
    """Synthetic GO-like annotation as gene<TAB>term text: each true program membership kept with
    probability ANNOTATION_KEPT, plus a few false terms (Poisson, FALSE_TERMS_PER_GENE a gene).

    Its own random stream, so the annotation never changes the simulated cells.
    """
    rng = np.random.default_rng([seed, 1])
    terms = np.array(program_terms(design.loadings.shape[0]))
    member = design.loadings != 0
    annotated = member & (rng.random(member.shape) < ANNOTATION_KEPT)
    wrong = rng.poisson(FALSE_TERMS_PER_GENE, member.shape[1])
    for gene in np.flatnonzero(wrong):
        others = np.flatnonzero(~member[:, gene])
        annotated[rng.choice(others, size=min(wrong[gene], len(others)), replace=False), gene] = True
    programs, genes = np.nonzero(annotated)
    pairs = sorted(zip(design.genes[genes], terms[programs]))
    return "gene\tterm\n" + "".join(f"{g}\t{t}\n" for g, t in pairs)


def _allocate_cells(n_cells: int, n_conditions: int, n_cell_types: int, control_fraction: float, rng):
    """(condition code, cell type code) per cell: every cell type gets controls and every condition."""
    per_type = np.full(n_cell_types, n_cells // n_cell_types)
    per_type[: n_cells % n_cell_types] += 1
    codes, types = [], []
    for cell_type, n in enumerate(per_type):
        n_ctrl = max(MIN_CELLS_PER_CONDITION, int(round(n * control_fraction)))
        n_free = n - n_ctrl - MIN_CELLS_PER_CONDITION * (n_conditions - 1)
        if n_free < 0:
            each = f" in each of {n_cell_types} cell types ({n} cells each)" if n_cell_types > 1 else ""
            fix = "raise --cells or lower --cell-types" if n_cell_types > 1 else "raise --cells"
            raise ReginaError(
                f"{n_cells} cells are too few for {n_conditions - 1} perturbations{each}: every condition needs "
                f"{MIN_CELLS_PER_CONDITION} cells or more{' per cell type' if n_cell_types > 1 else ''}; {fix}"
            )
        weights = rng.lognormal(0.0, 0.5, n_conditions - 1)
        sizes = MIN_CELLS_PER_CONDITION + rng.multinomial(n_free, weights / weights.sum())
        codes.append(np.repeat(np.arange(n_conditions), np.concatenate([[n_ctrl], sizes])))
        types.append(np.full(n, cell_type))
    order = rng.permutation(n_cells)
    return np.concatenate(codes)[order], np.concatenate(types)[order]


def _simulate_counts_chunk(rng, base, design: Design, cond, phase, measured):
    """Log-normalised expression of one chunk of cells over the measured genes, as CSR float32."""
    n, n_programs = len(cond), design.loadings.shape[0]
    efficiency = rng.beta(6.0, 2.0, n).astype(np.float32)  # knock-down works partly in some cells
    activity = rng.normal(0.0, 0.5, (n, n_programs)).astype(np.float32)  # cell-to-cell noise
    activity[:, 0] += rng.normal(0.0, 0.6, n).astype(np.float32)  # stress varies a lot
    activity[:, 1:3] *= 0.5  # the phase, not noise, drives the cell-cycle programs
    activity[:, 1] += np.where(phase == 1, 2.0, 0.0).astype(np.float32)  # S phase
    activity[:, 2] += np.where(phase == 2, 2.0, 0.0).astype(np.float32)  # G2/M phase
    activity += efficiency[:, None] * design.program_shift[cond]
    logits = base + activity @ design.loadings + efficiency[:, None] * design.effect[cond]
    logits -= logits.max(axis=1, keepdims=True)
    proportions = np.exp(logits)
    proportions /= proportions.sum(axis=1, keepdims=True)
    library = rng.lognormal(np.log(2.0 * base.shape[-1]), 0.35, n)
    counts = rng.poisson(proportions * library[:, None])[:, measured]  # a panel without some genes
    rows, cols = np.nonzero(counts)  # row-major order: already CSR order
    values = counts[rows, cols].astype(np.float32)
    totals = np.maximum(counts.sum(axis=1), 1).astype(np.float32)
    values = np.log1p(values * (TARGET_SUM / totals)[rows]).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return sp.csr_matrix((values, cols.astype(np.int32), indptr), shape=counts.shape)


def _dropped_targets(design: Design, drop_targets: float, seed: int) -> np.ndarray:
    """Gene indices of the targets left unmeasured: round(FRAC x targets), at least one if FRAC > 0."""
    if not 0.0 <= drop_targets <= 1.0:
        raise ReginaError(f"--drop-targets is a fraction of the targets, between 0 and 1; got {drop_targets}")
    n_drop = max(int(round(drop_targets * len(design.targets))), int(drop_targets > 0))
    return np.sort(np.random.default_rng([seed, 2]).choice(design.targets, size=n_drop, replace=False))


# simulate_demo's options and the `regina fetch demo` option of each (control_fraction has none)
DEMO_OPTIONS = {"n_cells": "--cells", "n_genes": "--genes", "n_singles": "--singles", "n_doubles": "--doubles",
                "n_cell_types": "--cell-types", "control_fraction": "control_fraction",
                "drop_targets": "--drop-targets", "seed": "--seed"}
FRACTIONS = ("control_fraction", "drop_targets")


def check_demo_options(options: dict) -> None:
    """The demo's options, before anything is simulated: known names, whole counts, numbers for
    the fractions, a seed numpy takes (from Python they come as given, `n_cells="300"` say)."""
    unknown = sorted(set(options) - set(DEMO_OPTIONS))
    if unknown:
        raise ReginaError(f"unknown option(s) {', '.join(unknown)}; the demo takes {', '.join(DEMO_OPTIONS)}")
    for key, value in options.items():
        if key == "seed":
            check_seed(value)
        elif key in FRACTIONS and not is_number(value):
            raise ReginaError(f"{DEMO_OPTIONS[key]} takes a number, not {value!r}")
        elif key not in FRACTIONS and (not is_whole(value) or value < 0):
            raise ReginaError(f"{DEMO_OPTIONS[key]} takes a whole number of at least 0, not {value!r}")


def simulate_demo(
    *,
    n_cells: int = 4000,
    n_genes: int = 1000,
    n_singles: int = 40,
    n_doubles: int = 30,
    n_cell_types: int = 1,
    control_fraction: float = 0.15,
    drop_targets: float = 0.0,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[AnnData, str]:
    """(the simulated screen in full GEARS layout, its gene annotation as TSV text); same seed,
    same data. `drop_targets` leaves that fraction of the targets out of the measured genes.
    `log` hears when the options are checked and the cells are being simulated."""
    if n_singles < 2:
        raise ReginaError(f"--singles must be at least 2 (the demo's combinations pair them), not {n_singles}")
    if n_cell_types < 1:
        raise ReginaError(f"--cell-types must be at least 1, not {n_cell_types}")
    if not 0 < control_fraction < 1:
        raise ReginaError(f"the control fraction must lie strictly between 0 and 1, not {control_fraction}")
    markers = [g for group in marker_genes() for g in group]
    if n_genes < len(markers) + n_singles:
        raise ReginaError(
            f"--genes must be at least {len(markers) + n_singles} "
            f"({len(markers)} marker genes plus one target per single perturbation)"
        )
    _check_memory(n_cells, n_genes)
    rng = np.random.default_rng(seed)
    design = design_screen(rng, n_genes=n_genes, n_singles=n_singles, n_doubles=n_doubles)
    dropped = _dropped_targets(design, drop_targets, seed)
    measured = ~np.isin(np.arange(n_genes), dropped)
    cond, cell_type = _allocate_cells(n_cells, len(design.conditions), n_cell_types, control_fraction, rng)
    log("simulating the demo screen")
    phase = rng.choice(len(PHASES), size=n_cells, p=[0.5, 0.3, 0.2])
    base_by_type = design.base + rng.normal(0.0, 0.3, (n_cell_types, n_genes)).astype(np.float32)

    chunks = []
    for start in range(0, n_cells, _CHUNK):
        rows = slice(start, start + _CHUNK)
        chunks.append(
            _simulate_counts_chunk(rng, base_by_type[cell_type[rows]], design, cond[rows], phase[rows], measured)
        )
    type_names = ["simulated"] if n_cell_types == 1 else [f"simulated_{i + 1}" for i in range(n_cell_types)]
    obs = pd.DataFrame(
        {
            keys.OBS_CONDITION: design.conditions[cond],
            keys.OBS_CELL_TYPE: np.array(type_names)[cell_type],
            PHASE_COLUMN: np.array(PHASES)[phase],  # ground truth for `regina label`
        },
        index=[f"cell{i:06d}" for i in range(n_cells)],
    )
    genes = design.genes[measured]
    var = pd.DataFrame({keys.VAR_GENE_NAME: genes}, index=pd.Index(genes))
    adata = AnnData(X=sp.vstack(chunks, format="csr"), obs=obs, var=var)
    add_gears_de(adata)
    annotation = gene_annotation(design, seed)
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
            "interactions": design.interactions,
            "drop_targets": drop_targets,
            "dropped_targets": np.array(sorted(design.genes[dropped]), dtype=str),
            "gene_knowledge": {
                "file": keys.GENE_KNOWLEDGE_FILE,
                "sha256": hashlib.sha256(annotation.encode()).hexdigest(),
                "true_term_kept": ANNOTATION_KEPT,
                "false_terms_per_gene": FALSE_TERMS_PER_GENE,
            },
        },
    }
    return adata, annotation


def simulate_screen(**kwargs) -> AnnData:
    """The simulated screen alone (see `simulate_demo` for the arguments)."""
    return simulate_demo(**kwargs)[0]
