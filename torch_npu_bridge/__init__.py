"""This project's predictors in torch / torch_npu: predictor directories read as NumPy factors (`factors.py`),
the guarded FFN executor for CANN, CUDA or CPU (`executor.py`), `patch_hf_model` / `unpatch` for transformers
models (`hf_patch.py`), the SVDP / PowerInfer per-layer predictor files (`svdp_format.py`), the decode parity
check against the JAX model (`parity.py`) and the CLI plug-in with export-svdp / import-svdp (`cli.py`).
The bridge depends on `svdsparse_jax`; `svdsparse_jax` never imports the bridge."""
