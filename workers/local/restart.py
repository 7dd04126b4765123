"""Restart policy of ``gangway up`` as a pure decision: restart after a backoff, or give up.

Like systemd's ``Restart=on-failure`` with ``StartLimitBurst``: a process that exits is
restarted after 1 s, 2 s, 4 s … (capped); a run that stayed up ``healthy_after`` seconds
resets the backoff; ``max_restarts`` restarts within ``window`` seconds is a crash loop,
and that process is left stopped (the rest of the fleet keeps running).
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    initial: float = 1.0
    cap: float = 30.0
    healthy_after: float = 60.0
    max_restarts: int = 5
    window: float = 60.0


@dataclass(frozen=True)
class RestartHistory:
    streak: int = 0                          # consecutive restarts after runs shorter than healthy_after
    restarts: tuple[float, ...] = field(default=())   # when each restart was decided


@dataclass(frozen=True)
class RestartDecision:
    give_up: bool
    delay: float
    history: RestartHistory
    reason: str


def decide(policy: RestartPolicy, history: RestartHistory, started_at: float, now: float) -> RestartDecision:
    """What to do with a process that started at ``started_at`` and exited at ``now``."""
    streak = 0 if now - started_at >= policy.healthy_after else history.streak
    recent = tuple(t for t in history.restarts if now - t < policy.window)
    if len(recent) >= policy.max_restarts:
        return RestartDecision(True, 0.0, RestartHistory(streak, recent),
                               f"crash loop: {len(recent)} restarts within {policy.window:g} s; not restarted")
    delay = min(policy.cap, policy.initial * 2 ** streak)
    return RestartDecision(False, delay, RestartHistory(streak + 1, (*recent, now)),
                           f"restarting in {delay:g} s (restart {len(recent) + 1} within {policy.window:g} s)")


def describe_exit(returncode: int) -> str:
    """``-9`` -> ``killed by signal 9 (SIGKILL)``; ``1`` -> ``exited with code 1``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-returncode} ({name})"
    return f"exited with code {returncode}"
