"""Which torch device a command runs on: one rule for training, prediction and evaluation."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
from typing import Iterator

from regina_cli.errors import ReginaError

_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str, local_rank: int = 0):
    """`auto` (the GPU when there is one), `cpu`, `cuda` (GPU `local_rank`, for data-parallel
    processes) or `cuda:N`; a GPU that is not there is a user error, not a CUDA traceback."""
    import torch

    match = _DEVICE.match(str(spec))
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ReginaError(f"--device takes auto, cpu, cuda or cuda:N, not {spec!r}")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ReginaError(f"--device {spec} was asked for but no CUDA GPU is visible; use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise ReginaError(f"--device {spec}: only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", int(index) if index is not None else local_rank % count)


def available_cpus() -> int:
    """Cores this process may run on (its CPU affinity: a Slurm allocation, taskset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@functools.cache
def start_threads() -> int:
    """The intra-op threads torch starts a process with (OMP_NUM_THREADS, else its default): what
    a command trains on. Read in a new thread, because numba's OpenMP layer (scanpy runs it)
    raises the count of the thread it runs in; and once, before `torch_threads` first sets a
    count, after which new threads start with the count set."""
    import torch

    found = []
    probe = threading.Thread(target=lambda: found.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    return found[0]


@contextlib.contextmanager
def torch_threads(n: int | None = None) -> Iterator[int]:
    """torch's intra-op threads set to `n` inside the block, then restored. None: the count torch
    started with (`start_threads()`), never more than the caller's: training runs in one, so a
    notebook trains as the command does after numba raised the count, while a count lowered on
    purpose stays (a forked child set to 1, as DataLoader workers are: OpenMP pools deadlock there)."""
    import torch

    n = n or min(start_threads(), torch.get_num_threads())  # start_threads() read before any set below
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)
