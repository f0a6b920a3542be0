"""Reading and writing `data/<name>/perturb_processed.h5ad`, with its recorded SHA-256.

A dataset counts as present only when its h5ad and the checksum beside it agree: the checksum is
written last, so an interrupted fetch never leaves something that looks complete, and a file that
was changed (or half-copied) after it was verified is refused instead of silently used.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

import h5py

from regina_cli import keys
from regina_cli.data import fingerprint
from regina_cli.errors import ReginaError
from regina_cli.io import SignalsHeld, atomic_path, folder_locked, staged_h5ad, write_text

GEARS_OBS = (keys.OBS_CONDITION, keys.OBS_CELL_TYPE, keys.OBS_CONTROL, keys.OBS_CONDITION_NAME, keys.OBS_DOSE)
GEARS_VAR = (keys.VAR_GENE_NAME,)
GEARS_UNS = (
    keys.UNS_RANK_GENES,
    keys.UNS_TOP_DE_20,
    keys.UNS_NON_DROPOUT_IDX,
    keys.UNS_TOP_NON_ZERO_DE_20,
    keys.UNS_NON_ZEROS_IDX,
)
_HASH_BLOCK = 1 << 20


def checksum_file(data_file: Path) -> Path:
    return data_file.with_name(data_file.name + keys.CHECKSUM_SUFFIX)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def record_checksum(data_file: Path, digest: str | None = None) -> str:
    """Write `<file>.sha256` in `sha256sum` format (so `sha256sum -c` works too)."""
    digest = digest or sha256_of(data_file)
    write_text(checksum_file(data_file), f"{digest}  {data_file.name}\n")
    return digest


def recorded_checksum(data_file: Path) -> str | None:
    path = checksum_file(data_file)
    if not path.is_file():
        return None
    fields = path.read_text().split()
    return fields[0] if fields else None


def is_complete(name: str, data_dir=None) -> bool:
    """Both the h5ad and its checksum exist (the content is checked on read)."""
    data_file = keys.dataset_file(name, data_dir)
    return data_file.is_file() and recorded_checksum(data_file) is not None


def refetch_command(name: str) -> str:
    """How to fetch dataset `name` again: by name for the demo and GEARS' datasets, else from the
    file it was imported from (the name alone is unknown to `regina fetch`)."""
    from regina_cli.data.fetch import DATASETS

    return f"`regina fetch {name} --force`" if name in DATASETS else \
        f"`regina fetch {name} --from SOURCE --force` with the file it was imported from"


def verify_checksum(name: str, data_file: Path, *, reuse: bool = False) -> str:
    """The file's SHA-256, refused unless it is the recorded one. `reuse`: skip the hash when an
    earlier full check saw this very file unchanged (see data/fingerprint.py)."""
    recorded = recorded_checksum(data_file)
    if recorded is None:
        raise ReginaError(f"{data_file} has no recorded checksum (interrupted fetch?): run {refetch_command(name)}")
    if reuse and fingerprint.still_verified(data_file, recorded):
        return recorded
    started, before = time.time_ns(), fingerprint.identity(data_file)
    actual = sha256_of(data_file)
    if actual != recorded:
        raise ReginaError(f"{data_file} changed after it was verified (SHA-256 mismatch): run "
                          f"{refetch_command(name)} to fetch it again")
    fingerprint.remember(data_file, before, actual, started)
    return actual


def _h5_columns(group) -> set[str]:
    """Column names of an obs/var/uns entry, for both the group layout and old compound tables."""
    if isinstance(group, h5py.Dataset):
        return set(group.dtype.names or ())
    return set(group.keys())


def missing_gears_fields(path: Path) -> list[str]:
    """GEARS fields absent from an h5ad file, read from the HDF5 index only (no matrix loaded).

    Raises ReginaError when the file is not an h5ad at all.
    """
    try:
        with h5py.File(path, "r") as handle:
            present = {part: _h5_columns(handle[part]) if part in handle else set() for part in ("obs", "var", "uns")}
            has_x = "X" in handle
    except OSError as exc:
        raise ReginaError(f"{path} is not a readable h5ad file ({exc.__class__.__name__}): check the file") from None
    missing = [] if has_x else ["X"]
    for part, wanted in (("obs", GEARS_OBS), ("var", GEARS_VAR), ("uns", GEARS_UNS)):
        missing += [f"{part}['{key}']" for key in wanted if key not in present[part]]
    return missing


def check_gears_layout(adata, source: str) -> None:
    """Refuse an AnnData that lacks any GEARS field (names the missing ones)."""
    missing = [f"obs['{k}']" for k in GEARS_OBS if k not in adata.obs]
    missing += [f"var['{k}']" for k in GEARS_VAR if k not in adata.var]
    missing += [f"uns['{k}']" for k in GEARS_UNS if k not in adata.uns]
    if missing:
        raise ReginaError(f"{source} lacks the GEARS fields {', '.join(missing)}: fetch or import it again")


class _Present(Exception):
    """Raised under the folder lock to drop the staged files: the dataset is complete already."""


def write_dataset(adata, name: str, data_dir=None, *, beside: dict[str, str] | None = None,
                  replace: bool = True) -> tuple[Path, str] | None:
    """Write the dataset atomically, then its checksum (the mark of a complete fetch). `beside`:
    text files (name -> content) that belong to this version of the dataset (the demo's gene
    knowledge), staged with it and swapped in with it. The old set stays complete until every new
    file is written and hashed; the swap to the new set is not cut by SIGTERM, waits for another
    process's swap of the same dataset (`io.folder_locked`), and a SIGKILL inside it leaves no
    checksum (an interrupted fetch, which the next fetch redoes whole). `replace=False` (fetch
    without --force): None, and nothing written, when a complete dataset is there once the lock
    is held (another fetch finished first)."""
    data_file = keys.dataset_file(name, data_dir)
    try:
        with SignalsHeld() as held, contextlib.ExitStack() as lock:
            with contextlib.ExitStack() as companions:
                for file_name, text in (beside or {}).items():
                    staged = companions.enter_context(atomic_path(data_file.parent / file_name))
                    staged.write_text(text, encoding="utf-8")
                with staged_h5ad(adata, data_file) as tmp:
                    digest = sha256_of(tmp)
                    lock.enter_context(folder_locked(data_file.parent))
                    if not replace and is_complete(name, data_dir):
                        raise _Present
                    held.hold()
                    checksum_file(data_file).unlink(missing_ok=True)
            return data_file, record_checksum(data_file, digest)
    except _Present:
        return None


def read_dataset(name: str, data_dir=None, *, backed: bool = False):
    """Open `data/<name>/perturb_processed.h5ad` after checking its SHA-256 and GEARS fields."""
    import anndata

    data_file = keys.dataset_file(name, data_dir)
    if not data_file.is_file():
        raise ReginaError(f"dataset {name!r} not found at {data_file}: run `regina fetch {name}` first")
    verify_checksum(name, data_file, reuse=True)
    adata = anndata.read_h5ad(data_file, backed="r" if backed else None)
    check_gears_layout(adata, str(data_file))
    return adata


def gene_count(name: str, data_dir=None) -> int:
    """Genes in a fetched dataset, read from the h5ad header (no matrix load, no checksum)."""
    path = keys.dataset_file(name, data_dir)
    if not path.is_file():
        raise ReginaError(f"dataset {name!r} not found at {path}: run `regina fetch {name}` first")
    try:
        with h5py.File(path, "r") as fh:
            x = fh["X"]
            return int(x.shape[1] if isinstance(x, h5py.Dataset) else x.attrs["shape"][1])
    except (OSError, KeyError) as exc:
        raise ReginaError(f"{path} is not a readable h5ad file ({exc.__class__.__name__}): "
                          f"run {refetch_command(name)}") from None
