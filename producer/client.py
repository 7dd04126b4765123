"""The producer's connection to a fleet: Redis state, the object store, and a Celery app to send with."""
from __future__ import annotations

import threading
import time
import uuid

import redis

from common import keys
from common.errors import BrokerUnavailableError, PlacementError
from common.models import JobSpec, Resources
from common.settings import Settings
from common.state import State, connect
from common.store import S3Store
from workers.celery_app import make_app
from workers.coordinator.scheduler import infeasibility

_clients: dict[Settings, Client] = {}
_lock = threading.Lock()


class Client:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = State(connect(settings))
        self.store = S3Store(settings)
        self.app = make_app(settings)

    @classmethod
    def default(cls, settings: Settings | None = None) -> Client:
        settings = settings or Settings.from_env()
        with _lock:
            if settings not in _clients:
                _clients[settings] = cls(settings)
            return _clients[settings]

    def check_capacity(self, resources: Resources) -> int:
        """Fail fast when the fleet can never run the gang; returns the gang size it would get now."""
        try:
            return self._check_capacity(resources)
        except redis.RedisError as exc:
            raise broker_unavailable(self.settings, exc) from None   # one line, not redis' own chain

    def _check_capacity(self, resources: Resources) -> int:
        self._wait_coordinator()
        workers = self._wait_feasible(resources)
        if resources.num_workers > 0:
            return resources.num_workers
        return max(1, sum(w.free for w in workers))

    def _wait_coordinator(self) -> None:
        """A coordinator that ran here before (being restarted) gets GANGWAY_HEARTBEAT_TTL to come back."""
        deadline = time.monotonic() + self.settings.heartbeat_ttl
        while not self.state.coordinator_alive():
            if time.monotonic() >= deadline or not self.state.r.exists(keys.COORDINATOR_INFO):
                raise PlacementError(f"no gangway coordinator answers at {self.settings.redacted_broker_url} "
                                     "(start a fleet with `gangway up`, or check GANGWAY_BROKER_URL)")
            time.sleep(0.5)

    def _wait_feasible(self, resources: Resources) -> list:
        """The live workers once the gang fits; a worker that is registered but not heartbeating (being
        restarted) gets GANGWAY_HEARTBEAT_TTL to come back before the caller is told it cannot fit."""
        deadline = time.monotonic() + self.settings.heartbeat_ttl
        while True:
            workers = self.state.workers()
            reason = infeasibility(resources, workers)
            if not reason:
                return workers
            if time.monotonic() >= deadline or all(w.alive for w in workers):
                raise PlacementError(reason)
            time.sleep(0.5)

    def submit(self, spec: JobSpec) -> str:
        spec.submitted_at = spec.submitted_at or time.time()   # signed specs set it before signing
        # Until a coordinator persists it, the job is known by this marker (a coordinator may be down for long).
        self.state.r.set(keys.job_submitted(spec.job_id), spec.submitted_at,
                         ex=int(self.settings.job_ttl_days * 86400))
        self.app.send_task("gangway.submit_job", args=[_as_dict(spec)], queue=keys.COORDINATOR_QUEUE,
                           argsrepr=f"job_id={spec.job_id} framework={spec.framework}")   # for Flower
        return spec.job_id

    def cancel(self, job_id: str) -> None:
        self.app.send_task("gangway.cancel_job", args=[job_id], queue=keys.COORDINATOR_QUEUE,
                           argsrepr=f"job_id={job_id}")


def broker_unavailable(settings: Settings, exc: redis.RedisError) -> BrokerUnavailableError:
    """The error a caller gets when the broker does not answer: where, why, and what to do about it."""
    url = settings.redacted_broker_url
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
        return BrokerUnavailableError(f"the Redis at {url} refused the credentials in GANGWAY_BROKER_URL "
                                      f"({type(exc).__name__}: {exc})")
    return BrokerUnavailableError(f"nothing answers at the gangway broker {url} ({type(exc).__name__}: {exc}); "
                                  "start a local fleet with `gangway up`, or point GANGWAY_BROKER_URL at your "
                                  "fleet's Redis")


def _as_dict(spec: JobSpec) -> dict:
    import json
    return json.loads(spec.to_json())


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
