"""One error tree for gangway. Every message names the offending values."""
from __future__ import annotations


class GangwayError(Exception):
    """Base class of every error gangway raises on purpose."""


class ConfigurationError(GangwayError):
    """A setting or argument has a value gangway cannot use."""


class ValidationError(GangwayError, ValueError):
    """User input (data, columns, params, sizes) is invalid; nothing was queued."""


class BrokerUnavailableError(GangwayError):
    """No Redis answers at the broker URL (or it refuses the credentials)."""


class DatasetError(GangwayError):
    """A dataset could not be materialised, found or read."""


class ObjectChangedError(DatasetError):
    """A source file that a dataset references in place was rewritten or deleted after the dataset was made."""


class WorkerMemoryError(GangwayError):
    """A rank's data cannot fit its worker's memory budget, even out of core (the numbers are named)."""


class StoreError(GangwayError):
    """The object store refused or failed a request (bucket and key are named)."""


class PlacementError(GangwayError):
    """The fleet can never (or not in time) provide the gang a job asks for."""


class RendezvousError(GangwayError):
    """Ranks did not all join before the rendezvous deadline."""


class SecurityError(GangwayError):
    """A job message or code blob is unsigned or does not match its signature; it is never executed."""


class JobNotFoundError(GangwayError, KeyError):
    """No job with this id exists in the coordination store."""


class JobNotFinishedError(GangwayError):
    """`result()` was asked of a job that has not ended."""


class JobTimeoutError(GangwayError, TimeoutError):
    """The job passed its whole-job ``timeout`` and was ended."""


class JobCancelledError(GangwayError):
    """The job was cancelled before it produced a result."""


class TrainingFailedError(GangwayError):
    """The job failed; `rank_errors` holds each failed rank's type, message and traceback."""

    def __init__(self, message: str, *, job_id: str | None = None,
                 rank_errors: dict[int, dict] | None = None, attempts: list[dict] | None = None) -> None:
        self.job_id = job_id
        self.rank_errors = dict(rank_errors or {})
        self.attempts = list(attempts or [])   # one entry per failed attempt: message, decision, rank errors
        details = "".join(
            f"\n  rank {rank}: {err.get('type', 'Error')}: {headline(err.get('message', ''))}"
            for rank, err in sorted(self.rank_errors.items()))
        super().__init__(message + details)

    def tracebacks(self) -> str:
        """All ranks' tracebacks (whole messages included), each with the last lines its process printed."""
        return "\n".join(f"--- rank {r} ---\n{e.get('traceback') or e.get('message', '')}"
                         + (f"\n--- rank {r}: last output ---\n{e['output']}" if e.get("output") else "")
                         for r, e in sorted(self.rank_errors.items()))


def headline(message: str, limit: int = 300) -> str:
    """A message's headline: its first line (XGBoost appends kilobytes of C++ stack), cut to ``limit``."""
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    first = lines[0].strip() if lines else ""
    return first if len(first) <= limit else first[:limit - 1] + "…"
