"""Matrix-vector products for decode: y [B, n] = x [B, k] @ w [n, k]^T with B a handful of sequences.

One program per block of `rows` consecutive rows of w; it loops over k in chunks of `chunk` columns, and for
each chunk multiplies the [rows, chunk] tile by every sequence's x chunk and sums along the row, in f32. The
tile is loaded once for all B sequences, so a batch costs little more than one sequence. Triton wants
power-of-two tiles: `chunk` is the largest power of two up to the requested size that divides k, and `rows` the
largest that divides n, so no tile ever reads past the matrix and no column mask is needed.

The same row-dot loop is the gate / up stage of the sparse FFN (`sparse_ffn.py`), there over a gathered list
of rows instead of a contiguous block: `dot_rows` serves both.

`gemv_block_pallas` is the second kernel: a block of rows per program with every column loaded at once (in
power-of-two pieces, as the stream kernel loads its rows), optionally forming RMSNorm(x) itself, so a decode
step's q/k/v product needs no separate norm launches. It is checked in interpret mode and dispatched only for
the norm-fused product under SVDSPARSE_DENSE_GEMV=1; it has not been timed on a GPU yet (docs/BENCHMARKS.md,
"Decode GEMVs"): whichever of the two measures faster per shape should then remain.
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


def _gemv_kernel(x_ref, w_ref, y_ref, *, rows: int, chunk: int, interpret: bool):
    start = pl.program_id(0) * rows
    idx = start + jnp.arange(rows, dtype=jnp.int32)
    live = jnp.ones((rows,), jnp.bool_)
    accs = dot_rows(x_ref, w_ref, idx, live, chunk=chunk, batch=y_ref.shape[0], interpret=interpret)
    for b, acc in enumerate(accs):
        y_ref[b, :] = acc


def rms_pieces(xs: list[jax.Array], scale_ref, pieces: list[pl.Slice], eps: float, dtype) -> list[jax.Array]:
    """Inside a kernel: one sequence's RMSNorm from its f32 column pieces xs (the columns `pieces`) and the scale
    [k], in f32, rounded to dtype as `reference.rms_norm` rounds it (the norm kernels and the norm GEMV share
    it)."""
    inv = jax.lax.rsqrt(sum(jnp.sum(v * v) for v in xs) / sum(c.size for c in pieces) + eps)
    return [(v * inv * scale_ref[c].astype(F32)).astype(dtype) for v, c in zip(xs, pieces)]


def _gemv_block_kernel(x_ref, w_ref, *refs, rows: int, cap: int, eps: float, has_scale: bool):
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
        y_ref[b, :] = dot_pieces(tiles, xs)


def pad_batch(x: jax.Array) -> jax.Array:
    """x [B, k] padded with zero rows to a power-of-two B (Triton tiles)."""
    b = x.shape[0]
    return jnp.pad(x, ((0, pl.next_power_of_2(b) - b), (0, 0)))


@functools.partial(jax.jit, static_argnames=("rows", "chunk", "num_warps", "num_stages", "interpret", "poison"))
def gemv_pallas(x: jax.Array, w: jax.Array, *, rows: int = 8, chunk: int = 1024, num_warps: int = 4,
                num_stages: int = 3, interpret: bool = False, poison: bool = False) -> jax.Array:
    """The Pallas GEMV: x [B, k] @ w [n, k]^T -> [B, n] f32. rows / chunk are upper bounds (see module doc)."""
    b, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"gemv: x has {k} columns, w {w.shape}")
    rows, chunk = pow2_divisor(n, rows), column_chunk(k, chunk, f"gemv weight {w.shape}")
    xp = pad_batch(x.astype(w.dtype))
    bp = xp.shape[0]
    y = call(functools.partial(_gemv_kernel, rows=rows, chunk=chunk, interpret=interpret),
             out_shape=jax.ShapeDtypeStruct((bp, n), F32), grid=(n // rows,),
             in_specs=[pl.no_block_spec] * 2, out_specs=pl.BlockSpec((bp, rows), lambda i: (0, i)),
             num_warps=num_warps, num_stages=num_stages, interpret=interpret, poison=poison)(xp, w)
    return y[:b]


@functools.partial(jax.jit, static_argnames=("eps", "rows", "cap", "num_warps", "interpret", "poison"))
def gemv_block_pallas(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, eps: float = 1e-6, *,
                      rows: int = 4, cap: int = 4096, num_warps: int = 8, interpret: bool = False,
                      poison: bool = False) -> jax.Array:
    """x [B, k] @ w [n, k]^T -> [B, n] f32 with whole rows per program; given scale [k], RMSNorm(x) (eps) @ w^T,
    the norm computed inside every program from x (a few KB, from L2)."""
    b, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or (scale is not None and scale.shape != (k,)):
        raise ValueError(f"gemv: x {x.shape}, w {w.shape}, scale {None if scale is None else scale.shape}; "
                         f"expected w [n, {k}], scale [{k}]")
    rows = pow2_divisor(n, rows)
    xp = pad_batch(x if scale is not None else x.astype(w.dtype))
    bp = xp.shape[0]
    inputs = [xp, w] + ([] if scale is None else [scale])
    y = call(functools.partial(_gemv_block_kernel, rows=rows, cap=cap, eps=eps, has_scale=scale is not None),
             out_shape=jax.ShapeDtypeStruct((bp, n), F32), grid=(n // rows,),
             in_specs=[pl.no_block_spec] * len(inputs), out_specs=pl.BlockSpec((bp, rows), lambda i: (0, i)),
             num_warps=num_warps, num_stages=1, interpret=interpret, poison=poison)(*inputs)
    return y[:b]


MAX_BATCH = 8  # more rows than this are a matrix product, XLA's job
# On the H100 (scripts/bench_gemv.py, docs/BENCHMARKS.md) the Pallas GEMV beat XLA's from 4096x4096 up
# (1.97 vs 1.76 TB/s; 11008x4096 2.52 vs 2.15) but lost on the small, latency-bound predictor factors
# (256x4096 4.6 vs 2.9 us; 11008x256 6.4 vs 5.2 us; 1024x4096 8.3 vs 6.1 us): below this many weights, XLA.
MIN_KERNEL_WEIGHTS = 4096 * 4096


def gemv(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, eps: float = 0.0) -> jax.Array:
    """x [B, k] @ w [n, k]^T -> [B, n] f32, or given scale [k], RMSNorm(x) (eps) @ w^T with the norm formed
    inside the kernel (one launch instead of XLA's norm launches and product). By the mode in effect
    (`dispatch.mode()`): the Pallas kernel, the same kernel interpreted, or XLA's (also for B > MAX_BATCH, for
    f32, whose full-precision products the model keeps on XLA, and on the GPU for matrices under
    MIN_KERNEL_WEIGHTS, where XLA measured faster)."""
    m = dispatch.mode()
    if m == "xla" or x.shape[0] > MAX_BATCH or w.dtype == F32 or (m == "pallas" and w.size < MIN_KERNEL_WEIGHTS):
        return reference.gemv(x, w, scale, eps)
    if scale is not None:
        return gemv_block_pallas(x, w, scale, eps, interpret=m == "interpret")
    return gemv_pallas(x, w, interpret=m == "interpret")
