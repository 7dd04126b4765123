"""The embedded fleet's S3 server starts even when one `weed mini` dies before serving (a port it was handed
was taken in between), and says why when it never does."""
from __future__ import annotations

import time

import pytest

from common.errors import GangwayError
from tests.conftest import private_fleet_settings
from workers.local import services
from workers.local.fleet import Fleet


def _fleet(monkeypatch, failures: int):
    real = services.weed_command
    calls = []

    def weed_command(port, data_dir, bind="127.0.0.1"):
        calls.append(port)
        if len(calls) <= failures:   # the weed binary itself, with a flag it refuses: it exits at once
            return [services.weed_binary(), "mini", "-no-such-flag"]
        return real(port, data_dir, bind=bind)

    monkeypatch.setattr(services, "weed_command", weed_command)
    settings = private_fleet_settings()
    return Fleet(settings, workers=0), settings, calls


def test_a_weed_that_exits_before_serving_is_started_again(monkeypatch):
    f, settings, calls = _fleet(monkeypatch, failures=1)
    host, port = services.s3_address(settings.s3_url)
    try:
        f._spawn_weed(host, port, time.monotonic() + 60)
        assert services.port_open(host, port)
        assert len(calls) == 2 and [s.name for s in f.started] == ["s3"]   # the dead one is not supervised
    finally:
        f.stop()
    assert not services.port_open(host, port)


def test_a_weed_that_never_serves_fails_with_its_log(monkeypatch):
    f, settings, calls = _fleet(monkeypatch, failures=5)
    host, port = services.s3_address(settings.s3_url)
    with pytest.raises(GangwayError, match=r"(?s)exited with code \d+ \(3 tries\); log .*s3\.log:\n.*weed mini"):
        f._spawn_weed(host, port, time.monotonic() + 60)
    assert len(calls) == 3 and f.started == []
