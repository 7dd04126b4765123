"""XGBEstimator: distributed XGBoost on a gang of workers, returning an ``xgboost.Booster``."""
from __future__ import annotations

from typing import Any

from common.errors import ValidationError
from producer.client import Client
from producer.estimator import (ScalingConfig, check_common_args, download_artifacts, load_json,
                                prepare_data, submit_spec)
from producer.jobs import TrainingJob

__all__ = ["XGBEstimator", "XGBScalingConfig"]


class XGBScalingConfig(ScalingConfig):
    """``XGBScalingConfig(num_workers=-1, num_cpu_per_worker=-1, use_gpu=None)``."""


class XGBEstimator:
    """``params`` wins over the named arguments (``n_estimators`` may also be given in params)."""

    def __init__(self, n_estimators: int = 100, objective: str = "reg:squarederror",
                 params: dict[str, Any] | None = None, scaling_config: XGBScalingConfig | None = None,
                 callbacks: list | None = None) -> None:
        if params is not None and not isinstance(params, dict):
            raise ValidationError(f"params must be a dict, got {type(params).__name__}")
        if scaling_config is not None and not isinstance(scaling_config, ScalingConfig):
            raise ValidationError(f"scaling_config must be an XGBScalingConfig, got {type(scaling_config).__name__}")
        if callbacks:
            raise ValidationError("XGBEstimator(callbacks=...) is not supported yet: training runs on the "
                                  "fleet and callbacks cannot travel there; use verbose_eval and "
                                  "early_stopping_rounds")
        self.params = {"objective": objective, **(params or {})}
        self.n_estimators = int(self.params.pop("n_estimators", self.params.pop("num_boost_round", n_estimators)))
        self.scaling_config = scaling_config or XGBScalingConfig()
        self._booster = None
        self._eval_results: dict = {}
        self.last_job: TrainingJob | None = None
        self._input_cols: list[str] | None = None

    def fit(self, dataset, input_cols=None, label_col=None, eval_set=None, verbose_eval=None, *,
            weight_col=None, early_stopping_rounds=None, timeout: float | None = None):
        """Train on the fleet; prints rank 0's eval every ``verbose_eval`` rounds; returns the Booster."""
        job = self.submit(dataset, input_cols, label_col, eval_set, verbose_eval, weight_col=weight_col,
                          early_stopping_rounds=early_stopping_rounds)
        return job.wait(timeout, echo=verbose_eval is not None)

    def submit(self, dataset, input_cols=None, label_col=None, eval_set=None, verbose_eval=None, *,
               weight_col=None, early_stopping_rounds=None, priority: int = 0) -> TrainingJob:
        """Validate, upload what the store lacks, enqueue; returns at once."""
        check_common_args(verbose_eval, early_stopping_rounds, self.n_estimators)
        if early_stopping_rounds and eval_set is None:
            raise ValidationError("early_stopping_rounds needs an eval_set")
        client = Client.default()
        resources = self.scaling_config.resources()
        world = client.check_capacity(resources)
        prepared = prepare_data(client, dataset, eval_set, input_cols, label_col, weight_col, world,
                                shard_eval=True)
        params = dict(self.params)
        if self.scaling_config.num_cpu_per_worker > 0:
            params.setdefault("nthread", self.scaling_config.num_cpu_per_worker)
        _check_params(params, prepared, label_col, weight_col)
        opts = {"num_boost_round": self.n_estimators, "input_cols": prepared.input_cols, "label_col": label_col,
                "weight_col": weight_col, "verbose_eval": verbose_eval,
                "early_stopping_rounds": early_stopping_rounds}
        self._input_cols = prepared.input_cols
        job = submit_spec(client, "xgboost", resources, prepared, params, opts, self._load, priority)
        self.last_job = job
        return job

    def _load(self, job: TrainingJob):
        import xgboost as xgb
        files = download_artifacts(job, ("model.ubj", "eval_results.json"))
        booster = xgb.Booster()
        booster.load_model(bytearray(files["model.ubj"]))
        self._booster = booster
        self._eval_results = load_json(files["eval_results.json"])
        return booster

    def get_booster(self):
        if self._booster is None:
            raise RuntimeError("no trained booster yet: call fit() (or wait() on a submitted job) first")
        return self._booster

    def get_eval_results(self) -> dict:
        """``{"train": {metric: [...]}, "eval": {...}}`` of the last fit."""
        self.get_booster()
        return self._eval_results

    def predict(self, data):
        """Predict locally with the trained booster (pandas, Arrow, numpy or a DataConnector)."""
        import numpy as np
        import xgboost as xgb
        booster = self.get_booster()
        names = booster.feature_names or self._input_cols
        if hasattr(data, "to_arrow") and not hasattr(data, "columns"):
            data = data.to_arrow()
        if hasattr(data, "column_names"):   # pyarrow
            data = data.to_pandas()
        if hasattr(data, "columns") and names:
            missing = [c for c in names if c not in data.columns]
            if missing:
                raise ValidationError(f"predict: missing input columns {missing} (has: {list(data.columns)})")
            data = data[names].to_numpy(dtype=np.float32)
        return booster.predict(xgb.DMatrix(data, feature_names=names))


def _check_params(params: dict, prepared, label_col: str, weight_col: str | None) -> None:
    """Train one round on a small local sample, so the library's own message about bad
    params reaches the caller before anything is queued."""
    try:
        import xgboost as xgb
    except ImportError:
        return   # the fleet will report it
    sample = prepared.sample
    cols = prepared.input_cols
    import numpy as np
    X = np.column_stack([sample.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in cols])
    y = sample.column(label_col).to_numpy(zero_copy_only=False)
    local = {k: v for k, v in params.items() if k not in ("device", "nthread")}
    try:
        xgb.train({**local, "nthread": 1}, xgb.DMatrix(X, label=y, feature_names=cols), num_boost_round=1)
    except xgb.core.XGBoostError as exc:
        raise ValidationError(f"invalid XGBoost params {params}: {str(exc).splitlines()[0]}") from exc
