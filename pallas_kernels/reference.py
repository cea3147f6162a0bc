"""XLA implementations of what the kernels compute: the fallback wherever the engine does not run a kernel (CPU,
prefill, evaluation). (The checks' float64 oracles live with the tests: tests/kernel_checks.py.)

Every jax function here is plain `jax.numpy`, accumulates in f32 and reads whole matrices (XLA has no cheap
data-dependent row skipping); the Pallas versions compute the same values while reading only the rows that
matter: `gemv.gemv_pallas`, `norm.add_rmsnorm_pallas`, `compaction.compact_pallas`,
`sparse_ffn.sparse_ffn_indexed`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.candidates import Candidates
from pallas_kernels.compaction import TILE, n_tiles
from pallas_kernels.numerics import Activation, rms_norm

F32 = jnp.float32


def gemv(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, eps: float = 0.0) -> jax.Array:
    """x [B, k] @ w [n, k]^T -> [B, n] f32 (f32 operands at full precision); given scale [k], RMSNorm(x) @ w^T."""
    if scale is not None:
        x = rms_norm(x, scale, eps)
    precision = jax.lax.Precision.HIGHEST if x.dtype == F32 and w.dtype == F32 else None
    return jnp.einsum("bk,nk->bn", x.astype(w.dtype), w, preferred_element_type=F32, precision=precision)


def gemv_t(x: jax.Array, w_t: jax.Array) -> jax.Array:
    """x [B, k] @ w_t [k, n] -> [B, n] f32 for a weight stored input-major (W_down_t), x rounded to its dtype."""
    precision = jax.lax.Precision.HIGHEST if w_t.dtype == F32 else None
    return jnp.einsum("bk,kn->bn", x.astype(w_t.dtype), w_t, preferred_element_type=F32, precision=precision)


def add_rmsnorm(x: jax.Array, delta: jax.Array, scale: jax.Array, eps: float,
                w: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(x + delta, RMSNorm(x + delta), w @ RMSNorm(x + delta) or None) for x, delta [..., d], scale [d],
    w [n, d]: the sum in x's dtype, the norm in the scale's dtype, the product f32 [..., n]."""
    total = x + delta.astype(x.dtype)
    normed = rms_norm(total, scale, eps)
    if w is None:
        return total, normed, None
    z = gemv(normed.reshape(-1, normed.shape[-1]), w).reshape(*normed.shape[:-1], w.shape[0])
    return total, normed, z


def compact(candidates: Candidates, tile: int = TILE) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The blocked neuron list (tiles, counts, own) of `compaction.compact_pallas`, built by XLA."""
    mask = candidates.as_mask()
    batch, d_ff = mask.shape
    union = jnp.any(mask, axis=0)
    n = n_tiles(d_ff, tile)
    m = jnp.pad(union, (0, n * tile - d_ff)).reshape(n, tile)
    ones = m.astype(jnp.int32)
    pos = jnp.cumsum(ones, axis=1) - 1 + (jnp.arange(n, dtype=jnp.int32) * tile)[:, None]
    target = jnp.where(m, pos, n * tile).reshape(-1)
    tiles = jnp.zeros(n * tile, jnp.int32).at[target].set(jnp.arange(n * tile, dtype=jnp.int32), mode="drop")
    own = None
    if batch > 1:
        padded = jnp.pad(mask, ((0, 0), (0, n * tile - d_ff))).astype(jnp.int8)
        own = jnp.zeros((n * tile, batch), jnp.int8).at[target].set(padded.T, mode="drop")
    return tiles, jnp.sum(ones, axis=1), own


def sparse_ffn(x: jax.Array, candidates: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down_t: jax.Array,
               act: Activation) -> jax.Array:
    """The predictor-guarded FFN (the paper's sparse executor) computed densely and masked.

    x [B, d] (the weights' dtype), candidates bool [B, d_ff] (one mask per sequence; the kernels read the union
    of the batch's rows, and a neuron counts for a sequence only where its own mask is set), w_gate and w_up
    [d_ff, d], w_down_t [d_ff, d]. Returns y [B, d] f32 = sum over neurons i in C_b of h_bi * w_down_t[i]."""
    h = act.hidden(gemv(x, w_gate), gemv(x, w_up))
    h = jnp.where(candidates, h, 0.0)
    return jnp.einsum("bf,fd->bd", h.astype(w_down_t.dtype), w_down_t, preferred_element_type=F32,
                      precision=jax.lax.Precision.HIGHEST if w_down_t.dtype == F32 else None)
