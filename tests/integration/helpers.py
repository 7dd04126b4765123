from __future__ import annotations

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
