"""How many CPU threads the evaluation uses: the cores that are free, not all of them.

The evaluation is many small matrix products (a hundred cells by a few thousand genes). On a
shared machine, torch's and OpenBLAS's thread pools sized to every core spin while they wait for
cores that other processes hold: on a 2-core machine with two other busy processes, the same
`regina evaluate` took 36 s with both pools at 2 threads and 11-17 s with 1. So, unless told
(`--threads N`), the pools get the cores that the 1-minute load average says are idle (at least
one), and are restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from regina_cli.devices import available_cpus, torch_threads


def free_cpus() -> int:
    """Cores this process may use minus the ones the load average says are busy (at least 1)."""
    available = available_cpus()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(available, round(available - busy)))


@contextlib.contextmanager
def cpu_threads(n: int = 0) -> Iterator[int]:
    """Limit torch's and the BLAS thread pools to `n` threads (0: free_cpus()) inside the block."""
    n = n or free_cpus()
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn (scanpy)
    except ImportError:  # pragma: no cover
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(limits=n)
    with torch_threads(n), limits:
        yield n
