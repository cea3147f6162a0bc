"""Measured kernel choices, as data: which decode products take the Pallas GEMV, and the tiles of every kernel,
each row with the measurement it came from (details and raw figures: docs/design.md, docs/BENCHMARKS.md).

The engine configuration (`svdsparse_jax.engine.EngineConfig`) starts from these tables; a benchmark that finds
a better choice changes a row here and names its run in `source`.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.sparse_ffn import SparseFFNConfig


@dataclasses.dataclass(frozen=True)
class GemvTile:
    """`gemv.gemv_pallas`'s tile: rows per program (cut to a power of two dividing n), the widest column
    piece, warps."""

    rows: int = 4
    cap: int = 4096
    num_warps: int = 8
    source: str = dataclasses.field(default="", compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class GemvShapeTile:
    """Products with a weight of exactly [n, k] take `tile` instead of the default `GEMV_TILE`."""

    n: int
    k: int
    tile: GemvTile
    source: str = dataclasses.field(default="", compare=False, repr=False)


def gemv_tile_for(n: int, k: int, default: GemvTile, shape_tiles: tuple[GemvShapeTile, ...]) -> GemvTile:
    """The row GEMV's tile for a weight [n, k]: the first row of `shape_tiles` of that shape, else `default`."""
    return next((row.tile for row in shape_tiles if (row.n, row.k) == (n, k)), default)


@dataclasses.dataclass(frozen=True)
class GemvTTile:
    """`gemv.gemv_t_pallas`'s tile (x @ w_t for w_t [k, n], the dense FFN's down product): rows of w_t per
    loop step and columns of y per program (each cut to a power of two dividing its dimension), partial sums per
    column block, warps, pipeline stages."""

    rows: int = 64
    cols: int = 256
    splits: int = 16
    num_warps: int = 4
    num_stages: int = 3
    source: str = dataclasses.field(default="", compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class MgpuTile:
    """`gemv_mgpu.gemv_mgpu`'s tile: rows of w per program, columns per pipelined tile, SMEM buffers in flight,
    pieces of k (partial sums); pad_x: x padded to 8 rows by XLA (else TMA's zero fill)."""

    tile_m: int = 64
    tile_k: int = 128
    stages: int = 4
    splits: int = 2
    pad_x: bool = False
    source: str = dataclasses.field(default="", compare=False, repr=False)

    def kernel_args(self) -> dict:
        return {"tile_m": self.tile_m, "tile_k": self.tile_k, "stages": self.stages, "splits": self.splits,
                "pad_x": bool(self.pad_x)}


@dataclasses.dataclass(frozen=True)
class AttentionTile:
    """`attention.decode_attention_pallas`'s tile: cache slots per loop step (a power of two >= 16), warps,
    software-pipeline stages of the loop."""

    block: int = 64
    num_warps: int = 4
    num_stages: int = 1
    source: str = dataclasses.field(default="", compare=False, repr=False)


IMPLS = ("gemv", "mgpu", "xla")


@dataclasses.dataclass(frozen=True)
class ProjectionRule:
    """Decode products x [B, k] @ w [n, k]^T with B <= max_batch, n * k >= min_weights and weights of a dtype
    in `dtypes` take `impl`: 'gemv' (the Pallas GEMV, `gemv.gemv_pallas`) or 'xla' (XLA's product). The first
    matching rule of a table wins; a product no rule matches is XLA's."""

    max_batch: int
    min_weights: int
    impl: str
    dtypes: tuple[str, ...] = ("bfloat16", "float16")
    source: str = dataclasses.field(default="", compare=False, repr=False)

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"projection rule impl {self.impl!r}: expected one of {IMPLS}")

    def matches(self, batch: int, n_weights: int, dtype: str) -> bool:
        return batch <= self.max_batch and n_weights >= self.min_weights and dtype in self.dtypes


@dataclasses.dataclass(frozen=True)
class SparseFFNRow:
    """Batches of at most max_batch sequences run the sparse FFN kernels with `config`."""

    max_batch: int
    config: SparseFFNConfig
    source: str = dataclasses.field(default="", compare=False, repr=False)


