"""The Pallas kernels compiled for the GPU against the float64 oracle, at the model table's shapes: every (d, d_ff)
for the sparse FFN, the compaction and the down product (`gemv_t`), the decode products for the GEMV, the dense
FFN's one-pass gate and up at the tiles a decode A/B tries, every width for the fused add + RMSNorm;
bf16 and f16, candidate counts 0, 1, all and not a multiple of any block size, batch 1 and 3, relu / FATReLU /
dReLU, outputs started as NaN; the Mosaic GPU GEMV (`gemv_mgpu`) at the products its table sends it. Then one
decode step of a LLaMA2-7B-shaped model through the Pallas engine (either table) against the XLA engine.
Weights are drawn and the float64 oracles computed on the GPU (tests/kernel_checks.py), so the host's work is
the compiling. These run where JAX has a GPU: `bash scripts/bench/device_session.sh` runs them on
8 workers sharing the GPU, then the decode benchmark (`python -m pytest tests/test_kernels_gpu.py -k quick`: one
shape per family); the CPU runs the same kernels interpreted in test_kernels.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from kernel_checks import (TOLERANCE, check_add_rmsnorm, check_compact, check_decode_attention, check_gate_up,
                           check_gemv, check_gemv_mgpu, check_gemv_t, check_sparse_ffn, random_weights)
from pallas_kernels import sparse_ffn as sf
from pallas_kernels import tuning
from pallas_kernels.numerics import Activation

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a GPU: the CPU runs these kernels interpreted (test_kernels.py)")

QUICK = [(4096, 11008), (256, 1024)]
SHAPES = QUICK + [(5120, 13824), (4096, 14336), (3584, 18944), (1536, 3840)]
# each variant at its defaults and as the tuning table runs it
CONFIGS = ({f"{v}-default": sf.SparseFFNConfig(v) for v in sf.VARIANTS}
           | {row.config.variant: row.config for row in tuning.SPARSE_FFN})
GEMV_SHAPES = [(12288, 4096), (4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096), (256, 4096),
               (11008, 256), (152064, 3584)]


def _ids(shapes):
    return [f"{'quick-' if s in QUICK else ''}{s[0]}x{s[1]}" for s in shapes]


@pytest.mark.parametrize("d,d_ff", SHAPES, ids=_ids(SHAPES))
@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_sparse_ffn(d, d_ff, variant, rng):
    for dtype in (jnp.bfloat16, jnp.float16):
        weights = random_weights(rng, d, d_ff, dtype)
        for count in (0, 1, d_ff, d_ff // 7 + 3, int(0.12 * d_ff) + 1):
            for batch, act in ((1, Activation("fatrelu", 0.5)), (3, Activation("relu")), (1, Activation("drelu"))):
                if dtype == jnp.float16 and batch == 3:
                    continue
                r = check_sparse_ffn(d, d_ff, dtype, count, rng=rng, batch=batch, act=act, cfg=CONFIGS[variant],
                                     interpret=False, weights=weights)
                assert r.ok, r


@pytest.mark.parametrize("d,d_ff", [(4096, 11008), (3584, 18944), (256, 1024)],
                         ids=["quick-4096x11008", "3584x18944", "quick-256x1024"])
def test_sparse_ffn_batches(d, d_ff, rng):
    """The batch kernels (mma) at every decode batch size the engine runs them for, bf16 and f32 (f32 products
    at full precision), the union at about a third and at all of d_ff."""
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        weights = random_weights(rng, d, d_ff, dtype)
        for batch in (2, 4, 8, 16):
            for count in (d_ff // 3 + 5, d_ff):
                r = check_sparse_ffn(d, d_ff, dtype, count, rng=rng, batch=batch, act=Activation("fatrelu", 0.1),
                                     cfg=CONFIGS["mma"], interpret=False, weights=weights)
                assert r.ok, r


@pytest.mark.parametrize("d_ff", [s[1] for s in SHAPES], ids=_ids(SHAPES))
def test_compaction(d_ff, rng):
    for count in (0, 1, d_ff, d_ff // 7 + 3, int(0.17 * d_ff)):
        for batch, with_bias in ((1, False), (3, False), (1, True), (3, True), (16, True)):
            r = check_compact(d_ff, count, rng=rng, batch=batch, interpret=False, with_bias=with_bias)
            assert r.ok, r


@pytest.mark.parametrize("n,k", GEMV_SHAPES, ids=[f"{'quick-' if i < 2 else ''}{n}x{k}"
                                                  for i, (n, k) in enumerate(GEMV_SHAPES)])
def test_gemv(n, k, rng):
    """Each shape at the tile the engine gives it (`tuning.gemv_tile_for`)."""
    tile = dataclasses.asdict(tuning.gemv_tile_for(n, k, tuning.GEMV_TILE, tuning.GEMV_SHAPE_TILES))
    tile.pop("source")
    for dtype in (jnp.bfloat16, jnp.float16):
        for batch in (1, 4):
            for kernel in ("plain", "norm"):
                for out_dtype in (jnp.float32, dtype):
                    r = check_gemv(n, k, dtype, rng=rng, batch=batch, interpret=False, kernel=kernel,
                                   out_dtype=out_dtype, **tile)
                    assert r.ok, r


@pytest.mark.parametrize("d,d_ff", SHAPES, ids=_ids(SHAPES))
def test_gemv_t(d, d_ff, rng):
    """The dense FFN's down product h [B, d_ff] @ W_down_t [d_ff, d] at the tuned tile."""
    tile = dataclasses.asdict(tuning.GEMV_T_TILE)
    tile.pop("source")
    for dtype in (jnp.bfloat16, jnp.float16):
        for batch in (1, 4):
            for out_dtype in (jnp.float32, dtype):
                r = check_gemv_t(d_ff, d, dtype, rng=rng, batch=batch, interpret=False, out_dtype=out_dtype, **tile)
                assert r.ok, r


