"""Pallas building blocks shared by the kernels: Triton compiler parameters, the output-buffer conventions of
`call`, power-of-two column pieces, masked row gathers and the in-kernel row dots and RMSNorm.

Triton-lowered kernels need power-of-two array sizes, so a row of k columns (k a multiple of 16) is loaded as a
few power-of-two pieces (`column_pieces`) or as a loop over equal chunks (`column_chunk`).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32

# jax 0.11 warns on every pallas_call that Pallas' Triton lowering is deprecated in favour of Mosaic GPU. The
# kernels keep a backend-neutral interface so a Mosaic GPU version can replace them; the warning is noise.
warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecated.*")


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


def column_pieces(k: int, cap: int) -> list[pl.Slice]:
    """k columns as power-of-two pieces of at most `cap`, largest first (3584 -> 2048 + 1024 + 512), so code
    written out over them makes a few wide loads, all in flight at once, where equal chunks would need many
    narrow ones. Each piece starts at a multiple of its size; k must be a multiple of 16."""
    column_chunk(k, 16)  # the multiple-of-16 check and its message
    pieces, start = [], 0
    while start < k:
        size = 1 << min(cap, k - start).bit_length() - 1
        pieces.append(pl.ds(start, size))
        start += size
    return pieces


def compiler_params(num_warps: int, num_stages: int):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def pad_batch(x: jax.Array, minimum: int = 1) -> jax.Array:
    """x [B, k] padded with zero rows to a power-of-two B of at least `minimum` (Triton tiles)."""
    b = x.shape[0]
    return jnp.pad(x, ((0, max(minimum, pl.next_power_of_2(b)) - b), (0, 0)))


def load_rows(ref, rows: jax.Array, live: jax.Array, cols, interpret: bool) -> jax.Array:
    """ref[rows, cols] with the rows where `live` is False read as zero. On the GPU those rows are masked out
    of the load, so they cost no memory traffic; interpret mode cannot run a masked gather, so there the
    (clamped, in-bounds) rows are read and zeroed afterwards. `rows` must be in bounds everywhere."""
    if interpret:
        return jnp.where(live[:, None], ref[rows, cols], 0)
    mask = jnp.broadcast_to(live[:, None], (rows.shape[0], cols.size))
    return plt.load(ref.at[rows, cols], mask=mask, other=0)


def load_vector(ref, idx: jax.Array, live: jax.Array, other: float, interpret: bool) -> jax.Array:
    """ref[idx] for a 1-D ref, `other` where `live` is False: `load_rows` for a vector (`idx` in bounds)."""
    if interpret:
        return jnp.where(live, ref[idx], other)
    return plt.load(ref.at[idx], mask=live, other=other)


def dot_pieces(tiles: list[jax.Array], xs: list[jax.Array]) -> jax.Array:
    """Inside a kernel: f32 [rows], row tiles tiles[i] [rows, n_i] dotted with the vector pieces xs[i] [n_i]."""
    return sum(jnp.sum(t.astype(F32) * v.astype(F32)[None, :], axis=1) for t, v in zip(tiles, xs))


def dot_tiles(x_ref, tiles: list[jax.Array], cols: list[pl.Slice], batch: int) -> list[jax.Array]:
    """Per sequence b < batch, f32 [rows]: loaded row tiles (tiles[i] [rows, size of cols[i]], columns cols[i]
    of w) dotted with x[b] over those columns, in f32."""
    return [dot_pieces(tiles, [x_ref[b, c] for c in cols]) for b in range(batch)]


def rms_pieces(xs: list[jax.Array], scale_ref, pieces: list[pl.Slice], eps: float, dtype) -> list[jax.Array]:
    """Inside a kernel: one sequence's RMSNorm from its f32 column pieces xs (the columns `pieces`) and the scale
    [k], in f32, rounded to dtype as `numerics.rms_norm` rounds it."""
    inv = jax.lax.rsqrt(sum(jnp.sum(v * v) for v in xs) / sum(c.size for c in pieces) + eps)
    return [(v * inv * scale_ref[c].astype(F32)).astype(dtype) for v, c in zip(xs, pieces)]


def call(kernel, *, out_shape, grid: tuple[int, ...], in_specs: list, out_specs,
         num_warps: int, num_stages: int, interpret: bool, poison: bool = False):
    """pl.pallas_call with this package's conventions: Triton compiler parameters on the GPU, and with `poison`
    the output buffers started as NaN in every float output and the smallest integer in every integer one (checks
    then prove that the kernel wrote every element, also where it exited early).
    out_shape: one jax.ShapeDtypeStruct, or a tuple of them (then out_specs is a tuple too)."""
    shapes = out_shape if isinstance(out_shape, tuple) else (out_shape,)
    starts = [jnp.full(s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.floating) else jnp.iinfo(s.dtype).min,
                       s.dtype) for s in shapes] if poison else []

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
