"""Matrix-vector products for decode: y [B, n] = x [B, k] @ w [n, k]^T with B a handful of sequences, and the
same product for a weight stored input-major, y = x @ w_t with w_t [k, n] (W_down_t, the dense FFN's down
product: `gemv_t_pallas`).

One program per block of `rows` consecutive rows of w, every column loaded at once in power-of-two pieces, all
loads in flight together; each sequence's x is multiplied into the tile and summed along the row in f32. The
tile is loaded once for all B sequences. Given a scale, each program also forms RMSNorm(x) itself from x (8 KB
per sequence, from L2), so the q/k/v product of a decode step needs no separate norm launches. The result is
written in the dtype asked for (f32, or the activations' dtype so no conversion launch follows).

`gate_up_pallas` is the same row GEMV over W_gate and W_up together: each program reads its rows of both and
writes the FFN's hidden activations act(g) * u, so the dense FFN's first half is one launch.

For w_t [k, n] a row of w_t feeds every output, so `gemv_t_pallas` cuts the work the other way: program (j, s)
owns columns [j*cols, (j+1)*cols) of y and row blocks s, s + splits, s + 2 splits, ... of w_t, streams its
[rows, cols] tiles in a software-pipelined loop and writes an f32 partial sum; XLA adds the `splits` partial
sums (fused with whatever consumes y).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (F32, call, column_chunk, column_pieces, dot_pieces, pad_batch, pow2_divisor,
                                   rms_pieces)
from pallas_kernels.numerics import Activation


def _gemv_kernel(x_ref, w_ref, *refs, rows: int, cap: int, eps: float, has_scale: bool):
    """Program p: rows [p*rows, (p+1)*rows) of w, every column at once (power-of-two pieces of at most `cap`,
    the weight loads issued before x's), dotted with x or, given a scale, with RMSNorm(x) rounded as the
    reference rounds it (to the scale's dtype, then to the weights' as `reference.gemv` casts x)."""
    scale_ref, y_ref = (refs[0], refs[1]) if has_scale else (None, refs[0])
    start = pl.multiple_of(pl.program_id(0) * rows, rows)
    pieces = column_pieces(w_ref.shape[1], cap)
    tiles = [w_ref[pl.ds(start, rows), c] for c in pieces]
    for b in range(x_ref.shape[0]):
        xs = [x_ref[b, c].astype(F32) for c in pieces]
        if scale_ref is not None:
            xs = [n.astype(w_ref.dtype) for n in rms_pieces(xs, scale_ref, pieces, eps, scale_ref.dtype)]
        y_ref[b, :] = dot_pieces(tiles, xs).astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "rows", "cap", "num_warps", "interpret",
                                             "poison"))
def gemv_pallas(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, eps: float = 1e-6, *,
                out_dtype=F32, rows: int = 4, cap: int = 4096, num_warps: int = 8, interpret: bool = False,
                poison: bool = False) -> jax.Array:
    """x [B, k] @ w [n, k]^T -> [B, n] out_dtype (accumulated in f32, then rounded); given scale [k],
    RMSNorm(x) (eps) @ w^T, the norm computed inside every program. rows is an upper bound (the largest power
    of two dividing n up to it); cap the widest column piece; k must be a multiple of 16. poison: the output
    starts as NaN (the checks' proof that every element is written)."""
    b, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or (scale is not None and scale.shape != (k,)):
        raise ValueError(f"gemv: x {x.shape}, w {w.shape}, scale {None if scale is None else scale.shape}; "
                         f"expected w [n, {k}], scale [{k}]")
    rows = pow2_divisor(n, rows)
    xp = pad_batch(x if scale is not None else x.astype(w.dtype))
    bp = xp.shape[0]
    inputs = [xp, w] + ([] if scale is None else [scale])
    y = call(functools.partial(_gemv_kernel, rows=rows, cap=cap, eps=eps, has_scale=scale is not None),
             out_shape=jax.ShapeDtypeStruct((bp, n), out_dtype), grid=(n // rows,),
             in_specs=[pl.no_block_spec] * len(inputs), out_specs=pl.BlockSpec((bp, rows), lambda i: (0, i)),
             num_warps=num_warps, num_stages=1, interpret=interpret, poison=poison)(*inputs)
    return y[:b]


def _gate_up_kernel(x_ref, wg_ref, wu_ref, h_ref, *, rows: int, cap: int, act: Activation):
    """Program p: rows [p*rows, (p+1)*rows) of W_gate and W_up, both tiles' loads issued before x's, then
    h = act(x W_gate^T) * up(x W_up^T) for each sequence."""
    start = pl.multiple_of(pl.program_id(0) * rows, rows)
    pieces = column_pieces(wg_ref.shape[1], cap)
    gate_tiles = [wg_ref[pl.ds(start, rows), c] for c in pieces]
    up_tiles = [wu_ref[pl.ds(start, rows), c] for c in pieces]
    for b in range(x_ref.shape[0]):
        xs = [x_ref[b, c].astype(F32) for c in pieces]
        h_ref[b, :] = act.hidden(dot_pieces(gate_tiles, xs), dot_pieces(up_tiles, xs)).astype(h_ref.dtype)


@functools.partial(jax.jit, static_argnames=("act", "out_dtype", "rows", "cap", "num_warps", "interpret", "poison"))
def gate_up_pallas(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, act: Activation, *, out_dtype=F32,
                   rows: int = 2, cap: int = 4096, num_warps: int = 8, interpret: bool = False,
                   poison: bool = False) -> jax.Array:
    """The dense FFN's hidden activations in one pass over W_gate and W_up: x [B, k], w_gate and w_up [n, k] ->
    h [B, n] out_dtype = act(x w_gate^T) * up(x w_up^T) (`numerics.Activation.hidden`, the products accumulated
    in f32); one launch where two GEMVs, XLA's activation and its conversion to out_dtype take four. rows, cap,
    num_warps as for `gemv_pallas` (each program reads `rows` rows of both matrices). poison: the output starts
    as NaN."""
    b, k = x.shape
    n = w_gate.shape[0]
    if w_gate.shape != (n, k) or w_up.shape != (n, k):
        raise ValueError(f"gate_up: x {x.shape}, w_gate {w_gate.shape}, w_up {w_up.shape}; expected both [n, {k}]")
    rows = pow2_divisor(n, rows)
    xp = pad_batch(x.astype(w_gate.dtype))
    bp = xp.shape[0]
    h = call(functools.partial(_gate_up_kernel, rows=rows, cap=cap, act=act),
             out_shape=jax.ShapeDtypeStruct((bp, n), out_dtype), grid=(n // rows,),
             in_specs=[pl.no_block_spec] * 3, out_specs=pl.BlockSpec((bp, rows), lambda i: (0, i)),
             num_warps=num_warps, num_stages=1, interpret=interpret, poison=poison)(xp, w_gate, w_up)
    return h[:b]


def _gemv_t_kernel(x_ref, w_ref, out_ref, *, rows: int, cols: int, splits: int, batch: int):
    """Program (j, s): columns [j*cols, (j+1)*cols) of x @ w_t over the row blocks s, s + splits, ... of w_t
    (`rows` rows each), accumulated in f32, written to its partial-sum block out_ref [1, B', cols]."""
    j, s = pl.program_id(0), pl.program_id(1)
    blocks = w_ref.shape[0] // rows
    mine = (blocks - s + splits - 1) // splits
    col = pl.ds(pl.multiple_of(j * cols, cols), cols)

    def body(t, accs):
        start = pl.multiple_of((s + t * splits) * rows, rows)
        w = w_ref[pl.ds(start, rows), col].astype(F32)
        return tuple(acc + jnp.sum(w * x_ref[b, pl.ds(start, rows)].astype(F32)[:, None], axis=0)
                     for b, acc in enumerate(accs))

    accs = jax.lax.fori_loop(0, mine, body, tuple(jnp.zeros((cols,), F32) for _ in range(batch)))
    for b in range(out_ref.shape[1]):
        out_ref[0, b, :] = accs[b] if b < batch else jnp.zeros((cols,), F32)


@functools.partial(jax.jit, static_argnames=("out_dtype", "rows", "cols", "splits", "num_warps", "num_stages",
                                             "interpret", "poison"))
def gemv_t_pallas(x: jax.Array, w_t: jax.Array, *, out_dtype=F32, rows: int = 64, cols: int = 256,
                  splits: int = 16, num_warps: int = 4, num_stages: int = 3, interpret: bool = False,
                  poison: bool = False) -> jax.Array:
    """x [B, k] @ w_t [k, n] -> [B, n] out_dtype (x rounded to w_t's dtype, products accumulated in f32, then
    rounded). rows and cols are upper bounds (cut to the largest power of two dividing k and n; n must be a
    multiple of 16); splits: partial sums per column block. poison: the partial sums start as NaN."""
    b, k = x.shape
    n = w_t.shape[1]
    if w_t.shape[0] != k:
        raise ValueError(f"gemv_t: x {x.shape}, w_t {w_t.shape}; expected w_t [{k}, n]")
    rows = pow2_divisor(k, rows)
    cols = column_chunk(n, cols, f"gemv_t weights {w_t.shape}")
    splits = min(splits, k // rows)
    xp = pad_batch(x.astype(w_t.dtype))
    bp = xp.shape[0]
    partial = call(functools.partial(_gemv_t_kernel, rows=rows, cols=cols, splits=splits, batch=b),
                   out_shape=jax.ShapeDtypeStruct((splits, bp, n), F32), grid=(n // cols, splits),
                   in_specs=[pl.no_block_spec] * 2, out_specs=pl.BlockSpec((1, bp, cols), lambda j, s: (s, 0, j)),
                   num_warps=num_warps, num_stages=num_stages, interpret=interpret, poison=poison)(xp, w_t)
    return jnp.sum(partial[:, :b], axis=0).astype(out_dtype)
