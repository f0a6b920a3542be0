"""`regina fetch`: put a dataset at `data/<name>/perturb_processed.h5ad`, whatever its origin.

Three origins, one result: the embedded simulation (`demo`), GEARS' own Harvard Dataverse files
(named datasets), or a local/remote copy given with `--from`. Whatever the origin, the file is
written atomically and its SHA-256 recorded last, so a dataset is either complete and verified
or absent.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from regina_cli import keys
from regina_cli.data.conditions import is_control, parse_condition
from regina_cli.data.dataset import is_complete, missing_gears_fields, verify_checksum, write_dataset
from regina_cli.data.download import GEARS_URLS, download
from regina_cli.data.importer import ImportOptions, file_kind, import_screen
from regina_cli.errors import ReginaError

DEMO = "demo"
DATASETS = (DEMO, *GEARS_URLS)
DOWNLOADS_DIR = ".downloads"  # under the data folder: partial downloads wait here to be resumed
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

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
        archive.unlink(missing_ok=True)  # verified or refused: either way never resumed
        if not any(archive.parent.iterdir()):
            archive.parent.rmdir()
    return adata, notes


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

    `demo` holds `simulate_screen` keyword arguments (only for `demo`); `options` tells the
    importer how to read the labels of a `source` file.
    """
    if not _NAME.match(name):
        raise ReginaError(f"{name!r} is not a usable dataset name: use letters, digits, '_', '-' or '.'")
    if demo and (name != DEMO or source):
        raise ReginaError("the simulation size options only apply to `regina fetch demo` without --from")
    options = options or ImportOptions()
    if options != ImportOptions() and source is None:
        raise ReginaError("--control, --condition-key, --cell-type-key and --separator only apply with --from")
    data_file = keys.dataset_file(name, data_dir)
    if not force and is_complete(name, data_dir):
        return _present(name, data_file)

    notes: list[str] = []
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
        from regina_cli.data.demo import simulate_screen

        log("simulating the demo screen")
        adata = simulate_screen(**(demo or {}))
        action, source = "simulated", adata.uns[keys.UNS_REGINA]["source"]
        normalisation = adata.uns[keys.UNS_REGINA]["normalisation"]
    elif name in GEARS_URLS:
        source = GEARS_URLS[name]
        adata, imported = _download_and_import(source, name, data_dir, options, require_gears=True,
                                               log=log, progress=progress)
        action, notes, normalisation = "downloaded", imported.messages, imported.normalisation
    else:
        raise ReginaError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or import a copy with --from PATH"
        )
    path, digest = write_dataset(adata, name, data_dir)
    return FetchResult(
        name=name, path=str(path), sha256=digest, action=action, source=str(source),
        n_genes=adata.n_vars, normalisation=normalisation, notes=notes, **_counts(adata.obs),
    )
