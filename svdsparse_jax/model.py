"""The ReGLU transformer as Flax NNX modules: RMSNorm, Attention (RoPE, GQA, optional qkv bias), FFN, Block,
Transformer.

Modules take their weights from a dict keyed by the paths of `weights.weight_specs`, so initialisation,
conversion and checkpointing share one description; the module tree holds them under the same paths, except
q/k/v (and their biases), held concatenated (`weights.FUSED`, `weights.module_shapes`). Layers are separate
modules with separate arrays (unrolled, never stacked; docs/design.md says why).

Numerics: weights and activations between ops in the weights' dtype (bf16 by default); every matmul
accumulates in f32 (`preferred_element_type`); norms, RoPE, softmax and the FFN activation run in f32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.candidates import Candidates
from pallas_kernels.numerics import Activation, rms_norm
from svdsparse_jax import kv_cache
from svdsparse_jax.config import ModelConfig
from svdsparse_jax.engine import (XLA, EngineConfig, add_rmsnorm, decode_attention, gate_up, guarded_ffn, project,
                                  project_t)
from svdsparse_jax.sharding import mesh_size, place_model, split_qkv, vocab_split
from svdsparse_jax.weights import FUSED, Path, fuse_qkv, unfuse_qkv

if TYPE_CHECKING:
    from svdsparse_jax.predictors.base import Predictor

F32 = jnp.float32


def einsum(spec: str, a: jax.Array, b: jax.Array, widen_batched: bool = False) -> jax.Array:
    """An einsum accumulating in f32. f32 operands get full f32 precision (GPUs would otherwise use TF32);
    bf16 / f16 operands run at their native rate. widen_batched: products with a label both operands keep
    (batched) are widened to f32 first, which is exact; XLA on the CPU cannot run some of them with an f32
    result ("Unsupported element type for DotThunk: BF16 x BF16 = F32")."""
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    batched = any(c.isalpha() and c in rhs and c in out for c in lhs)
    if widen_batched and batched and a.dtype != F32:
        a, b = a.astype(F32), b.astype(F32)
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 and b.dtype == F32 else None
    return jnp.einsum(spec, a, b, preferred_element_type=F32, precision=precision)


def linear(engine: EngineConfig, x: jax.Array, w: jax.Array, b: jax.Array | None = None,
           norm: RMSNorm | None = None, out_dtype=F32, split: str | None = None) -> jax.Array:
    """norm(x) [..., in] @ w [out, in]^T (+ b) -> [..., out] out_dtype, accumulated in f32 (x itself without a
    norm), through the engine's choice of product (`engine.project`; split: how w lies on the mesh)."""
    y = project(engine, x, w, None if norm is None else (norm.scale[...], norm.eps),
                F32 if b is not None else out_dtype, split)
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