GEMV_TILE = GemvTile(
    rows=4, cap=4096, num_warps=8,
    source="H100 2026-11-23 (docs/design.md, decode GEMVs): within 1 us of the best of 12 tiles on every 7B "
           "shape; 12288x4096 40.5 us, 11008x4096 36.3, 32000x4096 93.9")

_GEMV_SWEEP = ("H200 2026-12-02 (docs/bench/gemv_sweep_rows_66ded68.json, 36 tiles, batch 1, no norm; "
               "GEMV_TILE there: 12288x4096 32.32 us, 4096x4096 14.78, 11008x4096 27.63)")
# Shapes whose best tile beat GEMV_TILE in the sweep and then in decode: LLaMA2-7B's o_proj. Not kept: q/k/v
# (12288x4096), whose best plain tile rows=1 warps=8 (30.68 us) ran its product with the norm inside at 38.6 us a
# layer in decode against 30.7 at GEMV_TILE (each of its 12288 programs forms the norm again; docs/bench/
# decode_llama2-7b_shape_tiles_d243aaa.json: dense 244.5 -> 233.4 tok/s); 11008x4096 (gate, up): the best,
# rows=2 warps=16, 27.46 us, within noise of the default.
GEMV_SHAPE_TILES = (
    GemvShapeTile(n=4096, k=4096, tile=GemvTile(rows=2, cap=4096, num_warps=4),
                  source=f"{_GEMV_SWEEP}: 13.30 us (2.52 TB/s), the best of 36 (rows=1 warps=8 13.32); in decode "
                         "(docs/bench/decode_llama2-7b_shape_tiles_d243aaa.json, GPU checks passed) o_proj 10.96 -> "
                         "10.58 us a layer, 10.64 at e70e805 (docs/bench/decode_llama2-7b_b1_e70e805.json: dense "
                         "243.8 tok/s against 244.5 before, a step-level difference within noise)"),
)

# The dense FFN's gate and up products as one launch that also forms act(g) * u (`gemv.gate_up_pallas`), where
# the projection table sends the gate product to the GEMV. None would mean two GEMVs and XLA's activation.
GATE_UP_TILE: GemvTile | None = GemvTile(
    rows=2, cap=4096, num_warps=8,
    source="H200 2026-12-03, LLaMA2-7B dense b1 (scripts/bench/decode.py --gate-up-tile; GPU checks passed): a first "
           "A/B of 3 tiles (report not kept; copy 4.242 TB/s): two GEMVs 244.1 tok/s, rows=1 warps=4 250.5, rows=2 "
           "warps=8 251.8, rows=4 warps=8 250.9; then device_session.sh (docs/bench/decode_llama2-7b_gate_up_"
           "cc2b61e.json, copy 4.248): 243.5 -> 251.1 tok/s (0.764 -> 0.787 of the copy, 426 -> 362 launches), "
           "gate + up 44.4 us a layer (4.06 TB/s). Batch 4 takes XLA's products (the projection table): unchanged")

GEMV_T_TILE = GemvTTile(
    rows=64, cols=128, splits=32, num_warps=4, num_stages=2,
    source="H200 2026-12-02 (docs/bench/gemv_t_sweep.json): the fastest of 36 tiles at batch 1, 11008x4096 28.3 us "
           "(3.19 TB/s; XLA 43.1) and 18944x3584 41.7 us (3.26; XLA 46.1); more splits were faster throughout; "
           "in decode 27.9 us a layer with 3 stages, dense 225.0 -> 239.9 tok/s. Two stages: within 0.6 us alone "
           "(docs/bench/gemv_t_sweep2.json); kept after device_session.sh at 66ded68 (GPU checks: 54 passed in 108 s; "
           "dense 244.5 tok/s, 0.771 of a 4.223 TB/s copy: docs/bench/decode_llama2-7b_gemv_t_2stage_66ded68.json)")

