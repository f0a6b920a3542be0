"""Full SHA-256 checks remembered by file identity, so an unchanged dataset is not hashed on every read.

Hashing a dataset costs 0.3-0.7 s per 400 MB on every command that reads it. After a full check
the file's identity (device, inode, size, mtime and ctime in ns) and the digest it matched are
kept in the user's cache folder (keys.verified_dir); a later read of a file with the same
identity, whose recorded checksum is still that digest, skips the hash. Writing to the file or
replacing it changes its ctime (which no user can set back), size or inode, so it is hashed in
full again and a change is refused as before. Safeguards:

* a write in the same timestamp tick as the file's last change would leave ctime as it was, so
  an identity is only kept for a file whose ctime is over RACY_MARGIN_NS older than the start of
  its check (git's rule for "racily clean" files), and only when the identity did not change
  while it was hashed;
* the cache lives outside the data folder: reading commands write nothing beside the data
  (read-only data folders work; a refused command leaves the folder byte-identical), and a cache
  that cannot be written or read is only a slower read;
* `regina fetch NAME` on a present dataset always hashes in full.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from regina_cli import keys
from regina_cli.errors import ReginaError
from regina_cli.io import write_json

RACY_MARGIN_NS = 2_000_000_000  # over any file system's timestamp granularity (FAT, some NFS: 2 s)
_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")


def identity(path: Path) -> dict[str, int]:
    stat = os.stat(path)
    return {field: int(getattr(stat, field)) for field in _FIELDS}


def _entry(path: Path) -> Path:
    folder = keys.verified_dir()
    if folder is None:
        raise FileNotFoundError("no cache folder: no home folder and no $XDG_CACHE_HOME")
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()
    return folder / f"{key}.json"


def still_verified(path: Path, digest: str) -> bool:
    """True when `path` was checked against `digest` and has not changed since."""
    try:
        kept = json.loads(_entry(path).read_text())
        return kept.get("sha256") == digest and kept.get("identity") == identity(path)
    except (OSError, ValueError, AttributeError):
        return False


def remember(path: Path, before: dict[str, int], digest: str, started_ns: int) -> None:
    """Keep `path`'s identity after a full check that began at `started_ns` (wall clock) with the
    file's identity `before`; a racily fresh or meanwhile changed file is not kept, nor is any
    where the user has no home folder to keep a cache in ($HOME missing: it is not created)."""
    if keys.verified_dir() is None:
        return
    try:
        if identity(path) != before or before["st_ctime_ns"] > started_ns - RACY_MARGIN_NS:
            return
        write_json(_entry(path), {"path": str(Path(path).resolve()), "identity": before, "sha256": digest})
    except (OSError, ReginaError):  # no cache folder (read-only home): the next read hashes again
        return
