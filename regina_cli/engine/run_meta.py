"""`meta.json` of a training phase: what a run was trained on, read and written in one place.

Every later step (phase 2, predict, evaluate, resume) learns the run's dataset, split, labels,
genes and vocabularies from here, so the fields are typed once instead of looked up by string
in many files. Phase 2 copies phase 1's fields and adds its own.

It also records the hashes of what the phase was built from (`data.provenance`): the checks
below refuse a resume on changed inputs before anything is written, and report a run whose
dataset, split, labels, config or phase-1 weights changed after training as stale.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from pathlib import Path

from regina_cli import __version__, keys
from regina_cli.data.provenance import HASH_FIELDS, changed, dataset_sha256, file_sha256, stale, text_sha256
from regina_cli.engine.checkpoint import PhasePaths, ae_paths, gan_paths
from regina_cli.errors import ReginaError
from regina_cli.io import check_not_in_use, write_json

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
    prior_cell_types: list[str] | None = None  # the rows of the prior's cell_type_change (None: pooled)
    gene_knowledge: dict | None = None  # source, kind, sha256 and genes used of model.gene_knowledge
    held_out_conditions: list[str] | None = None  # training conditions kept out of phase 2 to validate on
    prompt_value: float | None = None
    validation_conditions_scored: list[str] | None = None
    validation_source: str | None = None
    top20_de_source: str | None = None
    n_train_pairs_per_epoch: int | None = None
    data_dir: str | None = None  # the data folder the phase was trained on (absolute); None in older runs
    # Provenance (data.provenance): what the phase was built from; None in runs of older versions
    dataset_sha256: str | None = None
    split_sha256: str | None = None
    labels_sha256: str | None = None
    config_sha256: str | None = None
    ae_model_sha256: str | None = None  # phase 2: the phase-1 weights it was trained on
    gan_model_sha256: str | None = None  # phase 2, once trained: its own weights (gan/model.pt)
    regina_version: str = __version__

    @property
    def is_trained(self) -> bool:
        return self.status == TRAINED

    def for_phase(self, phase: str, **changes) -> "RunMeta":
        """This run's data fields for another phase (phase 2 starts from phase 1's)."""
        return dataclasses.replace(self, **{"phase": phase, "status": TRAINING, "training": None,
                                            "regina_version": __version__, **changes})

    def trained(self, summary: dict, **changes) -> "RunMeta":
        """The same metadata, marked finished with the training loop's summary (and `changes`)."""
        return dataclasses.replace(self, status=TRAINED, training=summary, **changes)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def hashes(self) -> dict:
        return {name: getattr(self, name) for name in HASH_FIELDS}


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
        check_not_in_use(paths.run_dir)  # being trained right now: say so, not "resume it"
        raise ReginaError(f"{paths.dir} did not finish training (status: {meta.status}); continue it with "
                          f"`regina train-{paths.phase} ... --resume` first")
    return meta


# --- Guarding a run directory ------------------------------------------------------------------------
def prepare_run_dir(paths: PhasePaths, *, dataset: str, genes: list[str], resume: bool) -> None:
    """A fresh phase clears what a start killed before its first checkpoint left (`check_resume`
    has refused one over a saved phase); a resumed one must match the data."""
    meta = read_meta(paths) if paths.meta.is_file() else None
    if meta is not None:
        check_run_matches(meta, dataset=dataset, gene_names=genes, where=str(paths.run_dir))
    if not resume:
        paths.history.unlink(missing_ok=True)


def check_run_dataset(meta: RunMeta, dataset: str, where: str) -> None:
    """Refuse another dataset than the run was trained on."""
    if meta.dataset != dataset:
        raise ReginaError(f"run directory {where} was trained on dataset {meta.dataset!r}, not {dataset!r}; "
                          "choose another --run")


