"""`regina fetch NAME --from PATH`: bring a real-world screen into the GEARS layout.

Real files label the same things many ways (`ctrl`, `control`, `non-targeting`; `A`, `A+ctrl`,
`ctrl+A`, `A+B`, `A_B`), keep their perturbation in differently named columns, and ship raw
counts or log-normalised values. The importer settles all of that once, so every later step can
assume GEARS labels, log-normalised CSR float32 and the GEARS DE fields. A file that already is in
GEARS layout (a `perturb_processed.h5ad` from GEARS) keeps its labels and DE fields verbatim, so
numbers stay comparable with the literature.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from regina_cli import __version__, keys
from regina_cli.checks import is_whole
from regina_cli.data.conditions import (CONTROL_LABELS, canonical_condition, condition_genes, control_labels,
                                       parse_condition)
from regina_cli.data.dataset import GEARS_OBS, GEARS_UNS
from regina_cli.data.sources import extract_zip, file_kind, locate_h5ad, read_h5ad
from regina_cli.errors import WARNING_PREFIX, ReginaError

CELL_TYPE_FALLBACK_NOTE = "no cell-type column: every cell gets the cell type {!r}"
TARGET_SUM = 1e4
MIN_CELLS = 2  # scanpy's t-test needs two cells per group

Log = Callable[[str], None]


@dataclass
class ImportOptions:
    """How to read the user's labels (each None means: detect)."""

    control: tuple[str, ...] = ()  # given as one label, a list of them, or None (none)
    condition_key: str | None = None
    separator: str | None = None
    cell_type_key: str | None = None
    n_top_genes: int | None = None  # keep the N most variable genes (plus every measured target)
    gene_list: str | None = None  # or the genes listed in this file (plus every measured target)

    def __post_init__(self) -> None:
        """`control="SCR"` is one label (not S, C, R), a `gene_list` Path is kept as text; the values
        are checked here, before the file is read, as a Python caller may pass anything."""
        if self.gene_list is not None:
            self.gene_list = str(self.gene_list)
        control = self.control or ()
        self.control = tuple(control) if isinstance(control, Iterable) and not isinstance(control, str) else (control,)
        if not all(isinstance(label, str) for label in self.control):
            raise ReginaError(f"--control takes labels (text), not {list(self.control)!r}")
        if self.n_top_genes is not None and (not is_whole(self.n_top_genes) or self.n_top_genes < 1):
            raise ReginaError(f"--n-top-genes must be at least 1 (a whole number), got {self.n_top_genes!r}")


@dataclass
class ImportNotes:
    """What the importer changed, for the summary and for uns['regina']."""

    normalisation: str = "none (already log-normalised)"
    relabelled: int = 0
    dropped_cells: int = 0
    targets: int = 0
    unmeasured_targets: list[str] = field(default_factory=list)
    gene_filter: str = "none"
    kept_gears_fields: bool = False
    messages: list[str] = field(default_factory=list)

    def say(self, message: str, log: Log) -> None:
        """Keep `message` for uns['regina'] and show it now."""
        self.messages.append(message)
        log(message)


# --- Checks on the matrix and names ---------------------------------------------------------------


def check_names(adata) -> None:
    duplicated = adata.obs_names[adata.obs_names.duplicated()]
    if len(duplicated):
        raise ReginaError(
            f"{len(duplicated)} duplicate cell names (e.g. {duplicated[0]!r}): make obs_names unique first"
        )


# var columns that hold gene symbols in common files (scanpy, 10x, CELLxGENE, monocle), in the order preferred
SYMBOL_COLUMNS = (keys.VAR_GENE_NAME, "gene_symbols", "gene_symbol", "symbol", "symbols", "feature_name",
                  "gene_short_name")
MISSING_TEXT = ("", "nan", "NaN", "None")  # what a missing value reads as once a column is turned into text


def _missing(values: pd.Series) -> pd.Series:
    return values.isna() | values.astype(str).str.strip().isin(MISSING_TEXT)