# Which decode products take the Pallas GEMV: one sequence's products of 3584 x 3584 weights and more. Below
# that (the predictor factors) and at 2 sequences and more XLA measured faster; f32 models keep XLA's
# full-precision products.
PROJECTIONS = (
    ProjectionRule(
        max_batch=1, min_weights=3584 * 3584, impl="gemv",
        source="H200 2026-12-01 (docs/bench/gemv_batches_f7ce0ab.txt): Pallas against XLA at batch 1 "
               "12288x4096 32.9 / 43.5 us, 11008x4096 30.5 / 43.1, 4096x11008 33.1 / 40.3, 3584x3584 14.5 / 19.4, "
               "18944x3584 40.9 / 45.0; at batch 2 XLA wins every shape (12288x4096 32.4 / 42.5, 18944x3584 40.8 "
               "/ 76.8) and by 2-7x at batch 8; H100 2026-11-23: 256x4096 6.0 / 3.9, 11008x256 8.8 / 5.2"),
)
# The same products on the Mosaic GPU GEMV where its tile fits (the dense FFN's gate and up stay in the one-pass
# Pallas kernel, `GATE_UP_TILE`): `--projections mgpu` of the decode benchmark, the candidate to replace PROJECTIONS.
MGPU_PROJECTIONS = (
    ProjectionRule(max_batch=1, min_weights=3584 * 3584, impl="mgpu",
                   source="H200 2026-12-03 (docs/bench/mgpu_gemv_e30fef6.json): one product alone, against the "
                          "Pallas GEMV: 12288x4096 37.0 / 43.3 us, 4096x4096 18.0 / 19.1, W_down_t 11008x4096 33.2 / "
                          "35.5, 11008x4096 32.3 / 31.7"),
)
MGPU_TILE = MgpuTile(
    tile_m=64, tile_k=128, stages=4, splits=2,
    source="H200 2026-12-03 (docs/bench/mgpu_gemv_e30fef6.json, 83 tiles, batch 1, all passed float64): the fastest "
           "at q/k/v 12288x4096, o 4096x4096 and down 4096x11008 (x @ W_down_t), 4th at 11008x4096 (0.3 us off)")

# Every decode product on XLA (the `--projections xla` of the CLI and the benchmarks).
XLA_PROJECTIONS: tuple[ProjectionRule, ...] = ()

# The sparse FFN kernels by batch size; a batch larger than every row runs XLA's masked FFN.
SPARSE_FFN = (
    SparseFFNRow(
        max_batch=1, config=SparseFFNConfig(variant="stream", rows=2, num_warps=4, programs=396),
        source="H100 2026-11-23 (docs/design.md, sparse FFN kernels): medians of four turns at 90% sparsity, "
               "LLaMA2-7B 21.7 us per layer, Qwen2-7B 30.1 (next best 2 rows / 264 programs 21.2 / 31.2)"),
    SparseFFNRow(
        max_batch=16, config=SparseFFNConfig(variant="mma", rows=32, chunk=256, num_warps=4, num_stages=3,
                                             down_rows=32, down_cols=128, splits=16),
        source="H200 2026-12-01 (docs/bench/ffn_mma_sweep_b4_d4503fc.json): the fastest of 26 mma tiles that compiled, "
               "LLaMA2-7B, batch 4, 90%: kernels 56.7 us per layer (rows 64 or down 64x128x8 within 0.2 us; "
               "the earlier down tile 32x256x8: 63.3), dense XLA 76.1"),
)


@dataclasses.dataclass(frozen=True)
class FFNCost:
    """Measured cost of one FFN layer at decode, for batches of at most max_batch sequences: XLA's dense FFN
    reads its three matrices at dense_tb_s; the predictor-guarded one (predictor products, compaction, kernels)
    takes sparse_fixed_us plus its useful bytes (the union's candidate rows of W_gate, its active rows of W_up
    and W_down_t, the predictor's factors) at sparse_tb_s. The sparsity policy compares the two per layer."""

    max_batch: int
    dense_tb_s: float
    sparse_fixed_us: float
    sparse_tb_s: float
    source: str = dataclasses.field(default="", compare=False, repr=False)

    def dense_us(self, ffn_bytes: float) -> float:
        return ffn_bytes / self.dense_tb_s * 1e-6

    def sparse_us(self, useful_bytes: float) -> float:
        return self.sparse_fixed_us + useful_bytes / self.sparse_tb_s * 1e-6


