"""``gangway up``'s restart policy and the by-value code's file names, as pure logic."""
from __future__ import annotations

import json
import os
import traceback

from workers.local.restart import RestartHistory, RestartPolicy, decide, describe_exit

POLICY = RestartPolicy(initial=1.0, cap=8.0, healthy_after=60.0, max_restarts=5, window=60.0)


def _crash_times(history: RestartHistory, exits: list[float], up_for: float = 0.5):
    decisions = []
    for t in exits:
        d = decide(POLICY, history, started_at=t - up_for, now=t)
        history = d.history
        decisions.append(d)
    return decisions


def test_a_process_that_keeps_dying_is_restarted_after_1_2_4_8_seconds_capped():
    delays = [d.delay for d in _crash_times(RestartHistory(), [0, 10, 20, 30])]
    assert delays == [1.0, 2.0, 4.0, 8.0]
    late = decide(POLICY, RestartHistory(streak=6, restarts=()), started_at=99.0, now=100.0)
    assert late.delay == 8.0 and not late.give_up


def test_a_run_that_stayed_up_a_healthy_minute_resets_the_backoff():
    history = RestartHistory(streak=3, restarts=(0.0, 1.0, 2.0))
    d = decide(POLICY, history, started_at=5.0, now=5.0 + 61.0)
    assert d.delay == 1.0 and not d.give_up


def test_five_restarts_within_a_minute_is_a_crash_loop_and_the_process_is_left_stopped():
    decisions = _crash_times(RestartHistory(), [0, 5, 10, 15, 20, 25])
    assert [d.give_up for d in decisions] == [False] * 5 + [True]
    assert "crash loop: 5 restarts within 60 s" in decisions[-1].reason


def test_restarts_older_than_the_window_do_not_count_toward_a_crash_loop():
    decisions = _crash_times(RestartHistory(), [0, 20, 40, 70, 90, 110])
    assert not any(d.give_up for d in decisions)


def test_exits_are_described_by_signal_name_or_code():
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(3) == "exited with code 3"


def test_gangway_check_reads_what_a_live_supervisor_gave_up_on_and_ignores_dead_supervisors(tmp_path):
    from workers.local.fleet import given_up
    folder = tmp_path / "supervisor"
    folder.mkdir()
    proc = {"state": "gave_up", "pid": 1, "restarts": 5, "last_exit": "exited with code 1",
            "reason": "crash loop: 5 restarts within 60 s; not restarted", "log": "/x/worker-w0.log"}
    (folder / "live.json").write_text(json.dumps({"pid": os.getpid(), "processes": {
        "worker-w0": proc, "redis": {**proc, "state": "running"}}}))
    (folder / "dead.json").write_text(json.dumps({"pid": 2 ** 22 + 12345, "processes": {"coordinator": proc}}))
    lines = given_up(tmp_path)
    assert len(lines) == 1 and lines[0].startswith("worker-w0 exited with code 1; crash loop") and "/x/worker-w0.log" in lines[0]


def test_by_value_functions_name_their_real_file_in_tracebacks(tmp_path, monkeypatch):
    import cloudpickle

    from workers.runtime.pickled_code import restore_filenames
    (tmp_path / "user_helpers_mod.py").write_text(
        "def helper():\n    raise ValueError('boom')\n\n"
        "class Model:\n    def forward(self):\n        return helper()\n\n"
        "def train_func():\n    def inner():\n        return Model().forward()\n    return inner()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_helpers_mod
    cloudpickle.register_pickle_by_value(user_helpers_mod)
    try:
        blob = cloudpickle.dumps(user_helpers_mod.train_func)
    finally:
        cloudpickle.unregister_pickle_by_value(user_helpers_mod)
    func = restore_filenames(cloudpickle.loads(blob))
    try:
        func()
    except ValueError as exc:
        frames = traceback.extract_tb(exc.__traceback__)[1:]
    assert [f.name for f in frames] == ["train_func", "inner", "forward", "helper"]
    assert {f.filename for f in frames} == {str(tmp_path / "user_helpers_mod.py")}
    assert [f.lineno for f in frames] == [11, 10, 6, 2]


def test_s3_endpoint_accepts_host_port_and_urls_and_names_both_forms_otherwise():
    import pytest

    from common.errors import ConfigurationError
    from common.settings import Settings
    assert Settings(s3_endpoint="127.0.0.1:9000").s3_url == "http://127.0.0.1:9000"
    assert Settings(s3_endpoint="minio:9000", s3_secure=True).s3_url == "https://minio:9000"
    assert Settings(s3_endpoint="http://minio:9000/").s3_url == "http://minio:9000"
    assert Settings(s3_endpoint="https://s3.example.com").s3_url == "https://s3.example.com"
    for bad in ("ftp://minio:9000", "http://minio:9000/bucket", "minio:port"):
        with pytest.raises(ConfigurationError, match=r"GANGWAY_S3_ENDPOINT=.*'host:port'.*'http://host:port'") as info:
            Settings.from_env({"GANGWAY_S3_ENDPOINT": bad})
        assert repr(bad) in str(info.value)


def test_a_broker_that_does_not_answer_is_one_error_naming_the_redacted_url_and_what_to_do():
    import pytest
    import redis

    from common.errors import BrokerUnavailableError
    from common.models import Resources
    from common.settings import Settings
    from producer.client import Client
    from workers.local.services import free_port
    settings = Settings(broker_url=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with pytest.raises(BrokerUnavailableError) as info:
        Client(settings).check_capacity(Resources(num_workers=1))
    text = str(info.value)
    assert f"127.0.0.1:{settings.broker_url.rsplit(':', 1)[1]}" in text and "hunter2" not in text and "***" in text
    assert "gangway up" in text and "GANGWAY_BROKER_URL" in text
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not isinstance(info.value, redis.RedisError)


def test_a_broker_that_accepts_but_never_answers_fails_a_command_and_a_publish_within_the_socket_timeout():
    import socket
    import threading

    import pytest
    import redis

    from common import keys
    from common.settings import Settings
    from common.state import connect
    from workers.celery_app import make_app
    listener = socket.socket()   # a half-open broker: connections are accepted, nothing is ever answered
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(listener.accept()) for _ in range(16)], daemon=True).start()
    settings = Settings(broker_url=f"redis://127.0.0.1:{listener.getsockname()[1]}/0", redis_socket_timeout=1.0)
    outcome: dict = {}

    def publish() -> None:
        app = make_app(settings)
        try:
            app.send_task("gangway.schedule", queue=keys.COORDINATOR_QUEUE, retry=False)
        except Exception as exc:
            outcome["error"] = exc

    try:
        with pytest.raises(redis.TimeoutError):
            connect(settings).ping()
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        publisher.join(20)
        assert not publisher.is_alive(), "a publish to a broker that never answers hung past 20 s"
        assert "Timeout reading from socket" in str(outcome.get("error")), outcome
    finally:
        listener.close()
        for conn, _ in held:
            conn.close()
