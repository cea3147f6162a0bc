"""The engine configuration: how decode runs, chosen once at the edge and passed down as one static value.

`EngineConfig` is frozen and hashable. The model's modules hold it, so it is part of the graph every jitted
program takes as a static argument (`Generator` programs key on it), and the three routing functions below read
it, and nothing else, to pick a Pallas kernel or XLA for each decode operation while it is traced:

  project      x @ w^T, optionally RMSNorm(x) @ w^T: the Pallas GEMV (Triton or Mosaic GPU) or XLA's product, by
               `projections`
  project_t    x @ w_t for a weight stored input-major (W_down_t): the same choice, by the same rules
  gate_up      the dense FFN's act(x W_gate^T) * up(x W_up^T): one Pallas pass over both (given a gate_up_tile) or
               the two products of `project` and the activation
  add_rmsnorm  residual add + RMSNorm (+ the predictor's input projection): one Pallas launch, or XLA
  decode_attention  one query per sequence against its KV cache: one Pallas launch (given an attention_tile)
  guarded_ffn  candidates -> neuron list -> gate on the candidates, activation, up / down on the active rows

Environment variables are read only at the edge, once per command, never while JAX traces and never by the
Python API: this module's `from_environment` (which the CLI calls), `compile_cache.enable` and
`svdsparse-lm-eval`'s `main`:

  SVDSPARSE_KERNELS=auto|pallas|interpret|xla   the backend when the CLI's --kernels is not given (default auto)
  SVDSPARSE_COMPILE_CACHE=DIR|off               the compilation cache (`compile_cache`)
  SVDSPARSE_DEBUG=1                             svdsparse-lm-eval shows tracebacks
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels import reference, tuning
from pallas_kernels.candidates import Candidates
from pallas_kernels.compaction import compact_pallas
from pallas_kernels import attention, gemv_mgpu
from pallas_kernels.gemv import gate_up_pallas, gemv_pallas, gemv_t_pallas
from pallas_kernels.norm import add_rmsnorm_pallas
from pallas_kernels.numerics import Activation, rms_norm
from pallas_kernels.sparse_ffn import SparseFFNConfig, sparse_ffn_indexed
from pallas_kernels.tuning import (AttentionTile, FFNCost, GemvShapeTile, GemvTile, GemvTTile, MgpuTile, ProjectionRule,
                                   SparseFFNRow)
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.policy import POLICIES

F32 = jnp.float32
BACKENDS = ("pallas", "interpret", "xla")
PROJECTION_TABLES = {"table": tuning.PROJECTIONS, "mgpu": tuning.MGPU_PROJECTIONS, "xla": tuning.XLA_PROJECTIONS}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How decode runs.

    backend: 'pallas' (compiled GPU kernels), 'interpret' (the same kernels on any backend, slowly: how the CPU
      tests run them) or 'xla' (no kernels).
    platform: the JAX backend the engine was resolved for ('cpu', 'gpu', ...).
    projections: which decode products take the Pallas GEMV (`tuning.ProjectionRule`, first match wins; none:
      XLA). Given RMSNorm(x) @ w^T, the GEMV forms the norm itself.
    gemv_tile, gemv_t_tile, sparse_ffn (kernel configuration by batch size), compaction_tile: the kernels'
      tiles; gemv_shape_tiles: the row GEMV's tiles for particular weight shapes (`gemv_tile_for`), before
      gemv_tile; gate_up_tile: the tile of the one-pass gate and up kernel where the dense FFN's gate product
      goes to the GEMV (None: two GEMVs and XLA's activation); mgpu_tile: the Mosaic GPU GEMV's, for the
      products the projection table sends to it; attention_tile: decode attention's (None: XLA's).
    kernel_max_batch: more rows than this (prefill, evaluation windows) always run XLA.
    ffn_policy: which layers of a decode batch run the predictor-guarded FFN: 'measured' (where the measured
      costs `ffn_costs` say it beats dense by at least the fraction `ffn_margin` at the batch's union row
      fractions), 'sparse' (all) or 'dense' (none); `svdsparse_jax.policy`.
    steps_per_check: decode steps between two checks of the stop condition (generate.py).
    mesh: the device mesh of tensor-parallel decode (`sharding.make_mesh`), or None for one device. With a mesh,
      XLA's SPMD partitioning runs the products and norms, and the guarded FFN runs its kernels per shard
      (`shard_map`: each device its own neurons, then one all-reduce).
    """

    backend: str = "xla"
    platform: str = "cpu"
    projections: tuple[ProjectionRule, ...] = tuning.PROJECTIONS
    gemv_tile: GemvTile = tuning.GEMV_TILE
    gemv_shape_tiles: tuple[GemvShapeTile, ...] = tuning.GEMV_SHAPE_TILES
    gemv_t_tile: GemvTTile = tuning.GEMV_T_TILE
    gate_up_tile: GemvTile | None = tuning.GATE_UP_TILE
    mgpu_tile: MgpuTile = tuning.MGPU_TILE
    attention_tile: AttentionTile | None = tuning.ATTENTION_TILE
    sparse_ffn: tuple[SparseFFNRow, ...] = tuning.SPARSE_FFN
    compaction_tile: int = tuning.COMPACTION_TILE
    kernel_max_batch: int = 16
    ffn_policy: str = "measured"
    ffn_costs: tuple[FFNCost, ...] = tuning.FFN_COSTS
    ffn_margin: float = tuning.FFN_POLICY_MARGIN
    steps_per_check: int = 8
    mesh: Any = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise SvdsparseError(f"engine backend {self.backend!r}: expected one of {BACKENDS}")
        if self.ffn_policy not in POLICIES:
            raise SvdsparseError(f"engine ffn_policy {self.ffn_policy!r}: expected one of {POLICIES}")
        if not 0.0 <= self.ffn_margin < 1.0:
            raise SvdsparseError(f"engine ffn_margin must lie in [0, 1), got {self.ffn_margin}")
        if self.steps_per_check < 1:
            raise SvdsparseError(f"engine steps_per_check must be >= 1, got {self.steps_per_check}")

    @property
    def kernels(self) -> bool:
        """Whether decode-sized operations may run Pallas kernels (compiled or interpreted)."""
        return self.backend != "xla"

    @property
    def interpret(self) -> bool:
        return self.backend == "interpret"

    def projection_impl(self, batch: int, w: jax.Array) -> str:
        """'gemv', 'mgpu' or 'xla' for x [batch, k] @ w^T (`tuning.ProjectionRule`; XLA's under a mesh, whose
        partitioner splits it; `project` runs split weights' products per shard, each under the mesh-less
        engine)."""
        if not self.kernels or self.mesh is not None:
            return "xla"
        dtype = jnp.dtype(w.dtype).name
        rule = next((r for r in self.projections if r.matches(batch, w.size, dtype)), None)
        return "xla" if rule is None else rule.impl

    def mgpu_fits(self, n: int, k: int, batch: int) -> bool:
        """Whether the Mosaic GPU GEMV's tile fits a product of n outputs over k inputs for `batch` sequences."""
        return gemv_mgpu.fits(n, k, batch, **self.mgpu_tile.kernel_args())

    def attention_kernel(self, tokens: int, head_dim: int, kv_heads: int) -> bool:
        """Whether attention over `tokens` new tokens per sequence runs the decode-attention kernel: one token,
        a tile, a head size it fits, and on a mesh KV heads that split evenly (`sharding.axis_rules`)."""
        if not self.kernels or self.attention_tile is None or tokens != 1:
            return False
        if self.mesh is not None and kv_heads % self.mesh.devices.size:
            return False
        return attention.fits(head_dim, self.attention_tile.block)

    def gemv_tile_for(self, n: int, k: int) -> GemvTile:
        """The row GEMV's tile for a weight [n, k] (`tuning.gemv_tile_for`)."""
        return tuning.gemv_tile_for(n, k, self.gemv_tile, self.gemv_shape_tiles)

    def sparse_ffn_config(self, batch: int) -> SparseFFNConfig | None:
        """The sparse FFN kernels' configuration for a batch, or None where XLA's masked FFN runs."""
        if not self.kernels or batch > self.kernel_max_batch:
            return None
        return next((row.config for row in self.sparse_ffn if batch <= row.max_batch), None)

    @classmethod
    def resolve(cls, backend: str = "auto", projections: str = "table", **fields: Any) -> "EngineConfig":
        """The engine for this process: backend 'auto' is 'pallas' on a GPU and 'xla' elsewhere; 'pallas' without
        a GPU is refused. projections: 'table' (the measured table), 'mgpu' (the Mosaic GPU GEMV where the table
        has the Triton one) or 'xla' (XLA's products only). Other fields as given."""
        platform = jax.default_backend()
        if backend not in ("auto", *BACKENDS):
            raise SvdsparseError(f"kernel backend {backend!r}: expected one of {('auto', *BACKENDS)}")
        if backend == "auto":
            backend = "pallas" if platform == "gpu" else "xla"
        if backend == "pallas" and platform != "gpu":
            raise SvdsparseError(f"kernel backend 'pallas' needs a GPU; this JAX backend is {platform!r} (use "
                                 "'interpret' to run the kernels on it, or 'xla')")
        if projections not in PROJECTION_TABLES:
            raise SvdsparseError(f"projections {projections!r}: expected one of {sorted(PROJECTION_TABLES)}")
        return cls(backend=backend, platform=platform, projections=PROJECTION_TABLES[projections], **fields)


