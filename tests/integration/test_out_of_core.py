"""Out-of-core training in a real 2-worker gang: XGBoost ranks stream cached chunks into
ExtMemQuantileDMatrix, LightGBM ranks bin a Dataset from chunk Sequences, both reach in-core accuracy;
a budget that cannot hold even that fails before training, with the numbers."""
from __future__ import annotations

import os

import numpy as np
import pytest
import xgboost as xgb

from common.errors import TrainingFailedError
from producer import DataConnector
from producer.xgboost import XGBEstimator, XGBScalingConfig
from tests.conftest import private_fleet_settings, running_fleet
from tests.integration.helpers import (
    FEATURES,
    MIXED_FEATURES,
    mixed_frame,
    regression_frame,
    rmse,
    training_codes,
)

pytestmark = pytest.mark.integration
PARAMS = {"objective": "reg:squarederror", "max_depth": 4, "learning_rate": 0.2}

if not hasattr(xgb, "ExtMemQuantileDMatrix"):
    pytest.skip(f"xgboost {xgb.__version__} has no ExtMemQuantileDMatrix", allow_module_level=True)


def _est(rounds: int = 40) -> XGBEstimator:
    return XGBEstimator(n_estimators=rounds, params=PARAMS, scaling_config=XGBScalingConfig(num_workers=2))


@pytest.fixture(scope="module")
def external_fleet():
    """A fleet whose ranks always train out of core (GANGWAY_OUT_OF_CORE=always), small chunks."""
    with running_fleet(private_fleet_settings(out_of_core="always", chunk_rows=2048), workers=2) as fleet:
        yield fleet


def _modes(job) -> dict[int, str]:
    return {r: v.get("fetch", {}).get("memory", {}).get("mode") for r, v in job.status().ranks.items()}


def test_out_of_core_ranks_reach_the_rmse_of_in_core_xgboost(external_fleet):
    df = regression_frame(24000, seed=21)
    train, holdout = df.iloc[:20000], df.iloc[20000:]
    est = _est()
    job = est.submit(DataConnector.from_dataframe(train), FEATURES, "risk",
                     eval_set=DataConnector.from_dataframe(holdout), timeout=120)
    job.wait(180)
    assert _modes(job) == {0: "external", 1: "external"}, job.status().ranks
    native = xgb.train({**PARAMS, "nthread": 2}, xgb.QuantileDMatrix(train[FEATURES], train["risk"]), 40)
    ours = rmse(est.predict(holdout), holdout["risk"])
    theirs = rmse(native.predict(xgb.DMatrix(holdout[FEATURES])), holdout["risk"])
    assert abs(ours - theirs) / theirs <= 0.05, (ours, theirs)


def test_out_of_core_lightgbm_ranks_reach_the_rmse_of_in_core_lightgbm(external_fleet):
    import lightgbm as lgb

    from producer.lightgbm import LightGBMEstimator, LightGBMScalingConfig
    params = {"objective": "regression", "metric": "rmse", "num_leaves": 31, "learning_rate": 0.1}
    df = regression_frame(24000, seed=23)
    train, holdout = df.iloc[:20000], df.iloc[20000:]
    est = LightGBMEstimator(n_estimators=40, params=params, scaling_config=LightGBMScalingConfig(num_workers=2))
    job = est.submit(DataConnector.from_dataframe(train), FEATURES, "risk",
                     eval_set=DataConnector.from_dataframe(holdout), timeout=120)
    job.wait(180)
    assert _modes(job) == {0: "external", 1: "external"}, job.status().ranks
    native = lgb.train({**params, "verbose": -1, "num_threads": 2}, lgb.Dataset(train[FEATURES], train["risk"]),
                       num_boost_round=40)
    ours, theirs = rmse(est.predict(holdout), holdout["risk"]), rmse(native.predict(holdout[FEATURES]),
                                                                        holdout["risk"])
    assert abs(ours - theirs) / theirs <= 0.05, (ours, theirs)