class Attention(nnx.Module):
    """Self-attention with RoPE and grouped KV heads. q_proj, k_proj and v_proj are held as one [q + 2 kv, d]
    matrix (and one bias), so a decode step reads them in one matrix-vector product. The module makes that copy
    at construction; callers that hold the weight dict should drop it afterwards so the separate matrices are
    freed."""

    def __init__(self, cfg: ModelConfig, engine: EngineConfig, w: Callable[[str], jax.Array]):
        self.cfg, self.engine = cfg, engine
        self.qkv_shards = shards = mesh_size(engine.mesh)  # the devices wqkv's blocks are laid out for
        self.wqkv = nnx.Param(fuse_qkv([w(n) for n in FUSED["wqkv"]], cfg, shards))
        self.wo = nnx.Param(w("wo"))
        if cfg.qkv_bias:
            self.bqkv = nnx.Param(fuse_qkv([w(n) for n in FUSED["bqkv"]], cfg, shards))
        if cfg.o_bias:
            self.bo = nnx.Param(w("bo"))

    def lay_out_qkv(self, shards: int) -> None:
        """Re-lays the fused q/k/v matrix (and bias) out for a mesh of `shards` devices (`weights.fuse_qkv`)."""
        for name in FUSED:
            if hasattr(self, name):
                parts = unfuse_qkv(getattr(self, name)[...], self.cfg, self.qkv_shards)
                setattr(self, name, nnx.Param(fuse_qkv(parts, self.cfg, shards)))
        self.qkv_shards = shards

    def _bias(self, name: str) -> jax.Array | None:
        return getattr(self, name)[...] if hasattr(self, name) else None

    def __call__(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, start: jax.Array, pos: jax.Array,
                 mask: jax.Array, norm: RMSNorm) -> tuple[jax.Array, jax.Array, jax.Array]:
        """norm(x) for x [B, T, d], the tokens in slots [start, start+T); pos [B, T]; mask [B, T, W]: the
        queries attend over cache slots [0, W) (W <= slots: the caches are written where they lie and only that
        window is read). Returns (out [B, T, d], updated k_cache, updated v_cache)."""
        cfg, engine, dt = self.cfg, self.engine, x.dtype
        b, t, _ = x.shape
        with jax.named_scope("norm_qkv"):  # the GEMV kernel forms the norm itself, where it takes this product
            qkv = linear(engine, x, self.wqkv[...], self._bias("bqkv"), norm, dt, split="rows")
        q, k, v = split_qkv(qkv, cfg, engine.mesh)
        q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        with jax.named_scope("rope_cache_write"):
            q, k = rope(q, pos, cfg), rope(k, pos, cfg)
            k_cache = kv_cache.write(k_cache, k.transpose(0, 2, 1, 3), start)
            v_cache = kv_cache.write(v_cache, v.transpose(0, 2, 1, 3), start)
        with jax.named_scope("softmax_values"):
            if engine.attention_kernel(t, cfg.head_dim, cfg.n_kv_heads):  # one kernel, up to each query's slot
                out = decode_attention(engine, q[:, 0], k_cache, v_cache, mask[:, 0], start)
            else:
                out = self._softmax_values(q, k_cache, v_cache, mask)
            out = out.astype(dt).reshape(b, t, cfg.q_dim)
        with jax.named_scope("o_proj"):
            return linear(engine, out, self.wo[...], self._bias("bo"), out_dtype=dt, split="cols"), k_cache, v_cache

    def _softmax_values(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array) -> jax.Array:
        """XLA's attention: q [B, T, H, head_dim] over cache slots [0, W) with the additive mask [B, T, W] ->
        [B, T, KVH, groups, head_dim] f32 (scores and softmax in f32, the probabilities rounded to q's dtype)."""
        cfg, dt = self.cfg, q.dtype
        b, t = q.shape[:2]
        window = mask.shape[-1]
        k_read, v_read = ((k_cache, v_cache) if window == k_cache.shape[2]
                          else (k_cache[:, :, :window], v_cache[:, :, :window]))
        # Query head h reads kv head h // groups (HF's repeat_kv order).
        groups = cfg.n_heads // cfg.n_kv_heads
        widen = self.engine.platform == "cpu"
        q = q.reshape(b, t, cfg.n_kv_heads, groups, cfg.head_dim)
        scores = einsum("btkgh,bksh->bkgts", q, k_read, widen)
        scores = scores * (cfg.head_dim ** -0.5) + mask[:, None, None, :, :]
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        return einsum("bkgts,bksh->btkgh", probs, v_read, widen)