XLA = EngineConfig()  # XLA's products everywhere: statistics over many tokens (probe, calibration, evaluation)


def from_environment(backend: str | None = None, **fields: Any) -> EngineConfig:
    """`EngineConfig.resolve` with the backend given, else SVDSPARSE_KERNELS, else 'auto' (the CLI's edge)."""
    return EngineConfig.resolve(backend or os.environ.get("SVDSPARSE_KERNELS", "auto"), **fields)


def project(engine: EngineConfig, x: jax.Array, w: jax.Array, norm: tuple[jax.Array, float] | None = None,
            out_dtype=F32, split: str | None = None) -> jax.Array:
    """x [..., k] @ w [n, k]^T -> [..., n] out_dtype, accumulated in f32; given norm = (scale [k], eps),
    RMSNorm(x) @ w^T (the Triton GEMV forms the norm inside, saving XLA's norm launches; before the Mosaic GPU
    GEMV, `gemv_mgpu`, XLA forms it).

    split: how w lies on the engine's mesh (`sharding`): "rows" (its n output rows split: x replicated, the
    result split on its last axis), "cols" (its k input columns split: x split on its last axis, the partial
    products summed over the mesh: one all-reduce), None (replicated). With kernels, split products run per shard
    under `shard_map`, each device choosing its product for its own block; otherwise XLA partitions them."""
    if engine.mesh is not None and engine.kernels and split is not None:
        return _project_per_shard(engine, x, w, norm, out_dtype, split)
    flat = x.reshape(-1, x.shape[-1])
    scale, eps = (None, 0.0) if norm is None else norm
    impl = engine.projection_impl(flat.shape[0], w)
    if impl == "mgpu" and engine.mgpu_fits(*w.shape, flat.shape[0]):
        # XLA forms the norm (in the fusion that pads x to the kernel's 8 rows), rounded as the reference's
        xin = flat if scale is None else rms_norm(flat, scale, eps)
        y = gemv_mgpu.gemv_mgpu(xin, w, out_dtype=jnp.dtype(out_dtype), interpret=engine.interpret,
                                **engine.mgpu_tile.kernel_args())
    elif impl in ("gemv", "mgpu"):
        tile = engine.gemv_tile_for(*w.shape)
        y = gemv_pallas(flat, w, scale, eps, out_dtype=jnp.dtype(out_dtype), rows=tile.rows, cap=tile.cap,
                        num_warps=tile.num_warps, interpret=engine.interpret)
    else:
        y = reference.gemv(flat, w, scale, eps).astype(out_dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def project_t(engine: EngineConfig, x: jax.Array, w_t: jax.Array, out_dtype=F32) -> jax.Array:
    """x [..., k] @ w_t [k, n] -> [..., n] out_dtype, accumulated in f32, for a weight stored input-major (the
    dense FFN's W_down_t): the Pallas GEMV (`gemv.gemv_t_pallas`, or `gemv_mgpu` where the table says 'mgpu' and
    its tile fits) where the projection table sends a product of that size, else XLA's. Under a mesh XLA
    partitions it (w_t split by rows: one all-reduce)."""
    flat = x.reshape(-1, x.shape[-1])
    impl = engine.projection_impl(flat.shape[0], w_t)
    if impl == "mgpu" and engine.mgpu_fits(w_t.shape[1], w_t.shape[0], flat.shape[0]):
        y = gemv_mgpu.gemv_mgpu(flat, w_t, transposed=True, out_dtype=jnp.dtype(out_dtype),
                                interpret=engine.interpret, **engine.mgpu_tile.kernel_args())
    elif impl in ("gemv", "mgpu"):
        tile = engine.gemv_t_tile
        y = gemv_t_pallas(flat, w_t, out_dtype=jnp.dtype(out_dtype), rows=tile.rows, cols=tile.cols,
                          splits=tile.splits, num_warps=tile.num_warps, num_stages=tile.num_stages,
                          interpret=engine.interpret)
    else:
        y = reference.gemv_t(flat, w_t).astype(out_dtype)
    return y.reshape(*x.shape[:-1], w_t.shape[1])


def gate_up(engine: EngineConfig, x: jax.Array, w_gate: jax.Array, w_up: jax.Array, act: Activation,
            out_dtype=F32) -> jax.Array:
    """The dense FFN's hidden activations h = act(x W_gate^T) * up(x W_up^T), x [..., d], weights [d_ff, d] ->
    [..., d_ff] out_dtype (products accumulated in f32; `Activation.hidden`). Where the engine has a
    gate_up_tile and the projection table sends the gate product to the GEMV, one Pallas launch reads both
    matrices and forms h; otherwise two `project` products and the activation. Under a mesh the weights' rows
    are split: with the one-pass kernel each device runs it on its rows (`shard_map`), h split on its last
    axis like the products'."""
    if engine.gate_up_tile is not None and engine.mesh is not None and engine.kernels:
        axis = engine.mesh.axis_names[0]
        rows, last = PartitionSpec(axis, None), PartitionSpec(*([None] * (x.ndim - 1)), axis)
        local_engine = _local(engine)
        return jax.shard_map(lambda x, wg, wu: gate_up(local_engine, x, wg, wu, act, out_dtype), mesh=engine.mesh,
                             in_specs=(PartitionSpec(), rows, rows), out_specs=last, check_vma=False)(x, w_gate, w_up)
    rows_in = x.size // x.shape[-1]
    # the one pass over both matrices also where the table sends the products to Mosaic GPU (measured faster than
    # two Mosaic GEMVs: 44.4 us a layer against 2 x 32.3)
    if engine.gate_up_tile is not None and engine.projection_impl(rows_in, w_gate) in ("gemv", "mgpu"):
        t = engine.gate_up_tile
        h = gate_up_pallas(x.reshape(rows_in, x.shape[-1]), w_gate, w_up, act, out_dtype=jnp.dtype(out_dtype),
                           rows=t.rows, cap=t.cap, num_warps=t.num_warps, interpret=engine.interpret)
        return h.reshape(*x.shape[:-1], w_gate.shape[0])
    return act.hidden(project(engine, x, w_gate, split="rows"), project(engine, x, w_up, split="rows")
                      ).astype(out_dtype)


def decode_attention(engine: EngineConfig, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, bias: jax.Array,
                     start: jax.Array) -> jax.Array:
    """One new query per sequence through the decode-attention kernel (`engine.attention_kernel` said yes): q [B, H,
    head_dim] at cache slot start ([] or [B]), caches [B, KVH, S, head_dim], bias f32 [B, W] (the additive mask
    over slots [0, W)) -> [B, H, head_dim] in q's dtype. Under a mesh each device runs its own heads
    (`shard_map`: q, the caches and the result split on their head axis)."""
    ends = jnp.broadcast_to(jnp.asarray(start, jnp.int32) + 1, (q.shape[0],))  # the slots each query reads
    if engine.mesh is None:
        return _decode_attention_kernel(engine, q, k_cache, v_cache, bias, ends)
    axis = engine.mesh.axis_names[0]
    heads, caches = PartitionSpec(None, axis, None), PartitionSpec(None, axis, None, None)
    local_engine = _local(engine)
    return jax.shard_map(lambda *args: _decode_attention_kernel(local_engine, *args), mesh=engine.mesh,
                         in_specs=(heads, caches, caches, PartitionSpec(), PartitionSpec()), out_specs=heads,
                         check_vma=False)(q, k_cache, v_cache, bias, ends)


def _decode_attention_kernel(engine: EngineConfig, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                             bias: jax.Array, ends: jax.Array) -> jax.Array:
    """`attention.decode_attention_pallas` at the engine's tile (one device's heads)."""
    t = engine.attention_tile
    return attention.decode_attention_pallas(q, k_cache, v_cache, bias, ends, block=t.block, num_warps=t.num_warps,
                                             num_stages=t.num_stages, interpret=engine.interpret)


def _local(engine: EngineConfig) -> EngineConfig:
    """The engine a device runs inside `shard_map`: the same, without the mesh."""
    return dataclasses.replace(engine, mesh=None)


def _project_per_shard(engine: EngineConfig, x: jax.Array, w: jax.Array, norm: tuple[jax.Array, float] | None,
                       out_dtype, split: str) -> jax.Array:
    """`project` of a split weight, each device on its own block (see `project`)."""
    if split not in ("rows", "cols") or (split == "cols" and norm is not None):
        raise ValueError(f"project: split {split!r} (with a norm: {norm is not None}) is not a product layout")
    axis = engine.mesh.axis_names[0]
    rep, last = PartitionSpec(), PartitionSpec(*([None] * (x.ndim - 1)), axis)
    local_engine = _local(engine)
    scale, eps = (None, 0.0) if norm is None else norm

    def local(x, w, *scale):
        y = project(local_engine, x, w, None if not scale else (scale[0], eps), out_dtype)
        return y if split == "rows" else jax.lax.psum(y, axis)

    specs = (rep, PartitionSpec(axis, None)) if split == "rows" else (last, PartitionSpec(None, axis))
    return jax.shard_map(local, mesh=engine.mesh, in_specs=(*specs, *((rep,) if norm else ())),
                         out_specs=last if split == "rows" else rep,
                         check_vma=False)(x, w, *((scale,) if norm else ()))


def add_rmsnorm(engine: EngineConfig, x: jax.Array, delta: jax.Array, scale: jax.Array, eps: float,
                w: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(x + delta, RMSNorm(x + delta), w @ RMSNorm(x + delta) or None): x, delta [..., d], scale [d], w [n, d];
    the sum in x's dtype, the norm in the scale's dtype, the product f32 [..., n]. One Pallas launch for
    decode-sized inputs when the engine runs kernels; XLA otherwise."""
    d = x.shape[-1]
    if engine.mesh is not None and engine.kernels:  # replicated inputs: every device forms the same result
        rep = PartitionSpec()
        extra = () if w is None else (w,)
        total, normed, z = jax.shard_map(
            lambda x, delta, scale, *w: add_rmsnorm(_local(engine), x, delta, scale, eps, *w), mesh=engine.mesh,
            in_specs=(rep,) * (3 + len(extra)), out_specs=(rep, rep, rep if w is not None else None),
            check_vma=False)(x, delta, scale, *extra)
        return total, normed, z
    flat = x.reshape(-1, d)
    if (not engine.kernels or d % 16
            or flat.shape[0] > min(engine.kernel_max_batch, tuning.ADD_NORM_MAX_BATCH)):
        return reference.add_rmsnorm(x, delta, scale, eps, w)
    total, normed, z = add_rmsnorm_pallas(flat, delta.reshape(-1, d), scale, eps, w, rows=tuning.ADD_NORM_ROWS,
                                          num_warps=tuning.ADD_NORM_WARPS, interpret=engine.interpret)
    lead = x.shape[:-1]
    return total.reshape(x.shape), normed.reshape(x.shape), None if z is None else z.reshape(*lead, w.shape[0])


def guarded_ffn(engine: EngineConfig, x: jax.Array, candidates: Candidates, w_gate: jax.Array, w_up: jax.Array,
                w_down_t: jax.Array, act: Activation) -> jax.Array:
    """The predictor-guarded FFN: x [N, d], the predictor's candidates for each of the N rows, weights [d_ff, d]
    (w_down_t is down_proj transposed). Returns y [N, d] f32 = sum over candidates i of (act(g_i) * u_i) *
    w_down_t[i]. Decode-sized inputs run the kernels (the compaction of the candidates into a neuron list, then
    one kernel for gate, activation, up and down), which read only the candidates' W_gate rows and the active
    neurons' W_up and W_down_t rows; otherwise XLA computes every row and masks. Under a mesh with kernels, each
    device runs this on its own neurons (`_guarded_ffn_per_shard`)."""
    if act.kind == "silu":
        raise SvdsparseError("sparse FFN: silu is never zero, so a predictor cannot skip rows; run it dense")
    if engine.mesh is not None and engine.kernels:
        return _guarded_ffn_per_shard(engine, x, candidates, w_gate, w_up, w_down_t, act)
    cfg = engine.sparse_ffn_config(x.shape[0])
    if cfg is None:
        return reference.sparse_ffn(x, candidates.as_mask(), w_gate, w_up, w_down_t, act)
    with jax.named_scope("compaction"):  # the candidate set (scores + bias > 0) as a blocked neuron list
        tiles, counts, own = compact_pallas(candidates, tile=engine.compaction_tile, interpret=engine.interpret)
    with jax.named_scope("gate_activation_up_down"):  # one kernel: gate on candidates, up / down on active rows
        return sparse_ffn_indexed(x, tiles, counts, w_gate, w_up, w_down_t, own, act=act, cfg=cfg,
                                  interpret=engine.interpret)[0]


def _guarded_ffn_per_shard(engine: EngineConfig, x: jax.Array, candidates: Candidates, w_gate: jax.Array,
                           w_up: jax.Array, w_down_t: jax.Array, act: Activation) -> jax.Array:
    """Tensor parallel: each device runs the guarded FFN on its own neurons (its rows of the weights, its columns
    of the candidates, as `sharding` places them) and the partial outputs are summed over the mesh: one
    all-reduce."""
    axis = engine.mesh.axis_names[0]
    rows, cols, rep = PartitionSpec(axis, None), PartitionSpec(None, axis), PartitionSpec()
    local_engine = _local(engine)
    by_mask = candidates.mask is not None
    parts = (candidates.mask,) if by_mask else (candidates.scores, candidates.bias)
    specs = (cols,) if by_mask else (cols, PartitionSpec(axis))

    def local(x, w_gate, w_up, w_down_t, *parts):
        c = Candidates(mask=parts[0]) if by_mask else Candidates(scores=parts[0], bias=parts[1])
        return jax.lax.psum(guarded_ffn(local_engine, x, c, w_gate, w_up, w_down_t, act), axis)

    return jax.shard_map(local, mesh=engine.mesh, in_specs=(rep, rows, rows, rows, *specs), out_specs=rep,
                         check_vma=False)(x, w_gate, w_up, w_down_t, *parts)
