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


def weight_count(cfg: ModelConfig) -> tuple[int, int]:
    """(tensors, parameters) of `weight_specs(cfg)`, in closed form: what a config asks for is known before a
    list of its specs (millions, for a hostile layer count) is built or any memory is taken."""
    d, f, q, kv, v = cfg.d_model, cfg.d_ff, cfg.q_dim, cfg.kv_dim, cfg.vocab_size
    per_layer = 2 * d + 2 * q * d + 2 * kv * d + 3 * f * d + (q + 2 * kv if cfg.qkv_bias else 0) \
        + (d if cfg.o_bias else 0)
    tensors = 1 + cfg.n_layers * (9 + 3 * cfg.qkv_bias + cfg.o_bias) + 1 + (not cfg.tie_embeddings)
    return tensors, v * d * (1 + (not cfg.tie_embeddings)) + d + cfg.n_layers * per_layer


def check_weights_fit(cfg: ModelConfig, dtype, where: str, devices: int = 1) -> None:
    """Refuses a config whose weights in `dtype` cannot fit in memory (`limits.check_memory`), before any is
    read; `where` names the file, `devices` the mesh's devices that share them."""
    from svdsparse_jax.limits import available_memory, check_memory

    n = weight_count(cfg)[1]
    check_memory(n * jnp.dtype(dtype).itemsize, f"{where}: {n:,} weights in {jnp.dtype(dtype).name}",
                 available_memory(devices))


# Weights the model holds concatenated along axis 0, so that a decode step reads them in one matrix-vector
# product instead of three (model.Attention): the module's name for the group and the spec names it is made of,
# in order. Conversion and checkpoints keep the separate tensors of the specs.
FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv")}


def qkv_block_rows(cfg: ModelConfig, shards: int) -> tuple[int, int]:
    """(q rows, k rows = v rows) of one device's block of the fused q/k/v matrix on a mesh of `shards` devices:
    its share of the query heads, and its share of the KV heads, or all of them where there are fewer KV heads
    than devices (replicated)."""
    kv = cfg.kv_dim // shards if cfg.n_kv_heads % shards == 0 else cfg.kv_dim
    return cfg.q_dim // shards, kv


def fuse_qkv(parts: list[jax.Array], cfg: ModelConfig, shards: int = 1) -> jax.Array:
    """q, k, v (matrices [rows, d] or biases [rows]) as the one array the model holds: `shards` equal blocks of
    rows, block i holding device i's query heads, then the k and the v rows of the KV heads they read
    (`qkv_block_rows`). So a device's rows of the product are its own heads' q, k and v, and splitting them needs
    no communication. One device: [q; k; v]."""
    q, k, v = parts
    if shards == 1:
        return jnp.concatenate(parts, axis=0)
    split_kv = qkv_block_rows(cfg, shards)[1] < cfg.kv_dim
    ks, vs = ((jnp.split(a, shards) if split_kv else [a] * shards) for a in (k, v))
    return jnp.concatenate([t for i, qi in enumerate(jnp.split(q, shards)) for t in (qi, ks[i], vs[i])], axis=0)


def unfuse_qkv(fused: jax.Array, cfg: ModelConfig, shards: int = 1) -> list[jax.Array]:
    """The inverse of `fuse_qkv`: [q, k, v]."""
    qr, kr = qkv_block_rows(cfg, shards)
    blocks = jnp.split(fused, shards)
    q = jnp.concatenate([b[:qr] for b in blocks])
    if kr == cfg.kv_dim:  # replicated KV heads: every block has them all
        return [q, blocks[0][qr:qr + kr], blocks[0][qr + kr:]]
    return [q, jnp.concatenate([b[qr:qr + kr] for b in blocks]), jnp.concatenate([b[qr + kr:] for b in blocks])]


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


FINGERPRINT_SCHEME = "w3"  # prefixes every fingerprint; manifests without it hold the old sampled one
# w2 zeroed small magnitudes before rounding to bf16, so an f32 value just below 2^-14 that rounds up to it hashed
# differently in f32 and in bf16. Its digests equal w3's for every model that has no such value (every bf16 one).
READABLE_FINGERPRINT_SCHEMES = ("w2", "w3")


def _host_array(x: jax.Array) -> np.ndarray:
    """x's values on this host (gathered from other processes' devices when it is sharded across them)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def model_fingerprint(cfg: ModelConfig, weights: dict) -> str:
    """"w3-" + sha256 of the config and of every weight (in the spec table's order, each with its path and
    shape) rounded to bf16, then magnitudes below float16's normal range (2^-14) as zero: so a checkpoint keeps
    its fingerprint whether loaded as f32 or converted to bf16 (or f16, values in f16's normal range), while a
    change to any value that bf16 keeps changes it. Streamed one tensor at a
    time (a 7B model: seconds, and never a second copy). Predictor directories record it and refuse another
    model (weights: arrays, or anything indexable, keyed by spec path)."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for spec in weight_specs(cfg):
        w = jnp.asarray(weights[spec.path]).astype(jnp.bfloat16)
        w = jnp.where(jnp.abs(w) < 2.0 ** -14, jnp.zeros((), jnp.bfloat16), w)
        h.update(json.dumps([list(map(str, spec.path)), list(w.shape)]).encode())
        h.update(np.ascontiguousarray(_host_array(w)).view(np.uint16).tobytes())
    return f"{FINGERPRINT_SCHEME}-{h.hexdigest()[:32]}"
