"""Arrow columns to the float32 arrays the GBDT libraries take (one copy, no more)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from common.errors import DatasetError


def float32_column(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def float32_matrix(table: pa.Table | pa.RecordBatch, cols: list[str]) -> np.ndarray:
    """Rows x ``cols`` as one C-contiguous float32 matrix, filled a record batch at a time: besides the
    matrix, one batch's columns are copied at once, not every column of the table (a table of several
    chunks gave each column a contiguous copy first, as big as the matrix, then the matrix)."""
    names = table.schema.names
    idx = [names.index(c) for c in cols]
    batches = table.to_batches() if isinstance(table, pa.Table) else [table]
    if len(batches) == 1:
        return np.column_stack([float32_column(batches[0].column(i)) for i in idx]) if idx else \
            np.empty((table.num_rows, 0), dtype=np.float32)
    out = np.empty((table.num_rows, len(idx)), dtype=np.float32)
    lo = 0
    for batch in batches:
        hi = lo + batch.num_rows
        for j, i in enumerate(idx):
            out[lo:hi, j] = float32_column(batch.column(i))
        lo = hi
    return out


def finite_labels(y: np.ndarray, label: str, dataset: str, first_row: int = 0) -> np.ndarray:
    """``y`` when every value is finite, else DatasetError naming the column, the dataset and where in the
    rank's shard (``first_row``: the shard row of ``y[0]``). The producer checks labels at upload, but
    parquet used in place carries no NaN in its statistics: a NaN reaches the rank, and the frameworks'
    own errors ("Label contains NaN") name no column or row."""
    bad = ~np.isfinite(y)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DatasetError(f"label column {label!r} of dataset {dataset!r} has {len(rows)} NaN or inf value(s) "
                           f"in this rank's shard, the first at shard row {first_row + int(rows[0]):,} "
                           f"(value {y[rows[0]]}); fix the source or filter those rows and submit again")
    return y
