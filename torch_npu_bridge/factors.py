"""Predictor factors as NumPy arrays, the form the torch executor and the SVDP files exchange, read from a
predictor directory (the project's one predictor format, `svdsparse_jax.predictors.store`).

The score of neuron i is (B relu?(A x + hidden_bias))_i + bias_i; it is a candidate iff the score is > 0. Only
low-rank predictors (SVD, trained MLP) have factors: sign-bit and oracle predictors have no A / B to run.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.policy import UnionRows
from svdsparse_jax.predictors.base import LowRankPredictor
from svdsparse_jax.predictors.store import MANIFEST, TENSORS, check_no_stray_tensors, check_tensor_file, read_manifest


@dataclasses.dataclass
class LayerFactors:
    """One layer's predictor as NumPy arrays (the exchange form between JAX, torch and the paper's files)."""

    a: np.ndarray  # [r, d]
    b: np.ndarray  # [d_ff, r]
    bias: np.ndarray  # [d_ff]
    hidden_bias: np.ndarray | None = None  # [r], MLP predictors (then relu)
    relu: bool = False


@dataclasses.dataclass
class PredictorFactors:
    """A predictor directory read for the torch executor: every layer's factors and the manifest's facts."""

    layers: list[LayerFactors]
    activation: str
    threshold: float
    d_model: int
    d_ff: int
    dtype: str
    fingerprint: str
    method: str
    union: UnionRows | None = None  # the candidate / active union fractions the set measured, by batch size


def factors_of(pred, layer: int) -> LayerFactors:
    """A JAX predictor's factors (float32 NumPy for bf16 factors too)."""
    if not isinstance(pred, LowRankPredictor):
        raise SvdsparseError(f"layer {layer}: a {type(pred).__name__} has no factors for the torch executor (only "
                             "low-rank predictors: whitened / plain SVD or the trained MLP)")
    arr = lambda t: None if t is None else np.asarray(t, np.float32)  # noqa: E731
    return LayerFactors(arr(pred.a), arr(pred.b), arr(pred.bias), arr(pred.hidden_bias), pred.relu)


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


def read_factors(pred_dir: str | os.PathLike) -> PredictorFactors:
    """Reads a predictor directory (as float32 NumPy, bf16 included) for the torch executor, with torch's
    safetensors reader; refuses directories without factors or without the activation they were built for."""
    from safetensors import safe_open

    d = Path(pred_dir)
    m = read_manifest(d)
    if "activation" not in m:
        raise SvdsparseError(f"{d / MANIFEST}: format {m['format']} does not record the activation; save the "
                             "predictors again with this version (svdsparse build-predictors)")
    kinds = {e["type"] for e in m["layers"]}
    if kinds != {"lowrank"}:
        raise SvdsparseError(f"{d / MANIFEST}: {sorted(kinds - {'lowrank'})} predictors have no factors for the "
                             "torch executor (only low-rank ones: whitened / plain SVD or the trained MLP)")
    path = check_tensor_file(d, m)  # the manifest's own file (its hash), inside the directory
    if path is None:
        raise SvdsparseError(f"{d / TENSORS}: missing")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    check_no_stray_tensors(tensors, m, path)
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
    union = None if "union_rows" not in m else UnionRows.from_json(m["union_rows"], m["n_layers"], str(d / MANIFEST))
    return PredictorFactors(layers, m["activation"], float(m["threshold"]), m["d_model"], m["d_ff"], m["dtype"],
                            m["fingerprint"], m["method"], union)
