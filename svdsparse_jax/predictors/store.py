"""Saving and loading predictors: safetensors (one tensor per layer field) plus a JSON manifest with the method,
its configuration, per-layer types and shapes, and the model's fingerprint. Loading into a model of other
shapes or another fingerprint is refused. Writes are atomic (temporary directory, then rename)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from svdsparse_jax.config import ModelConfig
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import atomic_directory, read_versioned_json
from svdsparse_jax.predictors.base import LowRankPredictor, OraclePredictor, SignBitPredictor
from svdsparse_jax.predictors.build import PredictorSet

FORMAT = 1
MANIFEST = "manifest.json"
TENSORS = "predictors.safetensors"


def model_fingerprint(cfg: ModelConfig, weights: dict) -> str:
    """sha256 of the config and of a sample of the weights rounded to bf16 (so the same model loaded as bf16,
    f16 or f32 keeps its fingerprint)."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for path in [("embed",)] + [("layers", i, "ffn", "w_gate") for i in range(cfg.n_layers)]:
        sample = jnp.asarray(weights[path]).reshape(-1)[:4096].astype(jnp.bfloat16)
        h.update(np.asarray(sample).tobytes())
    return h.hexdigest()[:32]


def _layer_entry(i: int, p) -> tuple[dict, dict]:
    if isinstance(p, LowRankPredictor):
        tensors = {f"layers.{i}.a": p.a, f"layers.{i}.b": p.b, f"layers.{i}.bias": p.bias}
        if p.hidden_bias is not None:
            tensors[f"layers.{i}.hidden_bias"] = p.hidden_bias
        return {"type": "lowrank", "relu": p.relu, "rank": p.rank}, tensors
    if isinstance(p, SignBitPredictor):
        return {"type": "signbit", "d": p.d}, {f"layers.{i}.bits": p.bits.view(jnp.int32),
                                               f"layers.{i}.alpha": jnp.stack([p.alpha_num, p.alpha_den])}
    return {"type": "oracle", "threshold": p.threshold}, {}


def save_predictors(out_dir: str | os.PathLike, pset: PredictorSet, cfg: ModelConfig, fingerprint: str) -> Path:
    from safetensors.flax import save_file

    entries, tensors = [], {}
    for i, p in enumerate(pset.layers):
        e, t = _layer_entry(i, p)
        entries.append(e)
        tensors.update(t)
    manifest = {"format": FORMAT, "method": pset.method, "config": pset.config, "n_layers": cfg.n_layers,
                "d_model": cfg.d_model, "d_ff": cfg.d_ff, "fingerprint": fingerprint, "layers": entries,
                "info": pset.info, "timings": pset.timings}
    with atomic_directory(out_dir) as tmp:
        if tensors:
            save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return Path(out_dir).absolute()


def load_predictors(pred_dir: str | os.PathLike, cfg: ModelConfig, fingerprint: str | None) -> PredictorSet:
    """Loads a predictor directory for a model; refuses other shapes and, when `fingerprint` is given, another
    model."""
    pred_dir = Path(pred_dir)
    mpath = pred_dir / MANIFEST
    m = read_versioned_json(mpath, FORMAT, "a predictor manifest")
    shape = (m["n_layers"], m["d_model"], m["d_ff"])
    if shape != (cfg.n_layers, cfg.d_model, cfg.d_ff):
        raise SvdsparseError(f"{mpath}: predictors for (layers, d_model, d_ff) = {shape}, but the model has "
                             f"{(cfg.n_layers, cfg.d_model, cfg.d_ff)}")
    if fingerprint is not None and m["fingerprint"] != fingerprint:
        raise SvdsparseError(f"{mpath}: built for model fingerprint {m['fingerprint']}, but this model's is "
                             f"{fingerprint} (another checkpoint or config)")
    tensors = {}
    if (pred_dir / TENSORS).is_file():
        from safetensors import safe_open
        with safe_open(str(pred_dir / TENSORS), framework="flax") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = []
    for i, e in enumerate(m["layers"]):
        def t(name):
            key = f"layers.{i}.{name}"
            if key not in tensors:
                raise SvdsparseError(f"{pred_dir / TENSORS}: tensor {key} is missing")
            return tensors[key]
        if e["type"] == "lowrank":
            p = LowRankPredictor(t("a"), t("b"), t("bias"), t("hidden_bias") if e["relu"] else None, e["relu"])
            want = {"a": (e["rank"], cfg.d_model), "b": (cfg.d_ff, e["rank"]), "bias": (cfg.d_ff,)}
            bad = [f"{k} {getattr(p, k).shape} (expected {v})" for k, v in want.items() if getattr(p, k).shape != v]
            if bad:
                raise SvdsparseError(f"{pred_dir / TENSORS}: layer {i}: misshapen tensors {bad}")
        elif e["type"] == "signbit":
            p = SignBitPredictor(t("bits").view(jnp.uint32), t("alpha")[0], t("alpha")[1], e["d"])
        elif e["type"] == "oracle":
            p = OraclePredictor(e["threshold"])
        else:
            raise SvdsparseError(f"{mpath}: layer {i}: unknown predictor type {e['type']!r}")
        layers.append(p)
    return PredictorSet(m["method"], layers, m["config"], m.get("info", []), m.get("timings", {}))
