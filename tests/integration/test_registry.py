"""A worker's registration against a real redis-server: what survives Redis losing its state."""
from __future__ import annotations

import time

import pytest

from common import keys
from common.settings import Settings
from common.state import State, connect
from tests.integration.helpers import wait_until

pytestmark = pytest.mark.integration


class _NoCelery:
    """Stands in for the Celery app: these tests look at Redis, not at scheduling requests."""

    def send_task(self, *args, **kwargs) -> None:
        return None


def test_a_draining_worker_stays_draining_when_it_re_registers_after_redis_lost_its_state(redis_url):
    from workers.runtime.registry import Heartbeat, worker_info
    settings = Settings(broker_url=redis_url, worker_id="w-drain", heartbeat_interval=0.2, heartbeat_ttl=2.0)
    state = State(connect(settings))
    beat = Heartbeat(settings, state, _NoCelery(), worker_info(settings, ()))
    beat.start()
    try:
        beat.draining = True
        state.r.hset(keys.worker("w-drain"), "draining", "1")
        state.r.flushdb()   # Redis restarted without its data
        wait_until(lambda: state.r.sismember(keys.WORKERS, "w-drain"), 10, "the worker to register again")
        time.sleep(0.5)
        assert state.r.hget(keys.worker("w-drain"), "draining") == "1"
        assert next(w for w in state.workers() if w.info.worker_id == "w-drain").draining
    finally:
        beat.stop()
