"""``gangway demo``: distributed XGBoost on a synthetic credit-risk table, through a real fleet."""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from common.settings import Settings

FEATURES = ["age", "income", "credit_score", "debt_ratio", "years_employed", "num_accounts", "late_payments",
            "loan_amount"]


def make_data(rows: int, seed: int = 0):
    import pandas as pd
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "age": rng.integers(18, 80, rows).astype(np.float32),
        "income": rng.lognormal(10.5, 0.6, rows).astype(np.float32),
        "credit_score": rng.normal(680, 60, rows).astype(np.float32),
        "debt_ratio": rng.beta(2, 5, rows).astype(np.float32),
        "years_employed": rng.exponential(6, rows).astype(np.float32),
        "num_accounts": rng.poisson(4, rows).astype(np.float32),
        "late_payments": rng.poisson(0.7, rows).astype(np.float32),
        "loan_amount": rng.lognormal(9.5, 0.8, rows).astype(np.float32),
    })
    z = (-0.02 * (df.age - 45) - 0.6 * np.log(df.income / 36000) - 0.01 * (df.credit_score - 680)
         + 3.0 * df.debt_ratio + 0.35 * df.late_payments + 0.2 * np.log(df.loan_amount / 13000)
         - 0.05 * np.minimum(df.years_employed, 10))
    df["risk"] = (1 / (1 + np.exp(-z)) + rng.normal(0, 0.05, rows)).astype(np.float32)
    return df


def fleet_answers(settings: Settings) -> bool:
    out = subprocess.run([sys.executable, "-m", "workers.cli", "check"], capture_output=True, text=True,
                         env={**settings.as_env(), "PATH": __import__("os").environ.get("PATH", "")})
    return out.returncode == 0


def run_demo(settings: Settings, *, n_workers: int, rows: int, rounds: int, echo: Callable[[str], None]) -> dict:
    from producer import DataConnector
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    from workers.local.fleet import Fleet

    t0 = time.perf_counter()
    fleet = None
    if not fleet_answers(settings):
        echo(f"starting an embedded fleet with {n_workers} workers (home {settings.home}) ...")
        fleet = Fleet(settings, workers=n_workers)
        fleet.start()
        echo(f"fleet ready in {time.perf_counter() - t0:.1f}s: {fleet.describe()}")
    else:
        echo("using the running fleet")
    try:
        df = make_data(rows)
        split = int(rows * 0.8)
        train_df, eval_df = df.iloc[:split], df.iloc[split:]
        est = XGBEstimator(n_estimators=rounds,
                           params={"objective": "reg:squarederror", "max_depth": 6, "learning_rate": 0.1},
                           scaling_config=XGBScalingConfig(num_workers=n_workers))
        echo(f"training XGBoost on {len(train_df):,} rows x {len(FEATURES)} features with {n_workers} workers ...")
        t_fit = time.perf_counter()
        booster = est.fit(dataset=DataConnector.from_dataframe(train_df), input_cols=FEATURES, label_col="risk",
                          eval_set=DataConnector.from_dataframe(eval_df), verbose_eval=10)
        fit_s = time.perf_counter() - t_fit
        pred = est.predict(eval_df)
        rmse = float(np.sqrt(np.mean((pred - eval_df["risk"].to_numpy()) ** 2)))
        job = est.last_job
        rec = job.record()
        gain = booster.get_score(importance_type="gain")
        top = sorted(gain.items(), key=lambda kv: -kv[1])[:3]
        ranks = job.status().ranks
        echo("")
        echo(f"job {job.job_id}: {rec.get('state')} on gang {rec.get('gang')}")
        echo(f"evaluation: holdout RMSE {rmse:.5f}; last eval-rmse "
             f"{est.get_eval_results()['eval']['rmse'][-1]:.5f}; top features by gain {top}")
        echo(f"artifacts: s3://{settings.artifact_bucket}/model/{job.job_id}/ "
             "(model.ubj, eval_results.json, metadata.json)")
        train_s = max((r.get("summary", {}).get("train_seconds", 0) for r in ranks.values()), default=0)
        started = float(rec.get("started_at") or 0)
        submitted = float(rec.get("submitted_at") or 0)
        echo(f"timings: fit {fit_s:.2f}s (submit→gang reserved {max(0.0, started - submitted):.2f}s, "
             f"training {train_s:.2f}s); total {time.perf_counter() - t0:.2f}s")
        return {"job_id": job.job_id, "rmse": rmse, "fit_seconds": fit_s}
    finally:
        if fleet is not None:
            echo("stopping the fleet this demo started ...")
            fleet.stop()
