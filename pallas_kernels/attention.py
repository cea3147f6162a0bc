"""Decode attention (one new token per sequence) as one Pallas launch: RoPE on the new query and key, the KV
cache writes, scores, softmax and the weighted values.

XLA ran this as four launches per layer (the key write with its RoPE, the value write, the scores, the
softmax with the values: 8.1 us per LLaMA2-7B layer on the H100, docs/BENCHMARKS.md), each over the whole
cache. Here program (b, j) takes sequence b's kv head j and its query heads: it rotates q and k, writes k and v
into slot `start` of the cache (updated in place: the cache buffers are aliased to the outputs), then reads
the cache in blocks of SLOT_BLOCK slots up to `start` only (later slots are masked for every query), each
block's K and V rows loaded together, with an online softmax (running maximum, sum and weighted values in f32).
The new k and v enter from registers (slot `start` is not read back). Unlike XLA's path, which rounds the
probabilities to the model's dtype before they weight the values, the weights stay f32 here, so the two differ
in the last places of the dtype (the checks compare both to float64).

A first version read the cache twice (the softmax's maximum and sum, then the rounded probabilities times the
values, XLA's numerics exactly): 12.7 us per LLaMA2-7B layer in decode against XLA's 8.1 us for its four
launches (docs/bench/bench_decode_attention_two_pass.json).

Layout: the cache [B, n_kv, slots, hd] is handed to the kernel as rows [B * n_kv * slots, hd] (a free
reshape), so slot blocks are row gathers with a mask past the cache (`gemv.load_rows`). RoPE uses HF's
rotate-half convention on the two halves of each head, with cos / sin [B, hd / 2] computed by the caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from pallas_kernels.gemv import MAX_BATCH, compiler_params, load_rows

F32 = jnp.float32
SLOT_BLOCK = 64
NUM_WARPS = 4


def _rotate(lo, hi, cos, sin, dtype):
    """RoPE of one head given as halves (f32 [half] each): (lo cos - hi sin, hi cos + lo sin), rounded."""
    return (lo * cos + (-hi) * sin).astype(dtype), (hi * cos + lo * sin).astype(dtype)


def _attention_kernel(start_ref, qkv_ref, cos_ref, sin_ref, mask_ref, k_in, v_in, *refs, n_kv: int, groups: int,
                      hd: int, slots: int, scale: float, block: int, interpret: bool):
    out_ref, k_ref, v_ref = refs[-3:]  # k_in / v_in (and a poisoned start of out_ref) are aliased to the outputs
    b, j = pl.program_id(0), pl.program_id(1)
    half = hd // 2
    dt = out_ref.dtype
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    s = start_ref[0]
    cos, sin = cos_ref[b, :], sin_ref[b, :]
    q_dim, kv_dim = n_kv * groups * hd, n_kv * hd

    def head(offset):  # halves of the head starting at column `offset` of qkv, f32
        return (qkv_ref[b, pl.ds(offset, half)].astype(F32), qkv_ref[b, pl.ds(offset + half, half)].astype(F32))

    qs = [_rotate(*head((j * groups + g) * hd), cos, sin, dt) for g in range(groups)]
    k_lo, k_hi = _rotate(*head(q_dim + j * hd), cos, sin, dt)
    v_new = qkv_ref[b, pl.ds(q_dim + kv_dim + j * hd, hd)].astype(dt)
    row0 = (b * n_kv + j) * slots
    k_ref[row0 + s, lo] = k_lo
    k_ref[row0 + s, hi] = k_hi
    v_ref[row0 + s, :] = v_new

    n_blocks = s // block + 1  # slots after `start` are masked for this query: not read

    def step(t, carry):  # one block of slots: K and V rows loaded together, online softmax per query head
        slot = t * block + jnp.arange(block, dtype=jnp.int32)
        live = slot < slots
        rows = row0 + jnp.where(live, slot, 0)
        fresh = (slot == s)[:, None]
        kl = jnp.where(fresh, k_lo[None, :], load_rows(k_ref, rows, live, lo, interpret)).astype(F32)
        kh = jnp.where(fresh, k_hi[None, :], load_rows(k_ref, rows, live, hi, interpret)).astype(F32)
        v = jnp.where(fresh, v_new[None, :], load_rows(v_ref, rows, live, pl.ds(0, hd), interpret)).astype(F32)
        mask = jnp.where(live, mask_ref[b, jnp.where(live, slot, 0)], -1e30)
        out = []
        for g, (ql, qh) in enumerate(qs):
            m, total, acc = carry[3 * g: 3 * g + 3]
            sc = (jnp.sum(kl * ql.astype(F32)[None, :], axis=1) + jnp.sum(kh * qh.astype(F32)[None, :], axis=1)) * scale
            sc = sc + mask
            m_new = jnp.maximum(m, jnp.max(sc))
            rescale, p = jnp.exp(m - m_new), jnp.exp(sc - m_new)
            out += [m_new, total * rescale + jnp.sum(p), acc * rescale + jnp.sum(v * p[:, None], axis=0)]
        return tuple(out)

    init = tuple(x for _ in range(groups) for x in (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((hd,), F32)))
    carry = jax.lax.fori_loop(0, n_blocks, step, init)
    for g in range(groups):
        out_ref[b, pl.ds((j * groups + g) * hd, hd)] = (carry[3 * g + 2] / carry[3 * g + 1]).astype(dt)


@functools.partial(jax.jit, static_argnames=("n_kv", "scale", "block", "num_warps", "interpret", "poison"))
def decode_attention_pallas(qkv: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, start: jax.Array,
                            k_cache: jax.Array, v_cache: jax.Array, *, n_kv: int, scale: float,
                            block: int = SLOT_BLOCK, num_warps: int = NUM_WARPS, interpret: bool = False,
                            poison: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The Pallas version of `decode_attention` (same arguments and results); block: slots per step (a power
    of two). poison: out starts as NaN."""
    batch, _, slots, hd = k_cache.shape
    q_dim = qkv.shape[1] - 2 * n_kv * hd
    groups = q_dim // (n_kv * hd)
    rows = (batch * n_kv * slots, hd)
    out_shape = jax.ShapeDtypeStruct((batch, q_dim), k_cache.dtype)
    inputs = [jnp.reshape(start, (1,)).astype(jnp.int32), qkv, cos, sin, mask, k_cache.reshape(rows),
              v_cache.reshape(rows)] + ([jnp.full(out_shape.shape, jnp.nan, out_shape.dtype)] if poison else [])
    kernel = functools.partial(_attention_kernel, n_kv=n_kv, groups=groups, hd=hd, slots=slots, scale=scale,
                               block=block, interpret=interpret)
    out, k_rows, v_rows = pl.pallas_call(
        kernel, grid=(batch, n_kv),
        out_shape=(out_shape, jax.ShapeDtypeStruct(rows, k_cache.dtype), jax.ShapeDtypeStruct(rows, v_cache.dtype)),
        in_specs=[pl.no_block_spec] * len(inputs), out_specs=(pl.no_block_spec,) * 3,
        input_output_aliases={5: 1, 6: 2, **({7: 0} if poison else {})},
        compiler_params=None if interpret else compiler_params(num_warps, 1), interpret=interpret)(*inputs)
    return out, k_rows.reshape(k_cache.shape), v_rows.reshape(v_cache.shape)


