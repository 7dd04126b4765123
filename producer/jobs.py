"""TrainingJob: a handle on a submitted job, reattachable from any process by id."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterator

from common.errors import (
    GangwayError,
    JobCancelledError,
    JobNotFinishedError,
    JobNotFoundError,
    JobTimeoutError,
    PlacementError,
    SecurityError,
    TrainingFailedError,
    ValidationError,
)
from common import keys
from common.models import JobState, RankState
from common.settings import Settings
from producer.client import Client

_POLL = 0.1   # the whole status (job and ranks) is read this often while it is shown (progress, echo)
_QUIET_POLL = 0.5   # ... else this often: the job's end wakes a waiter through JOB_ENDED_CHANNEL at once
_ERRORS = {"PlacementError": PlacementError, "ValidationError": ValidationError,
           "JobTimeoutError": JobTimeoutError, "SecurityError": SecurityError}


@dataclass
class JobStatus:
    job_id: str
    state: JobState
    attempt: int = 0
    ranks: dict[int, dict] = field(default_factory=dict)
    error: dict | None = None
    waiting: str = ""

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    def __repr__(self) -> str:
        """One line: per-rank state and round, and the error's headline (``.error`` has the detail)."""
        ranks = ", ".join(f"{r}: {d.get('state', '?')}" + (f"@{d['iteration']}" if d.get("iteration") else "")
                          for r, d in sorted(self.ranks.items()))
        extra = f", waiting={self.waiting!r}" if self.waiting and not self.is_terminal else ""
        if self.error:
            extra += f", error={_headline(self.error.get('message', ''))!r}"
        return (f"JobStatus(job_id={self.job_id!r}, state={self.state.value}, attempt={self.attempt}, "
                f"ranks={{{ranks}}}{extra})")


def _headline(message: str, limit: int = 200) -> str:
    first = message.strip().splitlines()[0] if message.strip() else ""
    return first if len(first) <= limit else first[:limit - 1] + "…"


