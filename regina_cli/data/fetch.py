"""`regina fetch`: put a dataset at `data/<name>/perturb_processed.h5ad`, whatever its origin.

Three origins, one result: the embedded simulation (`demo`), GEARS' own Harvard Dataverse files
(named datasets), or a local/remote copy given with `--from`. Whatever the origin, the file is
written atomically and its SHA-256 recorded last, so a dataset is either complete and verified
or absent. `regina fetch go` does the same for GEARS' GO annotation (`data/go/gene2go_all.pkl`),
the gene knowledge that gives unmeasured targets a prompt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from regina_cli import keys
from regina_cli.checks import check_data_dir
from regina_cli.data.conditions import is_control, parse_condition
from regina_cli.data.dataset import (checksum_file, is_complete, missing_gears_fields, record_checksum,
                                     recorded_checksum, verify_checksum, write_dataset)
from regina_cli.data.download import GEARS_URLS, GO_URL, download
from regina_cli.data.importer import ImportOptions, import_screen
from regina_cli.data.sources import file_kind
from regina_cli.data.safe_pickle import is_pickle
from regina_cli.errors import ReginaError

DEMO = "demo"
GO = "go"  # `regina fetch go`: not a dataset, GEARS' GO annotation
GO_NAMES = (keys.GENE2GO_FILE, "gene2go.pkl")  # what GEARS calls the file in its two code paths
DATASETS = (DEMO, *GEARS_URLS)
DOWNLOADS_DIR = ".downloads"  # under the data folder: partial downloads wait here to be resumed

Log = Callable[[str], None]


@dataclass
class FetchResult:
    """What `regina fetch` did and what the dataset holds (the CLI's summary and --json)."""

    name: str
    path: str
    sha256: str
    action: str  # "simulated", "downloaded", "imported" or "already present"
    source: str
    n_cells: int
    n_genes: int
    n_controls: int
    n_singles: int
    n_doubles: int
    cell_types: list[str]
    normalisation: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _counts(obs: pd.DataFrame) -> dict:
    conditions = obs[keys.OBS_CONDITION].astype(str)
    unique = conditions.unique()
    sizes = pd.Series([len(parse_condition(c)) for c in unique])
    return {
        "n_cells": len(obs),
        "n_controls": int(conditions.isin([c for c in unique if is_control(c)]).sum()),
        "n_singles": int((sizes == 1).sum()),
        "n_doubles": int((sizes >= 2).sum()),
        "cell_types": sorted(obs[keys.OBS_CELL_TYPE].astype(str).unique()),
    }


def _present(name: str, data_file: Path) -> FetchResult:
    """Summary of an existing dataset, after re-checking its checksum (reads obs/var/uns only)."""
    import h5py
    from anndata.io import read_elem

    digest = verify_checksum(name, data_file)
    with h5py.File(data_file, "r") as handle:
        obs = read_elem(handle["obs"])
        n_genes = len(read_elem(handle["var"]))
        provenance = read_elem(handle["uns"][keys.UNS_REGINA]) if keys.UNS_REGINA in handle["uns"] else {}
    return FetchResult(
        name=name, path=str(data_file), sha256=digest, action="already present",
        source=str(provenance.get("source", "unknown")), n_genes=n_genes,
        normalisation=str(provenance.get("normalisation", "unknown")), **_counts(obs),
        notes=[f"already present: use --force to fetch {name} again"],
    )


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _discard(download_file: Path) -> None:
    """Remove a download once used or refused (never resumed), and the downloads folder if empty."""
    download_file.unlink(missing_ok=True)
    if download_file.parent.is_dir() and not any(download_file.parent.iterdir()):
        download_file.parent.rmdir()


def _download_and_import(url: str, name: str, data_dir, options: ImportOptions, *, require_gears: bool,
                         log: Log, progress: bool | None):
    root = keys.data_root(data_dir)
    archive = download(url, root / DOWNLOADS_DIR / f"{name}.download", log=log, progress=progress)
    try:
        if require_gears and file_kind(archive) == "h5ad" and (missing := missing_gears_fields(archive)):
            raise ReginaError(f"{url} is not a GEARS dataset (missing {', '.join(missing)})")
        adata, notes = import_screen(archive, name, options, scratch_root=root / DOWNLOADS_DIR, log=log)
        if require_gears and not notes.kept_gears_fields:
            raise ReginaError(f"{url} did not hold a complete GEARS perturb_processed.h5ad: download it again")
    finally:
        _discard(archive)
    return adata, notes


def _demo_notes(adata, name: str, data_dir, log: Log) -> list[str]:
    """What the summary says about the demo's synthetic GO-like annotation (written with the
    dataset, `write_dataset(beside=...)`: never one without the other)."""
    path = keys.dataset_dir(name, data_dir) / keys.GENE_KNOWLEDGE_FILE
    notes = [f"synthetic GO-like gene annotation written to {path} (use it with --gene-knowledge {path})"]
    dropped = list(adata.uns[keys.UNS_REGINA]["simulation"]["dropped_targets"])
    if dropped:
        notes.append(f"{len(dropped)} targets left out of the measured genes (their conditions kept): "
                     + ", ".join(dropped))
    for note in notes:
        log(note)
    return notes


def fetch(
    name: str,
    *,
    data_dir: str | Path | None = None,
    source: str | None = None,
    force: bool = False,
    options: ImportOptions | None = None,
    demo: dict | None = None,
    log: Log = print,
    progress: bool | None = None,
) -> FetchResult:
    """Fetch, simulate or import dataset `name`; a no-op when it is already present (unless force).

    `demo` holds `data.demo.simulate_demo` keyword arguments (only for `demo`); `options` tells the
    importer how to read the labels of a `source` file.
    """
    keys.check_name(name)
    if demo and (name != DEMO or source):
        raise ReginaError("the simulation size options only apply to `regina fetch demo` without --from")
    if demo:
        from regina_cli.data.demo import check_demo_options

        check_demo_options(demo)
    options = options or ImportOptions()
    if options != ImportOptions() and source is None:
        raise ReginaError(
            "--control, --condition-key, --cell-type-key, --separator, --n-top-genes and --gene-list only apply with --from"
        )
    data_file = keys.dataset_file(name, data_dir)
    present = not force and is_complete(name, data_dir)
    check_data_dir(data_dir, writes=not present)  # a dataset already there needs no writable folder
    if present:
        return _present(name, data_file)

    notes: list[str] = []
    beside: dict[str, str] = {}  # files that belong to this version of the dataset
    if source is not None:
        if _is_url(source):
            adata, imported = _download_and_import(source, name, data_dir, options, require_gears=False,
                                                   log=log, progress=progress)
            action = "downloaded"
        else:
            adata, imported = import_screen(Path(source), name, options,
                                            scratch_root=keys.data_root(data_dir) / DOWNLOADS_DIR, log=log)
            action = "imported"
        notes, normalisation = imported.messages, imported.normalisation
    elif name == DEMO:
        from regina_cli.data.demo import simulate_demo

        adata, annotation = simulate_demo(**(demo or {}), log=log)
        action, source = "simulated", adata.uns[keys.UNS_REGINA]["source"]
        normalisation = adata.uns[keys.UNS_REGINA]["normalisation"]
        beside = {keys.GENE_KNOWLEDGE_FILE: annotation}
    elif name in GEARS_URLS:
        source = GEARS_URLS[name]
        adata, imported = _download_and_import(source, name, data_dir, options, require_gears=True,
                                               log=log, progress=progress)
        action, notes, normalisation = "downloaded", imported.messages, imported.normalisation
    else:
        raise ReginaError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or import a copy with --from PATH"
        )
    counts = _counts(adata.obs)
    if counts["n_singles"] + counts["n_doubles"] == 0:
        notes.append(f"warning: {name} holds only control cells ({counts['n_controls']:,}): there is nothing to "
                     "split, train on or predict; check the labels (--condition-key, --control)")
        log(notes[-1])
    written = write_dataset(adata, name, data_dir, beside=beside, replace=force)
    if written is None:  # another fetch without --force completed it meanwhile: theirs stays
        return _present(name, data_file)
    path, digest = written
    if beside:
        notes += _demo_notes(adata, name, data_dir, log)
    return FetchResult(
        name=name, path=str(path), sha256=digest, action=action, source=str(source),
        n_genes=adata.n_vars, normalisation=normalisation, notes=notes, **counts,
    )


