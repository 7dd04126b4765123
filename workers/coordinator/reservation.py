"""Redis side of gang reservation: its Lua scripts (reserve, release, repair, unwatch, the reaper's scan) and
the fencing tokens."""
from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

import redis

from common import keys
from common.models import Placement, Rendezvous

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent


class Reservations:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._reserve = client.register_script((_HERE / "reserve.lua").read_text())
        self._release = client.register_script((_HERE / "release.lua").read_text())
        self._repair = client.register_script((_HERE / "repair.lua").read_text())
        self._unwatch = client.register_script((_HERE / "unwatch.lua").read_text())
        self._scan = client.register_script((_HERE / "reap.lua").read_text())
        self._unfree = client.register_script((_HERE / "unfree.lua").read_text())

    def next_token(self) -> str:
        """A fencing token no attempt had before: the counter orders tokens for people reading logs; the
        random part keeps a token unique when Redis loses the counter's last increments (appendfsync
        everysec, an async failover) and issues a number again."""
        return f"{self.r.incr(keys.FENCE)}-{secrets.token_hex(4)}"

    def reserve(self, placement: Placement, rendezvous: Rendezvous, lease_seconds: float,
                first_lease_seconds: float | None = None, now: float | None = None) -> tuple[str, str]:
        """Reserve every worker of ``placement`` or none. Returns (token, '') or ('', reason).

        Each rank's lease lasts ``first_lease_seconds`` (default: one lease) until the rank first writes,
        then ``lease_seconds`` from each of its writes."""
        token = self.next_token()
        wkeys: list[str] = []
        for wid in placement.worker_ids:
            wkeys += [keys.worker(wid), keys.worker_alive(wid)]
        now = time.time() if now is None else now
        gang = {"workers": list(placement.worker_ids), "use_gpu": placement.use_gpu}
        first = lease_seconds if first_lease_seconds is None else first_lease_seconds
        ok, reason = self._reserve(
            keys=[keys.job(placement.job_id), keys.PENDING, *wkeys, keys.RUNNING, keys.job_ranks(placement.job_id),
                  keys.FREE],
            args=[placement.job_id, token, now + lease_seconds, json.dumps(gang),
                  json.dumps(rendezvous.to_dict()), now, len(placement.worker_ids),
                  max(1, int(lease_seconds * 1000)), max(1, int(first * 1000)),
                  keys.rank_lease(placement.job_id, token, "")])
        return (token, "") if int(ok) == 1 else ("", reason)

    def release(self, job_id: str, token: str, worker_ids: list[str]) -> int:
        return int(self._release(keys=[keys.job(job_id), keys.RUNNING, keys.FREE,
                                       *[keys.worker(w) for w in worker_ids]], args=[job_id, token, *worker_ids]))

    def repair(self, worker_id: str, job_id: str) -> bool:
        """Free ``worker_id`` if its reservation for ``job_id`` names no attempt that runs on it now."""
        return bool(self._repair(keys=[keys.worker(worker_id), keys.job(job_id), keys.FREE], args=[worker_id]))

    def repair_many(self, held: list[tuple[str, str]]) -> list[str]:
        """``repair`` for every (worker, job) pair in one round trip (each script call stays atomic);
        returns the workers freed."""
        if not held:
            return []
        pipe = self.r.pipeline(transaction=False)
        for worker_id, job_id in held:
            self._repair(keys=[keys.worker(worker_id), keys.job(job_id), keys.FREE], args=[worker_id], client=pipe)
        return [wid for (wid, _), freed in zip(held, pipe.execute()) if freed]

    def unwatch(self, job_id: str) -> bool:
        """Drop ``job_id`` from the running set if (and only if) it is not RUNNING."""
        return bool(self._unwatch(keys=[keys.RUNNING, keys.job(job_id)], args=[job_id]))

    def drop_dead_free(self) -> list[str]:
        """``unfree.lua``: take every worker without a heartbeat out of the free-worker index; returns their ids."""
        return list(self._unfree(keys=[keys.FREE], args=[keys.worker("")]))

    def running_scan(self) -> list:
        """``reap.lua``: per running job its state, token, lease_ms, failing-since mark and the ranks that
        may need a verdict (final status written, worker heartbeat gone, or lease gone)."""
        return self._scan(keys=[keys.RUNNING], args=[keys.job(""), keys.worker("")])
