"""The caller's upload progress: a tqdm bar (rows, MB/s) that appears only for uploads past ~2 s."""
from __future__ import annotations

import sys
import threading
import time

SHOW_AFTER_SECONDS = 2.0


class UploadProgress:
    """A ``(rows, bytes)`` callback for ``write_batches``; thread-safe (chunks finish on upload threads)."""

    def __init__(self, total_rows: int | None, what: str, *, delay: float = SHOW_AFTER_SECONDS,
                 file=None) -> None:
        self.total_rows, self.what, self.delay = total_rows, what, delay
        self.file = file if file is not None else sys.stderr
        self.rows = 0
        self.nbytes = 0
        self._bar = None
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    def __enter__(self) -> UploadProgress:  # noqa: PYI034  (a final class in all but name)
        from tqdm import tqdm
        # delay: quick uploads (most submits) print nothing at all.
        self._bar = tqdm(total=self.total_rows, desc=f"uploading {self.what}", unit="rows", unit_scale=True,
                         delay=self.delay, file=self.file, leave=True, dynamic_ncols=True)
        return self

    def __call__(self, rows: int, nbytes: int) -> None:
        with self._lock:
            self.rows += rows
            self.nbytes += nbytes
            if self._bar is not None:
                self._bar.update(rows)
                self._bar.set_postfix_str(f"{self.mb_per_second():.1f} MB/s", refresh=False)

    def mb_per_second(self) -> float:
        return self.nbytes / 1e6 / max(time.perf_counter() - self._t0, 1e-9)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
