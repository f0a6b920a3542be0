"""Ordinary memory pages for the evaluation's arrays: NumPy's transparent huge pages cost it time.

NumPy asks the kernel for transparent huge pages on every large array (madvise), so each first
touch of such a region allocates and clears a whole 2 MB page (and, under Linux's common
`defrag=madvise`, may compact memory first). The evaluation allocates a few GB of short-lived
arrays (the dataset, the prediction file, per-condition copies) that it reads a few times and
frees: at Norman's shape, on the 2-core development machine, this was 3.1-3.7 s of system time
per `regina evaluate`, and 1.5-1.7 s without huge pages (wall time 1.5-2 s shorter). Values
are unchanged.
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
