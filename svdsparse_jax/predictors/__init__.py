"""Contextual-sparsity predictors: the types and the set (`base`), their directory format (`store`), and the
build (`build`: calibration, SVD and baselines, threshold calibration).

Importing the package, the types or the format pulls in no model, calibration or kernels (the torch executor
reads predictor directories with neither); the build's names load `build` on first use.
"""

from svdsparse_jax.predictors.base import (LowRankPredictor, OraclePredictor, Predictor,  # noqa: F401
                                           PredictorSet, SignBitPredictor)
from svdsparse_jax.predictors.store import load_predictors, save_predictors  # noqa: F401

_BUILD = ("METHODS", "BuildConfig", "build_predictors", "auto_ranks")


def __getattr__(name: str):
    if name in _BUILD:
        from svdsparse_jax.predictors import build
        return getattr(build, name)
    raise AttributeError(f"module 'svdsparse_jax.predictors' has no attribute {name!r}")
