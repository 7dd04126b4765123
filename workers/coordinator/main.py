"""Entry point of the coordinator process: ``celery -A workers.coordinator.main worker -Q gangway.coordinator``."""
from __future__ import annotations

from common.settings import Settings
from common.state import State, connect
from workers.celery_app import make_app
from workers.coordinator.service import Coordinator
from workers.coordinator.tasks import register

settings = Settings.from_env()
app = make_app(settings)
coordinator = Coordinator(settings, State(connect(settings)), app)
register(app, coordinator)