@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
def test_out_of_core_ranks_train_categoricals_natively_with_the_codes_predict_uses(external_fleet, framework):
    from producer.lightgbm import LightGBMEstimator, LightGBMScalingConfig
    df = mixed_frame(12000, seed=25)   # 3 chunks of 2048 rows per rank: codes must agree across chunks
    train, holdout = df.iloc[:10000], df.iloc[10000:]
    if framework == "xgboost":
        est = XGBEstimator(n_estimators=20, params={"max_depth": 4, "learning_rate": 0.3},
                           scaling_config=XGBScalingConfig(num_workers=2))
    else:
        est = LightGBMEstimator(n_estimators=30, params={"num_leaves": 15, "learning_rate": 0.2},
                                scaling_config=LightGBMScalingConfig(num_workers=2))
    job = est.submit(train, MIXED_FEATURES, "y", eval_set=holdout, categorical_cols=["color", "city"], timeout=120)
    booster = job.wait(180)
    assert _modes(job) == {0: "external", 1: "external"}, job.status().ranks
    assert rmse(est.predict(holdout), holdout["y"]) < 0.5 * float(holdout["y"].std())
    codes = training_codes(holdout, train)
    if framework == "xgboost":
        codes = xgb.DMatrix(codes, feature_names=MIXED_FEATURES, feature_types=["c", "c", "q"],
                            enable_categorical=True)
    np.testing.assert_allclose(est.predict(holdout), booster.predict(codes), rtol=1e-6)


