"""What one rank's supervisor records in the worker's metrics, fed from the child's events."""
from __future__ import annotations

import time

from common import metrics


class RankInstruments:
    """Counts a rank's fetch, rendezvous wait, iterations and outcome (labels: the job's framework)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind or "unknown"
        self._last_iter = 0
        self._last_at = 0.0

    def fetched(self, ev: dict) -> None:
        metrics.FETCH_BYTES.labels("store").inc(ev.get("bytes_fetched") or 0)
        metrics.FETCH_BYTES.labels("cache").inc(ev.get("bytes_cached") or 0)
        metrics.CACHE_LOOKUPS.labels("hit").inc(ev.get("cache_hits") or 0)
        metrics.CACHE_LOOKUPS.labels("miss").inc(ev.get("cache_misses") or 0)
        if ev.get("fetch_seconds") is not None:
            metrics.FETCH_SECONDS.observe(ev["fetch_seconds"])

    @property
    def iteration(self) -> int:
        return self._last_iter

    def rendezvous(self, seconds: float, resumed_rounds: int = 0) -> None:
        """The barrier passed; a retry resumes after ``resumed_rounds`` an earlier attempt already counted."""
        metrics.RENDEZVOUS.labels(self.kind).observe(seconds)
        self._last_at = time.monotonic()
        self._last_iter = max(self._last_iter, resumed_rounds)

    def progress(self, iteration: int, iter_seconds: float | None = None) -> None:
        """``iteration`` is the newest completed round; dropped progress events are made up for."""
        done = iteration - self._last_iter
        if done <= 0:
            return
        now = time.monotonic()
        if done == 1 and iter_seconds is not None:   # the child timed the round itself
            metrics.ITERATION_SECONDS.labels(self.kind).observe(iter_seconds)
        elif self._last_at:
            per = (now - self._last_at) / done
            for _ in range(min(done, 100)):   # bounded work if thousands of rounds arrive at once
                metrics.ITERATION_SECONDS.labels(self.kind).observe(per)
        metrics.ITERATIONS.labels(self.kind).inc(done)
        self._last_iter, self._last_at = iteration, now

    def step(self) -> None:
        """One ``report()`` of a PyTorch training function counts as an iteration."""
        self.progress(self._last_iter + 1)

    def finished(self, ok: bool) -> None:
        metrics.RANKS_FINISHED.labels(self.kind, "succeeded" if ok else "failed").inc()
