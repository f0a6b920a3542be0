"""Content hashes that tie every output to what it was built from, and the checks that use them.

The chain: a dataset's SHA-256 (recorded at fetch) -> a split file records it -> a label record
records the dataset's and the split's -> a run's `meta.json` records the dataset's, split's,
labels' and config's (phase 2 also phase 1's weights, and its own once trained) -> a prediction
file records the run's.
Each consumer compares what was recorded with what is on disk now, so a split or label file
replaced after a run was trained makes that run stale instead of silently mixing the two.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from regina_cli import keys
from regina_cli.errors import ReginaError

HASH_FIELDS = (keys.DATASET_SHA256, keys.SPLIT_SHA256, keys.LABELS_SHA256, keys.CONFIG_SHA256,
               keys.AE_MODEL_SHA256, keys.GAN_MODEL_SHA256)
_WHAT = {keys.DATASET_SHA256: "the dataset", keys.SPLIT_SHA256: "the split file",
         keys.LABELS_SHA256: "the labels file", keys.CONFIG_SHA256: "the saved config",
         keys.AE_MODEL_SHA256: "phase 1's weights", keys.GAN_MODEL_SHA256: "phase 2's weights"}


def content_sha256(obj) -> str:
    """SHA-256 of a JSON-able object in canonical form (key order and spacing do not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes; None when it does not exist."""
    from regina_cli.data.dataset import sha256_of

    path = Path(path)
    return sha256_of(path) if path.is_file() else None


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def dataset_sha256(name: str, data_dir=None) -> str | None:
    """The SHA-256 recorded when the dataset was fetched (read_dataset checks the file against it)."""
    from regina_cli.data.dataset import recorded_checksum

    return recorded_checksum(keys.dataset_file(name, data_dir))


def unchanged_dataset_sha256(name: str, data_dir, read: str | None, doing: str) -> str | None:
    """The dataset's SHA-256 `read` (taken before the dataset was read), refused when it is no
    longer the recorded one: a `fetch --force` committed meanwhile, and a record written now
    would name the new dataset beside what was computed from the old one."""
    if dataset_sha256(name, data_dir) != read:
        raise ReginaError(f"dataset {name} changed while {doing} (fetched again meanwhile?): nothing was "
                          "written; run the command again")
    return read


def changed(recorded: dict, current: dict) -> list[str]:
    """What changed since `recorded` was written: one phrase per hash field known on both sides."""
    return [f"{_WHAT.get(field, field)} changed ({recorded[field][:12]} -> {current[field][:12]})"
            for field in current
            if recorded.get(field) and current.get(field) and recorded[field] != current[field]]


def refuse_replacing(path: Path, alternative: str) -> None:
    raise ReginaError(f"{path} already exists with other content, and what was built on it would silently "
                      f"change: pass --force to replace it (runs built on the old one are then reported "
                      f"stale), or {alternative}")


def stale(what: str, reasons: list[str], fix: str, *, allow_stale: bool) -> list[str]:
    """An error naming why `what` is stale, or (`allow_stale`) the warnings to print instead."""
    if not reasons:
        return []
    message = f"{what} is stale: {'; '.join(reasons)}"
    if not allow_stale:
        raise ReginaError(f"{message}; {fix}, or pass --allow-stale to use it anyway")
    return [f"{message}; results may mix old and new inputs ({fix})"]


# --- Prediction files --------------------------------------------------------------------------
def prediction_provenance(path: str | Path) -> dict:
    """uns['regina'] of a prediction file, read from the HDF5 index only ({} for other tools' files)."""
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as handle:
            uns = handle.get("uns")
            return dict(read_elem(uns[keys.UNS_REGINA])) if uns is not None and keys.UNS_REGINA in uns else {}
    except (OSError, KeyError, TypeError):
        return {}  # not an HDF5 file, or an unusual one: the evaluation's reader says what is wrong


def check_predictions(name: str, predictions: str | Path, split: str | None, data_dir=None, *,
                      allow_stale: bool = False) -> list[str]:
    """Refuse predictions made for another dataset, or from a run whose dataset or split changed
    since (warnings instead with `allow_stale`); returns the warnings."""
    from regina_cli.data.split import load_split

    made = prediction_provenance(predictions)
    dataset = made.get("dataset")
    if isinstance(dataset, str) and dataset != name:
        raise ReginaError(f"{predictions} holds predictions for dataset {dataset!r}, not {name!r}: run "
                          f"`regina evaluate {dataset} --predictions {predictions}`")
    warnings = []
    made_split = made.get("split")
    if split:
        load_split(name, split, data_dir, allow_stale=allow_stale)  # a missing split is the error, not a warning
    if split and isinstance(made_split, str) and split != made_split:
        warnings.append(_other_split_warning(name, predictions, made_split, split, data_dir))
    current = {keys.DATASET_SHA256: dataset_sha256(name, data_dir)}
    if isinstance(made_split, str) and (split in (None, made_split)) and keys.split_file(
            name, made_split, data_dir).is_file():
        # its own hash only: a changed dataset is reported by the dataset's hash
        current[keys.SPLIT_SHA256] = load_split(name, made_split, data_dir, allow_stale=True).sha256()
    reasons = [f"{reason} since the predictions were made"
               for reason in changed({k: str(v) for k, v in made.items() if k in HASH_FIELDS}, current)]
    reasons += [f"it was predicted with --allow-stale ({why})" for why in recorded_staleness(made)]
    return warnings + stale(f"prediction file {predictions}", reasons,
                            "predict again from a run trained on the current files", allow_stale=allow_stale)


def _other_split_warning(name: str, predictions, made_split: str, split: str, data_dir) -> str:
    """Predictions of a run trained on `made_split`, scored on `split`: which of the conditions
    `split` holds out the run trained on (when its split file is still there to say)."""
    from regina_cli.data.conditions import is_control
    from regina_cli.data.split import load_split

    said = f"{predictions} comes from a run trained on split {made_split}; scored on {split}"
    if not keys.split_file(name, made_split, data_dir).is_file():
        return f"{said}, whose held-out sets may hold conditions the run trained on"
    trained = set(load_split(name, made_split, data_dir, allow_stale=True).train)
    scored = load_split(name, split, data_dir, allow_stale=True)
    seen = sorted(c for c in {*scored.val, *scored.test} & trained if not is_control(c))
    if not seen:
        return f"{said}: none of {split}'s val and test conditions was among the run's training conditions"
    shown = ", ".join(seen[:8]) + (", ..." if len(seen) > 8 else "")
    return (f"{said}, whose val and test sets hold {len(seen)} condition(s) the run trained on ({shown}): "
            "their scores are not those of unseen conditions")


def recorded_staleness(provenance: dict) -> list[str]:
    """Why `predict --allow-stale` called its run stale (uns['regina']['stale']; anndata reads the
    list back as an array), so a later step cannot score such predictions as a clean run's."""
    import numpy as np

    return [str(why) for why in np.atleast_1d(provenance.get("stale", [])).tolist() if str(why)]
