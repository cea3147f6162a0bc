"""Pallas GPU kernels for decode, each with an XLA version in `reference.py` and an interpret-mode path that the
CPU tests run: `gemv.py` (matrix-vector products, optionally forming RMSNorm(x) themselves), `norm.py`
(residual add + RMSNorm + the predictor's input projection), `compaction.py` (candidates -> neuron list),
`sparse_ffn.py` (the predictor-guarded FFN on that list). `common.py` holds the shared Pallas building blocks,
`tuning.py` the measured tiles and kernel choices. Which one runs is decided by the engine configuration
(`svdsparse_jax.engine`), never inside this package."""
