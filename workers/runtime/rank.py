"""One rank of one attempt, supervised: fence check, child, barrier, relay, artifacts, report."""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

from celery import Celery

from common import keys
from common.errors import RendezvousError
from common.models import JobState, RankState
from common.settings import Settings, renew_period
from common.signing import SecurityError, verify
from common.state import State
from workers.runtime import checkpoints
from workers.runtime.artifacts import upload_artifacts
from workers.runtime.instruments import RankInstruments
from workers.runtime.shards import warm_store
from workers.runtime.supervisor import OUTPUT_LINES_PER_SECOND, Standby, TrainingChild, Zygote

log = logging.getLogger(__name__)
_WRITE_EVERY = 0.25   # seconds between coalesced progress writes
_OWNER = ".gangway-owner"   # in a rank's short temp folder: the worker and GANGWAY_HOME it belongs to
_LISTEN_SLICE = 0.2   # seconds an abort watcher blocks on its subscription between checks of its stop flag


class Aborted(Exception):
    """The attempt was aborted (cancel, another rank failed, or the fence moved on)."""


class ProgressTimeoutError(Exception):
    """The rank made no progress (a hung collective, a stuck peer) for GANGWAY_PROGRESS_TIMEOUT."""


class AbortWatcher:
    """Listens on the abort channel for this attempt; also set when a fenced write is refused."""

    def __init__(self, state: State, job_id: str, token: str) -> None:
        self.event = threading.Event()
        self.reason = ""
        self._want = f"{job_id}:{token}"
        self._stop = threading.Event()
        self._pubsub = state.r.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(**{keys.ABORT_CHANNEL: self._on_message})
        self._thread = threading.Thread(target=self._listen, name="gangway-abort", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        """The thread owns the subscription: it reads it until ``close()``, then closes it itself (closing
        it under a reading thread would break its socket)."""
        try:
            while not self._stop.is_set():
                self._pubsub.get_message(timeout=_LISTEN_SLICE)   # runs _on_message for ours
        except Exception as exc:   # Redis away: the fenced writes still end a stale attempt
            if not self._stop.is_set():
                log.warning("abort watcher for %s stopped listening: %s", self._want, exc)
        finally:
            try:
                self._pubsub.close()
            except Exception:   # closing a broken connection must not mask the rank's outcome
                pass

    def _on_message(self, message: dict) -> None:
        if message.get("data") == self._want:
            self.set("the coordinator aborted the attempt")

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    def close(self) -> None:
        """Returns at once; the thread ends and closes the subscription within ``_LISTEN_SLICE`` s (waiting
        for it here cost every rank ~0.1 s before its report)."""
        self._stop.set()


@dataclass
class RankRun:
    settings: Settings
    state: State
    payload: dict
    status: dict = field(default_factory=dict)
    error: dict | None = None
    output: list[str] = field(default_factory=list)   # the child's printed lines not yet in the job log
    summary: dict = field(default_factory=dict)
    instruments: RankInstruments = field(init=False)

    def __post_init__(self) -> None:
        self.instruments = RankInstruments(self.payload.get("spec", {}).get("framework", ""))

    @property
    def job_id(self) -> str:
        return self.payload["job_id"]

    @property
    def token(self) -> str:
        return self.payload["token"]

    @property
    def rank(self) -> int:
        return self.payload["rank"]

    @property
    def renew_every(self) -> float:
        """The lease is the coordinator's (``reserve.lua`` set it from its GANGWAY_LEASE_SECONDS, which the
        payload carries), not this worker's setting."""
        return renew_period(float(self.payload.get("lease_seconds") or self.settings.lease_seconds))

    def write(self, rank_state: RankState | None = None, lines: tuple[str, ...] = (), **fields) -> bool:
        if rank_state is not None:
            self.status["state"] = rank_state.value
            self.status[f"t_{rank_state.value.lower()}"] = time.time()
        self.status.update(fields, updated=time.time(), worker=self.payload["worker_id"], token=self.token)
        return self.state.fenced_write(self.job_id, self.token, self.rank, self.status, lines)


class LeaseKeeper:
    """Renews the rank's lease from a thread while the rank works without writing (rank 0's artifact
    upload can outlast GANGWAY_LEASE_SECONDS); a refused renewal sets the abort."""

    def __init__(self, run: RankRun, abort: AbortWatcher, every: float | None = None) -> None:
        self.run, self.abort = run, abort
        self.every = run.renew_every if every is None else every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gangway-lease", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if not self.run.write(None):
                    self.abort.set("the attempt is no longer current")
                    return
            except Exception as exc:   # Redis away for a moment: the next renewal may land
                log.warning("job %s rank %s: lease renewal failed: %s", self.run.job_id, self.run.rank, exc)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def publish_artifacts(settings: Settings, state: State, run: RankRun, abort: AbortWatcher, workdir: str,
                      store=None) -> str:
    """Rank 0's upload, fenced before, between and after its writes, its lease renewed throughout; returns
    the artifact URI, or raises Aborted when the attempt ended before every object was written."""
    def check() -> None:
        if abort.event.is_set():
            raise Aborted(f"{abort.reason} while its artifacts were being written")

    if not is_current(state, run.job_id, run.token):
        raise Aborted("the attempt ended before its artifacts were written")
    run.write(None, t_uploading=time.time())   # training ended: the job timeline's upload phase
    with LeaseKeeper(run, abort):
        uri = upload_artifacts(settings, state, run, workdir, check=check, store=store)
    if not run.write(None):   # the success report below speaks only for an attempt still current
        raise Aborted("the attempt ended while its artifacts were being written")
    return uri


def is_current(state: State, job_id: str, token: str) -> bool:
    job = state.job(job_id) or {}
    return job.get("token") == token and job.get("state") == JobState.RUNNING.value


def barrier(state: State, run: RankRun, abort: AbortWatcher, timeout: float, publish: dict) -> dict:
    """Every rank has fetched its shard and is alive, or RendezvousError naming who is missing.

    Returns what the ranks published on arrival (rank 0's tracker port)."""
    world = run.payload["rendezvous"]["world_size"]
    key = keys.barrier(run.job_id, run.token)
    info = key + ":info"
    pipe = state.r.pipeline()
    if publish:
        pipe.hset(info, mapping={k: json.dumps(v) for k, v in publish.items()})
        pipe.expire(info, int(timeout) + 600)
    pipe.sadd(key, run.rank)
    pipe.expire(key, int(timeout) + 600)
    pipe.execute()
    deadline = time.monotonic() + timeout
    delay, renewed = 0.005, time.monotonic()
    while True:
        if time.monotonic() - renewed > run.renew_every:   # waiting peers keep their lease
            if not run.write(None):   # refused: the attempt ended, whether or not its abort reached us
                raise Aborted("the attempt is no longer current")
            renewed = time.monotonic()
        if state.r.scard(key) >= world:
            return {k: json.loads(v) for k, v in state.r.hgetall(info).items()}
        if abort.event.is_set():
            raise Aborted(abort.reason)
        if time.monotonic() > deadline:
            arrived = {int(x) for x in state.r.smembers(key)}
            missing = sorted(set(range(world)) - arrived)
            raise RendezvousError(f"ranks {missing} of job {run.job_id} did not reach the barrier within "
                                  f"{timeout:g}s (raise GANGWAY_RENDEZVOUS_TIMEOUT or check those workers)")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def rank_dirs(settings: Settings, worker_id: str) -> str:
    """This worker's folder for its ranks' files; a rank's folder goes when the rank ends."""
    return os.path.join(settings.home, "ranks", worker_id)


def sweep_rank_dirs(settings: Settings, worker_id: str, registered: set[str] | None = None) -> None:
    """At worker start: whatever a killed predecessor of the same id left behind and, given the
    ``registered`` worker ids, the folders of ids no longer in the registry (a worker id is new on every
    start by default, so a killed one's folder is otherwise never swept; a registered one may be running
    a rank and is left alone)."""
    shutil.rmtree(rank_dirs(settings, worker_id), ignore_errors=True)
    os.makedirs(rank_dirs(settings, worker_id), exist_ok=True)
    sweep_tmp_dirs(settings, worker_id, registered)
    if registered is None:
        return
    parent = os.path.dirname(rank_dirs(settings, worker_id))
    for other in os.listdir(parent):
        if other != worker_id and other not in registered:
            shutil.rmtree(os.path.join(parent, other), ignore_errors=True)


def sweep_tmp_dirs(settings: Settings, worker_id: str, registered: set[str] | None,
                   tmp: str | None = None) -> None:
    """The short temp folders (``gw-*``) that ranks of this fleet (same GANGWAY_HOME) left when killed with
    their worker: this worker's predecessor's, and, given the ``registered`` ids, those of workers no longer
    in the registry. Another fleet's on the same host, and a folder without an owner file, are left alone."""
    tmp = tmp or tempfile.gettempdir()
    for name in os.listdir(tmp):
        if not name.startswith("gw-"):
            continue
        path = os.path.join(tmp, name)
        try:
            with open(os.path.join(path, _OWNER)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue
        if owner.get("home") != settings.home:
            continue
        if owner.get("worker") == worker_id or (registered is not None and owner.get("worker") not in registered):
            shutil.rmtree(path, ignore_errors=True)


def _rank_folders(settings: Settings, payload: dict, made: list[str]) -> dict:
    """``workdir`` (framework files) and ``scratch`` (training code's cwd) in this worker's rank folder,
    and a short ``tmp`` under the system's temp dir: Unix socket paths (multiprocessing listeners, a
    DataLoader's shared tensors) must stay under 108 bytes. Every folder made is listed in ``made``."""
    parent = rank_dirs(settings, payload["worker_id"])
    os.makedirs(parent, exist_ok=True)
    made.append(tempfile.mkdtemp(prefix=f"{payload['job_id']}-r{payload['rank']}-", dir=parent))
    made.append(tempfile.mkdtemp(prefix="gw-"))
    with open(os.path.join(made[1], _OWNER), "w") as f:   # whose it is, for the sweep if this rank is killed
        json.dump({"worker": payload["worker_id"], "home": settings.home}, f)
    workdir, scratch = os.path.join(made[0], "work"), os.path.join(made[0], "scratch")
    os.makedirs(workdir)
    os.makedirs(scratch)
    return {"workdir": workdir, "scratch": scratch, "tmp": made[1]}


def wait_for_peers(run: RankRun, abort: AbortWatcher) -> None:
    """Rank 0, done training, waits until the coordinator has every other rank's success (a PyTorch
    rank can fail after rank 0 returned), so only an attempt that succeeded writes artifacts. A failed
    or silent peer ends the attempt, which reaches this rank as an abort."""
    others = {str(r) for r in range(1, run.payload["rendezvous"]["world_size"])}
    done_key = keys.job_done(run.job_id, run.token)
    renewed, delay = time.monotonic(), 0.005
    while not others <= run.state.r.smembers(done_key):
        if abort.event.is_set():
            raise Aborted(abort.reason)
        if time.monotonic() - renewed > run.renew_every:
            if not run.write(None):
                raise Aborted("the attempt is no longer current")
            renewed = time.monotonic()
        time.sleep(delay)   # peers usually report within milliseconds of rank 0: poll fast, then back off
        delay = min(delay * 1.5, 0.05)


def run_rank(settings: Settings, state: State, app: Celery, standby: Standby | Zygote, payload: dict) -> dict:
    """Run one rank to its end and report to the coordinator. Stale deliveries are no-ops."""
    job_id, token, rank = payload["job_id"], payload["token"], payload["rank"]
    pipe = state.r.pipeline()
    pipe.hincrby(keys.deliveries(job_id, token), str(rank), 1)
    pipe.expire(keys.deliveries(job_id, token), 86400)
    pipe.execute()
    try:
        verify(settings.secret, payload["spec"])
    except SecurityError as exc:   # never run it; the coordinator learns why
        log.error("SECURITY job %s rank %s refused: %s", job_id, rank, exc)
        app.send_task("gangway.rank_finished", queue=keys.COORDINATOR_QUEUE, args=[
            job_id, token, rank, False, {"type": "SecurityError", "message": str(exc), "traceback": ""}, None],
            argsrepr=f"job_id={job_id} attempt={payload.get('attempt')} rank={rank} ok=False error=SecurityError")
        return {"status": "refused"}
    abort = AbortWatcher(state, job_id, token)   # listening before the fence check: no abort slips by
    try:
        current = is_current(state, job_id, token)
    except BaseException:
        abort.close()
        raise
    if not current:
        abort.close()
        log.info("job %s rank %s: attempt %s is no longer current; skipping", job_id, rank, token)
        return {"status": "stale"}
    run = RankRun(settings, state, payload)
    child = None
    ok = False
    made: list[str] = []
    try:
        payload = {**payload, **_rank_folders(settings, payload, made), **_resume(state, payload)}
        child = standby.take()
        run.write(RankState.FETCHING, pid=child.proc.pid)
        child.send(json.dumps(payload))
        ok = _supervise(run, child, abort)
        if ok and rank == 0:
            wait_for_peers(run, abort)   # only an attempt whose every rank succeeded writes artifacts
            run.summary["artifacts"] = publish_artifacts(settings, state, run, abort, payload["workdir"])
    except Aborted as exc:
        # The abort may have overtaken this rank's own error (it failed first; a peer's echo reached the
        # coordinator sooner): the cause, when the child reported one, is the rank's error, not "Aborted".
        own = _own_error(child, run.output) if child is not None else None
        ok, run.error = False, own or {"type": "Aborted", "message": str(exc), "traceback": ""}
    except Exception as exc:   # an error of the runtime itself is this rank's error
        import traceback
        ok, run.error = False, {"type": type(exc).__name__, "message": str(exc),
                                "traceback": traceback.format_exc()}
    finally:
        if child is not None:
            child.kill(settings.kill_grace)
            _relay_output(run, child)
            if run.error is not None and child.tail:
                run.error.setdefault("output", child.stderr_tail(4000))   # what it printed last, with its error
            child.close()
        abort.close()
        try:
            _report(run, app, ok, abort.event.is_set())
        finally:
            # After the report, not before: the coordinator places this worker's next job meanwhile (what a
            # worker killed in between leaves is swept when it starts again, see sweep_rank_dirs)
            for folder in made:
                shutil.rmtree(folder, ignore_errors=True)
    log.info("job %s rank %s: %s", job_id, rank, "succeeded" if ok else f"failed ({run.error})")
    # Warm the next child only now: its imports (~1 s of CPU) would slow this job's training.
    standby.refill()
    return {"status": "succeeded" if ok else "failed"}


def _resume(state: State, payload: dict) -> dict:
    """For rank 0 of a GBDT retry: the newest checkpoint recorded by an earlier attempt (what a child
    outliving its attempt stored is never recorded, so never chosen); for every rank of a PyTorch job, the
    checkpoint folders earlier attempts recorded (``get_latest_checkpoint()`` takes only those)."""
    if payload["spec"]["framework"] == "pytorch":
        return {"checkpoints_recorded": sorted(state.checkpoints(payload["job_id"]).values())}
    if payload["rank"] != 0 or payload.get("attempt", 1) <= 1:
        return {}
    return {"resume": checkpoints.newest(state.checkpoints(payload["job_id"]))}


def record_checkpoint(run: RankRun, rounds: int, key: str) -> bool:
    """Record a GBDT checkpoint the child stored, if the attempt is still current; then delete the recorded
    ones past the newest GANGWAY_CHECKPOINT_KEEP. Returns whether it was recorded."""
    if not run.state.record_checkpoint(run.job_id, run.token, rounds, key):
        log.info("job %s: checkpoint %s of a stale attempt %s not recorded", run.job_id, key, run.token)
        return False
    old = checkpoints.prune(run.state.checkpoints(run.job_id), run.settings.checkpoint_keep)
    if old:
        recorded = run.state.checkpoints(run.job_id)
        run.state.forget_checkpoints(run.job_id, old)   # forgotten first: a retry never picks a deleted one
        store = warm_store(run.settings)
        for rounds_ in old:
            try:
                store.delete(run.settings.artifact_bucket, recorded[rounds_])
            except Exception as exc:   # left for the coordinator's sweep when the job ends
                log.warning("job %s: old checkpoint %s not deleted: %s", run.job_id, recorded[rounds_], exc)
    return True


def _own_error(child: TrainingChild, output: list[str], wait: float = 1.0) -> dict | None:
    """The ``error`` event the child sent (or sends within ``wait`` s, as it exits), if any; the output
    lines read on the way go to ``output``."""
    deadline = time.monotonic() + wait
    while True:
        try:
            ev = child.events.get(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
        except queue.Empty:
            if time.monotonic() >= deadline:
                return None
            continue
        if ev is None:
            return None
        if ev.get("ev") == "error" and ev.get("type") != "Aborted":
            return {k: ev.get(k, "") for k in ("type", "message", "traceback")}
        if ev.get("ev") == "output":
            output.append(ev["line"])


def _relay_output(run: RankRun, child: TrainingChild) -> None:
    """What the child printed and was not relayed yet, into the job log and the worker log."""
    lines = []
    while True:
        try:
            ev = child.events.get_nowait()
        except queue.Empty:
            break
        if ev is not None and ev.get("ev") == "output":
            lines.append(ev["line"])
    run.output.extend(lines)
    if child.output_dropped:
        run.output.append(f"[gangway] {child.output_dropped} output lines dropped (over "
                          f"{OUTPUT_LINES_PER_SECOND} lines/s)")
        child.output_dropped = 0
    _flush_output(run)


def _flush_output(run: RankRun) -> bool:
    """Write buffered output lines, prefixed with the rank, to the job log; False if the write was refused."""
    if not run.output:
        return True
    lines = [f"[rank {run.rank}] {line}" for line in run.output]
    run.output.clear()
    for line in lines:
        log.info("job %s %s", run.job_id, line)
    try:
        return run.state.fenced_write(run.job_id, run.token, run.rank, None, lines)
    except Exception as exc:   # output is best effort; the rank's outcome is not
        log.warning("job %s rank %s: output not written: %s", run.job_id, run.rank, exc)
        return True


def progress_limit(spec: dict, settings: Settings) -> float:
    """Seconds of silence after which a rank counts as hung. A job's own ``progress_timeout`` wins; PyTorch
    ranks have none by default (a live process is progress; a hung collective is what torch's own
    collective timeouts catch); XGBoost and LightGBM report every round, so GANGWAY_PROGRESS_TIMEOUT."""
    own = (spec.get("train") or {}).get("progress_timeout")
    if own is not None:
        return float(own)
    return 0.0 if spec.get("framework") == "pytorch" else settings.progress_timeout


def _report(run: RankRun, app: Celery, ok: bool, aborted: bool) -> None:
    """Final status (best effort) and the coordinator report (always), so no rank ends unheard."""
    run.instruments.finished(ok)
    try:
        run.write(RankState.SUCCEEDED if ok else (RankState.ABORTED if aborted else RankState.FAILED),
                  error=run.error, summary=run.summary)
    except Exception as exc:
        log.warning("job %s rank %s: final status write failed: %s", run.job_id, run.rank, exc)
    outcome = "ok=True" if ok else f"ok=False error={(run.error or {}).get('type')}"
    app.send_task("gangway.rank_finished", args=[run.job_id, run.token, run.rank, ok, run.error, run.summary],
                  queue=keys.COORDINATOR_QUEUE,
                  argsrepr=f"job_id={run.job_id} attempt={run.payload.get('attempt')} rank={run.rank} {outcome}")


def _supervise(run: RankRun, child: TrainingChild, abort: AbortWatcher) -> bool:
    """Relay the child's events until it exits; returns whether it succeeded."""
    last_write, pending = 0.0, None
    last_event = time.monotonic()
    inst = run.instruments
    limit = progress_limit(run.payload.get("spec") or {}, run.settings)
    done = False
    last_output = 0.0
    while True:
        if abort.event.is_set():
            raise Aborted(abort.reason)
        try:
            ev = child.events.get(timeout=0.2)
            last_event = time.monotonic()
        except queue.Empty:
            ev = {"ev": "tick"}
            if child.proc.poll() is not None:
                child.wait_reader(2.0)   # EOF follows the exit at once, unless a forked process holds the pipe
                if child.events.empty():
                    break
            if time.monotonic() - last_write > run.renew_every:   # the child is quiet: renew the lease
                if not run.write(None):
                    abort.set("the attempt is no longer current")
                last_write = time.monotonic()
            if limit > 0 and time.monotonic() - last_event > limit:
                raise ProgressTimeoutError(
                    f"rank {run.rank} of job {run.job_id} reported no progress for {limit:g}s (a hung "
                    f"collective or a stuck peer; raise GANGWAY_PROGRESS_TIMEOUT for longer silent phases)")
        if ev is None:
            break
        kind = ev["ev"]
        if kind == "fetched":
            run.summary["fetch"] = {k: v for k, v in ev.items() if k != "ev"}
            inst.fetched(ev)
            if not run.write(RankState.WAITING, fetch=run.summary["fetch"]):
                abort.set("the attempt is no longer current")
                continue
            arrived = time.monotonic()
            shared = barrier(run.state, run, abort, run.settings.rendezvous_timeout, ev.get("publish") or {})
            inst.rendezvous(time.monotonic() - arrived, int(shared.get("resume_rounds") or 0))
            child.send("go " + json.dumps(shared))
            run.write(RankState.TRAINING)
            last_event = time.monotonic()   # the barrier's wait is not silence of the training
        elif kind == "eval":
            if not run.state.fenced_write(run.job_id, run.token, run.rank, None, [ev["line"]]):
                abort.set("the attempt is no longer current")
        elif kind == "progress":
            pending = ev
            inst.progress(int(ev.get("iter") or 0), ev.get("iter_seconds"))
        elif kind == "metrics":
            inst.step()
            run.summary.setdefault("metrics", {}).update(ev.get("metrics") or {})
            if not run.write(None, metrics=run.summary["metrics"], iteration=inst.iteration):
                abort.set("the attempt is no longer current")
        elif kind == "checkpoint":
            run.summary["last_checkpoint"] = ev.get("uri")
            if ev.get("key"):   # a GBDT booster: recorded for a retry (not logged: every N rounds, like the eval lines)
                if not record_checkpoint(run, int(ev.get("rounds") or 0), ev["key"]):
                    abort.set("the attempt is no longer current")
            elif ev.get("folder") and not run.state.record_checkpoint(
                    run.job_id, run.token, int(ev["folder"].split("-", 1)[0]), ev["folder"], sweep=False):
                abort.set("the attempt is no longer current")   # a PyTorch checkpoint no retry will read
            elif not run.state.fenced_write(run.job_id, run.token, run.rank, None,
                                            [f"[gangway] checkpoint {ev.get('uri')}"]):
                abort.set("the attempt is no longer current")
        elif kind == "output":
            run.output.append(ev["line"])
        elif kind == "done":
            done = True
            run.summary.update(ev.get("summary") or {})
        elif kind == "error":
            run.error = {k: ev.get(k, "") for k in ("type", "message", "traceback")}
        now = time.monotonic()
        if run.output and (now - last_output >= _WRITE_EVERY or len(run.output) >= 100):
            last_output = now
            if not _flush_output(run):
                abort.set("the attempt is no longer current")
        if pending is not None and (now - last_write >= _WRITE_EVERY or kind == "done"):
            if not run.write(None, iteration=pending["iter"], total=pending["total"], metrics=pending["metrics"]):
                abort.set("the attempt is no longer current")
            last_write, pending = now, None
    code = child.proc.wait()
    if pending is not None:
        run.write(None, iteration=pending["iter"], total=pending["total"], metrics=pending["metrics"])
    if code == 0 and run.error is None and done:
        return True
    if code == 0 and run.error is None:   # os._exit(0), or a forked copy of the child returning, in train_func
        run.error = {"type": "IncompleteTrainingError",
                     "message": "the training process exited with code 0 before reporting completion (did the "
                                "training code call os._exit() or exit from a forked process?)",
                     "traceback": child.stderr_tail()}
        return False
    if run.error is None:
        run.error = {"type": "ChildProcessError",
                     "message": f"training process exited with code {code} (signal {-code})" if code < 0
                     else f"training process exited with code {code}",
                     "traceback": child.stderr_tail()}
    return False
