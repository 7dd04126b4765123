"""XGBEstimator: distributed XGBoost on a gang of workers, returning an ``xgboost.Booster``."""
from __future__ import annotations

from typing import Any

from common.categories import xgboost_feature_types
from common.errors import ValidationError
from producer.categoricals import Declaration
from producer.estimator import (
    BoostingEstimator,
    Prepared,
    ScalingConfig,
    feature_matrix,
)
from producer.validation import check_feature_names

__all__ = ["XGBEstimator", "XGBScalingConfig"]


class XGBScalingConfig(ScalingConfig):
    """``XGBScalingConfig(num_workers=-1, num_cpu_per_worker=-1, use_gpu=None)``."""


class XGBEstimator(BoostingEstimator):
    """``params`` wins over the named arguments (``n_estimators`` may also be given in params)."""

    framework = "xgboost"
    config_type = XGBScalingConfig
    model_file = "model.ubj"
    thread_param = "nthread"
    shard_eval = True   # XGBoost all-reduces eval metrics

    def __init__(self, n_estimators: int = 100, objective: str = "reg:squarederror",
                 params: dict[str, Any] | None = None, scaling_config: XGBScalingConfig | None = None,
                 callbacks: list | None = None) -> None:
        super().__init__(n_estimators, objective, params, scaling_config, callbacks)

    def _load_model(self, data: bytes):
        import xgboost as xgb
        booster = xgb.Booster()
        booster.load_model(bytearray(data))
        return booster

    def _feature_names(self) -> list[str] | None:
        return (self._booster.feature_names if self._booster is not None else None) or self._input_cols

    def _predict_matrix(self, X):
        import xgboost as xgb
        types = self.get_booster().feature_types
        return self.get_booster().predict(xgb.DMatrix(X, feature_names=self._feature_names(), feature_types=types,
                                                      enable_categorical=bool(types and "c" in types)))

    def _declaration(self, params: dict, categorical_cols: list) -> Declaration:
        """``categorical_cols`` names categorical columns (strings included); ``enable_categorical`` (a
        DMatrix argument, not a booster parameter) makes every pandas category / Arrow dictionary one."""
        enable = bool(params.pop("enable_categorical", False))
        return Declaration(tuple(categorical_cols), enable or bool(categorical_cols),
                           how="fit(..., categorical_cols=[...])",
                           how_dictionaries="params={'enable_categorical': True} (or fit(..., categorical_cols=[...]))")

    def _check_params(self, params: dict, prepared: Prepared, label_col: str) -> None:
        """Train one round on a small local sample, so the library's own message about bad
        params reaches the caller before anything is queued."""
        check_feature_names("XGBoost", prepared.input_cols)
        try:
            import xgboost as xgb
        except ImportError:
            return   # the fleet will report it
        cols = prepared.input_cols
        X = feature_matrix(prepared.sample, cols)
        y = prepared.sample.column(label_col).to_numpy(zero_copy_only=False)
        local = {k: v for k, v in params.items() if k not in ("device", "nthread")}
        types = xgboost_feature_types(cols, prepared.categorical)
        try:
            # nthread=1 for the matrix too: its default, every core, costs ~20 ms of thread start-up a submit
            xgb.train({**local, "nthread": 1}, xgb.DMatrix(X, label=y, feature_names=cols, feature_types=types,
                                                           enable_categorical=bool(prepared.categorical),
                                                           nthread=1),
                      num_boost_round=1)
        except xgb.core.XGBoostError as exc:
            raise ValidationError(f"invalid XGBoost params {params}: {str(exc).splitlines()[0]}") from exc
