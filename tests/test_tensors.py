"""CellTensors: codes, control pools, on-device control sampling, targets, streaming == dense."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from regina_cli.data.split import Split
from regina_cli.data.tensors import CellTensors, condition_targets
from regina_cli.errors import ReginaError

GENES = [f"G{i}" for i in range(24)]
TRAIN = ["ctrl", "G1+ctrl", "G2+ctrl", "G1+G2", "NOTMEASURED+ctrl"]
VAL = ["G3+ctrl", "G3+G1"]
TEST = ["G4+ctrl", "UNKNOWNGENE+ctrl"]


def tiny_screen(n_per: int = 7, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    conditions, cell_types = [], []
    for cond in TRAIN + VAL + TEST:
        for ct in ("A", "B"):
            count = 3 * n_per if cond == "ctrl" else n_per
            conditions += [cond] * count
            cell_types += [ct] * count
    x = rng.random((len(conditions), len(GENES))).astype(np.float32)
    x[x < 0.5] = 0
    obs = pd.DataFrame({"condition": conditions, "cell_type": cell_types,
                        "control": [int(c == "ctrl") for c in conditions]},
                       index=[f"cell{i}" for i in range(len(conditions))])
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame({"gene_name": GENES}, index=GENES))


def tiny_split() -> Split:
    return Split(dataset="tiny", mode="custom", seed=1, train_gene_frac=None, train=TRAIN, val=VAL,
                 test=TEST, subgroups={"test_subgroup": {}, "val_subgroup": {}})


def tiny_labels(adata) -> pd.Series:
    return pd.Series(np.where(np.arange(adata.n_obs) % 3 == 0, "Stressed", "Homeostasis"), index=adata.obs_names)


def test_codes_sets_and_targets():
    adata = tiny_screen()
    cells = CellTensors.from_anndata(adata, tiny_split(), tiny_labels(adata), device_data="always")
    assert cells.dense and cells.x.shape == (cells.n_cells, len(GENES))
    assert "G4+ctrl" not in cells.conditions  # test cells are not loaded
    assert cells.label_classes == ["Homeostasis", "Stressed"]
    assert cells.prompt_genes == ["NOTMEASURED"]  # by default: training targets the screen does not measure
    conds = np.array(cells.conditions)[cells.condition_codes.numpy()]
    assert set(conds[cells.val_idx.numpy()]) == set(VAL)
    assert set(conds[cells.train_idx.numpy()]) == set(TRAIN)
    assert cells.is_control.numpy().tolist() == (conds == "ctrl").tolist()
    expected = adata[cells.obs_names].X.toarray()
    assert np.array_equal(cells.rows(torch.arange(cells.n_cells)).numpy(), expected)
    code = cells.conditions.index("G1+G2")
    assert cells.target_idx[code].tolist() == [1, 2] and cells.n_targets[code] == 2
    code = cells.conditions.index("NOTMEASURED+ctrl")
    assert cells.target_idx[code].tolist() == [-1, -1] and cells.prompt_idx[code].tolist() == [0, -1]
    assert bool(cells.usable.all())


def test_unseen_unmeasured_target_is_marked_unusable():
    target_idx, prompt_idx, n_targets, usable = condition_targets(
        ["ctrl", "G0+ctrl", "X+ctrl", "U+G0"], ["G0", "G1"], ["U", "G0"])
    assert target_idx.tolist() == [[-1, -1], [0, -1], [-1, -1], [-1, 0]]
    assert prompt_idx.tolist() == [[-1, -1], [1, -1], [-1, -1], [0, 1]]  # a measured gene can have a prompt too
    assert n_targets.tolist() == [0, 1, 1, 2] and usable.tolist() == [True, True, False, True]


def test_sample_controls_respects_cell_type_and_stays_on_device():
    adata = tiny_screen()
    cells = CellTensors.from_anndata(adata, tiny_split(), None, device_data="always")
    gen = torch.Generator(device=cells.device).manual_seed(0)
    idx = cells.train_perturbed_idx
    partners = cells.control_partners(idx.repeat(50), gen)
    assert partners.device == cells.device and partners.dtype == torch.long
    assert bool(cells.is_control[partners].all())
    assert torch.equal(cells.cell_type_codes[partners], cells.cell_type_codes[idx.repeat(50)])
    train_controls = set(cells.train_idx[cells.is_control[cells.train_idx]].tolist())
    assert set(partners.tolist()) == train_controls  # every control gets drawn (uniform pools)


def test_streaming_equals_dense(tmp_path):
    adata = tiny_screen(n_per=11)
    path = tmp_path / "tiny.h5ad"
    adata.write_h5ad(path)
    dense = CellTensors.from_anndata(adata, tiny_split(), tiny_labels(adata), device_data="always")
    backed = ad.read_h5ad(path, backed="r")
    stream = CellTensors.from_anndata(backed, tiny_split(), tiny_labels(adata), device_data="never", chunk_cells=16)
    assert not stream.dense and stream.x is None
    for name in ("labels", "condition_codes", "cell_type_codes", "train_idx", "val_idx", "target_idx"):
        assert torch.equal(getattr(dense, name), getattr(stream, name))
    scattered = torch.tensor([40, 3, 17, 3, 190, 90, 0])  # near rows share a read, far ones do not
    assert torch.equal(stream.rows(scattered), dense.rows(scattered))
    ctrl = dense.sample_controls(torch.tensor([0, 1, 1]), torch.Generator().manual_seed(0))
    assert torch.equal(stream.rows(ctrl), dense.rows(ctrl))
    seen, total = [], 0
    for idx, x in stream.batches(stream.train_idx, 10, generator=torch.Generator().manual_seed(0)):
        assert len(idx) <= 10 and torch.equal(x, dense.rows(idx))
        seen += idx.tolist()
    assert sorted(seen) == sorted(stream.train_idx.tolist())  # every cell exactly once
    shards = [[i for b, _ in stream.batches(stream.train_idx, 8, generator=torch.Generator().manual_seed(3),
                                            rank=r, world_size=2) for i in b.tolist()] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) and not set(shards[0]) & set(shards[1])
    stream.close()
    backed.file.close()


def test_dense_batches_cover_every_cell_once():
    adata = tiny_screen()
    cells = CellTensors.from_anndata(adata, tiny_split(), None, device_data="always")
    seen = [i for idx, x in cells.batches(cells.train_idx, 7, generator=torch.Generator().manual_seed(0))
            for i in idx.tolist()]
    assert sorted(seen) == sorted(cells.train_idx.tolist())


def test_mismatches_are_user_errors():
    adata = tiny_screen()
    with pytest.raises(ReginaError, match="gene set mismatch"):
        CellTensors.from_anndata(adata, tiny_split(), genes=GENES[::-1])
    bad_split = Split("tiny", "custom", 1, None, TRAIN + ["ZZZ+ctrl"], VAL, TEST, {})
    with pytest.raises(ReginaError, match="re-run `regina split`"):
        CellTensors.from_anndata(adata, bad_split)
    with pytest.raises(ReginaError, match="re-run `regina label`"):
        CellTensors.from_anndata(adata, tiny_split(), tiny_labels(adata).iloc[:5])


def test_real_screen_streams_like_dense_and_pairs_by_cell_line(mcfaline_path):
    """McFaline (3 glioblastoma lines, CSR on disk): streamed rows equal the in-memory ones and
    every perturbed cell is paired with a control of its own line."""
    backed = ad.read_h5ad(mcfaline_path, backed="r")
    in_memory = ad.read_h5ad(mcfaline_path)
    for adata in (backed, in_memory):  # the raw file labels conditions "control" / "GENE"
        adata.obs["condition"] = [c if c == "ctrl" else ("ctrl" if c == "control" else f"{c}+ctrl")
                                  for c in adata.obs["condition"].astype(str)]
    perturbed = sorted(set(in_memory.obs["condition"]) - {"ctrl"})
    split = Split("mcfaline", "custom", 1, None, ["ctrl", *perturbed[:6]], perturbed[6:8], perturbed[8:],
                  {"test_subgroup": {}, "val_subgroup": {}})
    dense = CellTensors.from_anndata(in_memory, split, device_data="always")
    stream = CellTensors.from_anndata(backed, split, device_data="never", chunk_cells=300)
    assert dense.cell_types == ["A172", "T98G", "U87MG"] and dense.n_genes == 500
    some = torch.randperm(dense.n_cells, generator=torch.Generator().manual_seed(0))[:500]
    assert torch.equal(stream.rows(some), dense.rows(some))
    seen = torch.cat([idx for idx, _ in stream.batches(stream.val_idx, 128, shuffle=False)])
    assert torch.equal(seen.sort().values, stream.val_idx.sort().values)
    idx = dense.train_perturbed_idx
    partners = dense.control_partners(idx, torch.Generator().manual_seed(1))
    assert torch.equal(dense.cell_type_codes[partners], dense.cell_type_codes[idx])
    assert bool(dense.is_control[partners].all())
    stream.close()
    backed.file.close()
