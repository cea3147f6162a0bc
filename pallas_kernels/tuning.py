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

# Which decode products take the Pallas GEMV. Below 4096 x 4096 weights (the predictor factors) XLA measured
# faster; f32 models keep XLA's full-precision products.
PROJECTIONS = (
    ProjectionRule(
        max_batch=8, min_weights=4096 * 4096, impl="gemv",
        source="H100 2026-11-23 (docs/design.md, decode GEMVs): Pallas against XLA 4096x4096 16.8 / 19.7 us, "
               "11008x4096 36.3 / 43.8, 32000x4096 93.9 / 99.0, but 256x4096 6.0 / 3.9 and 11008x256 8.8 / 5.2; "
               "dense LLaMA2-7B decode 184.2 against 168.7 tok/s"),
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
        max_batch=8, config=SparseFFNConfig(variant="split"),
        source="H100 2026-11-23 (docs/design.md, sparse FFN kernels): best of 18 split shapes, 26.1 us per "
               "LLaMA2-7B layer; in batch-4 decode 5.82 ms a step against the stream kernel's 6.65"),
)

COMPACTION_TILE = 128  # H100 2026-11-23 (docs/design.md, compaction): tiles 64-256 within 0.6 us; 1.5 us in decode
ADD_NORM_ROWS = 4  # rows of A per program of the fused add + RMSNorm (+ A x): 3.7 us per layer in decode
ADD_NORM_WARPS = 4
