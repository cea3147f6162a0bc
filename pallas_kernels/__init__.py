"""Pallas GPU kernels (sparse row gather, fused predictor-guarded FFN, fast GEMV), each with an XLA fallback
and an interpret-mode path for CPU tests. The kernels arrive with the issue on Pallas GPU kernels; until then
the model runs its XLA implementation (svdsparse_jax.model) everywhere."""
