"""This project's predictors in torch / torch_npu: export (`export.py`), the guarded FFN executor for CANN,
CUDA or CPU (`executor.py`), `patch_hf_model` / `unpatch` for transformers models (`hf_patch.py`), and the
SVDP / PowerInfer per-layer predictor files (`svdp_format.py`)."""
