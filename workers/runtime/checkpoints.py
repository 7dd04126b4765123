"""Booster checkpoints of GBDT jobs: rank 0 saves every K rounds; a retry resumes from the newest recorded.

Keys: ``s3://<artifact-bucket>/checkpoints/<job_id>/<token>/round-NNNNNN.<ext>``: each attempt writes under
its own prefix, so a child outliving its attempt never overwrites a later attempt's checkpoint. Uploads run
on a background thread so a round never waits for the store; once an object is stored, the child tells its
supervisor (a ``checkpoint`` event), which records it in Redis only while the attempt is current
(``checkpoint.lua``). A retry resumes from the newest *recorded* checkpoint, chosen once by rank 0's
supervisor and passed to the child (``resume``), then published at the barrier, so every rank resumes from
the same model; what a stale child wrote is never read. The supervisor keeps the newest
GANGWAY_CHECKPOINT_KEEP recorded checkpoints; the coordinator deletes a job's checkpoints once it ended.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from common.settings import Settings
from common.store import ObjectStore

log = logging.getLogger(__name__)


def checkpoint_prefix(job_id: str) -> str:
    return f"checkpoints/{job_id}/"


def checkpoint_due(done: int, total: int, every_rounds: int, seconds_since: float, min_seconds: float) -> bool:
    """Whether rank 0 checkpoints after round ``done``: every ``every_rounds`` rounds but not after the
    last, and only once ``min_seconds`` of training passed since the last checkpoint (or the start), so a
    short job pays no serialisation and no upload for a checkpoint its retry would barely need."""
    return bool(every_rounds) and done % every_rounds == 0 and done < total and seconds_since >= min_seconds


class BoosterCheckpoints:
    def __init__(self, settings: Settings, store: ObjectStore, job_id: str, token: str, ext: str,
                 on_saved: Callable[[int, str], None] | None = None) -> None:
        self.store, self.bucket, self.ext = store, settings.artifact_bucket, ext
        self.prefix = f"{checkpoint_prefix(job_id)}{token}/"
        self.on_saved = on_saved   # (rounds, key) once stored: the supervisor records it, fenced
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gangway-checkpoint")
        self._pending: list[Future] = []
        self._bucket_ready = False

    def load(self, key: str) -> bytes:
        return self.store.get(self.bucket, key)

    def save_async(self, rounds: int, data: bytes) -> None:
        key = f"{self.prefix}round-{rounds:06d}.{self.ext}"
        if not self._bucket_ready:
            self.store.ensure_bucket(self.bucket)
            self._bucket_ready = True
        self._pending.append(self._pool.submit(self._save, rounds, key, data))

    def _save(self, rounds: int, key: str, data: bytes) -> None:
        self.store.put(self.bucket, key, data)
        if self.on_saved is not None:
            self.on_saved(rounds, key)

    def flush(self) -> None:
        for fut in self._pending:
            try:
                fut.result(timeout=60)
            except Exception as exc:   # a lost checkpoint costs rounds on a retry, never the job
                log.warning("checkpoint upload failed: %s", exc)
        self._pending.clear()


def newest(recorded: dict[int, str]) -> tuple[str, int] | None:
    """(key, rounds) of the newest recorded checkpoint, or None."""
    if not recorded:
        return None
    rounds = max(recorded)
    return recorded[rounds], rounds


def prune(recorded: dict[int, str], keep: int) -> list[int]:
    """The rounds of recorded checkpoints past the newest ``keep`` (0 = keep all)."""
    return sorted(recorded)[:-keep] if keep > 0 and len(recorded) > keep else []