@pytest.mark.parametrize("n,k,transposed", [(12288, 4096, False), (4096, 4096, False), (4096, 11008, True),
                                            (3584, 18944, True), (11008, 4096, False), (256, 4096, False)],
                         ids=["quick-12288x4096", "4096x4096", "quick-down-4096x11008", "down-3584x18944",
                              "11008x4096", "256x4096"])
def test_gemv_mgpu(n, k, transposed, rng):
    """The Mosaic GPU GEMV (TMA pipeline + wgmma) at the engine's tile, with x padded by XLA instead of TMA's
    zero fill, and at a second tile, on the decode products the mgpu table sends it (transposed: x @ W_down_t),
    bf16 and f16, batch 1, 3, 4 and 8 (the zero-filled rows must not reach the batch's columns)."""
    for tile in (tuning.MGPU_TILE, dataclasses.replace(tuning.MGPU_TILE, pad_x=True),
                 tuning.MgpuTile(tile_m=128, tile_k=128, stages=3, splits=2)):
        for dtype in (jnp.bfloat16, jnp.float16):
            for batch in (1, 3, 4, 8):
                r = check_gemv_mgpu(n, k, dtype, rng=rng, batch=batch, interpret=False, transposed=transposed,
                                    out_dtype=dtype if batch == 4 else jnp.float32, **tile.kernel_args())
                assert r.ok, r


GATE_UP_TILES = sorted({tuning.GemvTile(rows=r, cap=4096, num_warps=w) for r, w in ((1, 4), (2, 8), (4, 8))}
                       | ({tuning.GATE_UP_TILE} if tuning.GATE_UP_TILE else set()), key=lambda t: (t.rows, t.num_warps))


@pytest.mark.parametrize("d,d_ff", [(4096, 11008), (3584, 18944), (256, 1024)],
                         ids=["quick-4096x11008", "3584x18944", "quick-256x1024"])
def test_gate_up(d, d_ff, rng):
    """The dense FFN's gate and up in one kernel at the tiles a decode A/B tries (and the table's, once it has
    one), each activation, bf16 and f16, batch 1 and 4, f32 results and results in the weights' dtype."""
    for tile in GATE_UP_TILES:
        for dtype in (jnp.bfloat16, jnp.float16):
            for batch, act in ((1, Activation("fatrelu", 0.5)), (4, Activation("relu")), (1, Activation("drelu"))):
                r = check_gate_up(d_ff, d, dtype, act, rng=rng, batch=batch, interpret=False,
                                  out_dtype=dtype if batch == 1 else jnp.float32, rows=tile.rows, cap=tile.cap,
                                  num_warps=tile.num_warps)
                assert r.ok, (tile, r)


