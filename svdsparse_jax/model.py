"""The ReGLU transformer as Flax NNX modules: RMSNorm, Attention (RoPE, GQA, optional qkv bias), FFN, Block,
Transformer.

Modules take their weights from a dict keyed by the paths of `weights.weight_specs`, so initialisation,
conversion and checkpointing share one description; the module tree holds them under the same paths, except
q/k/v (and their biases), held concatenated (`weights.FUSED`, `weights.module_shapes`). Layers are separate
modules with separate arrays (unrolled, never stacked): on the H100 a `lax.scan` over stacked weights ran 2.4x
slower in decode.

Numerics: weights and activations between ops in the weights' dtype (bf16 by default); every matmul
accumulates in f32 (`preferred_element_type`); norms, RoPE, softmax and the FFN activation run in f32.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import dispatch
from pallas_kernels.gemv import MAX_BATCH, gemv
from pallas_kernels.norm import add_rmsnorm
from pallas_kernels.reference import Activation, rms_norm
from pallas_kernels.sparse_ffn import sparse_ffn
from svdsparse_jax import kv_cache
from svdsparse_jax.config import ModelConfig
from svdsparse_jax.weights import FUSED, Path

F32 = jnp.float32


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """An einsum accumulating in f32. f32 operands get full f32 precision (GPUs would otherwise use TF32);
    bf16 / f16 operands run at their native rate, except in batched products on the CPU, whose XLA cannot run
    some of them with an f32 result ("Unsupported element type for DotThunk: BF16 x BF16 = F32", e.g. the
    attention of two sequences of several tokens): there they are widened to f32 first, which is exact."""
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    batched = any(c.isalpha() and c in rhs and c in out for c in lhs)  # a label both operands keep
    if batched and a.dtype != F32 and jax.default_backend() == "cpu":
        a, b = a.astype(F32), b.astype(F32)
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 and b.dtype == F32 else None
    return jnp.einsum(spec, a, b, preferred_element_type=F32, precision=precision)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None, norm: RMSNorm | None = None,
           out_dtype=F32) -> jax.Array:
    """norm(x) [..., in] @ w[out, in]^T (+ b) -> [..., out] out_dtype, accumulated in f32 (x itself without a
    norm). Decode-sized inputs may take the Pallas GEMV (`pallas_kernels.dispatch.dense_gemv`), which then
    forms the norm itself and, without a bias, writes out_dtype directly (no conversion launch after it)."""
    if x.size // x.shape[-1] <= MAX_BATCH and dispatch.dense_gemv():
        scale, eps = (None, 0.0) if norm is None else (norm.scale[...], norm.eps)
        y = gemv(x.reshape(-1, x.shape[-1]), w, scale, eps, F32 if b is not None else out_dtype)
        y = y.reshape(*x.shape[:-1], w.shape[0])
    else:
        y = einsum("...i,oi->...o", x if norm is None else norm(x), w)
    return (y if b is None else y + b.astype(F32)).astype(out_dtype)


def activation(cfg: ModelConfig) -> Activation:
    """The model's FFN nonlinearity as the kernels' static description."""
    return Activation(cfg.activation, cfg.act_threshold if cfg.activation == "fatrelu" else 0.0)


def ffn_hidden(cfg: ModelConfig, gate: jax.Array, up: jax.Array) -> jax.Array:
    """The input of down_proj, h = act(gate) * up (dReLU: relu(gate) * relu(up)); f32 in, f32 out."""
    return activation(cfg).hidden(gate, up)


def rope(x: jax.Array, pos: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotary embedding, HF's rotate-half convention. x [B, T, heads, hd], pos [B, T] int32."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=F32) / hd))
    angle = (pos.astype(F32) / cfg.rope_scale)[..., None] * inv_freq  # [B, T, hd/2]
    angle = jnp.concatenate([angle, angle], axis=-1)[:, :, None, :]
    xf = x.astype(F32)
    rotated = jnp.concatenate([-xf[..., hd // 2:], xf[..., : hd // 2]], axis=-1)
    return (xf * jnp.cos(angle) + rotated * jnp.sin(angle)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, scale: jax.Array, eps: float):
        self.scale = nnx.Param(scale)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)

    def add(self, x: jax.Array, delta: jax.Array, w: jax.Array | None = None):
        """(x + delta, its norm, w @ its norm or None): one kernel at decode (`pallas_kernels.norm`)."""
        return add_rmsnorm(x, delta, self.scale[...], self.eps, w)


class Attention(nnx.Module):
    """Self-attention with RoPE and grouped KV heads. q_proj, k_proj and v_proj are held as one [q + 2 kv, d]
    matrix (and one bias), so a decode step reads them in one matrix-vector product: on the H100 (LLaMA2-7B
    shape) the three separate 4096x4096 products took 45.6 us per layer, the one 12288x4096 product 41.6 us
    (docs/BENCHMARKS.md, "Sparse decode end to end"). The module makes that copy at construction; callers that hold the weight
    dict should drop it afterwards so the separate matrices are freed."""

    def __init__(self, cfg: ModelConfig, w: Callable[[str], jax.Array]):
        self.cfg = cfg
        self.wqkv = nnx.Param(jnp.concatenate([w(n) for n in FUSED["wqkv"]], axis=0))
        self.wo = nnx.Param(w("wo"))
        if cfg.qkv_bias:
            self.bqkv = nnx.Param(jnp.concatenate([w(n) for n in FUSED["bqkv"]], axis=0))
        if cfg.o_bias:
            self.bo = nnx.Param(w("bo"))

    def _bias(self, name: str) -> jax.Array | None:
        return getattr(self, name)[...] if hasattr(self, name) else None

    def __call__(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, start: jax.Array, pos: jax.Array,
                 mask: jax.Array, norm: RMSNorm | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, d] for the tokens in slots [start, start+T) (normed here by `norm` when given, inside the
        q/k/v product where a kernel does it); pos [B, T]; mask [B, T, slots].
        Returns (out [B, T, d], updated k_cache, updated v_cache)."""
        cfg, dt = self.cfg, x.dtype
        b, t, _ = x.shape
        qkv = linear(x, self.wqkv[...], self._bias("bqkv"), norm, dt)
        q, k, v = jnp.split(qkv, [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=-1)
        q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        q, k = rope(q, pos, cfg), rope(k, pos, cfg)
        k_cache = kv_cache.write(k_cache, k.transpose(0, 2, 1, 3), start)
        v_cache = kv_cache.write(v_cache, v.transpose(0, 2, 1, 3), start)
        # Query head h reads kv head h // groups (HF's repeat_kv order).
        groups = cfg.n_heads // cfg.n_kv_heads
        q = q.reshape(b, t, cfg.n_kv_heads, groups, cfg.head_dim)
        scores = einsum("btkgh,bksh->bkgts", q, k_cache)
        scores = scores * (cfg.head_dim ** -0.5) + mask[:, None, None, :, :]
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = einsum("bkgts,bksh->btkgh", probs, v_cache)
        out = out.astype(dt).reshape(b, t, cfg.q_dim)
        return linear(out, self.wo[...], self._bias("bo"), out_dtype=dt), k_cache, v_cache


class FFN(nnx.Module):
    """The ReGLU FFN: y = (act(x W_gate^T) * (x W_up^T)) W_down_t, with W_down_t [d_ff, d].

    Dense, or predictor-guarded (REFERENCE.md section 3): the predictor picks the candidate neurons C, the
    activation is kept on C only, and up / down count only for the truly active T = {i in C : h_i != 0}.
    Guarded calls go through `pallas_kernels.sparse_ffn`: on a GPU, decode-sized inputs run the Pallas kernels,
    which read only the rows of C (W_gate) and T (W_up, W_down_t); elsewhere, and for many tokens, XLA computes
    every row and masks (exactly the dense result when C is everything)."""

    def __init__(self, cfg: ModelConfig, w: Callable[[str], jax.Array]):
        self.cfg = cfg
        self.w_gate, self.w_up, self.w_down_t = (nnx.Param(w(n)) for n in ("w_gate", "w_up", "w_down_t"))

    def hidden(self, x: jax.Array) -> jax.Array:
        """h = act(gate) * up, [..., d_ff] f32: the input of down_proj (zero for inactive neurons)."""
        return ffn_hidden(self.cfg, linear(x, self.w_gate[...]), linear(x, self.w_up[...]))

    def __call__(self, x: jax.Array, predictor=None, collect: dict | None = None,
                 z: jax.Array | None = None) -> jax.Array:
        """x [..., d] -> y [..., d]. With a predictor (predictors.LayerPredictor), only its candidates count;
        z [..., r]: a low-rank predictor's A x when already computed. `collect` (a dict of lists), when given,
        receives 'hidden' (h, f32, zero outside the candidates) and, when guarded, 'candidates' (bool
        [..., d_ff])."""
        if predictor is not None and collect is None:
            flat = x.reshape(-1, x.shape[-1])
            if hasattr(predictor, "score_terms"):  # low-rank: the compaction adds the bias and compares
                candidates, bias = predictor.score_terms(flat, None if z is None else z.reshape(len(flat), -1))
            else:
                gate = linear(flat, self.w_gate[...]) if predictor.needs_gate else None  # the oracle's
                candidates, bias = predictor.predict(flat, gate), None
            y = sparse_ffn(flat, candidates, self.w_gate[...], self.w_up[...], self.w_down_t[...],
                           activation(self.cfg), bias=bias)
            return y.astype(x.dtype).reshape(x.shape)
        gate, up = linear(x, self.w_gate[...]), linear(x, self.w_up[...])
        h = ffn_hidden(self.cfg, gate, up)
        if predictor is not None:
            candidates = predictor.predict(x, gate)
            h = jnp.where(candidates, h, 0.0)
            if collect is not None:
                collect.setdefault("candidates", []).append(candidates)
        if collect is not None:
            collect.setdefault("hidden", []).append(h)
        return einsum("...f,fd->...d", h.astype(x.dtype), self.w_down_t[...]).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, w: Callable[[str], jax.Array]):
        self.attn_norm = RMSNorm(w("attn_norm.scale"), cfg.rms_eps)
        self.attn = Attention(cfg, lambda n: w(f"attn.{n}"))
        self.ffn_norm = RMSNorm(w("ffn_norm.scale"), cfg.rms_eps)
        self.ffn = FFN(cfg, lambda n: w(f"ffn.{n}"))

    def __call__(self, x, k_cache, v_cache, start, pos, mask, predictor=None, collect=None):
        a, k_cache, v_cache = self.attn(x, k_cache, v_cache, start, pos, mask, self.attn_norm)
        # The residual add, the FFN's norm and a low-rank predictor's A x: one kernel at decode.
        low_rank = collect is None and hasattr(predictor, "score_terms")
        x, h, z = self.ffn_norm.add(x, a, predictor.a if low_rank else None)
        x = x + self.ffn(h, predictor, collect, z)
        return x, k_cache, v_cache


