"""What `regina fetch --from` was pointed at: a .h5ad, a zip (checked before extraction) or a
folder, told apart by their first bytes, never by their names; and reading the h5ad inside."""

from __future__ import annotations

import shutil
import zipfile
import zlib
from pathlib import Path

from regina_cli import keys
from regina_cli.data.download import looks_like_html
from regina_cli.errors import ReginaError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


def file_kind(path: Path) -> str:
    """'h5ad', 'zip', 'html' or 'unknown', from the first bytes (names and URLs lie)."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(HDF5_MAGIC):
        return "h5ad"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    return "html" if looks_like_html(head) else "unknown"


def _pick_member(names: list[str], name: str, where: str) -> str:
    """The dataset inside an archive or folder: `<name>/perturb_processed.h5ad`, any
    `perturb_processed.h5ad`, or the only `.h5ad`."""
    h5ads = [n for n in names if n.endswith(".h5ad") and not Path(n).name.startswith(".")]
    for wanted in (f"{name}/{keys.DATA_FILE}", keys.DATA_FILE):
        hits = [n for n in h5ads if n == wanted or n.endswith("/" + wanted)]
        if len(hits) == 1:
            return hits[0]
    gears = [n for n in h5ads if Path(n).name == keys.DATA_FILE]
    candidates = gears or h5ads
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ReginaError(f"{where} holds no .h5ad file: point --from at the dataset file itself")
    raise ReginaError(
        f"{where} holds several .h5ad files ({', '.join(sorted(candidates)[:4])}): point --from at one of them"
    )


def extract_zip(archive: Path, name: str, workdir: Path) -> Path:
    """Test the zip's integrity (every CRC) and extract the dataset member into `workdir`."""
    try:
        with zipfile.ZipFile(archive) as zf:
            broken = zf.testzip()
            if broken is not None:
                raise ReginaError(f"{archive.name} is corrupt (bad CRC in {broken}): download it again")
            member = _pick_member(zf.namelist(), name, archive.name)
            target = workdir / keys.DATA_FILE
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return target
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise ReginaError(f"{archive.name} is not a valid zip archive (truncated or corrupt: {exc}): download it again") from None


def locate_h5ad(source: Path, name: str) -> Path:
    """The h5ad behind a folder or an h5ad path (zips are handled by `extract_zip`)."""
    if not source.exists():
        raise ReginaError(f"{source} does not exist: check the path given to --from")
    if source.is_dir():
        found = [str(p.relative_to(source)) for p in source.rglob("*.h5ad")]
        return source / _pick_member(found, name, str(source))
    kind = file_kind(source)
    if kind == "h5ad":
        return source
    if kind == "html":
        raise ReginaError(f"{source} is a web page (an error or login page?), not data: download it again")
    raise ReginaError(f"{source} is neither an h5ad file, a zip nor a folder: give a .h5ad, .zip or folder")


def read_h5ad(path: Path):
    import anndata

    try:
        return anndata.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for a damaged or foreign file
        raise ReginaError(f"{path} could not be read as an h5ad file ({exc.__class__.__name__}): check the file") from None
