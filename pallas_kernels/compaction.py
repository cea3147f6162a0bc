"""Candidates -> neuron list: the step between the predictor and the sparse FFN kernels.

The list is blocked by tiles of `tile` consecutive neurons, so that every tile is listed independently, in
parallel. The candidate masks of B sequences, bool [B, d_ff], become
  tiles  int32 [n_tiles * tile]: tile t's candidates (in any sequence's mask), ascending, at
         tiles[t * tile : t * tile + counts[t]], zeros after;
  counts int32 [n_tiles]: how many each tile has (n_tiles = d_ff / tile rounded up to a power of two; the
         tiles past d_ff count 0);
  own    (B > 1 only) int8 [B, n_tiles * tile]: 1 where the neuron in that slot is in sequence b's own mask.
List position k (0 <= k < sum(counts)) is the k-th candidate overall; the kernels find its slot from the prefix
sum of the counts (`locate`, `slots`), which each program computes once from n_tiles numbers.

On the GPU, one Pallas program per tile: the union of the tile's masks, an inclusive prefix sum over the tile
in registers, a masked scatter of each candidate's index to its slot, a masked store of the zeros after the
count. Measured in LLaMA2-7B decode on the H100 (docs/BENCHMARKS.md, scripts/bench_compact.py): a flat list
built by XLA (a two-level prefix sum as small matrix products plus a scatter) took about six launches per layer;
one Pallas program walking the whole mask 4.8 us; these per-tile programs 1.5 us. A variant that also computed a
low-rank predictor's B z + bias > 0 for its tile (one launch less) took 5.5 us, as long as XLA's product and
comparison plus these programs: it was dropped. What was kept is the comparison alone: given the predictor's f32
scores and its bias, the programs form the mask themselves (1.7 us in decode, where a mask took 1.5 us and XLA's
bias, comparison and int8 cast another 1.5 us).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import dispatch
from pallas_kernels.gemv import compiler_params

TILE = 128
F32 = jnp.float32


def n_tiles(d_ff: int, tile: int = TILE) -> int:
    """Tiles in the blocked list: ceil(d_ff / tile) rounded up to a power of two (kernels load all counts as one
    power-of-two vector)."""
    return 1 << max(0, -(-d_ff // tile) - 1).bit_length()


def candidate_mask(candidates: jax.Array, bias: jax.Array | None) -> jax.Array:
    """bool [B, d_ff]: the mask itself, or with a bias, scores + bias > 0."""
    return candidates if bias is None else candidates.astype(jnp.float32) + bias.astype(jnp.float32) > 0


def compact_reference(candidates: jax.Array, tile: int = TILE,
                      bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The XLA version of `compact` (same arguments and results)."""
    candidates = candidate_mask(candidates, bias)
    batch, d_ff = candidates.shape
    union = jnp.any(candidates, axis=0)
    n = n_tiles(d_ff, tile)
    m = jnp.pad(union, (0, n * tile - d_ff)).reshape(n, tile)
    ones = m.astype(jnp.int32)
    pos = jnp.cumsum(ones, axis=1) - 1 + (jnp.arange(n, dtype=jnp.int32) * tile)[:, None]
    target = jnp.where(m, pos, n * tile).reshape(-1)
    tiles = jnp.zeros(n * tile, jnp.int32).at[target].set(jnp.arange(n * tile, dtype=jnp.int32), mode="drop")
    own = None
    if batch > 1:
        padded = jnp.pad(candidates, ((0, 0), (0, n * tile - d_ff))).astype(jnp.int8)
        own = jnp.zeros((batch, n * tile), jnp.int8).at[:, target].set(padded, mode="drop")
    return tiles, jnp.sum(ones, axis=1), own


def _compact_kernel(cand_ref, *refs, tile: int, has_bias: bool, interpret: bool):
    """Program t: tile t. cand_ref int8 [B, d_ff] (with has_bias: f32 scores, and the next ref the bias [d_ff] in
    its stored float dtype); then tiles_ref int32 [n_tiles * tile]; counts_ref int32 [n_tiles]; for B > 1 own_ref int8
    [B, n_tiles * tile]. The mask is read unpadded (neurons past d_ff clamped and zeroed, which interpret mode
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
            own_ref[0][b, cols] = jnp.zeros((tile,), jnp.int8).at[target].set(member[b].astype(jnp.int8),
                                                                               mode="drop")
    else:
        slot = t * tile + jnp.where(union, pos, 0)
        plt.store(tiles_ref.at[slot], neuron, mask=union)
        plt.store(tiles_ref.at[cols], jnp.zeros((tile,), jnp.int32), mask=lane >= count)
        for b in range(batch if own_ref else 0):
            plt.store(own_ref[0].at[b, slot], member[b].astype(jnp.int8), mask=union)
            plt.store(own_ref[0].at[b, cols], jnp.zeros((tile,), jnp.int8), mask=lane >= count)
    counts_ref[t] = count


@functools.partial(jax.jit, static_argnames=("tile", "num_warps", "interpret"))
def compact_pallas(candidates: jax.Array, *, tile: int = TILE, bias: jax.Array | None = None, num_warps: int = 4,
                   interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The Pallas version of `compact` (same arguments and results): one program per tile."""
    batch, d_ff = candidates.shape
    if bias is not None and bias.shape != (d_ff,):
        raise ValueError(f"compaction: bias has shape {bias.shape}; expected [{d_ff}] like the scores")
    inputs = [candidates.astype(jnp.int8)] if bias is None else [candidates.astype(F32), bias]  # bias: cast inside
    n = n_tiles(d_ff, tile)
    out_shape = [jax.ShapeDtypeStruct((n * tile,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.int32)]
    if batch > 1:
        out_shape.append(jax.ShapeDtypeStruct((batch, n * tile), jnp.int8))
    out = pl.pallas_call(
        functools.partial(_compact_kernel, tile=tile, has_bias=bias is not None, interpret=interpret),
        out_shape=tuple(out_shape), grid=(n,), in_specs=[pl.no_block_spec] * len(inputs),
        out_specs=tuple(pl.no_block_spec for _ in out_shape),
        compiler_params=None if interpret else compiler_params(num_warps, 1),
        interpret=interpret)(*inputs)
    return out[0], out[1], out[2] if batch > 1 else None


def compact(candidates: jax.Array, tile: int = TILE,
            bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """candidates bool [B, d_ff] -> the blocked list of their union, (tiles, counts, own) as described above.
    With bias [d_ff] (any float dtype), candidates are f32 scores and the mask is scores + bias > 0, which the programs
    compute themselves (saving XLA's launch for the addition and comparison). The Pallas programs or XLA's
    version by `dispatch.mode()`."""
    if dispatch.mode() == "xla":
        return compact_reference(candidates, tile, bias)
    return compact_pallas(candidates, tile=tile, bias=bias, interpret=dispatch.mode() == "interpret")


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