class TrainingJob:
    """A submitted job. ``wait()`` returns what ``fit``/``run`` would have returned."""

    def __init__(self, job_id: str, *, settings: Settings | None = None,
                 loader: Callable[[TrainingJob], Any] | None = None, submitted: bool = False) -> None:
        self.job_id = job_id
        self._client = Client.default(settings)
        self._loader = loader
        self._result: Any = None
        self._have_result = False

    @property
    def client(self) -> Client:
        return self._client

    def status(self) -> JobStatus:
        job = self._client.state.job(self.job_id)
        if job is None:
            sent = self._client.state.r.get(keys.job_submitted(self.job_id))
            if sent is not None:   # sent; no coordinator has taken it yet (said only once it is overdue)
                late = time.time() - float(sent) > 2.0
                return JobStatus(self.job_id, JobState.SUBMITTED, waiting="no coordinator has taken it yet (is one "
                                 "running? `gangway check`)" if late else "")
            raise JobNotFoundError(f"no job {self.job_id!r} at {self._client.settings.redacted_broker_url} (never "
                                   "submitted there, or expired after GANGWAY_JOB_TTL_DAYS)")
        state = JobState(job["state"])
        ranks = self._client.state.ranks(self.job_id)
        if state.is_terminal:   # a rank cut off by the end of its job could not write its last state
            for r in ranks.values():
                if r.get("state") not in (RankState.SUCCEEDED.value, RankState.FAILED.value, RankState.ABORTED.value):
                    r["state"] = RankState.ABORTED.value
        return JobStatus(self.job_id, state, int(job.get("attempt") or 0), ranks,
                         json.loads(job["error"]) if job.get("error") else None,
                         job.get("waiting", "") if state is JobState.PENDING else "")

    def record(self) -> dict[str, str]:
        return self._client.state.job(self.job_id) or {}

    def plot(self, path: str | None = None):
        """A matplotlib Figure of the eval curves and the timeline (queued, reserved, fetching, rendezvous,
        training, upload per rank); also written as PNG to ``path`` if given. Needs matplotlib."""
        from producer import plot
        self.status()   # a job that does not exist is an error
        job = self.record()
        return plot.render(self.job_id, job, self._client.state.ranks(self.job_id),
                           eval_results=self._eval_results(job), log_lines=self.logs(), now=time.time(),
                           path=path)

    def _eval_results(self, job: dict[str, str]) -> dict | None:
        """``eval_results.json`` of a succeeded GBDT job, or None (then the log's eval lines stand in)."""
        from common.store import parse_s3_uri
        uri = json.loads(job.get("rank0_summary") or "{}").get("artifacts")
        if job.get("state") != JobState.SUCCEEDED.value or job.get("framework") == "pytorch" or not uri:
            return None
        try:
            bucket, prefix = parse_s3_uri(uri)
            return json.loads(self._client.store.get(bucket, prefix + "eval_results.json"))
        except (GangwayError, ValueError):   # gone or unreadable: the log still has the eval lines
            return None

    def logs(self, follow: bool = False) -> list[str] | Iterator[str]:
        """Rank 0's log and eval lines; with ``follow`` an iterator that ends with the job."""
        if not follow:
            return self._client.state.log(self.job_id)
        return self._follow_lines()

    def _follow_lines(self) -> Iterator[str]:
        seen = 0
        while True:
            terminal = self.status().is_terminal
            lines = self._client.state.log(self.job_id, seen)
            seen += len(lines)
            yield from lines
            if terminal:
                return
            time.sleep(_POLL)

    @contextlib.contextmanager
    def _ended_signal(self):
        """A subscription to JOB_ENDED_CHANNEL, made before the caller's first read of the job (so the end is
        not announced in between), for ``_nap``; None if Redis would not subscribe (the caller just polls)."""
        try:
            pubsub = self._client.state.r.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(keys.JOB_ENDED_CHANNEL)
        except Exception:   # a hint only: waiting still works by polling
            yield None
            return
        try:
            yield pubsub
        finally:
            try:
                pubsub.close()
            except Exception:
                pass

    def _nap(self, seconds: float, signal=None) -> None:
        """Sleep up to ``seconds``; return as soon as ``signal`` (from ``_ended_signal``) says this job ended
        or was published (announced by the coordinator, one message per job: no polling in between)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if signal is None:
                time.sleep(left)
                return
            try:
                msg = signal.get_message(timeout=left)
            except Exception:   # the subscription broke: sleep out the interval, the caller polls
                time.sleep(max(0.0, end - time.monotonic()))
                return
            if msg is not None and msg.get("data") == self.job_id:
                return

    def cancel(self, wait: float | None = 10.0) -> JobStatus:
        """Cancel a pending or running job; waits up to ``wait`` seconds for it to end."""
        self.status()   # a job that does not exist is an error, not a silent no-op
        self._client.cancel(self.job_id)
        deadline = time.monotonic() + (wait or 0)
        st = self.status()
        while wait and not st.is_terminal and time.monotonic() < deadline:
            time.sleep(_POLL)
            st = self.status()
        return st

    def wait(self, timeout: float | None = None, *, echo: bool = False, progress: bool | None = None,
             cancel_on_interrupt: bool = False) -> Any:
        """Block until the job ends; return its result or raise its error.

        Ctrl-C (``KeyboardInterrupt``) stops waiting and says how to reattach; with
        ``cancel_on_interrupt`` (what ``fit``/``run`` do for the job they started) it also cancels
        the job, unless a second Ctrl-C comes while cancelling."""
        deadline = None if timeout is None else time.monotonic() + timeout
        printer = _LivePrinter(self, echo, sys.stderr.isatty() if progress is None else progress,
                               announce=echo or cancel_on_interrupt)
        poll = _POLL if printer.shows else _QUIET_POLL
        try:
            with self._ended_signal() as ended:
                while True:
                    st = self.status()
                    printer.update(st)
                    if st.is_terminal:
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"job {self.job_id} still {st.state.value} after {timeout:g}s "
                                           f"({st.waiting or 'running'})")
                    self._nap(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())),
                              ended)
        except KeyboardInterrupt:
            printer.close()
            self._interrupted(cancel_on_interrupt)
            raise
        finally:
            printer.close()
        return self.result()

    def _interrupted(self, cancel: bool) -> None:
        again = f"TrainingJob({self.job_id!r}).wait() reattaches, .cancel() stops it"
        if not cancel:
            print(f"\ngangway: stopped waiting; job {self.job_id} goes on ({again})", file=sys.stderr)
            return
        print(f"\ngangway: interrupted: cancelling job {self.job_id} (Ctrl-C again to leave it running)",
              file=sys.stderr)
        try:
            st = self.cancel(wait=15)
            print(f"gangway: job {self.job_id} is {st.state.value}", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"gangway: job {self.job_id} left running ({again})", file=sys.stderr)

    def get_eval_results(self) -> dict:
        """``{"train": {metric: [...]}, "eval": {...}}`` of a succeeded XGBoost/LightGBM job."""
        self.result()   # raises as wait() would for a job that did not succeed
        results = self._eval_results(self.record())
        if results is None:
            raise GangwayError(f"job {self.job_id} has no eval_results.json (a {self.record().get('framework')} job)")
        return results

    def result(self) -> Any:
        """The result of an ended job, without waiting."""
        st = self.status()
        if not st.is_terminal:
            raise JobNotFinishedError(f"job {self.job_id} has not ended (state {st.state.value})")
        if st.state is JobState.CANCELLED:
            raise JobCancelledError(f"job {self.job_id} was cancelled")
        if st.state is JobState.FAILED:
            raise _error_for(self.job_id, st.error or {}, json.loads(self.record().get("history") or "[]"))
        if not self._have_result:
            self._await_published()
            self._result = (self._loader or _load_by_framework)(self)
            self._have_result = True
        return self._result

    def _await_published(self) -> None:
        """A succeeded job's artifacts are readable once the coordinator has copied the winning attempt's
        staged objects to the model folder (right after the success); waits up to GANGWAY_PUBLISH_TIMEOUT."""
        timeout = self._client.settings.publish_timeout
        deadline = time.monotonic() + timeout
        with self._ended_signal() as published_signal:
            while True:
                job = self.record()
                published = job.get("published")
                if published is None or published:   # None: a record from before publishing existed
                    return
                if time.monotonic() > deadline:
                    raise GangwayError(f"job {self.job_id} succeeded but its artifacts were not published within "
                                       f"{timeout:g}s (is a coordinator running and the store reachable? `gangway "
                                       "check`; raise GANGWAY_PUBLISH_TIMEOUT to wait longer)")
                self._nap(_POLL, published_signal)

    def __repr__(self) -> str:
        return f"TrainingJob({self.job_id!r})"


def echoed(line: str, echo_ranks: str) -> bool:
    """Whether a job-log line is echoed at the caller: eval and gangway lines always; a rank's output
    (``[rank N] ...``) when N is in GANGWAY_ECHO_RANKS (``0`` by default, ``all``, or ``0,3``)."""
    if not line.startswith("[rank "):
        return True
    rank = line[len("[rank "):].split("]", 1)[0]
    return echo_ranks.strip() == "all" or rank in {r.strip() for r in echo_ranks.split(",")}


def _load_by_framework(job: TrainingJob) -> Any:
    """What ``fit``/``run`` return, from the artifacts: a job reattached by id gets the model too."""
    framework = job.record().get("framework", "")
    if framework == "xgboost":
        from producer.xgboost import XGBEstimator
        return XGBEstimator()._load(job)
    if framework == "lightgbm":
        from producer.lightgbm import LightGBMEstimator
        return LightGBMEstimator()._load(job)
    if framework == "pytorch":
        from producer.pytorch import load_result
        return load_result(job)
    raise GangwayError(f"job {job.job_id}: unknown framework {framework!r}; cannot load its result")


def _error_for(job_id: str, err: dict, history: list | None = None) -> GangwayError:
    cls = _ERRORS.get(err.get("type", ""))
    if cls is not None:
        return cls(f"job {job_id}: {err.get('message', '')}")
    rank_errors = {int(k): v for k, v in (err.get("rank_errors") or {}).items()}
    return TrainingFailedError(f"job {job_id} failed: {err.get('message', 'unknown error')}",
                               job_id=job_id, rank_errors=rank_errors, attempts=history or [])


class _LivePrinter:
    """Prints rank 0's eval lines as they arrive and a progress bar on a terminal."""

    def __init__(self, job: TrainingJob, echo: bool, progress: bool, announce: bool = False) -> None:
        self.job, self.echo, self.seen, self.bar = job, echo, 0, None
        self.progress, self.announce = progress, announce or progress
        self.waiting = ""

    @property
    def shows(self) -> bool:
        """Whether it prints anything while the job runs (then the status is read every _POLL)."""
        return self.echo or self.progress or self.announce

    def update(self, st: JobStatus) -> None:
        if self.announce and not st.is_terminal and st.state is not JobState.RUNNING \
                and st.waiting and st.waiting != self.waiting:
            self.waiting = st.waiting   # say why nothing happens yet, once per new reason
            print(f"gangway: job {self.job.job_id} is {st.state.value}: {st.waiting}", file=sys.stderr)
        if self.echo:
            for line in self.job.client.state.log(self.job.job_id, self.seen):
                self.seen += 1
                if echoed(line, self.job.client.settings.echo_ranks):
                    (self.bar.write if self.bar else print)(line)
        r0 = st.ranks.get(0, {})
        if self.progress and r0.get("total"):
            if self.bar is None:
                from tqdm import tqdm
                self.bar = tqdm(total=r0["total"], desc=f"job {self.job.job_id}", unit="round", leave=False)
            self.bar.n = r0.get("iteration", 0)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
