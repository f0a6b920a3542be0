"""`meta.json` of a training phase: what a run was trained on, read and written in one place.

Every later step (phase 2, predict, evaluate, resume) learns the run's dataset, split, labels,
genes and vocabularies from here, so the fields are typed once instead of looked up by string
in many files. Phase 2 copies phase 1's fields and adds its own.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from regina_cli import __version__, keys
from regina_cli.engine.checkpoint import PhasePaths
from regina_cli.errors import ReginaError
from regina_cli.io import write_json

TRAINING, TRAINED = "training", "trained"


@dataclass
class RunMeta:
    """One phase's metadata. `status` is "training" until the phase finished; `training` then
    holds the loop's summary (stop reason, best epoch, ...)."""

    phase: str
    dataset: str
    split: str
    labels: str
    gene_names: list[str]
    label_classes: list[str]
    cell_types: list[str]
    conditions: list[str]
    train_conditions: list[str]
    val_conditions: list[str]
    test_conditions: list[str]
    perturbed_genes: list[str]
    selection: str
    world_size: int = 1
    status: str = TRAINING
    notes: list[str] = field(default_factory=list)
    training: dict | None = None
    # Phase 1
    n_train_cells: int | None = None
    n_val_cells: int | None = None
    dense_on_device: bool | None = None
    # Phase 2
    prompt_genes: list[str] | None = None  # genes with a gene prompt (GenePrompts' table, in order)
    learned_genes: list[str] | None = None  # those with a learned prompt vector
    gene_features: str | None = None  # what the gene prompts' feature vectors are
    prior_observed_genes: list[str] | None = None  # genes whose observed effect the expression prior keeps
    gene_knowledge: dict | None = None  # source, kind, sha256 and genes used of model.gene_knowledge
    held_out_conditions: list[str] | None = None  # training conditions kept out of phase 2 to validate on
    prompt_value: float | None = None
    validation_conditions_scored: list[str] | None = None
    validation_source: str | None = None
    top20_de_source: str | None = None
    n_train_pairs_per_epoch: int | None = None
    regina_version: str = __version__

    @property
    def is_trained(self) -> bool:
        return self.status == TRAINED

    def for_phase(self, phase: str, **changes) -> "RunMeta":
        """This run's data fields for another phase (phase 2 starts from phase 1's)."""
        return dataclasses.replace(self, **{"phase": phase, "status": TRAINING, "training": None,
                                            "regina_version": __version__, **changes})

    def trained(self, summary: dict) -> "RunMeta":
        """The same metadata, marked finished with the training loop's summary."""
        return dataclasses.replace(self, status=TRAINED, training=summary)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


_FIELDS = {f.name for f in dataclasses.fields(RunMeta)}
_REQUIRED = {f.name for f in dataclasses.fields(RunMeta)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def write_meta(paths: PhasePaths, meta: RunMeta) -> None:
    write_json(paths.meta, meta.to_json())


def read_meta(paths: PhasePaths) -> RunMeta:
    """The phase's metadata; a missing, damaged or foreign file is a one-line user error."""
    if not paths.meta.is_file():
        raise ReginaError(f"{paths.dir} is not a trained {paths.phase} run (no {keys.META_FILE}); "
                          f"run `regina train-{paths.phase}` first")
    try:
        data = json.loads(paths.meta.read_text())
    except (ValueError, UnicodeDecodeError):
        data = None
    missing = sorted(_REQUIRED - set(data)) if isinstance(data, dict) else ["all"]
    if missing:
        raise ReginaError(f"{paths.meta} is damaged or not REGINA run metadata (missing {', '.join(missing[:3])}); "
                          f"train this phase again into a new --run")
    return RunMeta(**{k: v for k, v in data.items() if k in _FIELDS})


def read_trained_meta(paths: PhasePaths) -> RunMeta:
    """The metadata of a phase that finished training; an interrupted one is a user error."""
    meta = read_meta(paths)
    if not meta.is_trained:
        raise ReginaError(f"{paths.dir} did not finish training (status: {meta.status}); continue it with "
                          f"`regina train-{paths.phase} ... --resume` first")
    return meta


# --- Guarding a run directory ------------------------------------------------------------------------
def prepare_run_dir(paths: PhasePaths, *, dataset: str, genes: list[str], resume: bool) -> None:
    """A fresh phase needs an empty directory; a resumed one must match the data."""
    if paths.meta.is_file():
        check_run_matches(read_meta(paths), dataset=dataset, gene_names=genes, where=str(paths.run_dir))
    if not resume and (paths.last.is_file() or paths.model.is_file()):
        raise ReginaError(f"{paths.dir} already holds a trained {paths.phase} phase; pass --resume "
                          f"to continue it or choose another --run")


def check_run_matches(meta: RunMeta, *, dataset: str, gene_names: list[str], where: str) -> None:
    """Refuse data of another dataset or gene set than the run was trained on."""
    if meta.dataset != dataset:
        raise ReginaError(f"run directory {where} was trained on dataset {meta.dataset!r}, not {dataset!r}; "
                          "choose another --run")
    if list(meta.gene_names) != list(gene_names):
        missing = len(set(meta.gene_names) - set(gene_names))
        extra = len(set(gene_names) - set(meta.gene_names))
        raise ReginaError(
            f"gene set mismatch: {where} was trained on {len(meta.gene_names)} genes, the data has "
            f"{len(gene_names)} ({missing} missing, {extra} new, or reordered); re-fetch the "
            f"same dataset or train a new run"
        )
