"""The producer's connection to a fleet: Redis state, the object store, and a Celery app to send with."""
from __future__ import annotations

import threading
import time
import uuid

from common import keys
from common.errors import PlacementError
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
        if not self.state.coordinator_alive():
            raise PlacementError(f"no gangway coordinator answers at {self.settings.redacted_broker_url} "
                                 "(start a fleet with `gangway up`, or check GANGWAY_BROKER_URL)")
        workers = self.state.workers()
        reason = infeasibility(resources, workers)
        if reason:
            raise PlacementError(reason)
        if resources.num_workers > 0:
            return resources.num_workers
        return max(1, sum(w.free for w in workers))

    def submit(self, spec: JobSpec) -> str:
        spec.submitted_at = spec.submitted_at or time.time()   # signed specs set it before signing
        self.app.send_task("gangway.submit_job", args=[_as_dict(spec)], queue=keys.COORDINATOR_QUEUE,
                           argsrepr=f"job_id={spec.job_id} framework={spec.framework}")   # for Flower
        return spec.job_id

    def cancel(self, job_id: str) -> None:
        self.app.send_task("gangway.cancel_job", args=[job_id], queue=keys.COORDINATOR_QUEUE,
                           argsrepr=f"job_id={job_id}")


def _as_dict(spec: JobSpec) -> dict:
    import json
    return json.loads(spec.to_json())


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
