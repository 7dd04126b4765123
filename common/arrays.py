"""Arrow columns to the float32 arrays the GBDT libraries take (one copy, no more)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def float32_column(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def float32_matrix(table: pa.Table | pa.RecordBatch, cols: list[str]) -> np.ndarray:
    """Rows x ``cols`` as one C-contiguous float32 matrix."""
    names = table.schema.names
    return np.column_stack([float32_column(table.column(names.index(c))) for c in cols])
