"""The predictor-guarded FFN for decode (the paper's sparse executor) as Pallas kernels that read only the rows of
the candidate neurons (W_gate) and of the truly active ones (W_up, W_down_t), for x [B, d] (B a handful of
sequences sharing one union of candidates), on the blocked neuron list of `compaction`. Every kernel program
finds the neurons at its list positions from the prefix sum of the tile counts (`_List`, `_block`), so all work
is on dense blocks of the list and no program spends its lanes on rows that are not candidates.

Two variants (`SparseFFNConfig.variant`; docs/design.md gives the measurements that chose them, and the history
of the "split" and "fused" variants they replaced):
- "stream": one kernel with a fixed grid of `programs`; each takes list blocks p, p + programs, ...; for each it
  gathers the W_gate rows (its columns in a few power-of-two pieces, all loads in flight at once), applies the
  activation, then loads the W_up and the W_down_t rows of the active neurons together, so the down rows travel
  while h is computed; it keeps its [B, d] share of y in registers and writes it once; XLA adds the
  per-program partial sums.
- "mma" (batches): two kernels. The gate / up kernel runs over blocks of `rows` listed neurons (programs past
  the count write zeros and exit); each block's rows are gathered once and multiplied by the whole batch (padded
  to MMA_MIN_BATCH sequences) on tensor cores, and it writes h [list, B'] list-major in the weights' dtype with
  the flat neuron list. The down kernel computes h^T W_down_t over column blocks of y and `splits` interleaved
  slices of the list, each program writing a partial sum that XLA adds.

Interpret mode (CPU tests) runs the same kernel bodies; there gathers read clamped rows and zero them instead
of masking the load (`common.load_rows`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import compaction
from pallas_kernels.common import F32, call, column_chunk, column_pieces, dot_tiles, load_rows, pad_batch
from pallas_kernels.numerics import Activation


@dataclasses.dataclass(frozen=True)
class SparseFFNConfig:
    """Static kernel choices. rows: listed neurons per gate / up block; chunk: columns per gate / up tile;
    down_rows x down_cols: the mma down kernel's tile; splits: slices of the list per column block (mma).
    programs: the stream variant's grid.
    Sizes are upper bounds: each is cut to a power of two that divides its dimension."""

    variant: str = "stream"
    rows: int = 4
    chunk: int = 2048
    num_warps: int = 4
    num_stages: int = 3
    down_rows: int = 16
    down_cols: int = 128
    splits: int = 16
    down_warps: int = 4
    programs: int = 132

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"sparse FFN variant {self.variant!r}: expected one of {VARIANTS}")


VARIANTS = ("stream", "mma")
MMA_MIN_BATCH = 16  # tensor-core products need operands of at least 16 rows: the mma variant pads the batch


def list_length(d_ff: int, cfg: SparseFFNConfig) -> int:
    """Length of the padded neuron list: d_ff rounded up to a multiple of both block sizes."""
    block = max(cfg.rows, cfg.down_rows)
    return pl.cdiv(d_ff, block) * block


@dataclasses.dataclass(frozen=True)
class _List:
    """A kernel's view of the blocked neuron list (`compaction`): the tiles ref, the exclusive prefix sum of the
    tile counts (computed once per program) and the total."""

    tiles_ref: object
    before: jax.Array
    total: jax.Array
    tile: int

    @classmethod
    def read(cls, counts_ref, tiles_ref) -> "_List":
        before, total = compaction.locate(counts_ref[...])
        return cls(tiles_ref, before, total, tiles_ref.shape[0] // counts_ref.shape[0])


def _block(lst: _List, start: jax.Array, rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The list positions [start, start + rows): (neuron indices, 0 where past the total; valid; their slots in
    the tiles, 0 where past the total)."""
    k = start + jnp.arange(rows, dtype=jnp.int32)
    valid = k < lst.total
    slot = jnp.where(valid, compaction.slots(lst.before, k, lst.tile), 0)
    return jnp.where(valid, lst.tiles_ref[slot], 0), valid, slot


def _round_hidden(act: Activation, a: list, up: list, dtype) -> list[jax.Array]:
    """Per sequence h = act(g) * up(u), rounded to the weights' dtype as the dense FFN rounds it before W_down_t
    (kept in f32 for the down products)."""
    return [(ab * act.up(ub)).astype(dtype).astype(F32) for ab, ub in zip(a, up)]


