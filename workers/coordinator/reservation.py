"""Redis side of gang reservation: the Lua scripts and the fencing-token counter."""
from __future__ import annotations

import json
import logging
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

    def next_token(self) -> str:
        return str(self.r.incr(keys.FENCE))

    def reserve(self, placement: Placement, rendezvous: Rendezvous, lease_seconds: float) -> tuple[str, str]:
        """Reserve every worker of ``placement`` or none. Returns (token, '') or ('', reason)."""
        token = self.next_token()
        wkeys: list[str] = []
        for wid in placement.worker_ids:
            wkeys += [keys.worker(wid), keys.worker_alive(wid)]
        now = time.time()
        gang = {"workers": list(placement.worker_ids), "use_gpu": placement.use_gpu}
        ok, reason = self._reserve(
            keys=[keys.job(placement.job_id), keys.PENDING, *wkeys, keys.RUNNING],
            args=[placement.job_id, token, now + lease_seconds, json.dumps(gang),
                  json.dumps(rendezvous.to_dict()), now, len(placement.worker_ids)])
        return (token, "") if int(ok) == 1 else ("", reason)

    def release(self, job_id: str, token: str, worker_ids: list[str]) -> int:
        return int(self._release(keys=[keys.job(job_id), keys.RUNNING, *[keys.worker(w) for w in worker_ids]],
                                 args=[job_id, token]))