@pytest.mark.parametrize("d", sorted({s[0] for s in SHAPES}), ids=lambda d: f"quick-{d}" if d == 4096 else str(d))
def test_add_rmsnorm(d, rng):
    for n in (None, 256):
        for dtype, batch in ((jnp.bfloat16, 1), (jnp.bfloat16, 3), (jnp.float16, 1)):
            r = check_add_rmsnorm(d, n, dtype, rng=rng, batch=batch, interpret=False)
            assert r.ok, r


ATTENTION_SHAPES = {"quick-llama2-7b": (32, 32, 128, None), "mistral-7b": (32, 8, 128, 4096),
                    "qwen2-7b": (28, 4, 128, None), "bundled": (4, 2, 64, None)}


@pytest.mark.parametrize("shape", sorted(ATTENTION_SHAPES))
def test_decode_attention(shape, rng):
    """Decode attention (one query per sequence) at the table's tile and two others: MHA, GQA with a group of 4
    and of 7 (Qwen2), a sliding window, caches of 200 and 4096 slots read up to random query slots behind random
    left padding, a window shorter than the cache, bf16 and f16, batch 1 and 4."""
    heads, kv_heads, head_dim, sliding = ATTENTION_SHAPES[shape]
    for tile in (tuning.ATTENTION_TILE, tuning.AttentionTile(block=32, num_warps=4),
                 tuning.AttentionTile(block=128, num_warps=8, num_stages=2),
                 tuning.AttentionTile(block=256, num_warps=8)):
        for dtype, batch, slots, window in ((jnp.bfloat16, 1, 200, None), (jnp.bfloat16, 4, 4096, None),
                                            (jnp.float16, 4, 200, 136)):
            r = check_decode_attention(batch, heads, kv_heads, slots, head_dim, dtype, rng=rng, interpret=False,
                                       sliding_window=sliding and min(sliding, slots // 3), window=window,
                                       block=tile.block, num_warps=tile.num_warps, num_stages=tile.num_stages)
            assert r.ok, r


@pytest.mark.parametrize("projections", ["table", "mgpu"])
@pytest.mark.parametrize("sparse", [False, True], ids=["quick-dense", "quick-sparse"])
def test_decode_step_through_the_pallas_engine(sparse, projections, seed, rng):
    """Two layers of the LLaMA2-7B shape, bf16, batch 1 and 3: one decode step after a prefill, the Pallas
    engine's hidden states against the XLA engine's (bf16 tolerance), dense and sparse. ReLU, and a predictor
    whose candidates (a random fifth of d_ff) sit far from its decision boundary: in a random-weight model one
    neuron carries percents of the FFN output, so a FATReLU threshold or a score within rounding of zero, which
    the two engines may decide differently, would swamp the comparison (docs/design.md)."""
    from svdsparse_jax import kv_cache
    from svdsparse_jax.config import named_config
    from svdsparse_jax.engine import EngineConfig
    from svdsparse_jax.model import Transformer, with_engine
    from svdsparse_jax.predictors import LowRankPredictor
    from svdsparse_jax.weights import init_weights

    cfg = dataclasses.replace(named_config("llama2-7b", n_layers=2), activation="relu", act_threshold=0.0)
    model = Transformer(cfg, init_weights(cfg, jax.random.key(seed), jnp.bfloat16, std=0.02), EngineConfig())
    preds = None
    if sparse:
        preds = [LowRankPredictor(jnp.asarray(rng.standard_normal((256, cfg.d_model)) * 1e-6, jnp.bfloat16),
                                  jnp.asarray(rng.standard_normal((cfg.d_ff, 256)) * 1e-6, jnp.bfloat16),
                                  jnp.asarray(np.where(rng.random(cfg.d_ff) < 0.2, 1.0, -1.0), jnp.bfloat16))
                 for _ in range(cfg.n_layers)]
    for batch in (1, 3):
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, 9)), jnp.int32)

        @jax.jit
        def step(m, tokens, preds):
            cache = kv_cache.init_cache(cfg, jnp.zeros(batch, jnp.int32), 16, jnp.bfloat16)
            _, cache = m(tokens[:, :8], cache, jnp.int32(0))
            return m(tokens[:, 8:], cache, jnp.int32(8), preds)[0]

        want = step(model, tokens, preds)
        engine = EngineConfig.resolve("pallas", projections=projections)
        got = step(with_engine(model, engine), tokens, preds)
        assert bool(jnp.all(jnp.isfinite(got)))
        assert rel_err(np.asarray(got, np.float32), np.asarray(want, np.float32)) <= TOLERANCE["bfloat16"]
