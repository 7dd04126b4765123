"""The coordinator's timer loop: it survives a failing tick, the first one included."""
from __future__ import annotations

import threading
import time

from common.settings import Settings
from workers.coordinator.tasks import start_timer


class FlakyCoordinator:
    """Just what the timer uses of a Coordinator: settings and tick(); the first ``failures`` ticks raise."""

    def __init__(self, failures: int) -> None:
        self.settings = Settings.from_env({}, schedule_interval=0.01)
        self.failures = failures
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks <= self.failures:
            raise ConnectionError("Redis is restarting")


def test_the_timer_keeps_ticking_when_its_first_tick_raises():
    coordinator, stop = FlakyCoordinator(failures=1), threading.Event()
    thread = start_timer(coordinator, stop)
    deadline = time.monotonic() + 5
    while coordinator.ticks < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=2)
    assert coordinator.ticks >= 3 and not thread.is_alive()


def test_the_timer_ticks_at_once_and_stops_when_asked():
    coordinator, stop = FlakyCoordinator(failures=0), threading.Event()
    stop.set()
    start_timer(coordinator, stop).join(timeout=2)
    assert coordinator.ticks == 1
