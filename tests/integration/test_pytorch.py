"""2-rank gloo DDP through the real fleet, get_context(), datasets, checkpoints, bad functions."""
from __future__ import annotations

import os

import io
import json
import threading

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from common.errors import PlacementError, TrainingFailedError, ValidationError  # noqa: E402
from common.store import S3Store, parse_s3_uri  # noqa: E402
from producer import DataConnector, ShardedDataConnector  # noqa: E402
from producer.pytorch import (  # noqa: E402
    PyTorchDistributor,
    PyTorchScalingConfig,
    WorkerResourceConfig,
    get_context,
)
from tests.integration import torch_jobs  # noqa: E402
from tests.integration.helpers import regression_frame  # noqa: E402

pytestmark = pytest.mark.integration


def _two_ranks(**kw) -> PyTorchScalingConfig:
    return PyTorchScalingConfig(num_nodes=1, num_workers_per_node=2,
                                resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1, num_gpus=0), **kw)


@pytest.fixture(scope="module")
def ddp_run(fleet, fleet_settings):
    df = regression_frame(4000, seed=31)
    stage = f"s3://{fleet_settings.artifact_bucket}/runs"
    dist = PyTorchDistributor(train_func=torch_jobs.seed_style_train_func, scaling_config=_two_ranks())
    response = dist.run(dataset_map={"train": ShardedDataConnector.from_dataframe(df)},
                        hyper_params={"lr": 0.05, "epochs": 4}, artifact_stage_location=stage, timeout=180)
    return dist, response, stage


def test_seed_style_ddp_job_uploads_rank0_model_to_the_stage_location(ddp_run, fleet_settings):
    dist, response, stage = ddp_run
    assert response.get_model_dir() == f"{stage}/model/{dist.last_job.job_id}/"
    bucket, prefix = parse_s3_uri(response.get_model_dir())
    store = S3Store(fleet_settings)
    assert f"{prefix}model.pt" in store.list(bucket, prefix)
    state_dict = torch.load(io.BytesIO(store.get(bucket, prefix + "model.pt")))
    assert set(state_dict) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}


def test_ddp_ranks_end_with_identical_parameters_and_the_loss_decreases(ddp_run, state):
    dist, response, _ = ddp_run
    ranks = state.ranks(dist.last_job.job_id)
    checksums = {r["metrics"]["param_checksum"] for r in ranks.values()}
    assert len(ranks) == 2 and len(checksums) == 1
    metrics = response.get_metrics()
    assert metrics["last_loss"] < metrics["first_loss"]
    assert metrics["epoch"] == 3


def test_get_context_values_env_and_datasets_per_rank(fleet):
    df = pd.DataFrame({"i": np.arange(1001), "x": np.arange(1001, dtype=np.float32)})
    dist = PyTorchDistributor(torch_jobs.context_probe, _two_ranks())
    dist.run(dataset_map={"full": DataConnector.from_dataframe(df),
                          "part": ShardedDataConnector.from_dataframe(df, equal=True)},
             hyper_params={"depth": 3}, timeout=120)
    ranks = dist.last_job.status().ranks
    infos = [ranks[r]["metrics"][f"rank{r}"] for r in (0, 1)]
    for r, info in enumerate(infos):
        assert (info["rank"], info["world"], info["local_rank"], info["local_world"], info["node_rank"]) == \
            (r, 2, r, 2, 0)
        assert info["backend"] == "gloo" and info["hp"] == {"depth": 3}
        assert info["env"]["RANK"] == str(r) and info["env"]["WORLD_SIZE"] == "2"
        assert info["env"]["LOCAL_RANK"] == str(r) and info["env"]["NODE_RANK"] == "0"
        assert info["full_rows"] == 1001 and info["shard_rows"] == 500   # equal=True trims the odd row
        # torch's pool follows the worker's CPUs even in a child forked from a zygote that loaded OpenMP
        assert info["torch_threads"] == int(info["omp_threads"]), info
    assert infos[0]["env"]["MASTER_PORT"] == infos[1]["env"]["MASTER_PORT"]
    assert [i["shard_first"] for i in infos] == [0, 500]


def test_checkpoints_are_uploaded_and_the_latest_comes_back_as_a_local_folder(fleet):
    dist = PyTorchDistributor(torch_jobs.checkpointing, PyTorchScalingConfig())
    response = dist.run(timeout=120)
    assert response.get_metrics()["restored"] == "step 1"
    assert response.get_checkpoint_location().endswith(f"/checkpoints/{dist.last_job.job_id}/")


def test_a_failing_train_func_raises_with_the_ranks_traceback(fleet):
    with pytest.raises(TrainingFailedError) as info:
        PyTorchDistributor(torch_jobs.failing, _two_ranks()).run(timeout=120)
    err = info.value.rank_errors[1]
    assert err["type"] == "ValueError" and "does not like this data" in err["message"]
    assert "torch_jobs.py" in err["traceback"]


