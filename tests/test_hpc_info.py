"""`regina info`: versions, device and whether a dataset fits, on a machine with or without a GPU."""

from __future__ import annotations

import json

import torch

from cli_helpers import invoke
from regina_cli import __version__
from regina_cli.data.dataset import write_dataset
from regina_cli.data.demo import simulate_screen


def test_info_prints_versions_and_the_device():
    result = invoke("info")
    assert result.exit_code == 0, result.output
    for name in ("regina", "python", "torch", "anndata", "scanpy"):
        assert name in result.stdout  # stdout: `regina info > info.txt` keeps the report
    assert __version__ in result.stdout
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in result.output
    else:
        assert "no CUDA device available" in result.output


def test_info_json_for_bug_reports():
    result = invoke("--json", "info")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["regina"] == __version__
    assert report["torch"] == torch.__version__
    assert report["cuda_available"] is torch.cuda.is_available()
    assert len(report["gpus"]) == torch.cuda.device_count()
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["host_memory_free_bytes"] > 0


def test_info_says_whether_a_dataset_fits_on_the_device():
    adata = simulate_screen(n_cells=300, n_genes=140, n_singles=4, n_doubles=2, seed=0)
    write_dataset(adata, "tiny")
    result = invoke("--json", "info", "tiny")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["dataset"]
    assert (data["n_cells"], data["n_genes"]) == (300, 140)
    assert data["dense_float32_bytes"] == 300 * 140 * 4
    assert data["fits_on_device"] is True  # 164 kB fits anywhere
    table = invoke("info", "tiny")
    assert "300 cells x 140 genes" in table.output
    assert "fits on" in table.output


def test_info_on_a_missing_dataset_is_a_one_line_error():
    result = invoke("info", "nope")
    assert result.exit_code != 0
    assert "regina fetch nope" in result.output
    assert "Traceback" not in result.output


def test_info_on_a_data_dir_that_is_a_file_says_so(tmp_path):
    """It said "dataset 'demo' not found ... run `regina fetch demo` first", which cannot help."""
    (tmp_path / "afile").write_text("x")
    result = invoke("info", "--data-dir", tmp_path / "afile", "demo")
    assert result.exit_code == 2 and "is a file, not a folder" in result.output
