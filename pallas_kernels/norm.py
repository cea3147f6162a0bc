"""Residual add + RMSNorm for decode, optionally with a small matrix-vector product of the normed vector, in one
launch: every program forms the sum and its norm from the [B, d] inputs (16 KB, from L2), program 0 writes them,
and each program also computes its block of `rows` rows of w @ normed when a w is given (the low-rank
predictor's input projection A, r x d).

Numerics follow `reference.add_rmsnorm`: the sum rounded to x's dtype (as `x + a` in bf16), the norm in f32,
x * rsqrt(mean(x^2) + eps) * scale, rounded to the scale's dtype; w @ normed accumulated in f32. The mean's sum
runs in a different order than XLA's, so the normed vector can differ from XLA's in the last bf16 place.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, call, column_pieces, dot_pieces, pow2_divisor, rms_pieces


def _add_norm_kernel(x_ref, delta_ref, scale_ref, *refs, eps: float, rows: int, has_w: bool):
    """Program p: the sum and norm of every sequence (written by program 0) and rows [p*rows, (p+1)*rows) of
    w @ normed. Columns go in power-of-two pieces (3584 = 2048 + 1024 + 512), all loaded at once."""
    w_ref, (sum_ref, normed_ref, *z_ref) = (refs[0], refs[1:]) if has_w else (None, refs)
    batch, d = x_ref.shape
    p = pl.program_id(0)
    pieces = column_pieces(d, 2048)
    w = [] if w_ref is None else [w_ref[pl.ds(p * rows, rows), c] for c in pieces]
    for b in range(batch):
        total = [(x_ref[b, c].astype(F32) + delta_ref[b, c].astype(F32)).astype(sum_ref.dtype) for c in pieces]
        normed = rms_pieces([t.astype(F32) for t in total], scale_ref, pieces, eps, normed_ref.dtype)

        @pl.when(p == 0)
        def _():
            for c, t, n in zip(pieces, total, normed):
                sum_ref[b, c] = t
                normed_ref[b, c] = n

        if w:
            z_ref[0][b, pl.ds(p * rows, rows)] = dot_pieces(w, [n.astype(w_ref.dtype) for n in normed])


@functools.partial(jax.jit, static_argnames=("eps", "rows", "num_warps", "interpret", "poison"))
def add_rmsnorm_pallas(x: jax.Array, delta: jax.Array, scale: jax.Array, eps: float, w: jax.Array | None = None,
                       *, rows: int = 4, num_warps: int = 4, interpret: bool = False,
                       poison: bool = False) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(x + delta, RMSNorm(x + delta), w @ RMSNorm(x + delta) or None) for x, delta [B, d] (d a multiple of 16),
    scale [d], w [n, d]: the sum in x's dtype, the norm in the scale's dtype, the product f32 [B, n].
    poison: outputs start as NaN."""
    batch, d = x.shape
    if delta.shape != x.shape or scale.shape != (d,) or (w is not None and w.shape[1:] != (d,)):
        raise ValueError(f"add_rmsnorm: x {x.shape}, delta {delta.shape}, scale {scale.shape}, w "
                         f"{None if w is None else w.shape}; expected delta like x, scale [{d}], w [n, {d}]")
    rows = 1 if w is None else pow2_divisor(w.shape[0], rows)
    programs = 1 if w is None else w.shape[0] // rows
    out_shape = [jax.ShapeDtypeStruct((batch, d), x.dtype), jax.ShapeDtypeStruct((batch, d), scale.dtype)]
    if w is not None:
        out_shape.append(jax.ShapeDtypeStruct((batch, w.shape[0]), F32))
    inputs = [x, delta, scale] + ([] if w is None else [w])
    out = call(functools.partial(_add_norm_kernel, eps=eps, rows=rows, has_w=w is not None),
               out_shape=tuple(out_shape), grid=(programs,), in_specs=[pl.no_block_spec] * len(inputs),
               out_specs=tuple(pl.no_block_spec for _ in out_shape), num_warps=num_warps, num_stages=1,
               interpret=interpret, poison=poison)(*inputs)
    return out[0], out[1], out[2] if w is not None else None
