"""Celery wiring shared by the coordinator, the trainer workers and the producer's client."""
from __future__ import annotations

from celery import Celery, states
from celery.backends.base import DisabledBackend

from common import keys
from common.settings import Settings

COORDINATOR_TASKS = ("gangway.submit_job", "gangway.schedule", "gangway.rank_finished", "gangway.cancel_job")


class NoResults(DisabledBackend):
    """No result backend, by design (outcomes live in the Redis job records). A revoke (cancel, abort)
    asks the backend for the task's state before marking it revoked; this one answers PENDING and
    stores nothing, where Celery's disabled backend makes every worker log a warning per revoke."""

    def get_state(self, task_id: str) -> str:
        return states.PENDING

    def mark_as_revoked(self, *args, **kwargs) -> None:
        return None


def make_app(settings: Settings, *, include: tuple[str, ...] = ()) -> Celery:
    """A Celery app for ``settings``: JSON only, prefetch 1, task events on for Flower."""
    app = Celery("gangway", broker=settings.broker_url, include=list(include))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=f"{__name__}:NoResults",
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_routes={name: {"queue": keys.COORDINATOR_QUEUE} for name in COORDINATOR_TASKS},
        task_default_queue=keys.COORDINATOR_QUEUE,
        broker_connection_retry_on_startup=True,
        # A rank's report or a scheduling request published while Redis restarts waits for it (~40 s).
        task_publish_retry_policy={"max_retries": 30, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 2.0},
        # Leases and heartbeats decide what runs again, not redelivery: train_rank is acknowledged
        # when it starts, so only the short, acks_late coordinator tasks are ever redelivered (after
        # this timeout, e.g. when the coordinator was killed mid-task).
        # A publish (a rank's report, a task) on a half-open connection fails after GANGWAY_REDIS_SOCKET_TIMEOUT
        # and is retried on a new one, instead of waiting on TCP for ~15 min (kombu's default: no timeout).
        broker_transport_options={"visibility_timeout": settings.visibility_timeout,
                                  "socket_timeout": settings.redis_socket_timeout,
                                  "socket_connect_timeout": min(5.0, settings.redis_socket_timeout),
                                  "socket_keepalive": True},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    app.gangway_settings = settings
    return app