class Transformer(nnx.Module):
    """Decoder-only ReGLU transformer. Build with `Transformer(cfg, weights)`, weights keyed by spec paths."""

    def __init__(self, cfg: ModelConfig, weights: dict[Path, jax.Array]):
        def getter(prefix: Path) -> Callable[[str], jax.Array]:
            return lambda name: weights[prefix + tuple(name.split("."))]

        self.cfg = cfg
        self.embed = nnx.Param(weights[("embed",)])
        self.layers = nnx.List([Block(cfg, getter(("layers", i))) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(weights[("final_norm", "scale")], cfg.rms_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(weights[("lm_head",)])

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed[...].dtype

    def __call__(self, tokens: jax.Array, cache: kv_cache.KVCache, start: jax.Array,
                 predictors: list | None = None, collect: dict | None = None
                 ) -> tuple[jax.Array, kv_cache.KVCache]:
        """Runs tokens [B, T] int32 that occupy cache slots [start, start + T).

        Returns (the final-normed hidden states [B, T, d], the updated cache). Prefill is a call with the whole
        left-padded prompt at start=0; a decode step is a call with T=1. `predictors` (one per layer) makes
        every FFN predictor-guarded. `collect` (a dict of lists) receives each layer's FFN hidden activations
        h = act(gate) * up [B, T, d_ff] f32 under 'hidden' (and the candidate masks under 'candidates')."""
        t = tokens.shape[1]
        pos = kv_cache.positions(cache.pad, start, t)
        mask = kv_cache.attention_bias(self.cfg, cache.pad, start, t, cache.slots)
        x = self.embed[...][tokens]
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cache.k[i], cache.v[i], start, pos, mask,
                            None if predictors is None else predictors[i], collect)
            ks.append(k)
            vs.append(v)
        return self.final_norm(x), kv_cache.KVCache(k=ks, v=vs, pad=cache.pad)

    def logits(self, h: jax.Array) -> jax.Array:
        """h [..., d] -> logits [..., vocab] f32 (the tied embedding when there is no separate LM head)."""
        head = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...]
        return linear(h, head)
