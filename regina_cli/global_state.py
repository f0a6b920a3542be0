"""Leaving a Python session's global state as the API call found it.

A command owns its process, so training seeds every random stream and turns on torch's flushing
of denormal floats (`engine.loop.seed_everything`), and scanpy's numba layer raises torch's
thread count. Through the Python API the process is the user's notebook: after a call its
random draws would be one fixed stream, its own torch code would round tiny floats to zero and
run on other threads. `left_as_found` puts each back.
"""

from __future__ import annotations

import contextlib
import functools
import random
import sys
from typing import Callable, Iterator


def _flushes_denormals(torch) -> bool:
    """Whether torch flushes denormal floats now (it has a setter, no getter)."""
    return torch.tensor([1e-40], dtype=torch.float32).item() == 0.0


def _torch_state(torch) -> dict:
    return {"rng": torch.random.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "threads": torch.get_num_threads(), "flush_denormal": _flushes_denormals(torch)}


def _fresh_torch_state(torch) -> dict:
    """What a first `import torch` gives: a seed from the system's entropy (rng None), no
    flushing, the thread count torch starts a thread with."""
    from regina_cli.devices import start_threads

    return {"rng": None, "cuda_rng": None, "threads": start_threads(), "flush_denormal": False}


def _restore_torch(torch, state: dict) -> None:
    if state["rng"] is None:
        torch.seed()  # every device's generator, as a fresh import leaves them
    else:
        torch.random.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    elif torch.cuda.is_initialized():  # first used inside the block: reseeded as a fresh start would be
        torch.cuda.seed_all()
    torch.set_num_threads(state["threads"])
    torch.set_flush_denormal(state["flush_denormal"])


@contextlib.contextmanager
def left_as_found() -> Iterator[None]:
    """Python's, numpy's and torch's global random state, torch's thread count and denormal
    flushing restored when the block ends, however it ends. A library the block imported first
    is left as a fresh import would be (numpy reseeded from the system's entropy)."""
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    python_state = random.getstate()
    numpy_state = numpy.random.get_state() if numpy is not None else None
    torch_state = _torch_state(torch) if torch is not None else None
    try:
        yield
    finally:
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)
        elif "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        if torch is not None:
            _restore_torch(torch, torch_state)
        elif "torch" in sys.modules:
            _restore_torch(sys.modules["torch"], _fresh_torch_state(sys.modules["torch"]))


def leaves_global_state(fn: Callable) -> Callable:
    """Decorator form of `left_as_found`, for the API's functions."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with left_as_found():
            return fn(*args, **kwargs)

    return wrapper
