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

import dataclasses
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.candidates import Candidates
from pallas_kernels.numerics import Activation, rms_norm
from svdsparse_jax import kv_cache
from svdsparse_jax.config import ModelConfig
from svdsparse_jax.engine import XLA, EngineConfig, add_rmsnorm, guarded_ffn, project, project_t
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


@dataclasses.dataclass
class FFNProbe:
    """Asks every FFN of a forward pass to record, in layer order, what evaluation and calibration measure:
    `inputs` (the normed FFN input [..., d], when "inputs" is in `record`), `candidates` (the predictor's
    candidate mask, bool [..., d_ff]; None for a dense FFN) and `hidden` (h = act(gate) * up where a candidate,
    f32 [..., d_ff]). The statistics are computed beside the FFN from its input, with XLA's products, so the FFN
    itself runs what the engine picked (kernels or XLA) and produces the output as in decode. Inside a jitted
    function the lists fill with traced arrays, which that function returns."""

    record: tuple[str, ...] = ("candidates", "hidden")
    inputs: list = dataclasses.field(default_factory=list)
    candidates: list = dataclasses.field(default_factory=list)
    hidden: list = dataclasses.field(default_factory=list)

    def observe(self, cfg: ModelConfig, x: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                mask: jax.Array | None) -> None:
        """One FFN's statistics: x [..., d] its input, mask its candidates (None: dense)."""
        if "inputs" in self.record:
            self.inputs.append(x)
        if "candidates" in self.record:
            self.candidates.append(mask)
        if "hidden" in self.record:  # the products of XLA's FFN, which XLA computes once where both run
            gate, up = (project(XLA, x, w) for w in (w_gate, w_up))
            h = ffn_hidden(cfg, gate, up)
            self.hidden.append(h if mask is None else jnp.where(mask, h, 0.0))


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
        """norm(x) for x [B, T, d], the tokens in slots [start, start+T); pos [B, T]; mask [B, T, slots].
        Returns (out [B, T, d], updated k_cache, updated v_cache)."""
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
            # Query head h reads kv head h // groups (HF's repeat_kv order).
            groups = cfg.n_heads // cfg.n_kv_heads
            widen = engine.platform == "cpu"
            q = q.reshape(b, t, cfg.n_kv_heads, groups, cfg.head_dim)
            scores = einsum("btkgh,bksh->bkgts", q, k_cache, widen)
            scores = scores * (cfg.head_dim ** -0.5) + mask[:, None, None, :, :]
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            out = einsum("bkgts,bksh->btkgh", probs, v_cache, widen)
            out = out.astype(dt).reshape(b, t, cfg.q_dim)
        with jax.named_scope("o_proj"):
            return linear(engine, out, self.wo[...], self._bias("bo"), out_dtype=dt, split="cols"), k_cache, v_cache


class FFN(nnx.Module):
    """The ReGLU FFN: y = (act(x W_gate^T) * (x W_up^T)) W_down_t, with W_down_t [d_ff, d].

    Dense, or predictor-guarded (the paper's sparse executor): the predictor picks the candidate neurons C, the
    activation is kept on C only, and up / down count only for the truly active T = {i in C : h_i != 0}. The
    guarded FFN goes through `engine.guarded_ffn`: decode-sized inputs run the Pallas kernels where the engine
    says so, which read only the rows of C (W_gate) and T (W_up, W_down_t); otherwise XLA computes every row and
    masks (exactly the dense result when C is everything)."""

    def __init__(self, cfg: ModelConfig, engine: EngineConfig, w: Callable[[str], jax.Array]):
        self.cfg, self.engine = cfg, engine
        self.w_gate, self.w_up, self.w_down_t = (nnx.Param(w(n)) for n in ("w_gate", "w_up", "w_down_t"))

    def hidden(self, x: jax.Array) -> jax.Array:
        """h = act(gate) * up, [..., d_ff] f32: the input of down_proj (zero for inactive neurons)."""
        engine = self.engine
        return ffn_hidden(self.cfg, linear(engine, x, self.w_gate[...], split="rows"),
                          linear(engine, x, self.w_up[...], split="rows"))

    def __call__(self, x: jax.Array, predictor: Predictor | None = None, projected: jax.Array | None = None,
                 probe: FFNProbe | None = None, rows: jax.Array | None = None) -> jax.Array:
        """x [..., d] (the normed FFN input) -> y [..., d] in x's dtype. With a predictor only its candidates
        count; projected: x @ predictor.input_projection^T f32 [..., r] when already computed (decode: in the
        kernel that formed x). probe: records this FFN's statistics (`FFNProbe`). rows: bool [N] over the N
        tokens of x (with a predictor): the others get no candidates (an output of 0), so the batch reads only
        the union of these rows' candidates (the server's occupied slots)."""
        engine, mask = self.engine, None
        if predictor is None:
            with jax.named_scope("gate_up_activation"):
                h = self.hidden(x)
            with jax.named_scope("down"):
                y = project_t(engine, h.astype(x.dtype), self.w_down_t[...], x.dtype)
        else:
            flat = x.reshape(-1, x.shape[-1])
            with jax.named_scope("predictor_scores"):
                gate = linear(engine, flat, self.w_gate[...], split="rows") if predictor.needs_gate else None
                candidates = predictor.candidates(flat, engine=engine, gate=gate, projected=None if projected is None
                                                  else projected.reshape(len(flat), -1))
                if rows is not None:
                    candidates = Candidates(mask=candidates.as_mask() & rows.reshape(-1, 1))
            y = guarded_ffn(engine, flat, candidates, self.w_gate[...], self.w_up[...], self.w_down_t[...],
                            activation(self.cfg)).astype(x.dtype).reshape(x.shape)
            if probe is not None:
                mask = candidates.as_mask().reshape(*x.shape[:-1], -1)
        if probe is not None:
            probe.observe(self.cfg, x, self.w_gate[...], self.w_up[...], mask)
        return y


