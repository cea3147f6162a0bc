"""svdsparse-jax: SVD contextual-sparsity predictors for fast ReGLU LLM decoding, in JAX with Pallas kernels."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("svdsparse-jax")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"
