"""Fixtures: a real embedded fleet (redis-server, weed mini S3, coordinator, 2 Celery workers) on free ports.

Integration tests skip with a reason when a server binary is missing, but fail under CI=true.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile

import pytest

from common.settings import Settings
from workers.local import services

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing_binaries() -> str:
    try:
        services.redis_binary()
        services.weed_binary()
    except Exception as exc:
        return str(exc)
    return ""


def _free_block(size: int = 10) -> str:
    for _ in range(200):
        lo = random.randrange(30000, 45000, size)
        if all(not services.port_open("127.0.0.1", p, 0.05) for p in range(lo, lo + 4 * size)):
            return f"{lo}-{lo + size - 1}"
    raise RuntimeError("no free port block")


def private_fleet_settings(**overrides) -> Settings:
    """Settings for a fleet of a test module's own (fresh ports, home and Redis)."""
    missing = _missing_binaries()
    if missing:
        pytest.fail(missing) if IN_CI else pytest.skip(missing)
    base = dict(home=tempfile.mkdtemp(prefix="gangway-private-"),
                broker_url=f"redis://127.0.0.1:{services.free_port()}/0",
                s3_endpoint=f"http://127.0.0.1:{services.free_port()}", worker_ports=_free_block(),
                heartbeat_interval=1.0, heartbeat_ttl=4.0, schedule_interval=1.0, rendezvous_timeout=30.0,
                progress_timeout=20.0, chunk_rows=4096,   # 20 s: a 2-core CI box under load is not a hang
                checkpoint_seconds=0.0)   # tests kill ranks seconds into a job: checkpoint every 10 rounds
    return Settings.from_env({}, **{**base, **overrides})


@contextlib.contextmanager
def running_fleet(settings: Settings, workers: int):
    """Start a fleet and point this process's producer at it; restore everything afterwards."""
    from workers.local.fleet import Fleet
    saved = {k: v for k, v in os.environ.items() if k.startswith("GANGWAY_")}
    os.environ.update(settings.as_env())
    f = Fleet(settings, workers=workers)
    try:
        f.start(timeout=180)
        yield f
    finally:
        f.stop()
        for k in [k for k in os.environ if k.startswith("GANGWAY_")]:
            del os.environ[k]
        os.environ.update(saved)
        shutil.rmtree(settings.home, ignore_errors=True)


@pytest.fixture(scope="session")
def fleet_settings():
    missing = _missing_binaries()
    if missing:
        if IN_CI:
            pytest.fail(f"integration servers missing under CI: {missing}")
        pytest.skip(f"integration servers missing: {missing}")
    home = tempfile.mkdtemp(prefix="gangway-test-")
    return Settings.from_env(
        {}, home=home, broker_url=f"redis://127.0.0.1:{services.free_port()}/0",
        s3_endpoint=f"http://127.0.0.1:{services.free_port()}", worker_ports=_free_block(),
        heartbeat_interval=1.0, heartbeat_ttl=6.0, schedule_interval=1.0, rendezvous_timeout=30.0,
        progress_timeout=15.0, visibility_timeout=3.0,
        chunk_rows=4096, checkpoint_seconds=0.0)   # tests kill ranks seconds into a job: checkpoint every 10 rounds


@pytest.fixture(scope="session")
def fleet(fleet_settings):
    """A running 2-worker fleet; the producer in this process is pointed at it through env."""
    with running_fleet(fleet_settings, workers=2) as f:
        yield f


@contextlib.contextmanager
def server_process(cmd: list[str], port: int, folder: str):
    """A server of the test's own, up once ``port`` answers; terminated by PID, ``folder`` removed."""
    import subprocess
    import time
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not services.port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield proc
    finally:
        stop_process(proc)
        shutil.rmtree(folder, ignore_errors=True)


def stop_process(proc, grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``grace`` s (a weed mini busy flushing can be slow)."""
    import subprocess
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url():
    """A bare redis-server of our own (no fleet), for the Lua scripts' contracts."""
    try:
        services.redis_binary()
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"redis-server missing under CI: {exc}")
        pytest.skip(str(exc))
    port = services.free_port()
    data = tempfile.mkdtemp(prefix="gangway-redis-")
    with server_process(services.redis_command(port, data), port, data):
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def state(fleet, fleet_settings):
    from common.state import State, connect
    return State(connect(fleet_settings))
