"""Candidates -> neuron list: the step between the predictor and the sparse FFN kernels.

The list is blocked by tiles of `tile` consecutive neurons, so that every tile is listed independently, in
parallel. The candidate sets of B sequences (bool [B, d_ff], or scores + bias > 0) become
  tiles  int32 [n_tiles * tile]: tile t's candidates (in any sequence's set), ascending, at
         tiles[t * tile : t * tile + counts[t]], zeros after;
  counts int32 [n_tiles]: how many each tile has (n_tiles = d_ff / tile rounded up to a power of two; the
         tiles past d_ff count 0);
  own    (B > 1 only) int8 [n_tiles * tile, B]: 1 where the neuron in that slot is in sequence b's own set
         (slot-major, so a kernel loads a block of slots for every sequence as one [rows, B] tile).
List position k (0 <= k < sum(counts)) is the k-th candidate overall; the kernels find its slot from the prefix
sum of the counts (`locate`, `slots`), which each program computes once from n_tiles numbers.

On the GPU, one Pallas program per tile: the union of the tile's sets, an inclusive prefix sum over the tile in
registers, a masked scatter of each candidate's index to its slot, a masked store of the zeros after the count.
Given a predictor's f32 scores and its bias, the programs form the candidate set themselves (scores + bias > 0).
`reference.compact` is the XLA version.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.candidates import Candidates
from pallas_kernels.common import F32, compiler_params

TILE = 128


def n_tiles(d_ff: int, tile: int = TILE) -> int:
    """Tiles in the blocked list: ceil(d_ff / tile) rounded up to a power of two (kernels load all counts as one
    power-of-two vector)."""
    return 1 << max(0, -(-d_ff // tile) - 1).bit_length()


def _compact_kernel(cand_ref, *refs, tile: int, has_bias: bool, interpret: bool):
    """Program t: tile t. cand_ref int8 [B, d_ff] (with has_bias: f32 scores, and the next ref the bias [d_ff] in
    its stored float dtype); then tiles_ref int32 [n_tiles * tile]; counts_ref int32 [n_tiles]; for B > 1 own_ref int8
    [n_tiles * tile, B]. The mask is read unpadded (neurons past d_ff clamped and zeroed, which interpret mode
    runs too), so XLA need not pad it first."""
    bias_ref, (tiles_ref, counts_ref, *own_ref) = (refs[0], refs[1:]) if has_bias else (None, refs)
    batch, d_ff = cand_ref.shape
    t = pl.program_id(0)
    lane = jnp.arange(tile, dtype=jnp.int32)
    neuron = t * tile + lane
    live = neuron < d_ff
    at = jnp.where(live, neuron, 0)
    if has_bias:
        bias = bias_ref[at].astype(F32)  # in its stored dtype: a cast in XLA would cost a launch
        member = [live & (cand_ref[b, at] + bias > 0) for b in range(batch)]
    else:
        member = [live & (cand_ref[b, at] != 0) for b in range(batch)]
    union = functools.reduce(jnp.logical_or, member)
    ones = union.astype(jnp.int32)
    pos = jnp.cumsum(ones) - 1
    count = jnp.sum(ones)
    cols = pl.ds(pl.multiple_of(t * tile, tile), tile)
    if interpret:  # interpret mode cannot run a masked scatter: build the tile functionally
        target = jnp.where(union, pos, tile)
        tiles_ref[cols] = jnp.zeros((tile,), jnp.int32).at[target].set(neuron, mode="drop")
        for b in range(batch if own_ref else 0):
            own_ref[0][cols, b] = jnp.zeros((tile,), jnp.int8).at[target].set(member[b].astype(jnp.int8),
                                                                               mode="drop")
    else:
        slot = t * tile + jnp.where(union, pos, 0)
        plt.store(tiles_ref.at[slot], neuron, mask=union)
        plt.store(tiles_ref.at[cols], jnp.zeros((tile,), jnp.int32), mask=lane >= count)
        for b in range(batch if own_ref else 0):
            plt.store(own_ref[0].at[slot, b], member[b].astype(jnp.int8), mask=union)
            plt.store(own_ref[0].at[cols, b], jnp.zeros((tile,), jnp.int8), mask=lane >= count)
    counts_ref[t] = count


@functools.partial(jax.jit, static_argnames=("tile", "num_warps", "interpret"))
def compact_pallas(candidates: Candidates, *, tile: int = TILE, num_warps: int = 4,
                   interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The blocked list (tiles, counts, own) of the candidates of B sequences ([B, d_ff] mask or scores), as
    described above: one program per tile."""
    bias = candidates.bias
    values = candidates.mask if bias is None else candidates.scores
    batch, d_ff = values.shape
    if bias is not None and bias.shape != (d_ff,):
        raise ValueError(f"compaction: bias has shape {bias.shape}; expected [{d_ff}] like the scores")
    inputs = [values.astype(jnp.int8)] if bias is None else [values.astype(F32), bias]  # bias: cast inside
    n = n_tiles(d_ff, tile)
    out_shape = [jax.ShapeDtypeStruct((n * tile,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.int32)]
    if batch > 1:
        out_shape.append(jax.ShapeDtypeStruct((n * tile, batch), jnp.int8))
    out = pl.pallas_call(
        functools.partial(_compact_kernel, tile=tile, has_bias=bias is not None, interpret=interpret),
        out_shape=tuple(out_shape), grid=(n,), in_specs=[pl.no_block_spec] * len(inputs),
        out_specs=tuple(pl.no_block_spec for _ in out_shape),
        compiler_params=None if interpret else compiler_params(num_warps, 1),
        interpret=interpret)(*inputs)
    return out[0], out[1], out[2] if batch > 1 else None


def locate(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inside a kernel, once per program: (exclusive prefix sum of counts [n_tiles], total) for `slots`."""
    return jnp.cumsum(counts) - counts, jnp.sum(counts)


def slots(before_tile: jax.Array, k: jax.Array, tile: int) -> jax.Array:
    """Inside a kernel: the places in `tiles` of list positions k int32 [rows] (each < the total), from the
    exclusive prefix `before_tile` [n_tiles]. The tile of position k is the last one whose prefix is <= k (tiles
    that count 0 share their prefix with the next, which then holds k)."""
    at_or_before = before_tile[None, :] <= k[:, None]  # [rows, n_tiles]
    t = jnp.sum(at_or_before.astype(jnp.int32), axis=1) - 1
    first = jnp.max(jnp.where(at_or_before, before_tile[None, :], 0), axis=1)
    return t * tile + (k - first)
