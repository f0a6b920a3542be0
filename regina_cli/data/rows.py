"""Dense float32 rows of a dataset's X, from memory or straight from a backed h5ad.

Training streams rows from the file when the matrix does not fit on the device, and
prediction reads only the control cells it starts from; both go through `RowReader`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from regina_cli.errors import ReginaError

# Streaming reads: rows closer than this are read as one contiguous block.
_MAX_ROW_GAP = 64


class RowReader:
    """Dense float32 rows of X, from an in-memory AnnData or straight from a backed h5ad.

    Reading a backed file goes through h5py: CSR rows are read as contiguous runs of
    `indptr`, so a chunk of neighbouring rows costs one read instead of one per row.
    """

    def __init__(self, adata):
        self.n_genes = adata.n_vars
        self._matrix = None
        self._h5 = None
        if adata.isbacked:
            import h5py

            self._h5 = h5py.File(Path(adata.filename), "r")
            x = self._h5["X"]
            if isinstance(x, h5py.Dataset):
                self._dense_ds = x
            else:
                encoding = x.attrs.get("encoding-type", "")
                if encoding != "csr_matrix":
                    raise ReginaError(f"X in {adata.filename} is stored as {encoding!r}; "
                                      "streaming needs CSR or dense X (re-run `regina fetch`)")
                self._dense_ds = None
                self._indptr = x["indptr"][:]
                self._indices = x["indices"]
                self._data = x["data"]
        else:
            self._matrix = adata.X

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (strictly increasing file positions) as a dense [len(rows), G] array."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._matrix is not None:
            block = self._matrix[rows]
            block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
            return block.astype(np.float32, copy=False)
        if self._dense_ds is not None:
            return np.asarray(self._dense_ds[rows], dtype=np.float32)
        out = np.zeros((len(rows), self.n_genes), dtype=np.float32)
        # Group rows into runs with small gaps: one h5py read per run (reading a few unneeded
        # rows is far cheaper than one read per row when train/val cells interleave with test).
        breaks = np.flatnonzero(np.diff(rows) > _MAX_ROW_GAP) + 1
        for run_start, run in zip(np.r_[0, breaks], np.split(rows, breaks)):
            first, last = run[0], run[-1]
            lo, hi = self._indptr[first], self._indptr[last + 1]
            block = sp.csr_matrix((self._data[lo:hi], self._indices[lo:hi], self._indptr[first: last + 2] - lo),
                                  shape=(last - first + 1, self.n_genes))
            out[run_start: run_start + len(run)] = block[run - first].toarray()
        return out

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
