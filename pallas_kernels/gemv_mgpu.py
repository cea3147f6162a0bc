"""Decode products on Mosaic GPU: y [B, n] = x [B, k] @ w [n, k]^T, or x @ w_t for a weight stored input-major
(w_t [k, n]: W_down_t), with TMA-pipelined weight tiles multiplied on the tensor cores (wgmma).

Program (i, s) of the grid owns rows [i*tile_m, (i+1)*tile_m) of w and the s-th of `splits` equal pieces of k.
`plgpu.emit_pipeline` streams its [tile_m, tile_k] tiles of w (and x's [8, tile_k] tiles) through `stages` SMEM
buffers, so TMA copies are in flight while the tensor cores take the previous tile; a wgmma multiplies each tile
by x^T, the batch padded to 8 sequences (wgmma's smallest N), into an f32 [tile_m, 8] accumulator. x itself is
not padded: its 8-row TMA boxes read past the batch's B rows, which TMA fills with zeros (pad_x: XLA pads it
first, one more launch per product, as the first decode run did). Each program writes its accumulator to its
block of the f32 partial sums [splits, n, 8]; XLA adds the splits (elementwise, so the addition fuses into the
consumer), transposes back to [B, n] and rounds to out_dtype.

Measured against the Triton-lowered row GEMV (`gemv.gemv_pallas`) on the H200 at the LLaMA2-7B shapes, one product
alone (docs/bench/mgpu_gemv_e30fef6.json): q/k/v 37.0 us against 43.3, o 18.0 against 19.1, down 33.2 against
35.5, gate 32.3 against 31.7; `tuning.MGPU_TILE` is the best tile of that sweep on all four.

Interpret mode (the CPU tests) runs the same grid, the same tiles in the same order and the same partial-sum
layout as a plain `pallas_call` with a dot per tile: it checks which program reads which rows and columns and
how the pieces are put back together. The TMA pipeline and wgmma themselves run only on a GPU, where
tests/test_kernels_gpu.py checks them against float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, call

N_PAD = 8  # wgmma's smallest N: the batch is padded to it, so at most 8 sequences


def fits(n: int, k: int, batch: int, *, tile_m: int, tile_k: int, splits: int, **_: object) -> bool:
    """Whether x [batch, k] @ w [n, k]^T (or w_t [k, n]) runs at this tile: n a multiple of tile_m, k of
    splits * tile_k, at most 8 sequences."""
    return batch <= N_PAD and n % tile_m == 0 and k % (splits * tile_k) == 0


def _mosaic_gpu():
    """jax.experimental.pallas.mosaic_gpu, imported when a kernel is first traced for a GPU (its import costs
    every command half a second of start-up)."""
    from jax.experimental.pallas import mosaic_gpu
    return mosaic_gpu


def _mma_transforms(minor: int, dtype) -> tuple:
    """SMEM tiling and swizzle for a wgmma operand whose minor dimension has `minor` elements."""
    plgpu = _mosaic_gpu()
    for swizzle in (128, 64, 32):
        elems = swizzle // jnp.dtype(dtype).itemsize
        if minor % elems == 0:
            return plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)
    raise ValueError(f"gemv_mgpu: no wgmma swizzle for a minor dimension of {minor} {jnp.dtype(dtype).name}")


def _partial_sums_mgpu(w: jax.Array, xp: jax.Array, *, transposed: bool, tile_m: int, tile_k: int, stages: int,
                       splits: int) -> jax.Array:
    """The Mosaic GPU kernel: f32 [splits, n, 8] partial sums of w (or w_t) times xp [B, k]^T (B <= 8: the rows
    past B of each 8-row box of x come in as zeros)."""
    plgpu = _mosaic_gpu()
    k = xp.shape[1]
    n = w.shape[1] if transposed else w.shape[0]
    steps = k // (splits * tile_k)
    piece = steps * tile_k  # the k columns one program reads
    w_block = (tile_k, tile_m) if transposed else (tile_m, tile_k)
    w_spec = plgpu.BlockSpec(w_block, (lambda t: (t, 0)) if transposed else (lambda t: (0, t)),
                             transforms=_mma_transforms(w_block[1], w.dtype), delay_release=1)
    x_spec = plgpu.BlockSpec((N_PAD, tile_k), lambda t: (0, t), transforms=_mma_transforms(tile_k, w.dtype),
                             delay_release=1)

    def t(ref):  # a [r, c] SMEM ref seen as [c, r]: wgmma reads it transposed
        return plgpu.transpose_ref(ref, (1, 0))

    # jax 0.11's pl.pallas_call lowers on CUDA only with Triton's parameters: a Mosaic GPU kernel enters through
    # plgpu.kernel (a grid of programs over GMEM refs) and streams its tiles with plgpu.emit_pipeline.
    def body(w_gmem, x_gmem, out_gmem):
        i, s = lax.axis_index("rows"), lax.axis_index("split")
        cols, rows = pl.ds(s * piece, piece), pl.ds(i * tile_m, tile_m)
        w_mine = w_gmem.at[cols, rows] if transposed else w_gmem.at[rows, cols]

        def scope(acc, out_smem):
            def step(_, w_smem, x_smem):
                plgpu.wgmma(acc, t(w_smem) if transposed else w_smem, t(x_smem))  # [tile_m, tile_k] x [tile_k, 8]
                plgpu.wgmma_wait(1)  # the previous tile's product is done: its buffers can be refilled

            plgpu.emit_pipeline(step, grid=(steps,), in_specs=[w_spec, x_spec],
                                max_concurrent_steps=stages)(w_mine, x_gmem.at[:, cols])
            plgpu.wgmma_wait(0)
            out_smem[...] = acc[...]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[s, rows])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scope, plgpu.ACC((tile_m, N_PAD), F32), plgpu.SMEM((tile_m, N_PAD), F32))

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((splits, n, N_PAD), F32), grid=(n // tile_m, splits),
                        grid_names=("rows", "split"))(w, xp)


def _partial_sums_interpret(w: jax.Array, xp: jax.Array, *, transposed: bool, tile_m: int, tile_k: int,
                            splits: int, poison: bool) -> jax.Array:
    """The same grid, tiles and partial sums as `_partial_sums_mgpu`, as an interpreted pallas_call (xp padded to
    8 rows: what TMA's zero fill gives the GPU kernel)."""
    k = xp.shape[1]
    n = w.shape[1] if transposed else w.shape[0]
    steps = k // (splits * tile_k)

    def kernel(w_ref, x_ref, out_ref):
        i, s = pl.program_id(0), pl.program_id(1)
        rows = pl.ds(i * tile_m, tile_m)

        def step(t, acc):
            cols = pl.ds((s * steps + t) * tile_k, tile_k)
            tile = w_ref[cols, rows].T if transposed else w_ref[rows, cols]  # [tile_m, tile_k]
            return acc + jnp.dot(tile, x_ref[:, cols].T, preferred_element_type=F32)

        out_ref[0] = lax.fori_loop(0, steps, step, jnp.zeros((tile_m, N_PAD), F32))

    return call(kernel, out_shape=jax.ShapeDtypeStruct((splits, n, N_PAD), F32), grid=(n // tile_m, splits),
                in_specs=[pl.no_block_spec] * 2, out_specs=pl.BlockSpec((1, tile_m, N_PAD), lambda i, s: (s, i, 0)),
                num_warps=4, num_stages=1, interpret=True, poison=poison)(w, xp)


@functools.partial(jax.jit, static_argnames=("transposed", "out_dtype", "tile_m", "tile_k", "stages", "splits",
                                             "pad_x", "interpret", "poison"))
def gemv_mgpu(x: jax.Array, w: jax.Array, *, transposed: bool = False, out_dtype=F32, tile_m: int = 64,
              tile_k: int = 128, stages: int = 4, splits: int = 2, pad_x: bool = False, interpret: bool = False,
              poison: bool = False) -> jax.Array:
    """x [B, k] (B <= 8) @ w [n, k]^T -> [B, n] out_dtype, x rounded to w's dtype, products accumulated in f32,
    then rounded; transposed: w is w_t [k, n] and the product x @ w_t. n must be a multiple of tile_m and k of
    splits * tile_k (`fits`); stages: SMEM buffers in flight; pad_x: pad x to 8 rows in XLA instead of TMA's zero
    fill. poison (interpret mode): the partial sums start as NaN (the checks' proof that every element is
    written)."""
    b, k = x.shape
    n = w.shape[1] if transposed else w.shape[0]
    if w.shape[0 if transposed else 1] != k or not fits(n, k, b, tile_m=tile_m, tile_k=tile_k, splits=splits):
        raise ValueError(f"gemv_mgpu: x {x.shape}, w {w.shape} (transposed {transposed}) at tile_m {tile_m}, "
                         f"tile_k {tile_k}, splits {splits}: needs n % tile_m == 0, k % (splits * tile_k) == 0, "
                         f"B <= {N_PAD}")
    x = x.astype(w.dtype)
    padded = jnp.pad(x, ((0, N_PAD - b), (0, 0)))
    if interpret:
        partial = _partial_sums_interpret(w, padded, transposed=transposed, tile_m=tile_m, tile_k=tile_k,
                                          splits=splits, poison=poison)
    else:
        partial = _partial_sums_mgpu(w, padded if pad_x else x, transposed=transposed, tile_m=tile_m, tile_k=tile_k,
                                     stages=stages, splits=splits)
    y = functools.reduce(jnp.add, [partial[s] for s in range(splits)])  # elementwise: fuses into the consumer
    return y[:, :b].T.astype(out_dtype)