def check_run_matches(meta: RunMeta, *, dataset: str, gene_names: list[str], where: str) -> None:
    """Refuse data of another dataset or gene set than the run was trained on."""
    check_run_dataset(meta, dataset, where)
    if list(meta.gene_names) != list(gene_names):
        missing = len(set(meta.gene_names) - set(gene_names))
        extra = len(set(gene_names) - set(meta.gene_names))
        raise ReginaError(
            f"gene set mismatch: {where} was trained on {len(meta.gene_names)} genes, the data has "
            f"{len(gene_names)} ({missing} missing, {extra} new, or reordered); re-fetch the "
            f"same dataset or train a new run"
        )


def check_run_dir(run_dir: str | Path) -> None:
    from regina_cli.checks import in_dataset_folder

    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ReginaError(f"--run {run_dir} is a file, not a run directory: choose another --run")
    above = next((p for p in Path(run_dir).parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ReginaError(f"--run {run_dir}: {above} is a file, not a folder; choose another --run")
    if in_dataset_folder(Path(run_dir)):
        raise ReginaError(f"--run {run_dir} is in a dataset folder, whose files other steps read: choose a run "
                          "directory elsewhere, e.g. runs/<name>")


# --- Provenance ------------------------------------------------------------------------------------------
def config_sha256(config) -> str:
    """Hash of the config as `config.yaml` holds it."""
    from regina_cli.config import to_yaml

    return text_sha256(to_yaml(config))


def phase1_inputs(name: str, split: str, labels: str, data_dir=None) -> dict:
    """Hashes of phase 1's inputs, each checked against the one before (dataset -> split -> labels)."""
    from regina_cli.data.label import labels_path, verify_labels
    from regina_cli.data.split import load_split

    split_hash = load_split(name, split, data_dir).sha256()
    labels_hash = verify_labels(labels_path(name, labels, data_dir, split), name, labels, data_dir, split)
    return {keys.DATASET_SHA256: dataset_sha256(name, data_dir), keys.SPLIT_SHA256: split_hash,
            keys.LABELS_SHA256: labels_hash}


def current_inputs(meta: RunMeta, data_dir=None) -> dict:
    """The hashes of the files a run was built from as they are now (those that can be found)."""
    from regina_cli.data.label import labels_path
    from regina_cli.data.split import load_split

    current = {keys.DATASET_SHA256: dataset_sha256(meta.dataset, data_dir)}
    if keys.split_file(meta.dataset, meta.split, data_dir).is_file():
        # its own hash only: a changed dataset is reported by the dataset's hash
        current[keys.SPLIT_SHA256] = load_split(meta.dataset, meta.split, data_dir, allow_stale=True).sha256()
    try:
        current[keys.LABELS_SHA256] = file_sha256(labels_path(meta.dataset, meta.labels, data_dir, meta.split))
    except ReginaError:
        pass  # labels removed since: nothing to compare (predictions do not read them)
    return current


def check_resume(paths: PhasePaths, inputs: dict | None = None, *, resume: bool, **options: str) -> None:
    """Refuse, before anything is written, a fresh start over a phase the directory already holds
    (started or trained), a resume that has nothing to continue, or one whose options (split=...,
    labels=...) or input hashes (`inputs`) differ from the run's."""
    if not resume:
        if paths.last.is_file() or paths.model.is_file():
            meta = read_meta(paths) if paths.meta.is_file() else None
            state = "an interrupted" if meta is not None and not meta.is_trained else "a trained"
            raise ReginaError(f"{paths.dir} already holds {state} {paths.phase} phase; pass --resume "
                              f"to continue it or choose another --run")
        return
    if not paths.last.is_file():
        raise ReginaError(f"nothing to resume: {paths.last} does not exist; drop --resume to start")
    if not paths.meta.is_file():
        return
    meta = read_meta(paths)
    for option, asked in options.items():
        if getattr(meta, option) != asked:
            raise ReginaError(f"{paths.dir} was trained with --{option} {getattr(meta, option)}, not {asked}: "
                              f"resume with the same --{option}, or train a new --run")
    _refuse_changed_inputs(paths, meta, inputs or {})


def _refuse_changed_inputs(paths: PhasePaths, meta: RunMeta, inputs: dict) -> None:
    reasons = changed(meta.hashes(), inputs)
    if reasons:
        raise ReginaError(f"cannot resume {paths.dir}: {'; '.join(reasons)} since it started; train a new --run")


def check_phase1_kept(run_dir: str | Path) -> None:
    """Refuse resuming phase 2 over a phase 1 that changed since phase 2 started (retrained, say),
    before any setting is compared: the saved phase-2 config then differs from phase 1's, and the
    difference is not a setting the user changed."""
    paths = gan_paths(run_dir)
    if paths.meta.is_file():
        _refuse_changed_inputs(paths, read_meta(paths), {keys.AE_MODEL_SHA256: file_sha256(ae_paths(run_dir).model)})


def phase2_inputs(run_dir: str | Path, data_dir=None, *, resume: bool = False) -> dict:
    """Hashes phase 2 records (phase 1's weights), after checking that phase 1's dataset, split
    and labels are unchanged and, when resuming, that phase 2 started from the same phase 1."""
    phase1 = read_trained_meta(ae_paths(run_dir))
    reasons = changed(phase1.hashes(), current_inputs(phase1, data_dir))
    if reasons:
        raise ReginaError(f"phase 1 of {run_dir} is stale: {'; '.join(reasons)} since it was trained; "
                          + _stale_fix(phase1, data_dir, "train a new run with `regina train-ae`"))
    inputs = {keys.AE_MODEL_SHA256: file_sha256(ae_paths(run_dir).model)}
    check_resume(gan_paths(run_dir), inputs, resume=resume)
    return inputs


def trained_data_dir(data_dir) -> str:
    """What `RunMeta.data_dir` records: the data folder a phase reads, as an absolute path."""
    return str(keys.data_root(data_dir).resolve())


def run_data_dir(run_dir: str | Path, data_dir=None):
    """The data folder of a command on a trained run: `data_dir` when given, else the folder the run
    was trained on while it still holds the run's dataset (a run trained with --data-dir elsewhere
    finds its data from any working directory), else None: $REGINA_DATA or ./data."""
    if data_dir is not None:
        return data_dir
    paths = ae_paths(run_dir)
    if not paths.meta.is_file():
        return None
    try:
        meta = read_meta(paths)
    except ReginaError:
        return None  # the command that reads the run names the damage
    if meta.data_dir and keys.dataset_file(meta.dataset, meta.data_dir).is_file():
        return meta.data_dir
    return None


def _stale_fix(meta: RunMeta, data_dir, fix: str) -> str:
    """`fix`, led by the data folder the run was trained on when it was checked against another."""
    if not meta.data_dir or Path(meta.data_dir) == Path(trained_data_dir(data_dir)):
        return fix
    if keys.dataset_file(meta.dataset, meta.data_dir).is_file():
        return f"pass --data-dir {meta.data_dir} (the data it was trained on), or {fix}"
    return f"it was trained on the data in {meta.data_dir}, which no longer holds {meta.dataset!r}; {fix}"


def check_run_current(run_dir: str | Path, data_dir=None, *, allow_stale: bool = False) -> list[str]:
    """Refuse a trained run whose inputs changed after training (warnings instead with
    `allow_stale`): dataset, split, labels, either phase's config, phase 1's weights under phase 2,
    or phase 2's own weights (another run's gan/model.pt would transform this run's latents)."""
    reasons, fix = [], "train a new run on the current files"
    for paths in (ae_paths(run_dir), gan_paths(run_dir)):
        if not paths.meta.is_file():
            continue
        meta = read_meta(paths)
        if paths.phase == keys.AE_DIR:
            fix = _stale_fix(meta, data_dir, fix)
        current = current_inputs(meta, data_dir) if paths.phase == keys.AE_DIR else {}
        if paths.config.is_file():
            current[keys.CONFIG_SHA256] = file_sha256(paths.config)
        if paths.phase == keys.GAN_DIR:
            current[keys.AE_MODEL_SHA256] = file_sha256(ae_paths(run_dir).model)
            current[keys.GAN_MODEL_SHA256] = file_sha256(paths.model)
        reasons += [f"{reason} since {paths.phase}/ was trained" for reason in changed(meta.hashes(), current)]
    return stale(f"run {run_dir}", reasons, fix, allow_stale=allow_stale)
