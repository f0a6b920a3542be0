"""Ordinary memory pages for the evaluation's arrays: NumPy's transparent huge pages cost it time.

NumPy asks the kernel for transparent huge pages on every large array (madvise). Under Linux's
common `defrag=madvise` setting, each such fault may compact memory first, synchronously; the
evaluation allocates a few GB of short-lived arrays (the dataset, the prediction file, per
condition copies), so on a machine whose memory is fragmented by other jobs these stalls added
1.4-1.9 s of system time (and wall time) to a 12 s `regina evaluate` at Norman's shape. Huge pages buy nothing
back here: the arrays are read a few times, not walked repeatedly. Values are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


def _setter():
    try:
        from numpy._core.multiarray import _set_madvise_hugepage  # NumPy 2
    except ImportError:  # NumPy 1.x
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:  # pragma: no cover - a NumPy without the switch
            return None
    return _set_madvise_hugepage


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """No madvise(MADV_HUGEPAGE) on NumPy's allocations inside the block; restored afterwards."""
    switch = _setter()
    if switch is None:  # pragma: no cover
        yield
        return
    previous = switch(False)
    try:
        yield
    finally:
        switch(previous)