VAR_ORIGINAL_ID = "gene_id"  # var column keeping the file's var_names when symbols replace them


def gene_names(adata, notes: ImportNotes, log: Log, targets: set[str] = frozenset()) -> pd.Index:
    """Gene symbols: var['gene_name'] if present, else var_names, unless one of the symbol columns
    (`SYMBOL_COLUMNS`) names more perturbation targets (Ensembl var_names with symbols beside
    them must not turn every target into an unmeasured one); a gene without a symbol keeps its
    var_name; made unique if needed."""
    index = pd.Series(np.asarray(adata.var_names).astype(str))
    candidates = [(f"var['{c}']", pd.Series(np.asarray(adata.var[c], dtype=object)))
                  for c in SYMBOL_COLUMNS if c in adata.var] + [("var_names", index)]
    found = [len(targets & set(values.astype(str))) for _, values in candidates]
    usual = 0 if keys.VAR_GENE_NAME in adata.var else len(candidates) - 1  # var['gene_name'], else var_names
    best = int(np.argmax(found))
    best = best if found[best] > found[usual] else usual  # another naming only when it names more targets
    source, values = candidates[best]
    if best != usual:  # not the naming a GEARS file uses: say so
        notes.say(f"gene names from {source}: it names {found[best]} of {len(targets)} targets, "
                  + ", ".join(f"{s} {n}" for (s, _), n in zip(candidates, found) if s != source), log)
    missing = _missing(values)
    if missing.any():
        notes.say(f"{int(missing.sum())} genes have no symbol in {source}: named by their var_names "
                  f"(e.g. {index[missing].iloc[0]!r})", log)
    names = pd.Index(values.astype(str).where(~missing, index).to_numpy())
    if names.duplicated().any():
        from anndata.utils import make_index_unique

        notes.say(
            f"{int(names.duplicated().sum())} duplicate gene symbols made unique (e.g. "
            f"{names[names.duplicated()][0]!r} -> {names[names.duplicated()][0]}-1)", log)
        names = make_index_unique(names)
    return names


def rekey_de_genes(uns: dict, old_index: pd.Index, genes: pd.Index) -> None:
    """GEARS names DE genes by var_names (Ensembl IDs in its own files); name them by symbol."""
    symbol_of = pd.Series(genes.to_numpy(), index=old_index.astype(str))
    for key in (keys.UNS_RANK_GENES, keys.UNS_TOP_DE_20, keys.UNS_TOP_NON_ZERO_DE_20):
        for group, listed in uns[key].items():
            renamed = symbol_of.reindex(np.asarray(listed).astype(str))
            if renamed.isna().any():
                raise ReginaError(f"uns['{key}'][{group!r}] names genes that are not in var: the file is damaged")
            uns[key][group] = renamed.to_numpy().astype(str)


def as_csr_float32(X) -> sp.csr_matrix:
    if sp.issparse(X):
        X = X.tocsr()
        if X.dtype == np.float16:  # scipy's sparse formats hold no float16: widen the values alone
            X = sp.csr_matrix((X.data.astype(np.float32), X.indices, X.indptr), shape=X.shape)
    else:
        X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    X = X.astype(np.float32, copy=False)
    if not np.isfinite(X.data).all():
        raise ReginaError("the expression matrix contains NaN or infinite values: clean X before importing")
    if (X.data < 0).any():
        raise ReginaError(
            "the expression matrix has negative values (scaled or centred data?): import raw counts or "
            "log-normalised expression"
        )
    return X


def looks_like_counts(values: np.ndarray) -> bool:
    """Whole numbers, some of them 1 or more: counts (log1p values are almost never whole numbers)."""
    return values.size > 0 and float(values.max()) >= 1 and bool(np.array_equal(values, np.round(values)))


LOG_COUNT_SAMPLE = 200_000  # stored values checked for log1p of whole numbers
# Units in the last place allowed: log1p's own rounding is 0.5-0.63 of one; float32 leaves room for
# another tool's conversions, float16's units are so coarse that more would take in normalised values.
LOG_COUNT_ULPS = {np.dtype(np.float16): 1, np.dtype(np.float32): 4}


