"""One description of every weight: path, shape, logical axes and its Hugging Face name.

Initialisation, conversion, checkpointing (and later sharding) all read `weight_specs(cfg)`; the modules in
`model.py` take their arrays from a dict keyed by these paths. Linear weights keep the HF layout
[out, in] (one row per output, which is also what a GEMV reads best), except `w_down_t`, stored transposed,
[d_ff, d_model], so one FFN neuron's three weight rows (gate, up, down) are each one contiguous row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from svdsparse_jax.config import ModelConfig

Path = tuple  # ('layers', 3, 'ffn', 'w_gate')


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    path: Path
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axes: 'vocab', 'embed', 'q_heads', 'kv_heads', 'ffn'
    hf_name: str
    hf_transposed: bool = False  # stored here as the transpose of the HF tensor
    init: str = "normal"  # 'normal' (std 0.02 scaled), 'ones' (norm scales), 'zeros' (biases)

    @property
    def name(self) -> str:
        return ".".join(str(p) for p in self.path)


def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """Every weight of the model, in a fixed order (embedding, layers 0..n-1, final norm, LM head)."""
    d, f, q, kv, v = cfg.d_model, cfg.d_ff, cfg.q_dim, cfg.kv_dim, cfg.vocab_size
    specs = [WeightSpec(("embed",), (v, d), ("vocab", "embed"), "model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}."

        def spec(*path, shape, axes, name, **kw):
            return WeightSpec(("layers", i) + path, shape, axes, hf + name, **kw)

        specs += [
            spec("attn_norm", "scale", shape=(d,), axes=("embed",), name="input_layernorm.weight", init="ones"),
            spec("attn", "wq", shape=(q, d), axes=("q_heads", "embed"), name="self_attn.q_proj.weight"),
            spec("attn", "wk", shape=(kv, d), axes=("kv_heads", "embed"), name="self_attn.k_proj.weight"),
            spec("attn", "wv", shape=(kv, d), axes=("kv_heads", "embed"), name="self_attn.v_proj.weight"),
            spec("attn", "wo", shape=(d, q), axes=("embed", "q_heads"), name="self_attn.o_proj.weight"),
        ]
        if cfg.qkv_bias:
            specs += [
                spec("attn", "bq", shape=(q,), axes=("q_heads",), name="self_attn.q_proj.bias", init="zeros"),
                spec("attn", "bk", shape=(kv,), axes=("kv_heads",), name="self_attn.k_proj.bias", init="zeros"),
                spec("attn", "bv", shape=(kv,), axes=("kv_heads",), name="self_attn.v_proj.bias", init="zeros"),
            ]
        if cfg.o_bias:
            specs.append(spec("attn", "bo", shape=(d,), axes=("embed",), name="self_attn.o_proj.bias",
                              init="zeros"))
        specs += [
            spec("ffn_norm", "scale", shape=(d,), axes=("embed",), name="post_attention_layernorm.weight", init="ones"),
            spec("ffn", "w_gate", shape=(f, d), axes=("ffn", "embed"), name="mlp.gate_proj.weight"),
            spec("ffn", "w_up", shape=(f, d), axes=("ffn", "embed"), name="mlp.up_proj.weight"),
            spec("ffn", "w_down_t", shape=(f, d), axes=("ffn", "embed"), name="mlp.down_proj.weight",
                 hf_transposed=True),
        ]
    specs.append(WeightSpec(("final_norm", "scale"), (d,), ("embed",), "model.norm.weight", init="ones"))
    if not cfg.tie_embeddings:
        specs.append(WeightSpec(("lm_head",), (v, d), ("vocab", "embed"), "lm_head.weight"))
    return specs


# Weights the model holds concatenated along axis 0, so that a decode step reads them in one matrix-vector
# product instead of three (model.Attention): the module's name for the group and the spec names it is made of,
# in order. Conversion and checkpoints keep the separate tensors of the specs.
FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv")}


def module_view(cfg: ModelConfig, value: Callable[[WeightSpec], Any], merge: Callable[[list], Any]
                ) -> dict[Path, Any]:
    """One value per parameter the model holds: value(spec) for each spec, every FUSED group's values merged
    (in the group's order) into one under the group's path."""
    out = {s.path: value(s) for s in weight_specs(cfg)}
    for i in range(cfg.n_layers):
        for fused, parts in FUSED.items():
            paths = [("layers", i, "attn", part) for part in parts]
            if all(p in out for p in paths):
                out[("layers", i, "attn", fused)] = merge([out.pop(p) for p in paths])
    return out


def module_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """The model's parameter paths and shapes: those of the specs, with every FUSED group as one array."""
    return module_view(cfg, lambda s: s.shape, lambda shapes: (sum(sh[0] for sh in shapes), *shapes[0][1:]))


def init_weights(cfg: ModelConfig, key: jax.Array, dtype: jnp.dtype = jnp.bfloat16,
                 std: float = 0.02) -> dict[Path, jax.Array]:
    """Random weights for every spec (normal(0, std) matrices, unit norm scales, zero biases), created on the
    default device directly in `dtype`, one tensor at a time (a 7B model never exists in float32)."""
    out = {}
    for k, spec in zip(jax.random.split(key, len(weight_specs(cfg))), weight_specs(cfg)):
        if spec.init == "ones":
            out[spec.path] = jnp.ones(spec.shape, dtype)
        elif spec.init == "zeros":
            out[spec.path] = jnp.zeros(spec.shape, dtype)
        else:
            out[spec.path] = jax.random.normal(k, spec.shape, dtype) * jnp.asarray(std, dtype)
    return out


FINGERPRINT_SAMPLE = 4096  # values of each sampled tensor that the fingerprint reads


def model_fingerprint(cfg: ModelConfig, weights: dict) -> str:
    """sha256 of the config and of a sample of the weights (the first FINGERPRINT_SAMPLE values of the embedding
    and of every layer's W_gate) rounded to bf16, so the same model loaded as bf16, f16 or f32 keeps its
    fingerprint. Predictor directories record it and refuse another model (weights: arrays keyed by spec path;
    only those tensors are read)."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for path in [("embed",)] + [("layers", i, "ffn", "w_gate") for i in range(cfg.n_layers)]:
        sample = jnp.asarray(weights[path]).reshape(-1)[:FINGERPRINT_SAMPLE].astype(jnp.bfloat16)
        h.update(np.asarray(sample).tobytes())
    return h.hexdigest()[:32]
