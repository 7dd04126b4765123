"""Failure policy as a pure decision: retry the attempt or fail the job.

Only failures of the infrastructure are retried: a training process killed by a
signal, a lost worker, a rendezvous deadline, a rank that stopped making progress,
an object-store error. An exception
raised by training code or the framework (bad data, bad params, a bug in
``train_func``) would fail the same way again, so it fails the job at once.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from common.errors import headline  # noqa: F401  (the coordinator's headlines are the errors' own)

RETRYABLE = frozenset({"ChildProcessError", "WorkerLostError", "RendezvousError", "StoreError",
                       "ProgressTimeoutError", "WorkerDrainedError"})


class FailureAction(str, enum.Enum):
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True)
class FailureDecision:
    action: FailureAction
    reason: str


def is_retryable(error_type: str) -> bool:
    return error_type in RETRYABLE


def decide(attempt: int, max_failures: int, error_type: str) -> FailureDecision:
    """``attempt`` is the 1-based attempt that just failed; ``max_failures`` retries are allowed."""
    if not is_retryable(error_type):
        return FailureDecision(FailureAction.FAIL, f"{error_type} is an error of the training code; not retried")
    if attempt > max_failures:
        return FailureDecision(FailureAction.FAIL, f"attempt {attempt} failed and max_failures={max_failures} "
                                                   "retries are used up (raise max_failures to retry more)")
    return FailureDecision(FailureAction.RETRY, f"retrying: attempt {attempt} of {max_failures + 1} failed "
                                                f"with {error_type}")


# What a rank's collective reports when a *peer* died or failed first: such an error is an echo of the
# cause, never the cause, when another rank has a different error.
_ECHO_MARKERS = ("connection reset by peer", "socket recv error", "socket send error", "ring allreduce",
                 "connection closed by peer", "broken pipe", "read error", "allreduce failed", "socket error",
                 "gloo/transport", "connection refused", "peer closed", "timed out waiting for peer")


def is_collective_echo(error: dict) -> bool:
    """Whether ``error`` reads like a collective failing because a peer went away."""
    if error.get("type") in RETRYABLE or error.get("type") == "Aborted":
        return False
    text = f"{error.get('message', '')}".lower()
    return any(marker in text for marker in _ECHO_MARKERS)


def root_cause(errors: dict[int, dict]) -> tuple[int, dict]:
    """The rank whose error explains the attempt: an infrastructure failure first, then anything that is
    not a peer's echo, then the lowest rank. ``Aborted`` reports count only when nothing else is there."""
    real = {r: e for r, e in errors.items() if e.get("type") != "Aborted"} or errors
    if not real:
        return 0, {"type": "Error", "message": "unknown"}
    return min(real.items(), key=lambda kv: (not is_retryable(kv[1].get("type", "")),
                                             is_collective_echo(kv[1]), kv[0]))
