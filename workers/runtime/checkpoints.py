"""Booster checkpoints of GBDT jobs: rank 0 saves every K rounds; a retry resumes from the newest.

Keys: ``s3://<artifact-bucket>/checkpoints/<job_id>/round-NNNNNN.<ext>``. Uploads run on a
background thread so a round never waits for the store. The newest checkpoint is chosen once, by
rank 0 of the new attempt, and published at the barrier, so every rank resumes from the same model.
"""
from __future__ import annotations

import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor

from common.settings import Settings
from common.store import ObjectStore

log = logging.getLogger(__name__)
_ROUND = re.compile(r"round-(\d+)\.")


class BoosterCheckpoints:
    def __init__(self, settings: Settings, store: ObjectStore, job_id: str, ext: str) -> None:
        self.store, self.bucket, self.ext = store, settings.artifact_bucket, ext
        self.prefix = f"checkpoints/{job_id}/"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gangway-checkpoint")
        self._pending: list[Future] = []
        self._bucket_ready = False

    def latest(self) -> tuple[str, int] | None:
        """(key, rounds) of the newest checkpoint of this job, or None."""
        found = [(int(m.group(1)), k) for k in self.store.list(self.bucket, self.prefix)
                 if (m := _ROUND.search(k[len(self.prefix):]))]
        if not found:
            return None
        rounds, key = max(found)
        return key, rounds

    def load(self, key: str) -> bytes:
        return self.store.get(self.bucket, key)

    def save_async(self, rounds: int, data: bytes) -> None:
        key = f"{self.prefix}round-{rounds:06d}.{self.ext}"
        if not self._bucket_ready:
            self.store.ensure_bucket(self.bucket)
            self._bucket_ready = True
        self._pending.append(self._pool.submit(self.store.put, self.bucket, key, data))

    def flush(self) -> None:
        for fut in self._pending:
            try:
                fut.result(timeout=60)
            except Exception as exc:   # a lost checkpoint costs rounds on a retry, never the job
                log.warning("checkpoint upload failed: %s", exc)
        self._pending.clear()