_FFN_RUN = "H200 2026-12-01, docs/bench/ffn_batches_ca98fd3.json (bench.ffn, LLaMA2-7B and Qwen2-7B, 80% and 90%)"
_DECODE_RUN = "docs/bench/decode_llama2-7b_sparse_batches_4f079a7.json"
_MMA_RUN = ("H200 2026-12-01, docs/bench/ffn_batches_mma_tile.json (bench.ffn, the swept mma tile, LLaMA2-7B and "
            "Qwen2-7B, 80% and 90%), fitted as bench.ffn prints it")
FFN_COSTS = (
    FFNCost(max_batch=1, dense_tb_s=2.708, sparse_fixed_us=20.86, sparse_tb_s=3.305,
            source=f"{_FFN_RUN}: stream kernels; in decode ({_DECODE_RUN}) every layer sparse, 1.73x dense"),
    FFNCost(max_batch=2, dense_tb_s=3.716, sparse_fixed_us=43.33, sparse_tb_s=5.149, source=_MMA_RUN),
    FFNCost(max_batch=4, dense_tb_s=3.679, sparse_fixed_us=27.63, sparse_tb_s=3.216, source=_MMA_RUN),
    FFNCost(max_batch=8, dense_tb_s=3.617, sparse_fixed_us=61.3, sparse_tb_s=3.589,
            source=f"{_MMA_RUN}, fixed 32.54 us + 28.8: in decode (docs/bench/decode_qwen2-7b_batches_mma.json) "
                   "the 28 layers this row called sparse with 32.54 lost 12.4 us each where it predicted 16.4 saved "
                   "(LLaMA2-7B: 3.4 lost, 1.6 predicted)"),
    FFNCost(max_batch=16, dense_tb_s=3.522, sparse_fixed_us=0.0, sparse_tb_s=2.539, source=_MMA_RUN),
)
# Batches larger than every row run the dense FFN under the measured policy.

# The measured policy runs a layer sparse only where its cost is predicted at least this fraction below the dense
# FFN's: a layer whose predicted saving is inside the cost model's error in decode stays dense, where it cannot lose.
# Those errors (docs/design.md, batches): LLaMA2-7B decode saved 20.9 us a layer at batch 2 where the rows predicted
# 16.8 (4.1 us, 5.6% of the dense layer's 73 us), 15.7 against 15.5 at batch 4; Qwen2-7B at batch 8 lost 12.4 where
# 16.4 was predicted saved (since carried by that row's fixed cost). On the user's path (docs/bench/
# user_path_rank_auto_6d6dbba.json; `python -m scripts.bench.policy_margins` on it) the batch-4 layers the policy ran
# sparse were predicted 3.1, 0.2 and 0.7 us faster (4%, 0.3%, 1%) and the run was 2.8% slower than dense, twice;
# every layer at batches 1 and 2 is predicted at least 56% and 10% faster and keeps running sparse.
FFN_POLICY_MARGIN = 0.05

# Decode attention (one query per sequence) as one Pallas launch (`attention.decode_attention_pallas`); None:
# XLA's scores, softmax and values.
ATTENTION_TILE: AttentionTile | None = AttentionTile(
    block=256, num_warps=8, num_stages=1,
    source="H200 2026-12-04, LLaMA2-7B dense b1 and b4, 200 cache slots (scripts/bench/decode.py --attention-tile; "
           "GPU checks passed; docs/bench/decode_attention_tiles_61322d7.json, copy 4.124 TB/s): the kernel 4.9 / 6.1 "
           "us a layer at b1 / b4 (block 128 w4 s2 5.7 / 6.7, 64 w4 7.2 / 7.6, 32 w4 s3 8.5 / 10.5) where XLA's "
           "scores, softmax and values take 7.9 us in 3 launches (docs/bench/decode_attention_ab_61322d7.json)")

COMPACTION_TILE = 128  # H100 2026-11-23 (docs/design.md, compaction): tiles 64-256 within 0.6 us; 1.5 us in decode
ADD_NORM_ROWS = 4  # rows of A per program of the fused add + RMSNorm (+ A x): 3.7 us per layer in decode
ADD_NORM_WARPS = 4
ADD_NORM_MAX_BATCH = 8  # the batches it was checked and timed at; larger ones run XLA's add and norm
