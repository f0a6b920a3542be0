"""The training data as tensors: expression rows, codes, control pools and perturbation targets.

Speed comes from keeping the expression matrix of the training and validation cells on the
device as one dense float32 tensor (`runtime.device_data`): batches and control partners are
then gathered by index on the device, with no per-cell Python. When the matrix does not fit,
rows stream from the h5ad in chunks of `runtime.stream_chunk_cells` cells (bounded memory);
only the training controls, which every step samples from, stay on the device.

Row indices used everywhere here are *local*: positions among the kept (train + val) cells,
in file order; `obs_names[i]` names row i.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from regina_cli import keys
from regina_cli.data.conditions import condition_genes, is_control, parse_condition
from regina_cli.data.memory import use_dense
from regina_cli.data.rows import RowReader
from regina_cli.data.split import check_split_conditions
from regina_cli.errors import ReginaError


# --- The tensors ----------------------------------------------------------------------------------------
@dataclass
class CellTensors:
    """Everything the training loops index by cell or condition, on one device.

    Per cell (local row i): `condition_codes`, `cell_type_codes`, `labels` (-1 without
    labels), `is_control`. Per condition (code c): `target_idx[c]` gene indices of its
    measured targets and `prompt_idx[c]` their positions in `prompt_genes` (both padded
    with -1), `n_targets[c]` all its targets, `usable[c]` whether every target is measured or
    has a learned prompt. Index sets: `train_idx`, `val_idx`, and their perturbed-only parts.
    """

    genes: list[str]
    obs_names: np.ndarray
    file_rows: np.ndarray
    device: torch.device
    dense: bool
    x: torch.Tensor | None
    labels: torch.Tensor
    label_classes: list[str]
    conditions: list[str]
    condition_codes: torch.Tensor
    cell_types: list[str]
    cell_type_codes: torch.Tensor
    is_control: torch.Tensor
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    prompt_genes: list[str]
    target_idx: torch.Tensor
    prompt_idx: torch.Tensor
    n_targets: torch.Tensor
    usable: torch.Tensor
    chunk_cells: int = 8192
    notes: list[str] = field(default_factory=list)
    _reader: RowReader | None = None
    _pool_rows: torch.Tensor | None = None
    _pool_offset: torch.Tensor | None = None
    _pool_size: torch.Tensor | None = None
    _control_cache: torch.Tensor | None = None
    _control_pos: torch.Tensor | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_anndata(
        cls,
        adata,
        split,
        labels: pd.Series | None = None,
        *,
        device: str | torch.device = "cpu",
        device_data: str = "auto",
        chunk_cells: int = 8192,
        label_classes: Sequence[str] | None = None,
        genes: Sequence[str] | None = None,
        prompt_genes: Sequence[str] | None = None,
    ) -> "CellTensors":
        """Build from a dataset (in memory or backed), its `Split` and optional cell labels.

        `genes`, `label_classes` and `prompt_genes` (genes with a phase-2 gene prompt; by default
        the training targets the data does not measure) come from a trained run's metadata when
        continuing one; a mismatch with the data is a ReginaError.
        """
        device = torch.device(device)
        data_genes = [str(g) for g in adata.var_names]
        if genes is not None and list(genes) != data_genes:
            missing = len(set(genes) - set(data_genes))
            raise ReginaError(
                f"gene set mismatch: the run was trained on {len(genes)} genes, the data has "
                f"{len(data_genes)} ({missing} of the run's genes missing, or reordered); use the "
                "dataset the run was trained on"
            )
        obs = adata.obs
        condition = obs[keys.OBS_CONDITION].astype(str).to_numpy()
        keep_conditions = set(split.train) | set(split.val)
        check_split_conditions(split, set(condition))
        file_rows = np.flatnonzero(np.isin(condition, list(keep_conditions)))
        if len(file_rows) == 0:
            raise ReginaError("no cells of the split's train/val conditions are in the data; "
                              "re-run `regina split` for this dataset")
        kept_condition = condition[file_rows]
        obs_names = np.asarray(adata.obs_names[file_rows]).astype(str)

        cell_type = (obs[keys.OBS_CELL_TYPE].astype(str).to_numpy()[file_rows]
                     if keys.OBS_CELL_TYPE in obs else np.full(len(file_rows), "all"))
        cell_types = sorted(set(cell_type))
        conditions = sorted(set(kept_condition))
        control = np.array([is_control(c) for c in conditions])[np.searchsorted(conditions, kept_condition)]

        label_codes, classes = _label_codes(labels, obs_names, label_classes)

        train_set = set(split.train)
        in_train = np.isin(kept_condition, list(train_set))
        prompt_genes = (list(prompt_genes) if prompt_genes is not None
                        else sorted(condition_genes(train_set) - set(data_genes)))
        target_idx, prompt_idx, n_targets, usable = condition_targets(conditions, data_genes, prompt_genes)

        as_long = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long, device=device)  # noqa: E731
        dense = use_dense(device_data, len(file_rows), len(data_genes), device)
        reader = RowReader(adata)
        x = _read_dense(reader, file_rows, device, chunk_cells) if dense else None
        cells = cls(
            genes=data_genes, obs_names=obs_names, file_rows=file_rows, device=device, dense=dense, x=x,
            labels=as_long(label_codes), label_classes=classes, conditions=conditions,
            condition_codes=as_long(np.searchsorted(conditions, kept_condition)),
            cell_types=cell_types, cell_type_codes=as_long(np.searchsorted(cell_types, cell_type)),
            is_control=torch.as_tensor(control, device=device),
            train_idx=as_long(np.flatnonzero(in_train)), val_idx=as_long(np.flatnonzero(~in_train)),
            prompt_genes=prompt_genes, target_idx=as_long(target_idx),
            prompt_idx=as_long(prompt_idx), n_targets=as_long(n_targets),
            usable=torch.as_tensor(usable, device=device), chunk_cells=chunk_cells,
            _reader=None if dense else reader,
        )
        if dense:
            reader.close()
        cells._build_control_pools(control & in_train, cell_type)
        return cells

    def _build_control_pools(self, train_control: np.ndarray, cell_type: np.ndarray) -> None:
        """Training controls grouped by cell type, as flat index arrays for on-device sampling."""
        if not train_control.any():
            raise ReginaError("the split's training conditions contain no control cells; "
                              "controls (`ctrl`) must be in train")
        rows, offsets, sizes = [], [], []
        all_controls = np.flatnonzero(train_control)
        for t, name in enumerate(self.cell_types):
            pool = np.flatnonzero(train_control & (cell_type == name))
            if len(pool) == 0:
                self.notes.append(f"cell type {name!r} has no training controls: its cells are "
                                  "paired with controls of every cell type")
                pool = all_controls
            offsets.append(sum(len(r) for r in rows))
            sizes.append(len(pool))
            rows.append(pool)
        flat = np.concatenate(rows)
        self._pool_rows = torch.as_tensor(flat, dtype=torch.long, device=self.device)
        self._pool_offset = torch.as_tensor(offsets, dtype=torch.long, device=self.device)
        self._pool_size = torch.as_tensor(sizes, dtype=torch.long, device=self.device)
        if not self.dense:
            controls = np.unique(flat)
            self._control_cache = _read_dense(self._reader, self.file_rows[controls], self.device, self.chunk_cells)
            pos = np.full(len(self.obs_names), -1, dtype=np.int64)
            pos[controls] = np.arange(len(controls))
            self._control_pos = torch.as_tensor(pos, device=self.device)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return len(self.obs_names)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def train_perturbed_idx(self) -> torch.Tensor:
        return self.train_idx[~self.is_control[self.train_idx]]

    @property
    def val_perturbed_idx(self) -> torch.Tensor:
        return self.val_idx[~self.is_control[self.val_idx]]

    # -- rows -------------------------------------------------------------------------------
    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Expression [len(idx), G] of local rows `idx`, on the device, in `idx` order."""
        if self.dense:
            return self.x[idx]
        pos = self._control_pos[idx]  # >= 0 exactly for the cached training controls
        if bool((pos >= 0).all()):  # one host sync: the control partners of every step
            return self._control_cache[pos]
        idx_np = idx.cpu().numpy()
        order = np.argsort(self.file_rows[idx_np], kind="stable")
        unique_rows, inverse = np.unique(self.file_rows[idx_np][order], return_inverse=True)
        block = torch.from_numpy(self._reader.read(unique_rows)).to(self.device)
        out = torch.empty((len(idx_np), self.n_genes), dtype=torch.float32, device=self.device)
        out[torch.as_tensor(order, device=self.device)] = block[torch.as_tensor(inverse, device=self.device)]
        return out

    def batches(
        self,
        indices: torch.Tensor,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch over `indices` as (row indices, expression) batches on the device.

        Dense: a device permutation, gathered per batch. Streaming: the cells are cut into
        chunks of `chunk_cells` neighbouring rows read in shuffled chunk order and shuffled
        within each chunk, so memory stays bounded while every cell is seen once. For
        data-parallel runs each rank takes every `world_size`-th cell of the same order
        (give every rank a generator in the same state) and all ranks get equal batch counts.
        """
        indices = indices.to(self.device)
        if self.dense:
            order = self._order(len(indices), generator, shuffle)
            yield from self._dense_batches(indices[self._shard(order, rank, world_size)], batch_size)
            return
        yield from self._streaming_batches(indices, batch_size, generator, shuffle, rank, world_size)

    def _order(self, n: int, generator: torch.Generator | None, shuffle: bool) -> torch.Tensor:
        if not shuffle:
            return torch.arange(n, device=self.device)
        gen_device = generator.device if generator is not None else self.device
        return torch.randperm(n, generator=generator, device=gen_device).to(self.device)

    @staticmethod
    def _shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        if world_size == 1:
            return order
        usable = len(order) - len(order) % world_size
        return order[:usable][rank::world_size]

    def _dense_batches(self, idx: torch.Tensor, batch_size: int):
        for start in range(0, len(idx), batch_size):
            batch = idx[start: start + batch_size]
            yield batch, self.x[batch]

    def _streaming_batches(self, indices, batch_size, generator, shuffle, rank, world_size):
        by_file = np.argsort(self.file_rows[indices.cpu().numpy()], kind="stable")
        chunks = list(torch.split(indices[torch.as_tensor(by_file, device=self.device)], self.chunk_cells))
        # Every rank serves the same number of cells: the smallest share any rank gets.
        quota = min(sum(len(range(r, len(c), world_size)) for c in chunks) for r in range(world_size))
        carry_idx = carry_x = None
        for c in self._order(len(chunks), generator, shuffle).tolist():
            idx = chunks[c][self._order(len(chunks[c]), generator, shuffle)[rank::world_size]]
            x = self.rows(idx)
            if carry_idx is not None:
                idx, x = torch.cat([carry_idx, idx]), torch.cat([carry_x, x])
            full = len(idx) - len(idx) % batch_size
            for start in range(0, full, batch_size):
                take = min(batch_size, quota)
                if take <= 0:
                    return
                quota -= take
                yield idx[start: start + take], x[start: start + take]
            carry_idx, carry_x = idx[full:], x[full:]
        if carry_idx is not None and quota > 0:
            yield carry_idx[:quota], carry_x[:quota]

    # -- control partners -------------------------------------------------------------------
    def sample_controls(self, cell_type_codes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh uniformly random training control of the same cell type for every entry.

        Vectorised: one uniform draw per entry scaled into that cell type's slice of the
        flat control pool. `generator` must live on `self.device`.
        """
        size = self._pool_size[cell_type_codes]
        u = torch.rand(cell_type_codes.shape, generator=generator, device=self.device)
        pick = (u * size).long().clamp_max(size - 1)
        return self._pool_rows[self._pool_offset[cell_type_codes] + pick]

    def control_partners(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Control rows paired with the cells `idx` (same cell type), for one step."""
        return self.sample_controls(self.cell_type_codes[idx], generator)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


# --- helpers ---------------------------------------------------------------------------------------
def condition_targets(conditions: Sequence[str], genes: Sequence[str], prompt_genes: Sequence[str]):
    """Padded target arrays for `conditions`: (target_idx, prompt_idx, n_targets, usable).

    `target_idx[c, j]` is the gene index of the j-th target if measured, else -1;
    `prompt_idx[c, j]` its position in `prompt_genes` (genes with a gene prompt), else -1.
    A condition is usable when each target is measured (encoder prompt) or has a gene prompt.
    """
    gene_pos = {g: i for i, g in enumerate(genes)}
    prompt_pos = {g: i for i, g in enumerate(prompt_genes)}
    parsed = [parse_condition(c) for c in conditions]
    width = max([1, *(len(p) for p in parsed)])
    target_idx = np.full((len(conditions), width), -1, dtype=np.int64)
    prompt_idx = np.full((len(conditions), width), -1, dtype=np.int64)
    usable = np.ones(len(conditions), dtype=bool)
    for c, targets in enumerate(parsed):
        for j, gene in enumerate(targets):
            target_idx[c, j] = gene_pos.get(gene, -1)
            prompt_idx[c, j] = prompt_pos.get(gene, -1)
            if gene not in gene_pos and gene not in prompt_pos:
                usable[c] = False
    n_targets = np.array([len(p) for p in parsed], dtype=np.int64)
    return target_idx, prompt_idx, n_targets, usable


def _label_codes(labels: pd.Series | None, obs_names: np.ndarray, label_classes: Sequence[str] | None):
    if labels is None:
        return np.full(len(obs_names), -1, dtype=np.int64), list(label_classes or [])
    values = labels.reindex(obs_names)
    missing = int(values.isna().sum())
    if missing:
        raise ReginaError(f"the labels miss {missing} of {len(obs_names)} cells; they were made for "
                          "another dataset: re-run `regina label`")
    values = values.astype(str)
    classes = list(label_classes) if label_classes is not None else sorted(values.unique())
    codes = pd.Categorical(values, categories=classes).codes.astype(np.int64)
    if (codes < 0).any():
        unknown = sorted(set(values) - set(classes))
        raise ReginaError(f"labels contain classes the run was not trained on ({', '.join(unknown[:3])}); "
                          "use the labels the run was trained with")
    return codes, classes


def _read_dense(reader: RowReader, file_rows: np.ndarray, device: torch.device, chunk_cells: int) -> torch.Tensor:
    """Rows `file_rows` (increasing) as one dense device tensor, filled chunk by chunk."""
    out = torch.empty((len(file_rows), reader.n_genes), dtype=torch.float32, device=device)
    for start in range(0, len(file_rows), chunk_cells):
        block = reader.read(file_rows[start: start + chunk_cells])
        out[start: start + len(block)] = torch.from_numpy(block).to(device, non_blocking=False)
    return out
