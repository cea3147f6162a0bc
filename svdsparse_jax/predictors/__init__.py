"""Contextual-sparsity predictors: SVD (whitened and plain), baselines, threshold calibration, storage."""

from svdsparse_jax.predictors.base import (LowRankPredictor, OraclePredictor, Predictor,  # noqa: F401
                                           SignBitPredictor)
from svdsparse_jax.predictors.build import METHODS, BuildConfig, PredictorSet, build_predictors  # noqa: F401
from svdsparse_jax.predictors.store import load_predictors, save_predictors  # noqa: F401