class FFN(nnx.Module):
    """The ReGLU FFN's weights, y = (act(x W_gate^T) * (x W_up^T)) W_down_t with W_down_t [d_ff, d], and its
    dense computation. The predictor-guarded one (the paper's sparse executor) is `Block`'s other branch."""

    def __init__(self, cfg: ModelConfig, engine: EngineConfig, w: Callable[[str], jax.Array]):
        self.cfg, self.engine = cfg, engine
        self.w_gate, self.w_up, self.w_down_t = (nnx.Param(w(n)) for n in ("w_gate", "w_up", "w_down_t"))

    def hidden(self, x: jax.Array, out_dtype=F32) -> jax.Array:
        """h = act(gate) * up, [..., d_ff] out_dtype: the input of down_proj (zero for inactive neurons)."""
        return gate_up(self.engine, x, self.w_gate[...], self.w_up[...], activation(self.cfg), out_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The dense FFN: x [..., d] (the normed FFN input) -> y [..., d] in x's dtype."""
        with jax.named_scope("gate_up_activation"):
            h = self.hidden(x, x.dtype)
        with jax.named_scope("down"):
            return project_t(self.engine, h, self.w_down_t[...], x.dtype)


class FFNTrace(NamedTuple):
    """What a block's FFN ran on, returned beside the block's output (no work of its own: both are values the
    block computes anyway) for the statistics pass, `Transformer.forward_with_stats`. inputs: the normed FFN input
    [B, T, d]; candidates: the predictor's candidates of the B * T tokens, None where the FFN ran dense."""

    inputs: jax.Array
    candidates: Candidates | None


class Block(nnx.Module):
    """One decoder layer."""

    def __init__(self, cfg: ModelConfig, engine: EngineConfig, w: Callable[[str], jax.Array]):
        self.cfg, self.engine = cfg, engine
        self.attn_norm = RMSNorm(w("attn_norm.scale"), cfg.rms_eps)
        self.attn = Attention(cfg, engine, lambda n: w(f"attn.{n}"))
        self.ffn_norm = RMSNorm(w("ffn_norm.scale"), cfg.rms_eps)
        self.ffn = FFN(cfg, engine, lambda n: w(f"ffn.{n}"))

    def __call__(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, start: jax.Array, pos: jax.Array,
                 mask: jax.Array, predictor: Predictor | None = None, rows: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array, FFNTrace]:
        """x [B, T, d] (the residual stream) -> (x after this layer, updated k_cache, v_cache, the FFN's trace).

        Top to bottom: norm and attention; the residual add, the FFN's norm and the predictor's input
        projection (one kernel at decode); with a predictor, its candidates C and the guarded FFN, which computes
        the gate on C only and up / down only on the truly active T = {i in C : h_i != 0} (decode-sized inputs:
        the Pallas kernels, reading only those rows; otherwise XLA computes every row and masks); without one, the
        dense FFN; the residual add. rows: bool [B * T] over the tokens (with a predictor): the others get no
        candidates (an output of 0), so the batch reads only the union of these rows' candidates (the server's
        occupied slots)."""
        engine, ffn = self.engine, self.ffn
        with jax.named_scope("attention"):  # norm + q/k/v (one product), RoPE, cache write, softmax and values, o
            attn, k_cache, v_cache = self.attn(x, k_cache, v_cache, start, pos, mask, self.attn_norm)
        with jax.named_scope("residual_norm_predictor_projection"):  # one kernel at decode
            x, normed, projected = add_rmsnorm(engine, x, attn, self.ffn_norm.scale[...], self.ffn_norm.eps,
                                               None if predictor is None else predictor.input_projection)
        if predictor is None:
            candidates = None
            with jax.named_scope("dense_ffn"):  # gate, up, activation, down: every row
                y = ffn(normed)
        else:
            flat = normed.reshape(-1, normed.shape[-1])
            with jax.named_scope("predictor_candidates"):  # scores (B @ the projection) + bias > 0
                gate = linear(engine, flat, ffn.w_gate[...], split="rows") if predictor.needs_gate else None
                candidates = predictor.candidates(flat, engine=engine, gate=gate, projected=None if projected is None
                                                  else projected.reshape(len(flat), -1))
                if rows is not None:
                    candidates = Candidates(mask=candidates.as_mask() & rows.reshape(-1, 1))
            with jax.named_scope("guarded_ffn"):  # compaction, then gate on C, activation, up / down on T
                y = guarded_ffn(engine, flat, candidates, ffn.w_gate[...], ffn.w_up[...], ffn.w_down_t[...],
                                activation(self.cfg)).astype(normed.dtype).reshape(normed.shape)
        with jax.named_scope("residual"):
            return x + y, k_cache, v_cache, FFNTrace(normed, candidates)


class FFNStats(NamedTuple):
    """One layer's FFN statistics over a forward pass (`Transformer.forward_with_stats`), what evaluation and
    calibration measure. inputs: the normed FFN input [B, T, d] in the model's dtype; candidates: the predictor's
    candidate mask bool [B, T, d_ff] (None for a dense layer); hidden: h = act(gate) * up f32 [B, T, d_ff], zero
    outside the candidates, from XLA's products of the inputs (so the FFN itself ran what the engine picked)."""

    inputs: jax.Array
    candidates: jax.Array | None
    hidden: jax.Array


def ffn_stats(cfg: ModelConfig, ffn: FFN, trace: FFNTrace) -> FFNStats:
    """The statistics of one FFN from its trace."""
    x = trace.inputs
    gate, up = (project(XLA, x, w) for w in (ffn.w_gate[...], ffn.w_up[...]))
    h = ffn_hidden(cfg, gate, up)
    if trace.candidates is None:
        return FFNStats(x, None, h)
    mask = trace.candidates.as_mask().reshape(*x.shape[:-1], -1)
    return FFNStats(x, mask, jnp.where(mask, h, 0.0))


class Transformer(nnx.Module):
    """Decoder-only ReGLU transformer. Build with `Transformer(cfg, weights, engine)`, weights keyed by spec
    paths; engine: how decode runs (default: `EngineConfig.resolve()`, the Pallas kernels on a GPU, XLA
    elsewhere)."""

    def __init__(self, cfg: ModelConfig, weights: dict[Path, jax.Array], engine: EngineConfig | None = None):
        def getter(prefix: Path) -> Callable[[str], jax.Array]:
            return lambda name: weights[prefix + tuple(name.split("."))]

        self.cfg = cfg
        self.engine = engine = engine or EngineConfig.resolve()
        self.embed = nnx.Param(weights[("embed",)])
        self.layers = nnx.List([Block(cfg, engine, getter(("layers", i))) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(weights[("final_norm", "scale")], cfg.rms_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(weights[("lm_head",)])
        if engine.mesh is not None:  # tensor parallel: every parameter on the mesh by its logical axes
            place_model(self, engine.mesh)

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed[...].dtype

    def __call__(self, tokens: jax.Array, cache: kv_cache.KVCache, start: jax.Array,
                 predictors: list[Predictor | None] | None = None, rows: jax.Array | None = None,
                 window: int | None = None) -> tuple[jax.Array, kv_cache.KVCache]:
        """Runs tokens [B, T] int32 that occupy cache slots [start, start + T) (start int32 [], or [B]: each
        sequence from its own slot on).

        Returns (the final-normed hidden states [B, T, d], the updated cache). Prefill is a call with the whole
        left-padded prompt at start=0; a decode step is a call with T=1. `predictors` (one per layer, None for a
        layer that runs dense) makes those FFNs predictor-guarded; rows (bool [B], with predictors): only these
        sequences' candidates count, the others' FFNs output 0 (free decode slots). window (static): attention
        reads only cache slots [0, window), which must hold every slot a query sees (the server's context
        bucket: no copy of the caches); None: all of them."""
        states, cache, _ = self.run(tokens, cache, start, predictors, rows, window)
        return states, cache

    def run(self, tokens: jax.Array, cache: kv_cache.KVCache, start: jax.Array,
            predictors: list[Predictor | None] | None = None, rows: jax.Array | None = None,
            window: int | None = None) -> tuple[jax.Array, kv_cache.KVCache, list[FFNTrace]]:
        """`__call__`, also returning every layer's `FFNTrace`."""
        t = tokens.shape[1]
        pos = kv_cache.positions(cache.pad, start, t)
        mask = kv_cache.attention_bias(self.cfg, cache.pad, start, t, window or cache.slots)
        x = self.embed[...][tokens]
        ks, vs, traces = [], [], []
        token_rows = None if rows is None else jnp.repeat(rows, t)  # [B * T]: the FFN's flattened tokens
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, k, v, trace = layer(x, cache.k[i], cache.v[i], start, pos, mask,
                                       None if predictors is None else predictors[i], token_rows)
            ks.append(k)
            vs.append(v)
            traces.append(trace)
        return self.final_norm(x), kv_cache.KVCache(k=ks, v=vs, pad=cache.pad), traces

    def forward_with_stats(self, tokens: jax.Array, cache: kv_cache.KVCache, start: jax.Array,
                           predictors: list[Predictor | None] | None = None, rows: jax.Array | None = None
                           ) -> tuple[jax.Array, kv_cache.KVCache, list[FFNStats]]:
        """`__call__` with every layer's FFN statistics (`FFNStats`, in layer order): the pass evaluation and
        calibration run. Inside a jitted function, the statistics it does not return cost nothing."""
        states, cache, traces = self.run(tokens, cache, start, predictors, rows)
        return states, cache, [ffn_stats(self.cfg, layer.ffn, t) for layer, t in zip(self.layers, traces)]

    def logits(self, states: jax.Array) -> jax.Array:
        """states [..., d] (final-normed) -> logits [..., vocab] f32 (the tied embedding when there is no separate
        LM head)."""
        head = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...]
        with jax.named_scope("lm_head"):
            return linear(self.engine, states, head, split="rows" if vocab_split(self.cfg, self.engine.mesh) else None)


def with_engine(model: Transformer, engine: EngineConfig) -> Transformer:
    """The same model (sharing its arrays) running under another engine configuration (placed on its mesh, if
    it has one)."""
    graphdef, state = nnx.split(model)
    other = nnx.merge(graphdef, state)
    for _, module in nnx.iter_modules(other):
        if hasattr(module, "engine"):
            module.engine = engine
        if isinstance(module, Attention) and module.qkv_shards != mesh_size(engine.mesh):
            module.lay_out_qkv(mesh_size(engine.mesh))  # new arrays: the layout follows the mesh's size
    if engine.mesh is not None:
        place_model(other, engine.mesh)
    return other
