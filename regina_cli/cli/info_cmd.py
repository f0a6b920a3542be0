"""`regina info`: the versions and hardware a bug report needs, and whether a dataset fits.

Everything heavy (torch, anndata, scanpy) is imported inside the functions, so the module is
free to import at CLI start-up.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import typer
from rich.table import Table

from regina_cli import __version__, keys
from regina_cli.cli.app import app
from regina_cli.checks import check_data_dir
from regina_cli.cli.common import DataDirOpt, emit_result, show, user_errors

_GIB = 2**30


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _gpus() -> list[dict]:
    import torch

    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "memory_total_bytes": int(total),
                "memory_free_bytes": int(free),
                "compute_capability": f"{props.major}.{props.minor}",
            }
        )
    return gpus


def dataset_fit(name: str, *, data_dir=None, device: str) -> dict:
    """Shape of dataset `name` and whether training would keep its dense matrix on `device`.

    Uses the training engine's own rule (`runtime.device_data: auto`), applied to every cell:
    training keeps only train and validation cells, so "fits" here is the cautious answer.
    """
    import torch

    from regina_cli.data.dataset import read_dataset
    from regina_cli.data.memory import dense_bytes, free_memory_bytes, use_dense

    adata = read_dataset(name, data_dir, backed=True)
    n_cells, n_genes = (int(n) for n in adata.shape)
    adata.file.close()
    target = torch.device(device)
    return {
        "name": name,
        "file": str(keys.dataset_file(name, data_dir)),
        "n_cells": n_cells,
        "n_genes": n_genes,
        "dense_float32_bytes": dense_bytes(n_cells, n_genes),
        "device": device,
        "device_free_bytes": free_memory_bytes(target),
        "fits_on_device": use_dense("auto", n_cells, n_genes, target),
    }


def system_report(dataset: str | None = None, *, data_dir=None) -> dict:
    """Versions, device and GPUs; with `dataset`, whether its dense matrix fits on the device."""
    import torch

    from regina_cli.data.memory import free_memory_bytes

    cuda = torch.cuda.is_available()
    gpus = _gpus() if cuda else []
    report = {
        "regina": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "anndata": _package_version("anndata"),
        "scanpy": _package_version("scanpy"),
        "numpy": _package_version("numpy"),
        "device": "cuda" if cuda else "cpu",
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "nccl_available": bool(torch.distributed.is_available() and torch.distributed.is_nccl_available()),
        "cpu_threads": torch.get_num_threads(),
        "host_memory_free_bytes": free_memory_bytes(torch.device("cpu")),
        "gpus": gpus,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "data_dir": str(keys.data_root(data_dir).resolve()),
    }
    if dataset is not None:
        report["dataset"] = dataset_fit(dataset, data_dir=data_dir, device=report["device"])
    return report


def _size(n: int) -> str:
    return f"{n / _GIB:.1f} GiB" if n >= _GIB else f"{n / 2**20:.1f} MiB"


def _report_table(report: dict) -> Table:
    table = Table(title="regina info", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key in ("regina", "python", "platform", "torch", "anndata", "scanpy", "numpy", "device"):
        table.add_row(key, str(report[key]))
    if report["cuda_available"]:
        table.add_row("CUDA", f"{report['cuda_version']} (cuDNN {report['cudnn_version']})")
        table.add_row("bf16", "yes" if report["bf16_supported"] else "no")
        table.add_row("NCCL", "yes" if report["nccl_available"] else "no")
        for gpu in report["gpus"]:
            table.add_row(
                f"GPU {gpu['index']}",
                f"{gpu['name']} (sm {gpu['compute_capability']}), "
                f"{_size(gpu['memory_free_bytes'])} free of {_size(gpu['memory_total_bytes'])}",
            )
    else:
        cuda_build = report["cuda_version"] or "none (CPU-only torch build)"
        table.add_row("CUDA", f"no CUDA device available; torch CUDA build: {cuda_build}")
    if report["cuda_visible_devices"] is not None:  # an empty value hides every GPU
        table.add_row("CUDA_VISIBLE_DEVICES", repr(report["cuda_visible_devices"]))
    table.add_row("CPU threads", str(report["cpu_threads"]))
    table.add_row("host memory free", _size(report["host_memory_free_bytes"]))
    table.add_row("data folder", report["data_dir"])
    data = report.get("dataset")
    if data:
        table.add_row(
            f"dataset {data['name']}",
            f"{data['n_cells']:,} cells x {data['n_genes']:,} genes, "
            f"dense float32 {_size(data['dense_float32_bytes'])}",
        )
        verdict = (
            "yes: training keeps the matrix on the device"
            if data["fits_on_device"]
            else "no: training streams it from the h5ad in chunks (runtime.device_data)"
        )
        table.add_row(f"fits on {data['device']}", f"{verdict}; {_size(data['device_free_bytes'])} free")
    return table


@app.command("info")
@user_errors
def info_command(
    dataset: str = typer.Argument(
        None, help="Dataset name: also say whether its dense matrix fits on the device.", show_default=False
    ),
    data_dir: Path = DataDirOpt,
) -> None:
    """Versions, device, CUDA and GPU memory (paste this into bug reports)."""
    if dataset is not None:
        check_data_dir(data_dir, writes=False)
    report = system_report(dataset, data_dir=data_dir)
    show(_report_table(report))  # on stdout: `regina info > info.txt` keeps it
    emit_result(report)