class Block(nnx.Module):
    """One decoder layer. A decode step reads, top to bottom: norm, attention, residual, norm, predictor scores,
    candidates, gate on the candidates, activation, up / down on the active rows, residual."""

    def __init__(self, cfg: ModelConfig, engine: EngineConfig, w: Callable[[str], jax.Array]):
        self.engine = engine
        self.attn_norm = RMSNorm(w("attn_norm.scale"), cfg.rms_eps)
        self.attn = Attention(cfg, engine, lambda n: w(f"attn.{n}"))
        self.ffn_norm = RMSNorm(w("ffn_norm.scale"), cfg.rms_eps)
        self.ffn = FFN(cfg, engine, lambda n: w(f"ffn.{n}"))

    def __call__(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, start: jax.Array, pos: jax.Array,
                 mask: jax.Array, predictor: Predictor | None = None, probe: FFNProbe | None = None,
                 rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, d] (the residual stream) -> (x after this layer, updated k_cache, v_cache); rows: `FFN`'s."""
        with jax.named_scope("attention"):  # norm, q/k/v, RoPE, cache write, softmax and values, o_proj
            attn, k_cache, v_cache = self.attn(x, k_cache, v_cache, start, pos, mask, self.attn_norm)
        # The residual add, the FFN's norm and the predictor's input projection A (normed x): one kernel at decode.
        with jax.named_scope("residual_norm_predictor_projection"):
            x, normed, projected = add_rmsnorm(self.engine, x, attn, self.ffn_norm.scale[...], self.ffn_norm.eps,
                                               None if predictor is None else predictor.input_projection)
        with jax.named_scope("ffn"):  # predictor scores, candidates, gate, activation, up / down on active rows
            y = self.ffn(normed, predictor, projected, probe, rows)
        with jax.named_scope("residual"):
            return x + y, k_cache, v_cache


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
                 predictors: list[Predictor] | None = None, probe: FFNProbe | None = None,
                 rows: jax.Array | None = None) -> tuple[jax.Array, kv_cache.KVCache]:
        """Runs tokens [B, T] int32 that occupy cache slots [start, start + T) (start int32 [], or [B]: each
        sequence from its own slot on).

        Returns (the final-normed hidden states [B, T, d], the updated cache). Prefill is a call with the whole
        left-padded prompt at start=0; a decode step is a call with T=1. `predictors` (one per layer) makes
        every FFN predictor-guarded; rows (bool [B], with predictors): only these sequences' candidates count,
        the others' FFNs output 0 (free decode slots). `probe` records every FFN's statistics (`FFNProbe`)."""
        t = tokens.shape[1]
        pos = kv_cache.positions(cache.pad, start, t)
        mask = kv_cache.attention_bias(self.cfg, cache.pad, start, t, cache.slots)
        x = self.embed[...][tokens]
        ks, vs = [], []
        token_rows = None if rows is None else jnp.repeat(rows, t)  # [B * T]: the FFN's flattened tokens
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, k, v = layer(x, cache.k[i], cache.v[i], start, pos, mask,
                                None if predictors is None else predictors[i], probe, token_rows)
            ks.append(k)
            vs.append(v)
        return self.final_norm(x), kv_cache.KVCache(k=ks, v=vs, pad=cache.pad)

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