def _activate(act: Activation, gate: list, own, valid) -> tuple[list, jax.Array]:
    """Per sequence act(g) f32 [rows] (zero where the row is not in that sequence's own mask), and the rows
    active for some sequence (those whose W_up and W_down_t rows are read)."""
    a = [act.gate(g) for g in gate]
    if own is not None:  # a neuron in the union counts for sequence b only where b's own mask has it
        a = [jnp.where(ob, ab, 0.0) for ob, ab in zip(own, a)]
    return a, valid & functools.reduce(jnp.logical_or, [ab != 0 for ab in a])


def _own(own_ref, slot, batch: int):
    """Per sequence, bool [rows]: whether the neurons at these slots are in its own mask (None without own_ref)."""
    return None if own_ref is None else [own_ref[slot, b] != 0 for b in range(batch)]


def _stream_block(x_ref, wu_ref, wd_ref, neurons, valid, own, gate_w: list, accs, *, act: Activation, pieces,
                  batch: int, interpret: bool) -> tuple:
    """Gate, up and down of one block whose W_gate row tiles `gate_w` are loaded (or in flight), with W_down_t's
    rows loaded next to W_up's (both masked by the active gate): accs + sum over its rows of
    h[b][r] * W_down_t[neurons[r]]."""
    a, active = _activate(act, dot_tiles(x_ref, gate_w, pieces, batch), own, valid)
    up_w = [load_rows(wu_ref, neurons, active, cols, interpret) for cols in pieces]
    down_w = [load_rows(wd_ref, neurons, active, cols, interpret) for cols in pieces]
    h = _round_hidden(act, a, dot_tiles(x_ref, up_w, pieces, batch), wu_ref.dtype)
    return tuple(accs[i * batch + b] + jnp.sum(w.astype(F32) * h[b][:, None], axis=0)
                 for i, w in enumerate(down_w) for b in range(batch))


def _write_sums(out_ref, accs, pieces, batch: int):
    """A program's [batch, d] share of y into its partial-sum block out_ref [1, B', d] (rows past the batch as
    zeros)."""
    for i, cols in enumerate(pieces):
        for b in range(out_ref.shape[1]):
            out_ref[0, b, cols] = accs[i * batch + b] if b < batch else jnp.zeros((cols.size,), F32)


def _stream_kernel(counts_ref, tiles_ref, *refs, act, rows, chunk, batch, has_own, programs, interpret):
    """Program p: list blocks p, p + programs, p + 2 programs, ...; for each, gate, up and down of its rows
    (`_stream_block`), the down rows added into a [batch, d] sum held in registers, written once at the end as
    this program's partial sum."""
    own_ref, (x_ref, wg_ref, wu_ref, wd_ref, out_ref) = (refs[0], refs[1:]) if has_own else (None, refs)
    p = pl.program_id(0)
    lst = _List.read(counts_ref, tiles_ref)
    mine = jnp.maximum(pl.cdiv(lst.total, rows) - p + programs - 1, 0) // programs
    pieces = column_pieces(wd_ref.shape[1], chunk)

    def body(t, accs):
        neurons, valid, slot = _block(lst, (p + t * programs) * rows, rows)
        gate_w = [load_rows(wg_ref, neurons, valid, cols, interpret) for cols in pieces]
        return _stream_block(x_ref, wu_ref, wd_ref, neurons, valid, _own(own_ref, slot, batch), gate_w, accs,
                             act=act, pieces=pieces, batch=batch, interpret=interpret)

    zeros = tuple(jnp.zeros((cols.size,), F32) for cols in pieces for _ in range(batch))
    _write_sums(out_ref, jax.lax.fori_loop(0, mine, body, zeros), pieces, batch)


