"""``to_torch_dataset``: an IterableDataset streaming an Arrow table chunk by chunk as dicts of tensors."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

try:
    from torch.utils.data import IterableDataset
except ImportError:   # torch is an extra; the class below then refuses to be built
    IterableDataset = object


class ArrowTorchDataset(IterableDataset):
    """Yields ``dict[column -> tensor]``: single rows (``batch_size=None``) or batches of ``batch_size``.

    With ``shuffle``, chunk order and the rows inside each chunk are permuted with a
    seed that depends on the epoch (one per ``iter()``), the rank and the loader worker.
    Under ``DataLoader(num_workers=k)`` worker ``i`` takes chunks ``i, i+k, …``, so
    every row is seen exactly once per epoch.
    """

    def __init__(self, table: pa.Table, *, batch_size: int | None = None, shuffle: bool = False,
                 drop_last_batch: bool = True, seed: int = 0, rank: int = 0) -> None:
        if IterableDataset is object:
            raise ImportError("to_torch_dataset needs torch: pip install 'gangway[torch]'")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
        super().__init__()
        self.table = table
        self.batch_size, self.shuffle, self.drop_last_batch = batch_size, shuffle, drop_last_batch
        self.seed, self.rank = seed, rank
        self.epoch = 0

    def _chunks(self, rng: np.random.Generator | None) -> list[pa.RecordBatch]:
        import torch.utils.data as tud
        batches = [b for b in self.table.to_batches() if b.num_rows]
        info = tud.get_worker_info()
        order = list(range(len(batches)))
        if rng is not None:
            rng.shuffle(order)
        if info is not None:
            order = order[info.id::info.num_workers]
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[dict]:
        import torch
        import torch.utils.data as tud
        info = tud.get_worker_info()
        rng = None
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        self.epoch += 1
        worker_rng = None if rng is None else np.random.default_rng(
            [self.seed, self.epoch, self.rank, 0 if info is None else info.id + 1])
        carry: dict[str, np.ndarray] | None = None
        for batch in self._chunks(rng):
            cols = {name: batch.column(i).to_numpy(zero_copy_only=False) for i, name in enumerate(batch.schema.names)}
            if worker_rng is not None:
                perm = worker_rng.permutation(batch.num_rows)
                cols = {k: v[perm] for k, v in cols.items()}
            if self.batch_size is None:
                for i in range(batch.num_rows):
                    yield {k: torch.as_tensor(v[i]) for k, v in cols.items()}
                continue
            if carry is not None:
                cols = {k: np.concatenate([carry[k], v]) for k, v in cols.items()}
            n = len(next(iter(cols.values())))
            full = n - n % self.batch_size
            for start in range(0, full, self.batch_size):
                yield {k: _tensor(v[start:start + self.batch_size]) for k, v in cols.items()}
            carry = {k: v[full:] for k, v in cols.items()} if full < n else None
        if carry is not None and self.batch_size is not None and not self.drop_last_batch:
            yield {k: _tensor(v) for k, v in carry.items()}


def _tensor(values: np.ndarray):
    import torch
    # Arrow's zero-copy arrays are read-only; torch wants writable memory, so copy the batch once.
    return torch.from_numpy(np.array(values, copy=True))