def test_out_of_core_ranks_train_on_parquet_referenced_in_place(external_fleet):
    """XGBoost and LightGBM ranks stream the row groups of parquet objects (never copied into the data
    bucket) from the disk cache, and reach the models they reach on the same rows uploaded as chunks."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from common.settings import Settings
    from common.store import S3Store
    from producer.lightgbm import LightGBMEstimator, LightGBMScalingConfig
    settings = Settings.from_env()
    store = S3Store(settings)
    store.ensure_bucket("raw-ooc")
    df = regression_frame(20000, seed=24)
    for i in range(2):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df.iloc[i * 10000:(i + 1) * 10000], preserve_index=False), buf,
                       row_group_size=1500)
        store.put("raw-ooc", f"train/part-{i}.parquet", buf.getvalue())
    in_place = DataConnector.from_parquet("s3://raw-ooc/train/")
    xgb_est = _est(20)
    job = xgb_est.submit(in_place, FEATURES, "risk", timeout=120)
    job.wait(180)
    assert _modes(job) == {0: "external", 1: "external"}, job.status().ranks
    copied = _est(20)
    copied.fit(DataConnector.from_dataframe(df), FEATURES, "risk", timeout=120)
    np.testing.assert_allclose(xgb_est.predict(df.iloc[:300]), copied.predict(df.iloc[:300]), rtol=1e-5)
    params = {"objective": "regression", "num_leaves": 15, "learning_rate": 0.1, "num_threads": 1}
    lgb_est = LightGBMEstimator(n_estimators=20, params=params, scaling_config=LightGBMScalingConfig(num_workers=2))
    job = lgb_est.submit(in_place, FEATURES, "risk", timeout=120)
    job.wait(180)
    assert _modes(job) == {0: "external", 1: "external"}, job.status().ranks
    lgb_copied = LightGBMEstimator(n_estimators=20, params=params,
                                   scaling_config=LightGBMScalingConfig(num_workers=2))
    lgb_copied.fit(DataConnector.from_dataframe(df), FEATURES, "risk", timeout=120)
    np.testing.assert_allclose(lgb_est.predict(df.iloc[:300]), lgb_copied.predict(df.iloc[:300]), rtol=1e-5)


def test_a_budget_too_small_even_out_of_core_fails_before_training_with_the_numbers():
    settings = private_fleet_settings(worker_memory="64MiB")
    with running_fleet(settings, workers=2), pytest.raises(TrainingFailedError) as info:
        _est(5).fit(regression_frame(4000, seed=22), FEATURES, "risk", timeout=60)
    err = next(iter(info.value.rank_errors.values()))
    assert err["type"] == "WorkerMemoryError", err
    assert "does not fit GANGWAY_WORKER_MEMORY=64 MiB even out of core" in err["message"]
    assert "raise GANGWAY_WORKER_MEMORY to at least" in err["message"]


# Above what a worker's processes hold with torch loaded (Celery main and pool, zygote and training child,
# fork-shared pages once: ~390-410 MiB here), below that plus one 150 MB shard (143 MiB): ~55 MiB of room
# either way.
SMALL_TORCH_BUDGET = os.environ.get("GANGWAY_TEST_TORCH_BUDGET", "480MiB")


def _wide_linear_frame(rows: int, features: int, seed: int):
    import pandas as pd
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, features), dtype=np.float32)
    w = np.linspace(-1, 1, features, dtype=np.float32)
    df = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    df["y"] = (X @ w + 0.5 + rng.normal(0, 0.1, rows)).astype(np.float32)
    return df


def _least_squares(df, feats: list[str], label: str) -> np.ndarray:
    """Weights then bias, from the normal equations summed in blocks (float64)."""
    xtx, xty = np.zeros((len(feats) + 1,) * 2), np.zeros(len(feats) + 1)
    for lo in range(0, len(df), 500_000):
        part = df.iloc[lo:lo + 500_000]
        X = np.column_stack([part[feats].to_numpy(np.float64), np.ones(len(part))])
        xtx += X.T @ X
        xty += X.T @ part[label].to_numpy(np.float64)
    return np.linalg.solve(xtx, xty)


def test_a_ddp_job_on_a_small_budget_streams_its_shard_from_mapped_chunks_to_the_in_core_result():
    """3M rows x 24 features (300 MB of Arrow, 150 MB a rank) on workers whose budget leaves less than a
    shard above what their processes already use: each rank iterates its shard from memory-mapped chunk
    files, its heap grows by a window of chunks, not the shard; the batches come in the order the same
    dataset over the shard in memory gives, and DDP reaches the least-squares weights."""
    pytest.importorskip("torch")
    from common.datasets import ChunkCache, DatasetReader
    from common.state import State, connect
    from common.store import S3Store
    from producer import ShardedDataConnector
    from producer.pytorch import PyTorchDistributor, PyTorchScalingConfig, WorkerResourceConfig
    from producer.torch_data import ArrowTorchDataset
    from tests.integration import torch_jobs

    feats = [f"x{i}" for i in range(24)]
    rows = 3_000_000
    df = _wide_linear_frame(rows, 24, seed=41)
    hp = {"features": feats, "label": "y", "batch_size": 4096, "seed": 7, "lr": 0.1, "epochs": 2}
    settings = private_fleet_settings(worker_memory=SMALL_TORCH_BUDGET, chunk_rows=32768)
    with running_fleet(settings, workers=2):
        conn = ShardedDataConnector.from_dataframe(df)
        dist = PyTorchDistributor(
            train_func=torch_jobs.streamed_linear_train_func,
            scaling_config=PyTorchScalingConfig(num_nodes=1, num_workers_per_node=2,
                                                resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1)))
        dist.run(dataset_map={"train": conn}, hyper_params=hp,
                 artifact_stage_location=f"s3://{settings.artifact_bucket}/runs", timeout=300)
        job = dist.last_job
        ranks = State(connect(settings)).ranks(job.job_id)
        status = job.status().ranks
        # In core: each rank's shard read whole into memory by the same reader, from the same dataset.
        store = S3Store(settings)
        reader = DatasetReader(store, ChunkCache(os.path.join(settings.home, "test-cache"), 10 ** 10))
        uri = conn.materialise(store, settings).uri
        in_core = {r: reader.read(uri, world_size=2, rank=r) for r in (0, 1)}
    shard_bytes = rows * 25 * 4 // 2
    for r, rank in ranks.items():
        fetch = status[r]["fetch"]
        memory = fetch["memory"]
        assert memory["mode"] == "mapped", fetch
        assert memory["budget"] - memory["in_use"] < shard_bytes, memory   # the shard would not fit in core
        assert rank["metrics"]["heap_growth"] < shard_bytes // 4, (rank["metrics"]["heap_growth"], shard_bytes)
    # The same dataset over each rank's shard in memory gives the same batches in the same order.
    for r, table in in_core.items():
        expected = torch_jobs.batch_order(ArrowTorchDataset(table, batch_size=4096, shuffle=True, seed=7, rank=r),
                                          "y", 1)
        assert ranks[r]["metrics"]["order"] == pytest.approx(expected, rel=1e-9), r
    coef = _least_squares(df, feats, "y")
    for rank in ranks.values():
        np.testing.assert_allclose(rank["metrics"]["weights"], coef[:-1], atol=0.01)
        assert rank["metrics"]["bias"] == pytest.approx(coef[-1], abs=0.01)
