"""Whether a matrix goes onto the device as one dense tensor (`runtime.device_data`).

Dense data on the device makes every batch a gather with no host work; the policy keeps the
matrix to half of the free memory, the rest being for the model and its activations.
"""

from __future__ import annotations

import os

import torch

# Fraction of free memory the dense matrix may take: the rest is for the model and activations.
_DEVICE_SHARE = 0.5


def dense_bytes(n_cells: int, n_genes: int) -> int:
    return int(n_cells) * int(n_genes) * 4


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on `device` (GPU: CUDA's count; CPU: available RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on Linux: assume it fits
        return 1 << 62


def use_dense(mode: str, n_cells: int, n_genes: int, device: torch.device) -> bool:
    """`always`, `never`, or (`auto`) when the dense float32 matrix fits in half the free memory."""
    if mode != "auto":
        return mode == "always"
    return dense_bytes(n_cells, n_genes) <= _DEVICE_SHARE * free_memory_bytes(device)
