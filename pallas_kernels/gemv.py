"""Matrix-vector products for decode: y [B, n] = x [B, k] @ w [n, k]^T with B a handful of sequences.

`gemv_pallas`: one program per block of `rows` consecutive rows of w, every column loaded at once in
power-of-two pieces (as the stream kernel loads its rows), all loads in flight together; each sequence's x is
multiplied into the tile and summed along the row in f32. The tile is loaded once for all B sequences, so a
batch costs little more than one sequence. Given a scale, each program also forms RMSNorm(x) itself from x
(8 KB per sequence, from L2), so a decode step's q/k/v product needs no separate norm launches. The result is
written in the dtype asked for (f32, or the activations' dtype so no conversion launch follows).

A second design, a loop over equal column chunks per block of rows, was measured against it on the H100
(docs/BENCHMARKS.md, "Decode GEMVs"; `docs/bench/bench_gemv_loop_vs_block.json`): the loop kernel's best of
three tiles and this kernel at its default tile were within 2% of each other on every 7B shape (12288x4096
38.9 vs 39.2 us, 11008x4096 35.8 vs 35.2, 4096x11008 39.5 vs 40.0, 32000x4096 90.9 vs 90.5), and only whole
rows can fuse the norm, so the loop kernel was removed. Its row-dot loop remains as the gate / up stage of the
sparse FFN (`sparse_ffn.py`), over a gathered list of rows: `dot_rows`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import dispatch, reference

F32 = jnp.float32


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def column_chunk(k: int, cap: int, what: str = "matrix") -> int:
    """The column chunk for a k-wide matrix: a power of two dividing k, at least 16 (Triton's smallest useful
    tile width); k must therefore be a multiple of 16, as every model dimension here is."""
    c = pow2_divisor(k, cap)
    if c < 16:
        raise ValueError(f"{what}: {k} columns is not a multiple of 16, which the GPU kernels need")
    return c


def compiler_params(num_warps: int, num_stages: int):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def load_rows(ref, rows: jax.Array, live: jax.Array, cols, interpret: bool) -> jax.Array:
    """ref[rows, cols] with the rows where `live` is False read as zero. On the GPU those rows are masked out
    of the load, so they cost no memory traffic; interpret mode cannot run a masked gather, so there the
    (clamped, in-bounds) rows are read and zeroed afterwards. `rows` must be in bounds everywhere."""
    if interpret:
        return jnp.where(live[:, None], ref[rows, cols], 0)
    mask = jnp.broadcast_to(live[:, None], (rows.shape[0], cols.size))
    return plt.load(ref.at[rows, cols], mask=mask, other=0)


def column_pieces(k: int, cap: int) -> list[pl.Slice]:
    """k columns as power-of-two pieces of at most `cap`, largest first (3584 -> 2048 + 1024 + 512), so code
    written out over them makes a few wide loads where equal chunks would need many narrow ones (equal chunks
    must divide k: 3584 only in 512s), all of them in flight at once. Each piece starts at a multiple of its
    size; k must be a multiple of 16."""
    column_chunk(k, 16)  # the multiple-of-16 check and its message
    pieces, start = [], 0
    while start < k:
        size = 1 << min(cap, k - start).bit_length() - 1
        pieces.append(pl.ds(start, size))
        start += size
    return pieces


def dot_pieces(tiles: list[jax.Array], xs: list[jax.Array]) -> jax.Array:
    """Inside a kernel: f32 [rows], row tiles tiles[i] [rows, n_i] dotted with the vector pieces xs[i] [n_i]."""
    return sum(jnp.sum(t.astype(F32) * v.astype(F32)[None, :], axis=1) for t, v in zip(tiles, xs))


def dot_tiles(x_ref, tiles: list[jax.Array], cols: list[pl.Slice], batch: int) -> list[jax.Array]:
    """Per sequence b < batch, f32 [rows]: loaded row tiles (tiles[i] [rows, size of cols[i]], columns cols[i]
    of w) dotted with x[b] over those columns, in f32."""
    return [dot_pieces(tiles, [x_ref[b, c] for c in cols]) for b in range(batch)]


def dot_rows(x_ref, w_ref, rows: jax.Array, live: jax.Array, *, chunk: int, batch: int,
             interpret: bool) -> list[jax.Array]:
    """For each sequence b < batch: [w[rows[r]] . x[b] for r] as f32 [len(rows)], rows where `live` is False
    giving 0 and costing no reads on the GPU. x_ref [>=batch, k], w_ref [n, k]. Columns go in a loop over equal
    chunks of `chunk` (the loop Triton software-pipelines)."""
    k = x_ref.shape[1]

    def body(c, accs):
        cols = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        dots = dot_tiles(x_ref, [load_rows(w_ref, rows, live, cols, interpret)], [cols], batch)
        return tuple(acc + dot for acc, dot in zip(accs, dots))

    return list(jax.lax.fori_loop(0, k // chunk, body, tuple(jnp.zeros(rows.shape, F32) for _ in range(batch))))


def call(kernel, *, out_shape, grid: tuple[int, ...], in_specs: list, out_specs,
         num_warps: int, num_stages: int, interpret: bool, poison: bool = False,
         init: jax.Array | None = None):
    """pl.pallas_call with this package's conventions: Triton compiler parameters on the GPU, and output buffers
    optionally given their starting contents: `init` for the first (a kernel that accumulates into it) or, with
    `poison`, NaN in every float output and the smallest integer in every integer one (checks then prove that
    the kernel wrote every element, also where it exited early).
    out_shape: one jax.ShapeDtypeStruct, or a tuple of them (then out_specs is a tuple too)."""
    shapes = out_shape if isinstance(out_shape, tuple) else (out_shape,)
    if init is not None:
        starts = [init]
    elif poison:
        starts = [jnp.full(s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.floating) else jnp.iinfo(s.dtype).min,
                           s.dtype) for s in shapes]
    else:
        starts = []

    def body(*refs):  # the aliased starting buffers arrive as input refs the kernel does not read
        n_in = len(refs) - len(shapes) - len(starts)
        return kernel(*refs[:n_in], *refs[n_in + len(starts):])

    def run(*args):
        return pl.pallas_call(
            body, out_shape=out_shape, grid=grid, in_specs=in_specs + [pl.no_block_spec] * len(starts),
            out_specs=out_specs, input_output_aliases={len(args) + i: i for i in range(len(starts))},
            compiler_params=None if interpret else compiler_params(num_warps, num_stages),
            interpret=interpret)(*args, *starts)

    return run


def rms_pieces(xs: list[jax.Array], scale_ref, pieces: list[pl.Slice], eps: float, dtype) -> list[jax.Array]:
    """Inside a kernel: one sequence's RMSNorm from its f32 column pieces xs (the columns `pieces`) and the scale
    [k], in f32, rounded to dtype as `reference.rms_norm` rounds it (the norm kernels and the norm GEMV share
    it)."""
    inv = jax.lax.rsqrt(sum(jnp.sum(v * v) for v in xs) / sum(c.size for c in pieces) + eps)
    return [(v * inv * scale_ref[c].astype(F32)).astype(dtype) for v, c in zip(xs, pieces)]


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


def pad_batch(x: jax.Array) -> jax.Array:
    """x [B, k] padded with zero rows to a power-of-two B (Triton tiles)."""
    b = x.shape[0]
    return jnp.pad(x, ((0, pl.next_power_of_2(b) - b), (0, 0)))


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "rows", "cap", "num_warps", "interpret",
                                             "poison"))
def gemv_pallas(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, eps: float = 1e-6, *,
                out_dtype=F32, rows: int = 4, cap: int = 4096, num_warps: int = 8, interpret: bool = False,
                poison: bool = False) -> jax.Array:
    """x [B, k] @ w [n, k]^T -> [B, n] out_dtype (accumulated in f32, then rounded); given scale [k],
    RMSNorm(x) (eps) @ w^T, the norm computed inside every program. rows is an upper bound (the largest power
    of two dividing n up to it); cap the widest column piece; k must be a multiple of 16."""
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


MAX_BATCH = 8  # more rows than this are a matrix product, XLA's job
# On the H100 (docs/bench/bench_gemv_loop_vs_block.json, default tile) the Pallas GEMV beat XLA's from 4096x4096
# up (16.0 vs 18.1 us; 11008x4096 35.2 vs 41.1; 32000x4096 90.5 vs 96.3) but lost on the small, latency-bound
# predictor factors (256x4096 4.7 vs 2.9 us; 11008x256 7.0 vs 5.4 us): below this many weights, XLA.
MIN_KERNEL_WEIGHTS = 4096 * 4096


def gemv(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, eps: float = 0.0,
         out_dtype=F32) -> jax.Array:
    """x [B, k] @ w [n, k]^T -> [B, n] out_dtype (f32 accumulation), or given scale [k], RMSNorm(x) (eps) @ w^T
    with the norm formed inside the kernel (one launch instead of XLA's norm launches and product). By the
    mode in effect (`dispatch.mode()`): the Pallas kernel, the same kernel interpreted, or XLA's (also for
    B > MAX_BATCH, for f32, whose full-precision products the model keeps on XLA, and on the GPU for matrices
    under MIN_KERNEL_WEIGHTS, where XLA measured faster)."""
    m = dispatch.mode()
    if m == "xla" or x.shape[0] > MAX_BATCH or w.dtype == F32 or (m == "pallas" and w.size < MIN_KERNEL_WEIGHTS):
        return reference.gemv(x, w, scale, eps).astype(out_dtype)
    return gemv_pallas(x, w, scale, eps, out_dtype=jnp.dtype(out_dtype), interpret=m == "interpret")
