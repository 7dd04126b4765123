"""The zygote forks training children that behave, for their supervisor, like spawned ones."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from workers.runtime.supervisor import ForkedProcess, TrainingChild, Zygote

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def zygote():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT}
    z = Zygote(env, fork_timeout=120)
    z.refill()
    first = z.take()   # waits for the zygote's imports once for the whole module
    first.send("")
    first.proc.wait(60)
    yield z
    z.close()


def _events(child: TrainingChild, timeout: float = 30) -> list[dict]:
    out = []
    while (ev := child.events.get(timeout=timeout)) is not None:
        out.append(ev)
    return out


def test_a_forked_child_speaks_the_event_protocol_and_reports_its_exit_code(zygote):
    child = zygote.take()
    assert isinstance(child.proc, ForkedProcess)
    child.send(json.dumps({"spec": {"framework": "no-such-framework"}}))
    errors = [ev for ev in _events(child) if ev["ev"] == "error"]
    assert errors and errors[0]["type"] == "KeyError" and "no-such-framework" in errors[0]["traceback"]
    assert child.proc.wait(10) == 1 and not child.alive


def test_an_unused_forked_child_exits_0_when_its_stdin_closes(zygote):
    child = zygote.take()
    child.send("")
    assert child.proc.wait(10) == 0


def test_forking_takes_milliseconds_not_an_import(zygote):
    t0 = time.perf_counter()
    child = zygote.take()
    took = time.perf_counter() - t0
    child.kill(1.0)
    assert took < 0.5, f"fork took {took:.3f}s"


def test_a_forked_child_leads_its_own_session_in_the_supervisors_cwd_and_kill_ends_it(zygote):
    child = zygote.take()
    pid = child.proc.pid
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid
    assert os.readlink(f"/proc/{pid}/cwd") == os.getcwd()
    child.kill(2.0)
    assert child.proc.returncode == -signal.SIGTERM and not child.alive


def test_a_dead_zygote_takes_its_children_with_it_and_the_next_rank_spawns_then_refill_restarts_it():
    z = Zygote({**os.environ, "PYTHONPATH": ROOT}, fork_timeout=120)
    z.refill()
    child = z.take()
    assert isinstance(child.proc, ForkedProcess)
    os.kill(z.pid, signal.SIGKILL)
    assert child.proc.wait(10) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while _running(child.proc.pid):
        assert time.monotonic() < deadline, "the forked child outlived its zygote"
        time.sleep(0.05)
    spawned = z.take()
    assert isinstance(spawned.proc, subprocess.Popen)
    spawned.kill(1.0)
    z.refill()
    again = z.take()
    assert isinstance(again.proc, ForkedProcess)
    again.kill(1.0)
    z.close()


def test_a_forked_child_dies_with_its_supervisor(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {ROOT!r})
        from workers.runtime.supervisor import Zygote
        z = Zygote({{**os.environ, "PYTHONPATH": {ROOT!r}}}, fork_timeout=120)
        z.refill()
        child = z.take()
        print(z.pid, child.proc.pid, flush=True)
        time.sleep(600)
    """)
    sup = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    zygote_pid, child_pid = (int(x) for x in sup.stdout.readline().split())
    sup.kill()
    sup.wait()
    deadline = time.monotonic() + 10
    while any(_running(p) for p in (zygote_pid, child_pid)):
        assert time.monotonic() < deadline, "the zygote or its child outlived the supervisor"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_the_memory_plan_of_a_forked_child_counts_its_supervisors_tree_once_per_page(zygote):
    from workers.runtime.memory import _footprint, tree_rss, worker_pids, worker_tree_memory
    child = zygote.take()
    try:
        time.sleep(0.2)   # the child has settled (its RSS only grows while it waits for its payload)
        # the pool process (here: this test) is found above the zygote, and its parent (Celery main) counted
        pids = worker_pids(child.proc.pid)
        assert {os.getpid(), zygote.pid, child.proc.pid, os.getppid()} <= set(pids)
        held = worker_tree_memory(child.proc.pid)
        # The zygote's imports are shared with the child it forked (and with nothing outside this tree):
        # the tree holds at least all of the zygote's anonymous pages, and less than summed RSS, which
        # counts those shared pages once in the zygote and again in the child.
        if _footprint(zygote.pid) is None:
            pytest.skip("this kernel's smaps_rollup has no Pss_Anon (Linux < 5.10): the tree is summed RSS")
        with open(f"/proc/{zygote.pid}/smaps_rollup") as f:
            zygote_anon = next(int(line.split()[1]) * 1024 for line in f if line.startswith("Anonymous:"))
        assert zygote_anon <= held < tree_rss(pids)
    finally:
        child.kill(1.0)


def test_a_hung_zygote_is_replaced_and_the_rank_meanwhile_gets_a_spawned_child():
    z = Zygote({**os.environ, "PYTHONPATH": ROOT}, fork_timeout=120)
    z.refill()
    warm = z.take()
    warm.send("")
    warm.proc.wait(60)
    hung = z.pid
    os.kill(hung, signal.SIGSTOP)
    z.fork_timeout = 0.5
    spawned = z.take()
    assert isinstance(spawned.proc, subprocess.Popen) and z.pid is None
    spawned.kill(1.0)
    assert not _running(hung)
    z.fork_timeout = 120
    z.refill()
    again = z.take()
    assert isinstance(again.proc, ForkedProcess) and z.pid != hung
    again.kill(1.0)
    z.close()
