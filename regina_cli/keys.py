"""Every obs/var/uns key, file name and default location, defined once.

GEARS field names are kept verbatim so that files written here open in cell-gears and vice
versa.
"""

import os
import re
from pathlib import Path

from regina_cli.errors import ReginaError

# --- AnnData keys (GEARS layout) ------------------------------------------------------------
OBS_CONDITION = "condition"  # "ctrl", "A+ctrl", "A+B"
OBS_CELL_TYPE = "cell_type"
OBS_CONTROL = "control"  # 1 for control cells, 0 otherwise
OBS_CONDITION_NAME = "condition_name"  # "<cell_type>_<condition>_1+1"
OBS_DOSE = "dose_val"  # "1+1" / "1"
VAR_GENE_NAME = "gene_name"
UNS_RANK_GENES = "rank_genes_groups_cov_all"
UNS_TOP_DE_20 = "top_non_dropout_de_20"
UNS_NON_DROPOUT_IDX = "non_dropout_gene_idx"
UNS_TOP_NON_ZERO_DE_20 = "top_non_zero_de_20"
UNS_NON_ZEROS_IDX = "non_zeros_gene_idx"
UNS_REGINA = "regina"  # provenance written by REGINA (source, normalisation, versions)

# --- REGINA-specific keys --------------------------------------------------------------------
OBS_CELL_STATE = "cell_state"  # label used by the latent classifier
OBS_CONTROL_CELL = "control_cell"  # predictions: which control cell a prediction came from
OBS_PROMPT_SOURCE = "prompt_source"  # predictions: learned, measured, knowledge (or control)
VARM_RECONSTRUCTION = "reconstruction"  # predictions: mean decoded control per condition (genes x conditions)

# --- Label vocabulary ------------------------------------------------------------------------
CTRL = "ctrl"
GENE_SEPARATOR = "+"

# --- File names ------------------------------------------------------------------------------
DATA_FILE = "perturb_processed.h5ad"
CHECKSUM_SUFFIX = ".sha256"
SPLITS_DIR = "splits"
LABELS_DIR = "labels"
AE_DIR = "ae"
GAN_DIR = "gan"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.pt"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
PREDICTIONS_FILE = "predictions.h5ad"
# Predicted cells per condition whose mean change is steady: with fewer, its sampling noise lowers
# mean metrics (benchmarks/README.md, "Predicted cells per condition": 100 -> 1000 -> 3000 cells).
STEADY_MEAN_CELLS = 1000
EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
PER_CONDITION_FILE = "per_condition.csv"
GO_DIR = "go"  # under the data folder: what `regina fetch go` downloads
GENE2GO_FILE = "gene2go_all.pkl"  # GEARS' gene -> GO terms dict (name kept as GEARS has it)
GENE_KNOWLEDGE_FILE = "gene_knowledge.tsv"  # demo: synthetic GO-like annotation beside the dataset
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
PLOT_FILES = ("metric_by_subgroup.png", "delta_top_de.png", "delta_scatter.png", "pca_cells.png")  # in report order
# Every path an evaluation writes into its folder: a folder holding anything else is not replaced
EVAL_OUTPUTS = frozenset({METRICS_FILE, PER_CONDITION_FILE, REPORT_FILE, *(f"{PLOTS_DIR}/{p}" for p in PLOT_FILES)})
LABELS_SPLIT_MARK = "@"  # labels fitted on a split: labels/<method>@<split>.csv
RECORD_SUFFIX = ".json"  # beside a split's or labels' file: what it was built from (written last)
PART_MARK = ".part"  # temporary names of outputs being written (`io.atomic_path`, downloads)

# --- Provenance fields (split files, label records, meta.json, predictions' uns['regina']) --------
DATASET_SHA256 = "dataset_sha256"
SPLIT_NAME = "name"  # a split file's own name, which its file name must be (older files lack it)
SPLIT_SHA256 = "split_sha256"
LABELS_SHA256 = "labels_sha256"
CONFIG_SHA256 = "config_sha256"
AE_MODEL_SHA256 = "ae_model_sha256"
GAN_MODEL_SHA256 = "gan_model_sha256"

# --- Locations -------------------------------------------------------------------------------
ENV_DATA_DIR = "REGINA_DATA"
DEFAULT_DATA_DIR = "data"
DEFAULT_RUNS_DIR = "runs"
ENV_CACHE_HOME = "XDG_CACHE_HOME"  # the user's cache folder (default ~/.cache)
CACHE_APP_DIR = "regina"
VERIFIED_DIR = "verified"  # under the cache folder: data files whose SHA-256 was checked, by identity


def data_root(data_dir: str | Path | None = None) -> Path:
    """The data folder: an explicit option, else `$REGINA_DATA`, else `./data`."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR)


def verified_dir() -> Path | None:
    """Where `data.fingerprint` remembers full checksum checks: outside every data folder. None
    without `$XDG_CACHE_HOME` and without a home folder ($HOME unset with no passwd entry, or
    missing): nothing is remembered then, and no home folder is made."""
    base = os.environ.get(ENV_CACHE_HOME)
    if not base:
        try:
            home = Path.home()
        except RuntimeError:  # "Could not determine home directory."
            return None
        if not home.is_dir():
            return None
        base = home / ".cache"
    return Path(base) / CACHE_APP_DIR / VERIFIED_DIR


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(value: str, what: str = "dataset name") -> str:
    """A dataset or split name is one plain folder/file name, so no command can write outside
    the data folder (`../outside`, `a/b`, `.hidden` are refused the same way everywhere)."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ReginaError(f"{value!r} is not a usable {what}: use letters, digits, '_', '-' or '.' "
                          "(not starting with '.' or '-')")
    return value


def go_file(data_dir: str | Path | None = None) -> Path:
    """GEARS' gene2go pickle as `regina fetch go` stores it."""
    return data_root(data_dir) / GO_DIR / GENE2GO_FILE


def dataset_dir(name: str, data_dir: str | Path | None = None) -> Path:
    return data_root(data_dir) / check_name(name)


def dataset_file(name: str, data_dir: str | Path | None = None) -> Path:
    return dataset_dir(name, data_dir) / DATA_FILE


def split_file(name: str, split: str, data_dir: str | Path | None = None) -> Path:
    """`split` is `<mode>_<seed>`, e.g. `simulation_1`, `simulation_1_0.5` at a share of training
    genes other than 0.75 (`data.split.split_name`), or `custom_<hash>`."""
    return dataset_dir(name, data_dir) / SPLITS_DIR / f"{check_name(split, 'split name')}.json"


def labels_file(name: str, method: str, data_dir: str | Path | None = None, split: str | None = None) -> Path:
    """`method` as given to `regina label` (`stress`, `cell-cycle`, `obs:<column>`); labels fitted
    on a split's training cells get their own file per split (`stress@simulation_1.csv`)."""
    safe = method.replace(":", "_").replace("/", "_")
    if split is not None:
        safe += LABELS_SPLIT_MARK + check_name(split, "split name")
    return dataset_dir(name, data_dir) / LABELS_DIR / f"{safe}.csv"
