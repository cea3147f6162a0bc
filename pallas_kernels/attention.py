"""Decode attention in one launch: each sequence's one query token against its KV cache, softmax(q k^T * scale +
bias) v, for every query head of a grouped-query model.

XLA runs this step as about five kernels (the scores' product, the softmax's reductions, a conversion, the values'
product), each a launch of a few microseconds over a few megabytes, and reads every slot of the cache. Here
program (b, h) owns sequence b and KV head h with its `groups` query heads: it streams the slots [0, length[b])
of that head's keys and values in blocks of `block` slots, keeping a running maximum, sum and weighted value sum
per query head in f32 (the streaming softmax), and writes the normalised result in q's dtype. Blocks past the
sequence's length are never read, so the cost follows the context, not the cache's size.

Layout: the caches [B, n_kv, S, hd] are read as [B * n_kv * S, hd] (a free reshape), so a block of slots is one
contiguous [block, hd] load; S must be a multiple of the block (`kv_cache.init_cache` rounds caches up to a
multiple of 64) and hd a power of two of at least 16 (Triton's tiles). The XLA version is
`reference.attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, call, pow2_divisor


def block_for(slots: int, block: int) -> int:
    """The kernel's block of slots for a cache of `slots`: the largest power of two <= block dividing it."""
    return pow2_divisor(slots, block)


def fits(slots: int, head_dim: int, block: int) -> bool:
    """Whether the kernel takes caches of `slots` slots and heads of `head_dim` (else the engine runs XLA's)."""
    return block_for(slots, block) >= 16 and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _decode_attention_kernel(length_ref, q_ref, k_ref, v_ref, bias_ref, o_ref, *, heads: int, slots: int,
                             block: int, groups: int, scale: float):
    """Program (b, h): q rows [(b*heads + h)*G', +groups) of q_ref [B*heads*G', hd] against cache rows
    [(b*heads + h)*S, +length[b]) of k_ref / v_ref [B*heads*S, hd] with bias_ref [B*S] f32; o_ref [1, G', hd]."""
    b, h = pl.program_id(0), pl.program_id(1)
    head = b * heads + h
    padded = o_ref.shape[1]
    base = pl.multiple_of(head * slots, block)
    qs = [q_ref[head * padded + g, :].astype(F32) for g in range(groups)]

    def body(j, running):
        at = pl.multiple_of(j * block, block)
        k = k_ref[pl.ds(base + at, block), :].astype(F32)
        v = v_ref[pl.ds(base + at, block), :].astype(F32)
        bias = bias_ref[pl.ds(pl.multiple_of(b * slots + at, block), block)]
        out = []
        for q, (m, total, acc) in zip(qs, running):
            s = jnp.sum(k * q[None, :], axis=1) * scale + bias
            m_new = jnp.maximum(m, jnp.max(s))
            p = jnp.exp(s - m_new)
            shrink = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
            out.append((m_new, total * shrink + jnp.sum(p), acc * shrink + jnp.sum(p[:, None] * v, axis=0)))
        return tuple(out)

    hd = k_ref.shape[1]
    start = tuple((jnp.full((), -jnp.inf, F32), jnp.zeros((), F32), jnp.zeros((hd,), F32)) for _ in qs)
    n_blocks = (length_ref[b] + block - 1) // block
    final = jax.lax.fori_loop(0, n_blocks, body, start)
    for g in range(padded):
        o_ref[0, g, :] = ((final[g][2] / final[g][1]).astype(o_ref.dtype) if g < groups
                          else jnp.zeros((hd,), o_ref.dtype))


@functools.partial(jax.jit, static_argnames=("scale", "block", "num_warps", "num_stages", "interpret", "poison"))
def decode_attention_pallas(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, bias: jax.Array,
                            length: jax.Array, *, scale: float, block: int = 64, num_warps: int = 4,
                            num_stages: int = 2, interpret: bool = False, poison: bool = False) -> jax.Array:
    """softmax(q k^T * scale + bias) v for one query token per sequence.

    q [B, n_kv, G, hd] (query head h*G + g reads KV head h, HF's repeat_kv order); k_cache, v_cache
    [B, n_kv, S, hd]; bias [B, S] f32, added to the scores (masked slots: a large negative number such as
    `kv_cache.MASKED`); length: int32 [] or [B], the slots [0, length) each sequence reads (every slot of it at
    or past its length must be masked or never read: it is not read). Returns [B, n_kv, G, hd] in q's dtype.
    block: slots per loop step (cut to a power of two dividing S, at least 16). poison: the output starts as
    NaN."""
    batch, heads, groups, hd = q.shape
    slots = k_cache.shape[2]
    if k_cache.shape != (batch, heads, slots, hd) or v_cache.shape != k_cache.shape or bias.shape != (batch, slots):
        raise ValueError(f"decode_attention: q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}, bias "
                         f"{bias.shape}; expected caches [{batch}, {heads}, S, {hd}] and bias [{batch}, S]")
    if not fits(slots, hd, block):
        raise ValueError(f"decode_attention: {slots} cache slots and head_dim {hd}: the kernel needs slots a "
                         "multiple of 16 and head_dim a power of two >= 16")
    block = block_for(slots, block)
    padded = pl.next_power_of_2(groups)
    qf = jnp.pad(q, ((0, 0), (0, 0), (0, padded - groups), (0, 0))).reshape(batch * heads * padded, hd)
    lengths = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (batch,))
    kernel = functools.partial(_decode_attention_kernel, heads=heads, slots=slots, block=block, groups=groups,
                               scale=scale)
    out = call(kernel, out_shape=jax.ShapeDtypeStruct((batch * heads, padded, hd), q.dtype), grid=(batch, heads),
               in_specs=[pl.no_block_spec] * 5,
               out_specs=pl.BlockSpec((1, padded, hd), lambda b, h: (b * heads + h, 0, 0)),
               num_warps=num_warps, num_stages=num_stages, interpret=interpret, poison=poison)(
        lengths, qf, k_cache.reshape(-1, hd), v_cache.reshape(-1, hd), bias.astype(F32).reshape(-1))
    return out.reshape(batch, heads, padded, hd)[:, :, :groups]
