"""Export of predictors for the torch executor: `predictors.safetensors` (per layer `layers.{i}.a` [r, d],
`layers.{i}.b` [d_ff, r], `layers.{i}.bias` [d_ff], and for MLP predictors `layers.{i}.hidden_bias` [r]) plus
`manifest.json` (format, activation and threshold, layer count, shapes, dtype, the model fingerprint).

The score of neuron i is (B relu?(A x + hidden_bias))_i + bias_i; it is a candidate iff the score is > 0
(REFERENCE.md section 2). Only low-rank predictors (SVD, trained MLP) export: sign-bit and oracle predictors
have no A / B to run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from svdsparse_jax.config import ModelConfig
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import atomic_directory, read_versioned_json
from svdsparse_jax.predictors.base import LowRankPredictor

FORMAT = 1
KIND = "svdsparse-torch-predictors"
MANIFEST = "manifest.json"
TENSORS = "predictors.safetensors"


@dataclasses.dataclass
class LayerFactors:
    """One layer's predictor as NumPy arrays (the exchange form between JAX, torch and the paper's files)."""

    a: np.ndarray  # [r, d]
    b: np.ndarray  # [d_ff, r]
    bias: np.ndarray  # [d_ff]
    hidden_bias: np.ndarray | None = None  # [r], MLP predictors (then relu)
    relu: bool = False


@dataclasses.dataclass
class Exported:
    """An exported predictor directory, read back: the layers and the manifest facts."""

    layers: list[LayerFactors]
    activation: str
    threshold: float
    d_model: int
    d_ff: int
    dtype: str
    fingerprint: str
    method: str


def factors_of(pred, layer: int) -> LayerFactors:
    if not isinstance(pred, LowRankPredictor):
        raise SvdsparseError(f"layer {layer}: a {type(pred).__name__} cannot be exported (only low-rank "
                             "predictors: whitened / plain SVD or the trained MLP)")
    arr = lambda t: None if t is None else np.asarray(t)  # noqa: E731
    return LayerFactors(arr(pred.a), arr(pred.b), arr(pred.bias), arr(pred.hidden_bias), pred.relu)


def export_predictors(out_dir: str | os.PathLike, layers: list[LayerFactors], cfg: ModelConfig, fingerprint: str,
                      method: str) -> Path:
    """Writes the export directory atomically (nothing is left half-written on failure)."""
    import torch
    from safetensors.torch import save_file

    check_layers(layers, cfg.n_layers, cfg.d_model, cfg.d_ff, f"{out_dir}")
    dtype = str(layers[0].a.dtype)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise SvdsparseError(f"{out_dir}: predictor dtype {dtype}: expected float32, float16 or bfloat16")
    tensors = {}
    for i, f in enumerate(layers):
        for name in ("a", "b", "bias", "hidden_bias"):
            value = getattr(f, name)
            if value is not None:  # via float32: NumPy's bfloat16 has no torch counterpart to share memory with
                tensors[f"layers.{i}.{name}"] = torch.from_numpy(np.array(value, np.float32)).to(torch_dtype)
    manifest = {"format": FORMAT, "kind": KIND, "method": method, "n_layers": cfg.n_layers,
                "d_model": cfg.d_model, "d_ff": cfg.d_ff, "activation": cfg.activation,
                "threshold": cfg.act_threshold if cfg.activation == "fatrelu" else 0.0, "dtype": dtype,
                "fingerprint": fingerprint,
                "layers": [{"rank": int(f.a.shape[0]), "relu": f.relu} for f in layers]}
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return Path(out_dir).absolute()


def check_layers(layers: list[LayerFactors], n_layers: int, d: int, d_ff: int, where: str) -> None:
    """Refuses a wrong layer count or misshapen factors, naming the layer and tensor."""
    if len(layers) != n_layers:
        raise SvdsparseError(f"{where}: {len(layers)} predictor layers for a model with {n_layers} layers")
    for i, f in enumerate(layers):
        r = f.a.shape[0] if f.a.ndim == 2 else -1
        want = {"a": (r, d), "b": (d_ff, r), "bias": (d_ff,)}
        if f.hidden_bias is not None:
            want["hidden_bias"] = (r,)
        bad = [f"{k} {tuple(getattr(f, k).shape)} (expected {v})" for k, v in want.items()
               if tuple(getattr(f, k).shape) != v]
        if bad or r < 1:
            raise SvdsparseError(f"{where}: layer {i}: misshapen predictor tensors: {', '.join(bad) or 'a'}")


def read_exported(exported_dir: str | os.PathLike) -> Exported:
    """Reads an export directory (as float32 NumPy, bf16 included) and checks it against its manifest."""
    from safetensors import safe_open

    d = Path(exported_dir)
    m = read_versioned_json(d / MANIFEST, FORMAT, "an exported predictor manifest")
    if m.get("kind") != KIND:
        raise SvdsparseError(f"{d / MANIFEST}: not an export-npu manifest (kind {m.get('kind')!r})")
    if not (d / TENSORS).is_file():
        raise SvdsparseError(f"{d / TENSORS}: missing")
    with safe_open(str(d / TENSORS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = []
    for i, e in enumerate(m["layers"]):
        def t(name, required=True):
            key = f"layers.{i}.{name}"
            if key not in tensors:
                if required:
                    raise SvdsparseError(f"{d / TENSORS}: tensor {key} is missing")
                return None
            return tensors[key].float().numpy()
        layers.append(LayerFactors(t("a"), t("b"), t("bias"), t("hidden_bias", e["relu"]), e["relu"]))
    check_layers(layers, m["n_layers"], m["d_model"], m["d_ff"], str(d))
    return Exported(layers, m["activation"], float(m["threshold"]), m["d_model"], m["d_ff"], m["dtype"],
                    m["fingerprint"], m["method"])
