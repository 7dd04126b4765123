from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd

FEATURES = ["age", "income", "score"]


def regression_frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"age": rng.uniform(18, 80, rows).astype(np.float32),
                       "income": rng.lognormal(10, 0.5, rows).astype(np.float32),
                       "score": rng.normal(0, 1, rows).astype(np.float32)})
    df["risk"] = (0.02 * df.age + np.log(df.income) * 0.3 + np.sin(df.score * 2)
                  + rng.normal(0, 0.1, rows)).astype(np.float32)
    return df


COLORS = ["teal", "amber", "plum", "sand"]          # pandas' category order, not alphabetical
CITIES = ["oslo", "lima", "kyiv", "rome", "pune", "baku"]
MIXED_FEATURES = ["color", "city", "x"]


def mixed_frame(rows: int, seed: int) -> pd.DataFrame:
    """A target that is mostly the categories' effects (not ordinal in their codes) plus a little of x."""
    rng = np.random.default_rng(seed)
    color = rng.choice(COLORS, rows)
    city = rng.choice(CITIES, rows)
    x = rng.normal(size=rows)
    effect = {"teal": 2.0, "amber": -1.5, "plum": 1.0, "sand": -2.5, "oslo": 1.2, "lima": -2.0, "kyiv": 2.2,
              "rome": -0.7, "pune": 0.4, "baku": -1.1}
    y = np.array([effect[c] for c in color]) + np.array([effect[c] for c in city]) + 0.3 * x \
        + rng.normal(0, 0.1, rows)
    return pd.DataFrame({"color": pd.Categorical(color, categories=COLORS), "city": city.astype(object), "x": x,
                         "y": y})


def training_codes(frame: pd.DataFrame, train: pd.DataFrame) -> np.ndarray:
    """What the data plane promises: category codes in pandas' order, string codes in first-seen order."""
    cities = list(pd.unique(train["city"]))
    return np.column_stack([frame["color"].cat.codes.to_numpy(), frame["city"].map(cities.index).to_numpy(),
                            frame["x"].to_numpy()]).astype(np.float32)


def gangway(settings, *args: str, ok: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the ``gangway`` CLI against ``settings``' fleet (None: this process's GANGWAY_* env)."""
    env = {**os.environ, **(settings.as_env() if settings is not None else {})}
    out = subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def rmse(pred, y) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(y)) ** 2)))


def wait_until(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def all_workers_idle(state) -> bool:
    views = state.workers()
    return bool(views) and all(w.alive and not w.job_id for w in views)


def training_processes(fleet) -> dict[str, list[int]]:
    """Per worker of ``fleet``: pids of live ``workers.runtime.child`` processes (the warm standby
    included) and of anything a training process forked, i.e. every non-Celery descendant."""
    import psutil
    out = {}
    for s in fleet.started:
        if not s.name.startswith("worker-") or s.proc.poll() is not None:
            continue
        try:
            kids = psutil.Process(s.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        out[s.name] = [k.pid for k in kids if _live(k) and "celery" not in " ".join(_cmdline(k))]
    return out


def _live(p) -> bool:
    import psutil
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(p) -> list[str]:
    import psutil
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def assert_nothing_left(fleet, state, settings, job, *, artifacts: tuple[str, ...] = (), pids=()) -> None:
    """The end-of-fault contract: no worker stays reserved, no training process survives (each worker
    keeps at most its one warm standby; the ranks' training pids and the ``pids`` the test saw are gone), and the job's artifacts
    exist exactly once (``artifacts`` names them; empty = none may exist)."""
    import psutil

    from common.store import S3Store
    pids = [*pids, *(r["pid"] for r in job.status().ranks.values() if r.get("pid"))]
    wait_until(lambda: all(not w.job_id for w in state.workers() if w.alive), 10, "no worker to stay reserved")

    def no_survivors():
        gone = all(not psutil.pid_exists(p) or not _live(psutil.Process(p)) for p in pids)
        return gone and all(len(v) <= 1 for v in training_processes(fleet).values())
    wait_until(no_survivors, 10, f"training processes to be gone (left: {training_processes(fleet)})")
    store = S3Store(settings)
    if artifacts:   # a reader waits for the coordinator's copy of the winning attempt's staged upload
        wait_until(lambda: job.record().get("published") != "", 15, "the job's artifacts to be published")
    keys = store.list(settings.artifact_bucket, f"model/{job.job_id}/")
    assert keys == sorted(f"model/{job.job_id}/{a}" for a in artifacts), keys
    # every attempt's staged upload is deleted: the winner's once published, the others' by the timer's sweep
    wait_until(lambda: not store.list(settings.artifact_bucket, f"staging/{job.job_id}/"), 15,
               "the job's staged artifacts to be deleted")
    from common import keys as redis_keys
    assert not state.r.sismember(redis_keys.RUNNING, job.job_id)


XGB_ARTIFACTS = ("eval_results.json", "metadata.json", "model.ubj")