def _dot(a: jax.Array, b: jax.Array, contract: int, precision) -> jax.Array:
    """f32 a [m, k] @ b [k, n] (contract=1: a [m, k], b [n, k] -> a b^T; contract=0: a [k, m], b [k, n] ->
    a^T b), which the Triton lowering runs on tensor cores (f32 operands at full precision given HIGHEST)."""
    dims = (((1,), (1,)), ((), ())) if contract == 1 else (((0,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _mma_rows(x_ref, w_ref, neurons, live, *, chunk: int, precision, interpret: bool) -> jax.Array:
    """f32 [rows, B']: the rows w[neurons] times every sequence x [B', k], on tensor cores, over column chunks
    (the loop Triton software-pipelines); rows where `live` is False read as zero and cost no traffic."""
    def body(c, acc):
        cols = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        w = load_rows(w_ref, neurons, live, cols, interpret)
        return acc + _dot(w, x_ref[:, cols], 1, precision)

    return jax.lax.fori_loop(0, x_ref.shape[1] // chunk, body,
                             jnp.zeros((neurons.shape[0], x_ref.shape[0]), F32))


def _mma_gate_up_kernel(counts_ref, tiles_ref, *refs, act, rows, chunk, has_own, precision, interpret):
    """Program i: list block i, all sequences at once. h_ref block [rows, B'] (list-major, the weights' dtype)
    and idx_ref block [rows]; blocks past the total write zeros."""
    own_ref, (x_ref, wg_ref, wu_ref, h_ref, idx_ref) = (refs[0], refs[1:]) if has_own else (None, refs)
    start = pl.program_id(0) * rows
    lst = _List.read(counts_ref, tiles_ref)

    @pl.when(start >= lst.total)
    def _():
        h_ref[...] = jnp.zeros(h_ref.shape, h_ref.dtype)
        idx_ref[...] = jnp.zeros(idx_ref.shape, jnp.int32)

    @pl.when(start < lst.total)
    def _():
        neurons, valid, slot = _block(lst, start, rows)
        dots = functools.partial(_mma_rows, x_ref, chunk=chunk, precision=precision, interpret=interpret)
        a = act.gate(dots(wg_ref, neurons, valid))  # zero-padded sequences and rows not valid give g = 0, a = 0
        if own_ref is not None:  # a neuron of the union counts for sequence b only where b's own set has it
            a = jnp.where(own_ref[slot, :] != 0, a, 0.0)
        active = valid & (jnp.max(jnp.abs(a), axis=1) > 0)  # any sequence (Triton lowers no reduce_or)
        h_ref[...] = (a * act.up(dots(wu_ref, neurons, active))).astype(h_ref.dtype)
        idx_ref[...] = neurons


def _mma_down_kernel(counts_ref, idx_ref, h_ref, wd_ref, out_ref, *, rows, cols, splits, precision, interpret):
    """Program (j, s): columns [j*cols, (j+1)*cols) of y for all sequences, list blocks s, s + splits, ...:
    h [rows, B']^T @ W_down_t rows [rows, cols] on tensor cores, rows that are zero for every sequence unread."""
    j, s = pl.program_id(0), pl.program_id(1)
    total = jnp.sum(counts_ref[...])
    mine = jnp.maximum(pl.cdiv(total, rows) - s + splits - 1, 0) // splits
    col = pl.ds(pl.multiple_of(j * cols, cols), cols)

    def body(t, acc):
        start = pl.multiple_of((s + t * splits) * rows, rows)
        h = h_ref[pl.ds(start, rows), :]
        live = jnp.max(jnp.abs(h.astype(F32)), axis=1) > 0  # any sequence; zero past the total
        w = load_rows(wd_ref, idx_ref[pl.ds(start, rows)], live, col, interpret)
        return acc + _dot(h, w, 0, precision)

    out_ref[0] = jax.lax.fori_loop(0, mine, body, jnp.zeros(out_ref.shape[1:], F32))


def _mma(inputs, w_down_t, *, act, cfg, batch, has_own, interpret, poison):
    """The mma variant: (y [B, d] f32, h [list length, B'] in the weights' dtype)."""
    d, length = w_down_t.shape[1], list_length(w_down_t.shape[0], cfg)
    bp = inputs[-3].shape[0]
    dtype = w_down_t.dtype
    precision = jax.lax.Precision.HIGHEST if dtype == F32 else None
    # f32 products at full precision come out wrong under Triton's software pipelining (docs/design.md)
    stages = 1 if dtype == F32 else cfg.num_stages
    chunk = column_chunk(d, cfg.chunk, f"sparse FFN weights {w_down_t.shape}")
    h, idx = call(functools.partial(_mma_gate_up_kernel, act=act, rows=cfg.rows, chunk=chunk, has_own=has_own,
                                    precision=precision, interpret=interpret),
                  out_shape=(jax.ShapeDtypeStruct((length, bp), dtype), jax.ShapeDtypeStruct((length,), jnp.int32)),
                  grid=(length // cfg.rows,), in_specs=[pl.no_block_spec] * len(inputs),
                  out_specs=(pl.BlockSpec((cfg.rows, bp), lambda i: (i, 0)),
                             pl.BlockSpec((cfg.rows,), lambda i: (i,))),
                  poison=poison, num_warps=cfg.num_warps, num_stages=stages, interpret=interpret)(*inputs)
    cols = column_chunk(d, cfg.down_cols, f"sparse FFN weights {w_down_t.shape}")
    partial = call(functools.partial(_mma_down_kernel, rows=cfg.down_rows, cols=cols, splits=cfg.splits,
                                     precision=precision, interpret=interpret),
                   out_shape=jax.ShapeDtypeStruct((cfg.splits, bp, d), F32), grid=(d // cols, cfg.splits),
                   in_specs=[pl.no_block_spec] * 4, out_specs=pl.BlockSpec((1, bp, cols), lambda j, s: (s, 0, j)),
                   poison=poison, num_warps=cfg.down_warps, num_stages=stages,
                   interpret=interpret)(inputs[0], idx, h, w_down_t)
    return jnp.sum(partial[:, :batch], axis=0), h.T.astype(F32)


def _check_shapes(x, w_gate, w_up, w_down_t):
    d = x.shape[-1]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        if w.shape != w_gate.shape or w.shape[1] != d:
            raise ValueError(f"sparse FFN: {name} has shape {w.shape}; expected [d_ff, {d}] like w_gate "
                             f"{w_gate.shape}")


@functools.partial(jax.jit, static_argnames=("act", "cfg", "interpret", "poison"))
def sparse_ffn_indexed(x: jax.Array, tiles: jax.Array, counts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                       w_down_t: jax.Array, own: jax.Array | None = None, *, act: Activation,
                       cfg: SparseFFNConfig, interpret: bool = False,
                       poison: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """The kernels on an explicit neuron list: x [B, d]; (tiles, counts) the blocked list of `compaction.compact`
    (distinct neurons < d_ff); weights [d_ff, d]; own (B > 1 only) bool or int8 [len(tiles), B]: whether the
    neuron in slot j of the tiles is in sequence b's own set (None: in all; `compaction.compact` gives it).

    Returns (y [B, d] f32, h): h is the mma variant's hidden buffer as f32 [B', list_length(d_ff, cfg)] in list
    order (B' = B padded to a power of two, at least MMA_MIN_BATCH; zero past the count), None for the stream
    variant.
    poison: start the kernels' output buffers as NaN (the checks' way to prove every element gets written)."""
    _check_shapes(x, w_gate, w_up, w_down_t)
    batch, d = x.shape
    length, rows = list_length(w_gate.shape[0], cfg), cfg.rows
    column_chunk(d, 16, f"sparse FFN weights {w_gate.shape}")  # the multiple-of-16 check, with the weights named
    if tiles.shape[0] % counts.shape[0] or tiles.shape[0] < w_gate.shape[0]:
        raise ValueError(f"sparse FFN: a blocked list of {tiles.shape[0]} slots in {counts.shape[0]} tiles cannot "
                         f"list {w_gate.shape[0]} neurons (use compaction.compact)")
    xp = pad_batch(x.astype(w_gate.dtype), MMA_MIN_BATCH if cfg.variant == "mma" else 1)
    bp = xp.shape[0]
    own_in = [] if own is None else [jnp.pad(own.astype(jnp.int8), ((0, 0), (0, bp - batch)))]
    inputs = [counts, tiles, *own_in, xp, w_gate, w_up]
    if cfg.variant == "mma":
        return _mma(inputs, w_down_t, act=act, cfg=cfg, batch=batch, has_own=own is not None, interpret=interpret,
                    poison=poison)
    programs = min(cfg.programs, length // rows)
    kernel = functools.partial(_stream_kernel, act=act, rows=rows, chunk=cfg.chunk, batch=batch,
                               has_own=own is not None, programs=programs, interpret=interpret)
    partial = call(kernel, out_shape=jax.ShapeDtypeStruct((programs, bp, d), F32), grid=(programs,),
                   in_specs=[pl.no_block_spec] * (len(inputs) + 1),
                   out_specs=pl.BlockSpec((1, bp, d), lambda p: (p, 0, 0)), poison=poison,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, interpret=interpret)(*inputs, w_down_t)
    return jnp.sum(partial[:, :batch], axis=0), None