@dataclass
class GoResult:
    """What `regina fetch go` did (the CLI's summary and --json)."""

    path: str
    sha256: str
    action: str  # "downloaded", "imported" or "already present"
    source: str
    n_genes: int
    n_terms: int

    def as_dict(self) -> dict:
        return asdict(self)


def _local_go_file(source: Path) -> Path:
    if source.is_dir():
        found = [source / n for n in GO_NAMES if (source / n).is_file()]
        if not found:
            raise ReginaError(f"{source} holds no {' or '.join(GO_NAMES)}: point --from at GEARS' gene2go pickle")
        return found[0]
    if not source.is_file():
        raise ReginaError(f"{source} does not exist: check the path given to --from")
    return source


def check_go_options(options: ImportOptions, *, others: bool) -> None:
    """`fetch go` stores GEARS' GO file as it is: an import option, or any other option (`others`:
    the demo's, an AnnData), would be ignored without a word, so it is refused."""
    if others or options != ImportOptions():
        raise ReginaError("`regina fetch go` takes only --from, --force and --data-dir")


def fetch_go(*, data_dir=None, source: str | None = None, force: bool = False, log: Log = print,
             progress: bool | None = None) -> GoResult:
    """GEARS' gene -> GO terms pickle into `<data-dir>/go/`, checked (read safely) before it is kept."""
    from regina_cli.data.knowledge import ANNOTATION, load_gene_knowledge
    from regina_cli.io import atomic_path

    check_data_dir(data_dir, writes=True)
    target = keys.go_file(data_dir)
    if not force and target.is_file() and recorded_checksum(target) is not None:
        verify_checksum(GO, target)
        knowledge, action, source = load_gene_knowledge(target), "already present", str(target)
    else:
        source = source or GO_URL
        staged = (download(source, keys.data_root(data_dir) / DOWNLOADS_DIR / "go.download", log=log,
                           progress=progress) if _is_url(source) else _local_go_file(Path(source)))
        try:
            knowledge = load_gene_knowledge(staged)
            with open(staged, "rb") as handle:
                pickled = is_pickle(handle.read(1))
            if knowledge.kind != ANNOTATION or not pickled:
                raise ReginaError(
                    f"{source} is not GEARS' gene2go pickle: give other knowledge files to --gene-knowledge directly"
                )
            checksum_file(target).unlink(missing_ok=True)
            with atomic_path(target) as tmp:
                tmp.write_bytes(staged.read_bytes())
        finally:
            if _is_url(source):
                _discard(staged)
        record_checksum(target)
        action = "downloaded" if _is_url(source) else "imported"
    n_terms = len(set().union(*knowledge.terms))
    return GoResult(str(target), knowledge.sha256(), action, str(source), len(knowledge.genes), n_terms)
