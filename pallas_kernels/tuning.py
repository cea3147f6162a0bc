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
        if self.impl not in ("gemv", "xla"):
            raise ValueError(f"projection rule impl {self.impl!r}: expected 'gemv' or 'xla'")

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
                                             down_rows=32, down_cols=256, splits=8),
        source="H200 2026-12-01 (docs/bench/ffn_batches_ca98fd3.json): 73.7 us per LLaMA2-7B layer at batch 4, "
               "90%, with predictor and compaction, where the split kernels took 104 and dense XLA 79 "
               "(docs/bench/ffn_batches_split_f7ce0ab.json); the tile not swept yet"),
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
FFN_COSTS = (
    FFNCost(max_batch=1, dense_tb_s=2.708, sparse_fixed_us=20.86, sparse_tb_s=3.305,
            source=f"{_FFN_RUN}: stream kernels; in decode ({_DECODE_RUN}) every layer sparse, 1.73x dense"),
    FFNCost(max_batch=2, dense_tb_s=3.584, sparse_fixed_us=44.01, sparse_tb_s=3.748,
            source=f"{_FFN_RUN}: mma kernels; in decode every layer sparse saved 14.7 us a layer, as predicted"),
    FFNCost(max_batch=4, dense_tb_s=3.551, sparse_fixed_us=28.5, sparse_tb_s=2.365,
            source=f"{_FFN_RUN}: mma kernels, fixed 22.15 us fitted + 6.3: in decode every layer sparse saved 6.7 "
                   "us a layer where the fit predicted 13"),
    FFNCost(max_batch=8, dense_tb_s=3.505, sparse_fixed_us=33.0, sparse_tb_s=2.514,
            source=f"{_FFN_RUN}: mma kernels, fixed 18.9 us fitted + 14: in decode the 10 layers the fit called "
                   "even with dense lost 14 us each (0.97x dense)"),
    FFNCost(max_batch=16, dense_tb_s=3.456, sparse_fixed_us=0.0, sparse_tb_s=2.123,
            source=f"{_FFN_RUN}: mma kernels, not run in decode; a union over (W_gate + 2 W_up/down) / 3 of 61% "
                   "or more stays dense (the measured unions of batch 16: 83% / 65%)"),
)
# Batches larger than every row run the dense FFN under the measured policy.

COMPACTION_TILE = 128  # H100 2026-11-23 (docs/design.md, compaction): tiles 64-256 within 0.6 us; 1.5 us in decode
ADD_NORM_ROWS = 4  # rows of A per program of the fused add + RMSNorm (+ A x): 3.7 us per layer in decode
ADD_NORM_WARPS = 4
ADD_NORM_MAX_BATCH = 8  # the batches it was checked and timed at; larger ones run XLA's add and norm
