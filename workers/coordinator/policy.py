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
