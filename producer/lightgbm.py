"""LightGBMEstimator: distributed LightGBM on a gang of workers, returning a ``lightgbm.Booster``.

LightGBM's PyPI wheel has no CUDA learner and no distributed GPU training, so
``use_gpu=True`` reserves GPU workers but trains on their hosts' CPUs, with a
``UserWarning`` at the caller and a line in the job's log (decision: warn, not refuse,
so code written for Snowflake ML runs unchanged). ``use_gpu=None`` picks CPU workers.
"""
from __future__ import annotations

import warnings
from typing import Any

from common.errors import ValidationError
from producer.categoricals import (
    LIGHTGBM_CATEGORICAL_ALIASES,
    Declaration,
    lightgbm_names,
)
from producer.estimator import (
    BoostingEstimator,
    Prepared,
    ScalingConfig,
    feature_matrix,
)
from producer.validation import check_feature_names

__all__ = ["LightGBMEstimator", "LightGBMScalingConfig"]


def _user_stacklevel() -> int:
    """The stacklevel that points a warning at the caller's line, whether it called fit() or submit()."""
    import os
    import sys
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level

GPU_WARNING = ("LightGBM's PyPI wheel has no distributed GPU learner: this job trains on the CPUs of the "
               "workers it reserves")


class LightGBMScalingConfig(ScalingConfig):
    """``LightGBMScalingConfig(num_workers=-1, num_cpu_per_worker=-1, use_gpu=None)``."""

    def resources(self):
        res = super().resources()
        if res.use_gpu is None:   # GPUs do not help LightGBM here; leave them to other jobs
            return type(res)(res.num_workers, False, res.num_cpu_per_worker)
        return res


class LightGBMEstimator(BoostingEstimator):
    framework = "lightgbm"
    config_type = LightGBMScalingConfig
    model_file = "model.txt"
    thread_param = "num_threads"
    shard_eval = False   # LightGBM's metrics are local: every rank evaluates the whole eval set
    rounds_aliases = ("n_estimators", "num_boost_round", "num_iterations", "num_iteration", "n_iter",
                      "num_tree", "num_trees", "num_round", "num_rounds", "nrounds")

    def __init__(self, n_estimators: int = 100, objective: str = "regression",
                 params: dict[str, Any] | None = None, scaling_config: LightGBMScalingConfig | None = None,
                 callbacks: list | None = None) -> None:
        super().__init__(n_estimators, objective, params, scaling_config, callbacks)

    def _before_submit(self) -> None:
        device = str(self.params.get("device_type", self.params.get("device", ""))).lower()
        if self.scaling_config.use_gpu or device in ("gpu", "cuda"):
            warnings.warn(GPU_WARNING, UserWarning, stacklevel=_user_stacklevel())

    def _load_model(self, data: bytes):
        import lightgbm as lgb
        return lgb.Booster(model_str=data.decode())

    def _predict_matrix(self, X):
        return self.get_booster().predict(X)

    def _declaration(self, params: dict, categorical_cols: list) -> Declaration:
        """pandas category / Arrow dictionary columns are categorical as in LightGBM's ``"auto"``; more are
        named by ``categorical_cols`` or ``params["categorical_feature"]`` (taken out of params: the
        fleet passes the names to its Datasets)."""
        names = list(categorical_cols)
        for alias in LIGHTGBM_CATEGORICAL_ALIASES:
            if alias in params:
                names += lightgbm_names(params.pop(alias))
        return Declaration(tuple(names), True,
                           how="fit(..., categorical_cols=[...]) or params={'categorical_feature': [...]}")

    def _check_params(self, params: dict, prepared: Prepared, label_col: str) -> None:
        check_feature_names("LightGBM", prepared.input_cols)
        try:
            import lightgbm as lgb
        except ImportError:
            return
        X = feature_matrix(prepared.sample, prepared.input_cols)
        y = prepared.sample.column(label_col).to_numpy(zero_copy_only=False)
        local = {k: v for k, v in params.items() if k not in ("device", "device_type", "num_threads", "machines")}
        try:
            lgb.train({**local, "num_threads": 1, "verbose": -1, "min_data_in_leaf": 1, "min_data_in_bin": 1},
                      lgb.Dataset(X, label=y, feature_name=prepared.input_cols,
                                  categorical_feature=prepared.categorical or "auto"), num_boost_round=1)
        except lgb.basic.LightGBMError as exc:
            raise ValidationError(f"invalid LightGBM params {params}: {exc}") from exc