def test_an_unpicklable_train_func_fails_at_run_naming_the_object(fleet):
    lock = threading.Lock()

    def uses_a_lock():
        with lock:
            pass

    with pytest.raises(ValidationError, match="closure variable 'lock' .*lock.* cannot be pickled"):
        PyTorchDistributor(uses_a_lock).run()


def test_a_topology_the_fleet_can_never_satisfy_fails_fast(fleet):
    with pytest.raises(PlacementError, match="num_nodes=2 x num_workers_per_node=1"):
        PyTorchDistributor(torch_jobs.failing, PyTorchScalingConfig(num_nodes=2)).run()
    with pytest.raises(PlacementError, match="no GPU worker"):
        PyTorchDistributor(torch_jobs.failing, PyTorchScalingConfig(
            resource_requirements_per_worker=WorkerResourceConfig(num_gpus=1))).run()


def test_get_context_outside_a_train_func_is_a_clear_error():
    with pytest.raises(RuntimeError, match="only available inside a train_func"):
        get_context()


def test_a_train_func_calling_sys_exit_fails_the_job_with_its_exit_code(fleet):
    with pytest.raises(TrainingFailedError) as info:
        PyTorchDistributor(torch_jobs.exits_early, PyTorchScalingConfig()).run(timeout=60)
    err = info.value.rank_errors[0]
    assert err["type"] == "SystemExit" and err["message"] == "3"


def test_processes_a_train_func_forks_do_not_outlive_the_job(fleet, state):
    import psutil

    from tests.integration.helpers import all_workers_idle, wait_until
    result = PyTorchDistributor(torch_jobs.forks_a_sleeper, PyTorchScalingConfig()).run(timeout=60)
    pid = result.get_metrics()["sleeper_pid"]
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
               "the forked process to be gone")
    assert all_workers_idle(state)


def test_files_a_train_func_writes_relative_or_as_temp_files_stay_in_its_rank_folders_and_go_with_them(
        fleet, fleet_settings):
    result = PyTorchDistributor(torch_jobs.writes_scratch_files, PyTorchScalingConfig()).run(timeout=60)
    m = result.get_metrics()
    assert m["relative"].startswith(os.path.join(fleet_settings.home, "ranks") + os.sep), m   # not the worker's cwd
    tmp = os.path.dirname(m["temp"])
    assert os.path.basename(tmp).startswith("gw-") and os.path.dirname(m["socket"]).startswith(tmp), m
    for path in (m["relative"], m["temp"], tmp):
        assert not os.path.exists(path)
    assert not os.path.exists(os.path.dirname(m["model_dir"]))   # the whole rank folder is gone


def test_a_malformed_artifact_location_is_refused_at_run(fleet):
    with pytest.raises(ValidationError, match="artifact_stage_location: not an s3:// URI"):
        PyTorchDistributor(torch_jobs.failing).run(artifact_stage_location="gs://bucket/runs")


def test_unicode_column_names_train_end_to_end(fleet):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    df = regression_frame(2000, seed=95).rename(columns={"age": "âge", "income": "収入"})
    est = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))
    booster = est.fit(df, ["âge", "収入", "score"], "risk", timeout=60)
    assert booster.feature_names == ["âge", "収入", "score"]
    assert len(est.predict(df)) == len(df)


def test_the_seed_examples_4_gpu_worker_is_refused_on_a_cpu_fleet_with_requested_and_available(fleet, state):
    from common.errors import PlacementError
    from producer.pytorch import PyTorchDistributor, PyTorchScalingConfig, WorkerResourceConfig
    config = PyTorchScalingConfig(num_nodes=1, num_workers_per_node=1,
                                  resource_requirements_per_worker=WorkerResourceConfig(num_cpus=0, num_gpus=4))
    with pytest.raises(PlacementError, match=r"num_gpus=4 per worker requested but the fleet's workers own at "
                                             r"most 0 GPUs each"):
        PyTorchDistributor(lambda: None, config).run()
    assert all(not w.job_id for w in state.workers())


def test_a_retry_gets_the_checkpoint_its_killed_first_attempt_recorded(fleet, fleet_settings):
    stage = f"s3://{fleet_settings.artifact_bucket}/runs"
    dist = PyTorchDistributor(torch_jobs.checkpoint_then_die_once, PyTorchScalingConfig())
    job = dist.submit(artifact_stage_location=stage, max_failures=1)
    response = job.wait(180)
    assert job.status().attempt == 2 and response.get_metrics() == {"restored": "from the first attempt"}
    first = json.loads(job.record()["history"])[0]["token"]
    assert list(job.client.state.checkpoints(job.job_id).values()) == [f"000000-{first}"]