def is_log1p_counts(X: sp.csr_matrix, stored: np.dtype) -> bool:
    """log1p of raw counts, never normalised for depth: every value is log1p of a whole number to
    within `LOG_COUNT_ULPS` units in the last place of the file's dtype `stored` (its rounding alone
    moves expm1 off whole numbers by 0.04 at 40 in float16, 0.005 at 1e4 in float32; log1p of
    depth-normalised values lands that close only by chance), some of them above 1."""
    data = X.data
    if data.size == 0 or float(data.max()) > LOG_MAX:
        return False
    step = max(1, data.size // LOG_COUNT_SAMPLE)
    values = data[::step].astype(np.float64)
    whole = np.round(np.expm1(values))
    precision = np.dtype(np.float16 if stored == np.float16 else np.float32)  # X is float32 whatever the file held
    allowed = LOG_COUNT_ULPS[precision] * np.spacing(values.astype(precision)).astype(np.float64)
    return bool(np.all(np.abs(np.log1p(whole) - values) <= allowed)) and float(whole.max()) > 1


def counts_from_log1p(adata) -> str:
    """Recover the counts of log1p(counts), so they can be normalised as raw counts are."""
    adata.X.data = np.round(np.expm1(adata.X.data.astype(np.float64))).astype(np.float32)
    sums = np.asarray(adata.X.sum(axis=1)).ravel()
    return (f"log1p of raw counts detected (expm1 gives whole numbers; cells sum to {sums.min():,.0f}-"
            f"{sums.max():,.0f}, never normalised for depth): counts recovered, then ")


LOG_MAX = 20.0  # log1p of counts normalised to 1e4 (GEARS) or 1e6 (log CPM) stays below ~14


def check_log_scale(X: sp.csr_matrix) -> bool:
    """For values that are not counts: True when they are normalised but not log-transformed
    (every cell sums to the same total, values far above what log1p gives), which log1p fixes;
    False for log-scale values. Anything else large is refused: taken for log data, it would
    train and score on the wrong scale without a word."""
    top = float(X.data.max()) if X.data.size else 0.0
    if top <= LOG_MAX:
        return False
    sums = np.asarray(X.sum(axis=1)).ravel()
    if sums.size and np.allclose(sums, sums.mean(), rtol=1e-3):
        return True
    raise ReginaError(f"X is neither raw counts (whole numbers) nor log-normalised (values up to {top:,.1f}, "
                      f"where log1p of normalised counts stays below {LOG_MAX:g}): put the raw counts in X "
                      "(files often keep them in adata.layers or adata.raw), or normalize_total + log1p X first")


def log_transform(adata) -> str:
    """log1p of values already normalised to one total per cell."""
    import scanpy as sc

    total = float(np.asarray(adata.X.sum(axis=1)).ravel().mean())
    sc.pp.log1p(adata)
    adata.X = adata.X.astype(np.float32)
    return f"normalised values without log detected (every cell sums to {total:,.0f}): log1p"


def normalise_counts(adata) -> str:
    """normalize_total(target_sum=1e4) + log1p, as GEARS' datasets were prepared."""
    import scanpy as sc

    sc.pp.normalize_total(adata, target_sum=TARGET_SUM)
    sc.pp.log1p(adata)
    adata.X = adata.X.astype(np.float32)
    return f"normalize_total(target_sum={TARGET_SUM:g}) + log1p"


# --- Labels ---------------------------------------------------------------------------------------


def pick_condition_column(adata, key: str | None) -> str:
    if key is not None:
        if key not in adata.obs:
            raise ReginaError(
                f"obs has no column {key!r} (columns: {', '.join(map(str, adata.obs.columns))}): "
                "fix --condition-key"
            )
        return key
    if keys.OBS_CONDITION in adata.obs:
        return keys.OBS_CONDITION
    raise ReginaError(
        f"obs has no {keys.OBS_CONDITION!r} column (columns: {', '.join(map(str, adata.obs.columns))}): "
        "name the perturbation column with --condition-key"
    )


def label_rules(options: ImportOptions) -> tuple[set[str], str]:
    """(control labels, lower case; the separator of combinations) the options ask for."""
    return control_labels(options.control), options.separator or keys.GENE_SEPARATOR


def normalise_label(label: str, controls: set[str], separator: str) -> str:
    """One raw label -> GEARS spelling: controls -> "ctrl", "A"/"ctrl+A" -> "A+ctrl", "A_B" -> "A+B"."""
    if label.strip().lower() in controls:
        return keys.CTRL
    parts = label.replace(separator, keys.GENE_SEPARATOR).split(keys.GENE_SEPARATOR)
    genes = [p.strip() for p in parts if p.strip() and p.strip().lower() not in controls]
    return canonical_condition(dict.fromkeys(genes))


def normalise_conditions(raw: pd.Series, options: ImportOptions) -> tuple[pd.Series, dict[str, str]]:
    """Map every distinct raw label once (labels repeat over thousands of cells); one spelling per
    target set (`merge_spellings`). Returns the labels and the spellings merged."""
    missing = _missing(raw)
    if missing.any():
        raise ReginaError(
            f"{int(missing.sum())} cells have no perturbation label (missing or empty): drop them or fill the column"
        )
    rules = label_rules(options)
    mapping = {label: normalise_label(label, *rules) for label in pd.unique(raw.astype(str))}
    too_many = [label for label, condition in mapping.items() if len(parse_condition(condition)) > 2]
    if too_many:
        raise ReginaError(
            f"{len(too_many)} labels target more than two genes (e.g. {too_many[0]!r}): the GEARS layout "
            "holds singles and pairs only; drop those cells or check --separator"
        )
    conditions = raw.astype(str).map(mapping)
    merged = merge_spellings(conditions)
    return (conditions.map(lambda c: merged.get(c, c)) if merged else conditions), merged


def merge_spellings(conditions: pd.Series) -> dict[str, str]:
    """{spelling: the one kept} for combinations labelled in both orders (`A+B` and `B+A`): one
    condition, or a split could put one spelling in training and the other in test. The spelling
    of more cells is kept (ties: the first in sort order)."""
    counts = conditions.value_counts()
    by_targets: dict[frozenset, list[str]] = {}
    for condition in sorted(counts.index):
        by_targets.setdefault(frozenset(parse_condition(condition)), []).append(condition)
    merged = {}
    for spellings in by_targets.values():
        kept = max(spellings, key=lambda c: counts[c])  # max keeps the first of equal counts
        merged.update({c: kept for c in spellings if c != kept})
    return merged


def check_controls(obs: pd.DataFrame) -> None:
    condition = obs[keys.OBS_CONDITION].astype(str)
    cell_type = obs[keys.OBS_CELL_TYPE].astype(str)
    control = condition == keys.CTRL
    if not control.any():
        raise ReginaError(
            f"no control cells found (looked for {', '.join(CONTROL_LABELS)}): name your control label "
            "with --control"
        )
    lacking = sorted(set(cell_type[~control]) - set(cell_type[control]))
    if lacking:
        raise ReginaError(
            f"cell type(s) {', '.join(lacking)} have no control cells: controls are matched by cell type"
        )


def drop_tiny_groups(adata, notes: ImportNotes, log: Log):
    """Drop (cell type, condition) groups with fewer than two cells: no DE test is possible. A
    cell type with perturbed cells and one control cell is refused: it would lose its controls."""
    groups = adata.obs[keys.OBS_CELL_TYPE].astype(str) + "\t" + adata.obs[keys.OBS_CONDITION].astype(str)
    sizes = groups.map(groups.value_counts())
    tiny = (sizes < MIN_CELLS).to_numpy()
    if tiny.any():
        condition = adata.obs[keys.OBS_CONDITION].astype(str).to_numpy()
        cell_type = adata.obs[keys.OBS_CELL_TYPE].astype(str).to_numpy()
        control = condition == keys.CTRL
        short = sorted(set(cell_type[tiny & control]) & set(cell_type[~tiny & ~control]))
        if short:
            raise ReginaError(f"cell type {short[0]!r} has 1 control cell: controls are matched by cell type, and "
                              f"each cell type with perturbed cells needs at least {MIN_CELLS}")
        notes.dropped_cells += int(tiny.sum())
        names = sorted(set(condition[tiny]))
        notes.say(
            f"dropped {int(tiny.sum())} cells whose condition has fewer than {MIN_CELLS} cells in their cell "
            f"type: {', '.join(names[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''}", log)
        adata = adata[~tiny].copy()
    return adata


def _listed_genes(path: str) -> list[str]:
    """One gene per line; blank lines and `#` comments ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReginaError(f"cannot read the gene list {path} ({exc.__class__.__name__}): give a text file, one gene per line") from None
    genes = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not genes:
        raise ReginaError(f"the gene list {path} names no gene: give one gene per line")
    return genes


def _picked_genes(adata, options: ImportOptions, notes: ImportNotes, log: Log) -> tuple[np.ndarray, str]:
    """Mask of the genes the filter picks, and its description."""
    if options.gene_list is not None:
        listed = _listed_genes(options.gene_list)
        absent = [g for g in listed if g not in adata.var_names]
        if absent:
            notes.say(f"{len(absent)} of {len(listed)} listed genes are not measured (e.g. {absent[0]})", log)
        return adata.var_names.isin(listed), f"gene list {options.gene_list}"
    if options.n_top_genes >= adata.n_vars:
        return np.ones(adata.n_vars, dtype=bool), f"n_top_genes={options.n_top_genes}: every gene"
    import scanpy as sc

    hvg = sc.pp.highly_variable_genes(adata, n_top_genes=options.n_top_genes, flavor="seurat", inplace=False)
    return hvg["highly_variable"].to_numpy(), f"highly variable, seurat flavour, n_top_genes={options.n_top_genes}"


def select_genes(adata, options: ImportOptions, targets: set[str], notes: ImportNotes, log: Log):
    """Apply --n-top-genes / --gene-list, keeping every measured target the filter would drop:
    a perturbed gene's own expression is the first readout of its perturbation."""
    if options.n_top_genes is None and options.gene_list is None:
        return adata
    if options.n_top_genes is not None and options.gene_list is not None:
        raise ReginaError("give --n-top-genes or --gene-list, not both")
    picked, description = _picked_genes(adata, options, notes, log)
    rescued = adata.var_names.isin(list(targets)) & ~picked
    notes.gene_filter = f"{description} + {int(rescued.sum())} measured targets"
    notes.say(
        f"kept {int(picked.sum())} of {adata.n_vars} genes ({description}) plus {int(rescued.sum())} "
        "targeted genes the filter would drop", log)
    return adata[:, picked | rescued].copy()


SEPARATOR_LOOKALIKES = ("|", ";", ",")  # no gene symbol holds these; a label that does is a combination


def report_targets(targets: set[str], measured: pd.Index, notes: ImportNotes, log: Log,
                   separator_given: bool = False) -> None:
    """`k of n targets measured`, naming the unmeasured ones (all of them go to uns['regina'])."""
    notes.targets = len(targets)
    notes.unmeasured_targets = sorted(g for g in targets if g not in measured)
    if not targets:
        return
    message = f"{len(targets) - len(notes.unmeasured_targets)} of {len(targets)} targets measured"
    if notes.unmeasured_targets:
        shown = notes.unmeasured_targets[:12]
        more = len(notes.unmeasured_targets) - len(shown)
        message += (f"; not measured: {', '.join(shown)}{f' and {more} more' if more else ''} "
                    "(kept: their perturbations still act on the measured genes)")
        joined = next((g for g in notes.unmeasured_targets if any(c in g for c in SEPARATOR_LOOKALIKES)), None)
        if joined and not separator_given:
            mark = next(c for c in SEPARATOR_LOOKALIKES if c in joined)
            message += f"; {joined!r} looks like a combination: pass --separator '{mark}'"
    notes.say(message, log)


def free_column(obs: pd.DataFrame, name: str) -> str:
    """`name`, else the first of `name_2`, `name_3`, ... that obs lacks: a column the importer keeps
    beside the labels never overwrites one of the file's own."""
    return next(c for c in itertools.chain([name], (f"{name}_{i}" for i in itertools.count(2))) if c not in obs)


def keep_own_column(adata, key: str, column: str, what: str, notes: ImportNotes, log: Log) -> None:
    """The file's own obs[`key`], where `what` comes from another column `column`: kept beside as
    `<key>_input` (`free_column`), not overwritten without a word."""
    if column == key or key not in adata.obs:
        return
    kept = free_column(adata.obs, f"{key}_input")
    adata.obs[kept] = adata.obs[key].to_numpy()
    notes.say(f"the file's obs['{key}'] is kept as obs['{kept}']: obs['{key}'] now holds {what} of "
              f"obs['{column}']", log)


def relabel(adata, name: str, options: ImportOptions, notes: ImportNotes, log: Log) -> None:
    """obs `condition` and `cell_type` in GEARS spelling (the original column is kept beside)."""
    column = pick_condition_column(adata, options.condition_key)
    raw = adata.obs[column]
    present = {str(v).lower() for v in pd.unique(raw.astype(str))}
    for label in options.control:
        if label.lower() not in present:  # a typo: the default labels may still have found the controls
            notes.say(f"{WARNING_PREFIX}--control {label!r} matches no cell's obs['{column}']", log)
    condition, merged = normalise_conditions(raw, options)
    if merged:
        notes.say("one condition per pair of targets: " + ", ".join(
            f"{a!r} counted as {b!r}" for a, b in sorted(merged.items())[:5]), log)
    notes.relabelled = int((condition != raw.astype(str)).sum())
    if notes.relabelled:
        changed = {a: b for a, b in zip(raw.astype(str), condition) if a != b}
        examples = ", ".join(f"{a!r} -> {b!r}" for a, b in list(changed.items())[:3])
        notes.say(f"relabelled {notes.relabelled:,} cells to GEARS spelling ({examples}, ...)", log)
    if options.cell_type_key is not None and options.cell_type_key not in adata.obs:
        raise ReginaError(f"obs has no column {options.cell_type_key!r} (columns: "
                          f"{', '.join(map(str, adata.obs.columns))}): fix --cell-type-key")
    cell_type_key = options.cell_type_key or keys.OBS_CELL_TYPE
    if cell_type_key in adata.obs:
        missing = _missing(adata.obs[cell_type_key])
        if missing.any():
            raise ReginaError(f"{int(missing.sum())} cells have no cell type in obs['{cell_type_key}'] (missing or "
                              "empty): drop them or fill the column")
        cell_type = adata.obs[cell_type_key].astype(str).to_numpy()
        if slashed := sorted({t for t in cell_type if "/" in t}):
            cell_type = _without_slashes(adata, cell_type, cell_type_key, slashed, notes, log)
    else:
        cell_type = name
        notes.say(CELL_TYPE_FALLBACK_NOTE.format(name), log)
    if notes.relabelled and column == keys.OBS_CONDITION:
        adata.obs[free_column(adata.obs, f"{keys.OBS_CONDITION}_original")] = raw.to_numpy()
    keep_own_column(adata, keys.OBS_CONDITION, column, "the perturbations", notes, log)
    keep_own_column(adata, keys.OBS_CELL_TYPE, cell_type_key, "the cell types", notes, log)
    adata.obs[keys.OBS_CONDITION] = condition.to_numpy()
    adata.obs[keys.OBS_CELL_TYPE] = cell_type


def _without_slashes(adata, cell_type: np.ndarray, key: str, slashed: list[str], notes: ImportNotes, log: Log):
    """Cell types with `_` for `/`: the GEARS DE fields are named "<cell type>_<condition>_1+1", and
    HDF5 reads a `/` in a name as a folder, so those fields came back nested and the top-20 DE
    metrics of those cells' conditions were lost. The original names stay in obs."""
    renamed = np.array([t.replace("/", "_") for t in cell_type], dtype=object)
    clash = sorted({t.replace("/", "_") for t in slashed} & (set(cell_type) - set(slashed)))
    if clash:
        raise ReginaError(f"cell type {clash[0]!r} exists, and so does {clash[0]!r} spelled with '/': rename one "
                          "(HDF5 cannot store '/' in the DE fields' names)")
    column = free_column(adata.obs, f"{key}_original")
    adata.obs[column] = cell_type
    shown = ", ".join(f"{t!r} -> {t.replace('/', '_')!r}" for t in slashed[:3])
    notes.say(f"cell types renamed with _ for / ({shown}): HDF5 reads '/' in the DE fields' names as a folder; "
              f"the original names are in obs['{column}']", log)
    return renamed


def check_has_x(adata) -> None:
    """The importer reads X only; layers and raw are named to say where the values may be."""
    if adata.X is None:
        layers = ", ".join(map(str, adata.layers)) or "none"
        raise ReginaError(f"the file has no X (layers: {layers}; raw: {'yes' if adata.raw is not None else 'no'}): "
                          "put the raw counts or log-normalised values in X")


def to_gears_layout(adata, name: str, options: ImportOptions, log: Log):
    """The imported AnnData in GEARS layout (X normalised, labels canonical, DE fields), plus notes."""
    from regina_cli.data.gears_de import add_gears_de

    notes = ImportNotes()
    if adata.n_obs < 2 * MIN_CELLS:  # before the label checks, which would blame the labels
        raise ReginaError(f"the file holds {adata.n_obs} cell(s): a screen needs at least {MIN_CELLS} control cells "
                          f"and {MIN_CELLS} cells of a perturbation; check that --from names the whole screen")
    check_names(adata)
    genes = gene_names(adata, notes, log, _label_targets(adata, options))
    check_has_x(adata)
    X = as_csr_float32(adata.X)
    counts = looks_like_counts(X.data)
    log_counts = not counts and is_log1p_counts(X, adata.X.dtype)
    unlogged = not counts and not log_counts and check_log_scale(X)
    is_gears = all(k in adata.obs for k in GEARS_OBS) and all(k in adata.uns for k in GEARS_UNS)
    relabelling = (options.condition_key is not None or options.cell_type_key is not None or bool(options.control)
                   or options.separator is not None)
    filtering = options.n_top_genes is not None or options.gene_list is not None
    spelled_twice = is_gears and bool(merge_spellings(adata.obs[keys.OBS_CONDITION].astype(str)))
    named_twice = adata.var_names.duplicated().any()  # the DE fields' gene names would be ambiguous
    keep_gears = (is_gears and not relabelling and not counts and not log_counts and not unlogged
                  and not filtering and not spelled_twice and not named_twice)  # DE fields index var, name conditions
    uns = {k: dict(adata.uns[k]) for k in GEARS_UNS} if keep_gears else {}
    original_index = adata.var_names.copy()
    adata = adata.__class__(X=X, obs=adata.obs.copy(), var=adata.var.copy(), uns=uns)
    adata.var_names = genes
    adata.var[keys.VAR_GENE_NAME] = genes.to_numpy()
    if not original_index.astype(str).equals(genes) and VAR_ORIGINAL_ID not in adata.var:
        adata.var[VAR_ORIGINAL_ID] = original_index.astype(str).to_numpy()  # the file's own IDs (Ensembl, ...)
    adata = drop_empty_cells(adata, notes, log)

    if keep_gears:
        notes.kept_gears_fields = True
        notes.say("GEARS layout found: labels and DE fields kept as they are", log)
        if not original_index.astype(str).equals(genes):
            rekey_de_genes(adata.uns, original_index, genes)
            notes.say(f"var_names switched to gene symbols (var['gene_name']; the file's own in "
                      f"var['{VAR_ORIGINAL_ID}']); DE gene lists renamed", log)
        check_controls(adata.obs)
    else:
        if is_gears:
            why = ("a combination is labelled in both orders: one condition each" if spelled_twice else
                   "var_names name a gene twice" if named_twice else
                   "labels read as given (--condition-key, --cell-type-key, --control, --separator)" if relabelling
                   else "genes filtered" if filtering else "X normalised")
            notes.say(f"GEARS layout found, but {why}, and the DE fields computed again", log)
        relabel(adata, name, options, notes, log)
        if counts or log_counts:
            found = "raw counts detected: " if counts else counts_from_log1p(adata)
            notes.normalisation = found + normalise_counts(adata)
            log(notes.normalisation)
        elif unlogged:
            notes.normalisation = log_transform(adata)
            log(notes.normalisation)
        adata = drop_tiny_groups(adata, notes, log)
        check_controls(adata.obs)
        targets = condition_genes(adata.obs[keys.OBS_CONDITION].astype(str).unique())
        adata = select_genes(adata, options, targets, notes, log)
        add_gears_de(adata)

    targets = condition_genes(adata.obs[keys.OBS_CONDITION].astype(str).unique())
    report_targets(targets, adata.var_names, notes, log, separator_given=options.separator is not None)
    return adata, notes


def _label_targets(adata, options: ImportOptions) -> set[str]:
    """The genes the perturbation labels name, read leniently (the labels are checked later):
    what tells the file's gene naming apart."""
    column = options.condition_key or keys.OBS_CONDITION
    if column not in adata.obs:
        return set()
    rules = label_rules(options)
    return condition_genes(normalise_label(label, *rules) for label in pd.unique(adata.obs[column].dropna().astype(str)))


def drop_empty_cells(adata, notes: ImportNotes, log: Log):
    """Drop cells without a single count: nothing to normalise, nothing to learn from."""
    empty = np.asarray(adata.X.sum(axis=1)).ravel() == 0
    if not empty.any():
        return adata
    notes.dropped_cells += int(empty.sum())
    notes.say(f"dropped {int(empty.sum())} cells with no expression at all (every value 0)", log)
    return adata[~empty].copy()


@contextlib.contextmanager
def duplicate_genes_allowed():
    """Without anndata's "Variable names are not unique" warning: `gene_names` makes them unique
    (and says so), so its advice to call var_names_make_unique would mislead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
        yield


def import_screen(source: Path, name: str, options: ImportOptions, *, scratch_root: Path, log: Log):
    """Read a zip, folder or h5ad and return it in GEARS layout, with notes on what changed."""
    source = Path(source)
    with duplicate_genes_allowed():
        if source.is_file() and file_kind(source) == "zip":
            scratch_root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".import-", dir=scratch_root) as workdir:
                adata = read_h5ad(extract_zip(source, name, Path(workdir)))
        else:
            adata = read_h5ad(locate_h5ad(source, name))
        adata, notes = to_gears_layout(adata, name, options, log)
    adata.uns[keys.UNS_REGINA] = {
        "source": str(source),
        "regina_version": __version__,
        "normalisation": notes.normalisation,
        "relabelled_cells": notes.relabelled,
        "dropped_cells": notes.dropped_cells,
        "kept_gears_fields": notes.kept_gears_fields,
        "control_labels": list(CONTROL_LABELS + tuple(options.control)),
        "condition_key": options.condition_key or keys.OBS_CONDITION,
        "separator": options.separator or keys.GENE_SEPARATOR,
        "gene_filter": notes.gene_filter,
        "targets": notes.targets,
        "targets_measured": notes.targets - len(notes.unmeasured_targets),
        "unmeasured_targets": np.array(notes.unmeasured_targets, dtype=str),
    }
    return adata, notes