def supported(batch: int, head_dim: int) -> bool:
    """Whether the kernel takes this shape: a decode-sized batch and a power-of-two head_dim of at least 32."""
    return batch <= MAX_BATCH and head_dim >= 32 and head_dim & (head_dim - 1) == 0


def use_kernel(batch: int, head_dim: int) -> bool:
    """Whether decode attention should run the kernel here (`dispatch.mode()` and `supported`)."""
    return dispatch.mode() != "xla" and supported(batch, head_dim)


def decode_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, start: jax.Array,
                     k_cache: jax.Array, v_cache: jax.Array, *, n_kv: int,
                     scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention: qkv [B, (n_heads + 2 n_kv) hd] (the fused projection, before RoPE), cos / sin
    f32 [B, hd / 2] (RoPE of each sequence's position), mask f32 [B, slots] (additive), start int32 scalar (the
    slot of the new token), caches [B, n_kv, slots, hd]. Returns (out [B, n_heads * hd] in the caches' dtype,
    k_cache, v_cache with slot `start` written). Query head h reads kv head h // (n_heads / n_kv)."""
    return decode_attention_pallas(qkv, cos, sin, mask, start, k_cache, v_cache, n_kv=n_kv, scale=scale,
                                   interpret=dispatch.mode() == "interpret")
