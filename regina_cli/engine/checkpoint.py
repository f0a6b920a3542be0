"""Run directories and checkpoints: what a training phase leaves on disk, and how it resumes.

Layout (names from `keys.py`): `runs/<run>/{ae,gan}/` with `config.yaml`, `meta.json`,
`history.csv`, `model.pt` (best weights, state_dict only), `best.pt` and `last.pt` (resumable
training state). Every file is written atomically, and every `.pt` file holds only tensors and
plain containers so it loads with `torch.load(weights_only=True)` (no pickled objects).
"""

from __future__ import annotations

import csv
import io
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regina_cli import keys
from regina_cli.errors import ReginaError
from regina_cli.io import atomic_path, write_text


@dataclass(frozen=True)
class PhasePaths:
    """The files of one training phase (`ae` or `gan`) inside a run directory."""

    run_dir: Path
    phase: str

    @property
    def dir(self) -> Path:
        return self.run_dir / self.phase

    @property
    def config(self) -> Path:
        return self.dir / keys.CONFIG_FILE

    @property
    def meta(self) -> Path:
        return self.dir / keys.META_FILE

    @property
    def history(self) -> Path:
        return self.dir / keys.HISTORY_FILE

    @property
    def model(self) -> Path:
        return self.dir / keys.MODEL_FILE

    @property
    def best(self) -> Path:
        return self.dir / keys.BEST_CHECKPOINT

    @property
    def last(self) -> Path:
        return self.dir / keys.LAST_CHECKPOINT


def ae_paths(run_dir: str | Path) -> PhasePaths:
    return PhasePaths(Path(run_dir), keys.AE_DIR)


def gan_paths(run_dir: str | Path) -> PhasePaths:
    return PhasePaths(Path(run_dir), keys.GAN_DIR)


# --- Tensors on disk ---------------------------------------------------------------------------
# What torch.save's C++ writer says when a write fails (a full disk, a used-up quota): no errno reaches Python.
_FAILED_WRITE = ("iostream error", "unexpected pos", "failed writing")


def save_torch(path: str | Path, obj: Any) -> None:
    """`torch.save` through a temporary file, renamed only when complete; a failed write is a
    user error (the previous file stays) whose advice works: `--resume` only where a `last.pt`
    beside it can be resumed."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            if not any(mark in str(exc) for mark in _FAILED_WRITE):
                raise
            again = ("run again with --resume" if Path(path).with_name(keys.LAST_CHECKPOINT).is_file() else
                     "run the same command again")
            raise ReginaError(f"cannot write {path}: the write failed (is the disk full, or the quota used up?): "
                              f"free some space or write elsewhere, then {again}") from None


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy a written file (e.g. `last.pt` to `best.pt`) atomically, without re-serialising it."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def load_torch(path: str | Path, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Load a REGINA `.pt` file with `weights_only=True`; a damaged file is a user error. `mmap`:
    tensors stay on disk until read (for a look at a checkpoint's small entries)."""
    path = Path(path)
    if not path.is_file():
        raise ReginaError(f"{path} does not exist; train this phase first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated or foreign files: tell the user which one
        raise ReginaError(f"cannot read checkpoint {path} ({type(exc).__name__}); retrain or delete it") from None


def state_dict_to_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights copied to the CPU, keys free of the `_orig_mod.` that `torch.compile` inserts."""
    return {name.replace("_orig_mod.", ""): t.detach().to("cpu", copy=True)
            for name, t in module.state_dict().items()}


# --- RNG state -----------------------------------------------------------------------------------
def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random stream training touches, as tensors and plain values (weights_only-safe)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


# --- Config and history ---------------------------------------------------------------------------
def write_config(paths: PhasePaths, config) -> None:
    from regina_cli.config import to_yaml

    write_text(paths.config, to_yaml(config))


def read_config(paths: PhasePaths):
    from regina_cli.config import config_from_dict, load_yaml

    return config_from_dict(load_yaml(paths.config))


def append_history(paths: PhasePaths, row: dict) -> None:
    """Add one epoch's row to `history.csv`; the column set grows if a later row has new keys."""
    rows = read_history(paths)
    rows.append({k: _plain(v) for k, v in row.items()})
    _write_history(paths, rows)


def read_history(paths: PhasePaths) -> list[dict]:
    if not paths.history.is_file():
        return []
    with paths.history.open(newline="") as fh:
        return list(csv.DictReader(fh))


def truncate_history(paths: PhasePaths, last_epoch: int) -> None:
    """On resume, drop rows written after the checkpoint we continue from."""
    rows = [r for r in read_history(paths) if int(r["epoch"]) <= last_epoch]
    _write_history(paths, rows)


def _write_history(paths: PhasePaths, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(paths.history, buf.getvalue())


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
