"""Decode attention in one launch: each sequence's one new query against its KV cache, scores, softmax and the
weighted values, where XLA takes three launches (scores, softmax, values) and reads the whole window.

Program (b, h) owns query head h of sequence b and reads its KV head h // groups (HF's repeat_kv order, any
group size). It walks the cache slots [0, end_b) in blocks of `block` slots, end_b = the query's slot + 1, so
slots past the sequence's current position cost no memory traffic (XLA's softmax reads the whole window): a block
of K, the scores q.k * scale + the additive mask, an online softmax in f32 (the running maximum and sum), a block
of V into an f32 accumulator. The mask (kv_cache.attention_bias: left padding, causality, a sliding window) is
the same one XLA adds, so both see the same visible slots.

Numerics: scores, softmax and the weighted sum in f32 with the probabilities unrounded (XLA's path rounds them to
the cache's dtype before the values), the result rounded to q's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, call, load_rows, load_vector


def fits(head_dim: int, block: int) -> bool:
    """Whether the kernel runs at this head size and slot block (Triton tiles: powers of two, at least 16)."""
    return all(v >= 16 and v & (v - 1) == 0 for v in (head_dim, block))


def _decode_attention_kernel(ends_ref, q_ref, k_ref, v_ref, bias_ref, o_ref, *, groups: int, kv_heads: int,
                             slots: int, window: int, block: int, scale: float, interpret: bool):
    """Program (b, h): o[b, h] = softmax(q[b, h] . K[b, kv]^T * scale + bias[b]) V[b, kv] over slots < ends[b],
    K and V rows [(b * kv_heads + kv) * slots + s] of the flattened caches, bias [b * window + s]."""
    b, h = pl.program_id(0), pl.program_id(1)
    head_dim = q_ref.shape[-1]
    cols = pl.ds(0, head_dim)
    q = q_ref[...].astype(F32)  # [head_dim]
    end = jnp.minimum(ends_ref[b], window)
    base = (b * kv_heads + h // groups) * slots

    def step(j, carry):
        m, total, acc = carry
        slot = j * block + jnp.arange(block, dtype=jnp.int32)
        live = slot < end
        inside = jnp.minimum(slot, window - 1)  # in bounds everywhere (interpret mode reads every row)
        # K, V and the mask loaded together (all in flight at once), then the online softmax
        k = load_rows(k_ref, base + inside, live, cols, interpret).astype(F32)  # [block, head_dim]
        v = load_rows(v_ref, base + inside, live, cols, interpret).astype(F32)
        bias = load_vector(bias_ref, b * window + inside, live, 0.0, interpret)
        s = jnp.where(live, jnp.sum(k * q[None, :], axis=1) * scale + bias, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s))
        p = jnp.exp(s - m_new)
        shrink = jnp.exp(m - m_new)
        return m_new, total * shrink + jnp.sum(p), acc * shrink + jnp.sum(p[:, None] * v, axis=0)

    # a finite start: a block with no visible slot leaves the maximum finite, so exp(m - m_new) is never NaN
    start = (jnp.float32(jnp.finfo(jnp.float32).min), jnp.float32(0.0), jnp.zeros((head_dim,), F32))
    _, total, acc = jax.lax.fori_loop(0, pl.cdiv(end, block), step, start)
    o_ref[...] = (acc / total).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block", "num_warps", "num_stages", "interpret", "poison"))
def decode_attention_pallas(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, bias: jax.Array,
                            ends: jax.Array, *, block: int = 64, num_warps: int = 4, num_stages: int = 1,
                            interpret: bool = False,
                            poison: bool = False) -> jax.Array:
    """One query per sequence: q [B, H, head_dim] against k_cache, v_cache [B, KVH, S, head_dim] (H a multiple
    of KVH) with the additive mask bias f32 [B, W] over slots [0, W) (W <= S), reading slots < min(ends[b], W)
    (ends int32 [B]: the query's slot + 1). -> [B, H, head_dim] in q's dtype, scaled by head_dim^-0.5.
    block: cache slots per loop step; num_stages: Triton's software pipelining of that loop; head_dim and block
    powers of two >= 16 (`fits`). poison: the output starts as NaN."""
    batch, heads, head_dim = q.shape
    _, kv_heads, slots, _ = k_cache.shape
    window = bias.shape[-1]
    if (k_cache.shape != (batch, kv_heads, slots, head_dim) or v_cache.shape != k_cache.shape
            or heads % kv_heads or bias.shape != (batch, window) or window > slots or ends.shape != (batch,)
            or not fits(head_dim, block)):
        raise ValueError(f"decode_attention: q {q.shape}, caches {k_cache.shape} / {v_cache.shape}, bias "
                         f"{bias.shape}, ends {ends.shape}, block {block}; expected caches [{batch}, KVH, S, "
                         f"{head_dim}] with {heads} % KVH == 0, bias [{batch}, W <= S], ends [{batch}], "
                         "head_dim and block powers of two >= 16")
    kernel = functools.partial(_decode_attention_kernel, groups=heads // kv_heads, kv_heads=kv_heads, slots=slots,
                               window=window, block=block, scale=head_dim ** -0.5, interpret=interpret)
    head_spec = pl.BlockSpec((None, None, head_dim), lambda b, h: (b, h, 0))
    flat = (batch * kv_heads * slots, head_dim)  # free reshapes: the rows a program reads are contiguous
    return call(kernel, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(batch, heads),
                in_specs=[pl.no_block_spec, head_spec, pl.no_block_spec, pl.no_block_spec, pl.no_block_spec],
                out_specs=head_spec, num_warps=num_warps, num_stages=num_stages, interpret=interpret, poison=poison)(
        ends.astype(jnp.int32), q, k_cache.reshape(flat), v_cache.reshape(flat),
        bias.astype(F32).reshape(-1))
