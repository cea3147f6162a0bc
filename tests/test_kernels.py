"""The Pallas kernels in interpret mode (CPU) against float64 oracles on seeded random inputs, with
NaN-started outputs; the engine's routing of each decode operation; sparse decoding through the kernels inside
the generate program."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from kernel_checks import (TOLERANCE, blocked_list_numpy, candidate_mask, check_add_rmsnorm, check_decode_attention,
                           check_gate_up, check_gemv, check_gemv_mgpu, check_gemv_t, check_sparse_ffn, f64_sparse_ffn,
                           random_weights, scores_for, sparse_ffn_error)
from pallas_kernels import compaction, reference, tuning
from pallas_kernels import sparse_ffn as sf
from pallas_kernels.common import column_chunk, column_pieces
from pallas_kernels.candidates import Candidates
from pallas_kernels.gemv import gemv_pallas
from pallas_kernels.attention import decode_attention_pallas
from pallas_kernels.gemv_mgpu import gemv_mgpu
from pallas_kernels.numerics import Activation
from svdsparse_jax import engine as eng
from svdsparse_jax import kv_cache
from svdsparse_jax.convert import load_model
from svdsparse_jax.engine import XLA, EngineConfig
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.generate import Generator
from svdsparse_jax.model import Transformer, with_engine
from svdsparse_jax.predictors import LowRankPredictor

# Small blocks, so the tiny shapes below have several of each, and counts that are multiples of none.
SMALL = {"stream": sf.SparseFFNConfig("stream", rows=8, chunk=32, programs=3),
         "mma": sf.SparseFFNConfig("mma", rows=16, chunk=32, down_rows=16, down_cols=32, splits=3)}
ACTS = [Activation("relu"), Activation("fatrelu", 0.4), Activation("drelu")]
# The kernels interpreted, with every decode product of the tiny models through the GEMV kernel (the measured
# table sends matrices under 4096 x 4096 weights to XLA).
INTERPRET = EngineConfig(backend="interpret", projections=(tuning.ProjectionRule(8, 0, "gemv"),), ffn_policy="sparse")
SPARSE_XLA = EngineConfig(ffn_policy="sparse")  # XLA, every layer of every batch sparse


@pytest.mark.parametrize("variant", sorted(SMALL))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("count", [0, 1, 200, 77])
def test_sparse_ffn_kernels_match_float64(variant, dtype, count, rng):
    for batch, act in [(1, ACTS[count % 3]), (3, ACTS[(count + 1) % 3])]:
        r = check_sparse_ffn(96, 200, dtype, count, rng=rng, batch=batch, act=act, cfg=SMALL[variant],
                             interpret=True)
        assert r.ok, r


def test_the_sparse_ffn_check_rejects_a_kernel_1e3_off(rng):
    """The check's allowance for f32's rounding (`kernel_checks.F32_ULPS`) still fails an output 1e-3 off the
    float64 oracle everywhere, on fresh f32 draws of 1 to 8 candidates (where cancellation makes it largest)."""
    for draw in range(24):
        act = ACTS[draw % 3]
        wg, wu, wd = random_weights(rng, 96, 200, jnp.float32)
        x = jnp.asarray(rng.standard_normal((1, 96), np.float32))
        cand = candidate_mask(rng, 1, 200, 1 + draw % 8)
        ref, terms = f64_sparse_ffn(x, cand, wg, wu, wd, act, terms_too=True)
        if np.linalg.norm(ref) > 0:
            assert sparse_ffn_error(ref * (1 + 1e-3), ref, terms) > TOLERANCE["float32"], draw


@pytest.mark.parametrize("d", [256, 1536, 3584, 4096, 5120])
def test_sparse_ffn_tuned_configs(d, rng):
    """The tuned configurations at every width of the model table, whose rows the kernels read in column pieces
    of at most 2048 (bundled 256; 1536: 1024 + 512; Qwen2-7B 3584: 2048 + 1024 + 512; LLaMA2-7B 4096;
    LLaMA2-13B 5120: 2048 + 2048 + 1024): stream for one sequence, mma for batches up to 16; each checked on the
    kernels at d_ff = 512."""
    engine = EngineConfig(backend="interpret")
    assert engine.sparse_ffn_config(1).variant == "stream"
    assert engine.sparse_ffn_config(4).variant == engine.sparse_ffn_config(16).variant == "mma"
    assert engine.sparse_ffn_config(17) is None and XLA.sparse_ffn_config(1) is None
    for batch in (1, 4):
        for count in (0, 1, 512, 131):
            r = check_sparse_ffn(d, 512, jnp.bfloat16, count, rng=rng, batch=batch, act=Activation("fatrelu", 0.3),
                                 cfg=engine.sparse_ffn_config(batch), interpret=True)
            assert r.ok, r


@pytest.mark.parametrize("variant", sorted(SMALL))
def test_sparse_ffn_f16(variant, rng):
    for batch in (1, 3):
        r = check_sparse_ffn(96, 200, jnp.float16, 33, rng=rng, batch=batch, act=Activation("relu"),
                             cfg=SMALL[variant], interpret=True)
        assert r.ok, r


@pytest.mark.parametrize("n,k", [(200, 96), (64, 256), (24, 48)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_gemv_kernel_matches_float64(n, k, dtype, rng):
    """The GEMV kernel, plain and with RMSNorm inside (k = 96 and 48 go in column pieces 64 + 32 and 32 + 16),
    with f32 results and results in the weights' dtype."""
    for batch in (1, 3):
        for kernel in ("plain", "norm"):
            for out_dtype in (jnp.float32, dtype):
                r = check_gemv(n, k, dtype, rng=rng, batch=batch, interpret=True, kernel=kernel,
                               out_dtype=out_dtype, rows=8, cap=64)
                assert r.ok, r


@pytest.mark.parametrize("act", [Activation("relu"), Activation("fatrelu", 0.4), Activation("drelu")],
                         ids=lambda a: a.kind)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_gate_up_kernel_matches_float64(act, dtype, rng):
    """The one-pass gate and up kernel: act(x W_gate^T) * up(x W_up^T) against the float64 rule, k = 96 in column
    pieces 64 + 32, one and two rows per program, f32 results and results in the weights' dtype."""
    for batch in (1, 3):
        for rows in (1, 2, 8):
            for out_dtype in (jnp.float32, dtype):
                r = check_gate_up(200, 96, dtype, act, rng=rng, batch=batch, interpret=True, out_dtype=out_dtype,
                                  rows=rows, cap=64)
                assert r.ok, r


@pytest.mark.parametrize("rows,num_warps", [(1, 8), (2, 4)])
def test_gemv_kernel_at_the_shape_tiles_rows(rows, num_warps, rng):
    """The row counts of `tuning.GEMV_SHAPE_TILES` (one and two rows per program) against float64."""
    for kernel in ("plain", "norm"):
        for batch in (1, 3):
            r = check_gemv(24, 96, jnp.bfloat16, rng=rng, batch=batch, interpret=True, kernel=kernel,
                           out_dtype=jnp.float32, rows=rows, cap=64, num_warps=num_warps)
            assert r.ok, r


def test_engine_picks_the_gemv_tile_by_shape(rng):
    """A weight shape with a row in the shape table takes its tile; every other shape the default; the engine
    stays hashable (it is a jit static argument)."""
    special = tuning.GemvTile(rows=1, cap=64, num_warps=8)
    engine = EngineConfig(backend="interpret", gemv_shape_tiles=(tuning.GemvShapeTile(24, 96, special),))
    assert engine.gemv_tile_for(24, 96) == special
    assert engine.gemv_tile_for(96, 24) == engine.gemv_tile == tuning.GEMV_TILE
    assert hash(engine) != hash(EngineConfig(backend="interpret", gemv_shape_tiles=()))
    for row in tuning.GEMV_SHAPE_TILES:  # the measured table: each shape once
        assert EngineConfig().gemv_tile_for(row.n, row.k) == row.tile
    assert len({(r.n, r.k) for r in tuning.GEMV_SHAPE_TILES}) == len(tuning.GEMV_SHAPE_TILES)
    x = jnp.asarray(rng.standard_normal((2, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((24, 96)), jnp.bfloat16)
    engine = dataclasses.replace(engine, projections=(tuning.ProjectionRule(8, 0, "gemv"),))
    y = eng.project(engine, x, w)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    assert rel_err(np.asarray(y, np.float64), ref) < TOLERANCE["bfloat16"]


@pytest.mark.parametrize("k,n,rows,cols,splits", [(96, 48, 16, 16, 4), (200, 64, 8, 32, 3), (64, 32, 64, 32, 8)])
def test_gemv_t_kernel_matches_float64(k, n, rows, cols, splits, rng):
    """x @ w_t for w_t [k, n] stored input-major: row blocks shared unevenly among the splits (6 blocks in 4, 25
    in 3), a single block (splits cut to 1), f32 and bf16 results, one and three sequences."""
    for dtype in (jnp.bfloat16, jnp.float32):
        for batch in (1, 3):
            for out_dtype in (jnp.float32, dtype):
                r = check_gemv_t(k, n, dtype, rng=rng, batch=batch, interpret=True, out_dtype=out_dtype, rows=rows,
                                 cols=cols, splits=splits)
                assert r.ok, r


@pytest.mark.parametrize("n,k,tile", [(256, 512, tuning.MgpuTile()), (48, 96, tuning.MgpuTile(16, 16, 2, 3)),
                                       (64, 32, tuning.MgpuTile(64, 32, 2, 1))],
                         ids=["default-tile", "three-splits", "one-tile"])
@pytest.mark.parametrize("transposed", [False, True], ids=["w", "w_t"])
def test_gemv_mgpu_kernel_matches_float64(n, k, tile, transposed, rng):
    """The Mosaic GPU GEMV's grid, tiles and partial sums (interpreted, partial sums started as NaN): x @ w^T and
    x @ w_t, several pipelined tiles per program in two and three pieces of k and a single tile, bf16 and f16,
    one, three and eight sequences (the padded batch full), f32 results and results in the weights' dtype."""
    for dtype in (jnp.bfloat16, jnp.float16):
        for batch in (1, 3, 8):
            for out_dtype in (jnp.float32, dtype):
                r = check_gemv_mgpu(n, k, dtype, rng=rng, batch=batch, interpret=True, transposed=transposed,
                                    out_dtype=out_dtype, **tile.kernel_args())
                assert r.ok, r


@pytest.mark.parametrize("heads,kv_heads,head_dim,sliding,dtype,block", [
    (4, 4, 32, None, jnp.bfloat16, 16), (6, 2, 16, 7, jnp.float32, 16), (12, 4, 32, None, jnp.float16, 32),
    (7, 1, 16, None, jnp.float32, 64)], ids=["mha-bf16", "gqa3-sliding-f32", "gqa3-f16", "gqa7-f32"])
def test_decode_attention_matches_float64(heads, kv_heads, head_dim, sliding, dtype, block, rng):
    """Decode attention interpreted against float64 softmax attention with the model's mask: group sizes 1, 3 and
    7, a sliding window, random left padding and query slots, caches longer than the window read, blocks that do
    and do not divide the slots."""
    for batch, slots, window in ((1, 40, None), (3, 50, 37)):
        r = check_decode_attention(batch, heads, kv_heads, slots, head_dim, dtype, rng=rng, interpret=True,
                                   sliding_window=sliding, window=window, block=block)
        assert r.ok, r


def test_decode_attention_refuses_what_does_not_fit():
    q, cache = jnp.zeros((1, 4, 24), jnp.float32), jnp.zeros((1, 2, 32, 24), jnp.float32)
    with pytest.raises(ValueError, match="decode_attention: q"):
        decode_attention_pallas(q, cache, cache, jnp.zeros((1, 32)), jnp.ones(1, jnp.int32), interpret=True)
    q, cache = jnp.zeros((1, 3, 16), jnp.float32), jnp.zeros((1, 2, 32, 16), jnp.float32)
    with pytest.raises(ValueError, match="decode_attention: q"):
        decode_attention_pallas(q, cache, cache, jnp.zeros((1, 32)), jnp.ones(1, jnp.int32), interpret=True)


def test_gemv_mgpu_lowers_for_cuda_and_refuses_what_does_not_fit():
    """The GPU program itself (TMA pipeline, swizzled SMEM tiles, wgmma) lowers for CUDA on this CPU at the
    engine's tile for q/k/v and for the transposed down product, so a broken kernel body fails here, not first on
    a GPU; shapes off the tile and more than 8 sequences are refused with the shapes named."""
    x = jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16)
    for w, transposed in (((12288, 4096), False), ((4096, 12288), True)):
        lowered = jax.jit(gemv_mgpu, static_argnames=("transposed",)).trace(
            x, jax.ShapeDtypeStruct(w, jnp.bfloat16), transposed=transposed).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()
    w = jnp.zeros((256, 512), jnp.bfloat16)
    for bad_x, bad_w in ((jnp.zeros((9, 512), jnp.bfloat16), w), (jnp.zeros((1, 512), jnp.bfloat16), w[:200]),
                         (jnp.zeros((1, 384), jnp.bfloat16), w[:, :384]), (jnp.zeros((1, 500), jnp.bfloat16), w)):
        with pytest.raises(ValueError, match="gemv_mgpu: x"):
            gemv_mgpu(bad_x, bad_w, interpret=True)


def test_gemv_out_dtype_is_the_f32_result_rounded(rng):
    """Asked for bf16, the kernel writes exactly its f32 result rounded (what `.astype` after it would give)."""
    w = jnp.asarray(rng.standard_normal((64, 96)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((2, 96)), jnp.bfloat16)
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(96), jnp.bfloat16)
    for s in (None, scale):
        wide = gemv_pallas(x, w, s, 1e-5, interpret=True, rows=8, cap=64)
        narrow = gemv_pallas(x, w, s, 1e-5, out_dtype=jnp.dtype(jnp.bfloat16), interpret=True, rows=8, cap=64)
        assert narrow.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(narrow, np.float32), np.asarray(wide.astype(jnp.bfloat16), np.float32))


def test_projection_table_routes_each_product():
    """The engine's table decides per batch, size and dtype; no kernel without a kernel backend."""
    pallas = EngineConfig(backend="pallas", platform="gpu")
    big, small = jnp.zeros((4096, 4096), jnp.bfloat16), jnp.zeros((256, 4096), jnp.bfloat16)
    assert pallas.projection_impl(1, big) == "gemv"  # one sequence: the Pallas GEMV measured faster
    assert pallas.projection_impl(2, big) == pallas.projection_impl(8, big) == "xla"  # batches: XLA did
    assert pallas.projection_impl(1, small) == "xla"  # the predictor factors: XLA measured faster
    assert pallas.projection_impl(1, big.astype(jnp.float32)) == "xla"  # f32 keeps full-precision products
    assert XLA.projection_impl(1, big) == "xla"
    only_xla = EngineConfig.resolve("interpret", projections="xla")
    assert only_xla.projection_impl(1, big) == "xla" and only_xla.backend == "interpret"
    mgpu = dataclasses.replace(pallas, projections=eng.PROJECTION_TABLES["mgpu"])
    assert mgpu.projection_impl(1, big) == "mgpu" and mgpu.mgpu_fits(4096, 4096, 1)
    assert mgpu.projection_impl(2, big) == mgpu.projection_impl(1, small) == "xla"
    assert not mgpu.mgpu_fits(4096, 4000, 1) and not mgpu.mgpu_fits(4096, 4096, 9)


def test_engine_resolution_and_refusals():
    assert EngineConfig.resolve().backend == "xla"  # auto on the CPU
    assert EngineConfig.resolve("interpret").interpret
    with pytest.raises(SvdsparseError, match="needs a GPU"):
        EngineConfig.resolve("pallas")
    with pytest.raises(SvdsparseError, match="backend 'fast'"):
        EngineConfig.resolve("fast")
    with pytest.raises(SvdsparseError, match="projections"):
        EngineConfig.resolve(projections="cublas")
    with pytest.raises(SvdsparseError, match="steps_per_check"):
        EngineConfig(steps_per_check=0)
    assert eng.from_environment("interpret").backend == "interpret"
    assert hash(INTERPRET) != hash(XLA) and INTERPRET == EngineConfig(**vars(INTERPRET))


def test_interpreted_decode_projections_match_xla(llama_checkpoint, rng):
    """The decode projections through the GEMV kernels (interpreted; q/k/v with the attention norm inside) give
    XLA's hidden states, bf16, within the bf16 tolerance, for a 4-token step of two sequences and the next
    1-token step; so does the engine that runs the dense FFN's gate and up as one kernel (`gate_up_tile`), and the
    one that sends the 1-token step's products to the Mosaic GPU GEMV (at a tile that fits these widths; the
    4-token step is past its table's batch); the programs really differ."""
    lm = load_model(llama_checkpoint.path, jnp.bfloat16)
    tokens = jnp.asarray(rng.integers(0, lm.cfg.vocab_size, (2, 5)), jnp.int32)

    def two_steps(model):
        cache = kv_cache.init_cache(lm.cfg, jnp.zeros(2, jnp.int32), 8, jnp.bfloat16)
        first, cache = model(tokens[:, :4], cache, jnp.int32(0))
        return first, model(tokens[:, 4:], cache, jnp.int32(4))[0]

    outputs, texts = [], []
    two_gemvs = dataclasses.replace(INTERPRET, gate_up_tile=None)
    one_pass = dataclasses.replace(INTERPRET, gate_up_tile=tuning.GemvTile(rows=2, cap=4096, num_warps=8))
    mgpu = dataclasses.replace(one_pass, projections=(tuning.ProjectionRule(2, 0, "mgpu"),),
                               mgpu_tile=tuning.MgpuTile(tile_m=16, tile_k=16, stages=2, splits=2))
    engines = (XLA, two_gemvs, one_pass, mgpu)  # one_pass: the dense FFN's gate and up in one kernel
    for engine in engines:
        model = Transformer(lm.cfg, lm.weights, engine)
        outputs.append([np.asarray(h, np.float32) for h in jax.jit(two_steps)(model)])
        texts.append(jax.jit(two_steps).lower(model).as_text())
    assert len(set(texts)) == 4 and "pallas" not in texts[0]
    kernels = [str(jax.make_jaxpr(two_steps)(Transformer(lm.cfg, lm.weights, e))) for e in engines[1:]]
    assert "name=gate_up_pallas" not in kernels[0] and "name=gate_up_pallas" in kernels[1]
    # q/k/v, o and down (transposed) of every layer through the Mosaic GPU GEMV; gate and up still in one pass
    assert kernels[2].count("name=gemv_mgpu") == 3 * lm.cfg.n_layers and "name=gemv_mgpu" not in kernels[1]
    assert "name=gemv_pallas" in kernels[0] and "name=gemv_pallas" not in kernels[2]
    assert "name=gate_up_pallas" in kernels[2]
    for kernel_outputs in outputs[1:]:  # the checks' measure and bf16 tolerance (seen: about 5e-3)
        for a, b in zip(outputs[0], kernel_outputs):
            assert rel_err(a, b) <= TOLERANCE["bfloat16"]


@pytest.mark.parametrize("k", [4096, 3584, 5120, 1536, 96, 16])
def test_column_pieces_tile_the_row(k):
    pieces = column_pieces(k, 2048)
    assert [p.start for p in pieces] == list(np.cumsum([0] + [p.size for p in pieces[:-1]]))
    assert sum(p.size for p in pieces) == k
    for p in pieces:  # powers of two, at most the cap, each aligned to its size, largest first
        assert p.size & (p.size - 1) == 0 and 16 <= p.size <= 2048 and p.start % p.size == 0
    assert [p.size for p in pieces] == sorted((p.size for p in pieces), reverse=True)


def test_guarded_ffn_equals_reference_in_every_backend(rng):
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)
    w = [jnp.asarray(rng.standard_normal((160, 64)) / 8, jnp.float32) for _ in range(3)]
    mask = jnp.asarray(rng.random((2, 160)) < 0.3)
    act = Activation("relu")
    ref = eng.guarded_ffn(XLA, x, Candidates(mask=mask), *w, act)
    got = eng.guarded_ffn(INTERPRET, x, Candidates(mask=mask), *w, act)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    scores, bias = scores_for(rng, np.asarray(mask))  # scores + bias > 0 is exactly the mask
    got = eng.guarded_ffn(INTERPRET, x, Candidates(scores=jnp.asarray(scores), bias=jnp.asarray(bias)), *w, act)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        column_chunk(100, 1024, "w")
    with pytest.raises(ValueError, match="variant"):
        sf.SparseFFNConfig(variant="atomic")
    with pytest.raises(ValueError, match="either a mask"):
        Candidates()
    x, w = jnp.zeros((1, 64)), jnp.zeros((32, 64))
    with pytest.raises(ValueError, match="w_up"):
        sf.sparse_ffn_indexed(x, jnp.zeros(32, jnp.int32), jnp.ones(1, jnp.int32), w, jnp.zeros((32, 48)), w,
                              act=Activation(), cfg=SMALL["stream"], interpret=True)
    with pytest.raises(SvdsparseError, match="silu"):
        eng.guarded_ffn(INTERPRET, x, Candidates(mask=jnp.ones((1, 32), bool)), w, w, w, Activation("silu"))


def _predictor(cfg, rng, all_active: bool):
    r = 8
    a = jnp.asarray(rng.standard_normal((r, cfg.d_model)) / np.sqrt(cfg.d_model), jnp.float32)
    b = jnp.asarray(rng.standard_normal((cfg.d_ff, r)), jnp.float32)
    bias = jnp.full(cfg.d_ff, 1e4 if all_active else 0.0, jnp.float32)
    return LowRankPredictor(a, b, bias)


def test_sparse_decoding_through_the_kernels(llama_checkpoint, rng):
    """The generate program with the kernels (interpret mode) gives the dense tokens under an all-active
    predictor, and the XLA-guarded tokens under a real partial one."""
    lm = load_model(llama_checkpoint.path, jnp.float32)
    cfg, model = lm.cfg, Transformer(lm.cfg, lm.weights, SPARSE_XLA)
    kernels = with_engine(model, INTERPRET)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (4, 9)]
    dense = Generator(model).generate(prompts, 12).tokens
    everything = [_predictor(cfg, rng, True) for _ in range(cfg.n_layers)]
    partial = [_predictor(cfg, rng, False) for _ in range(cfg.n_layers)]
    guarded_xla = Generator(model, partial).generate(prompts, 12).tokens
    assert Generator(kernels, everything).generate(prompts, 12).tokens == dense
    assert Generator(kernels, partial).generate(prompts, 12).tokens == guarded_xla
    assert guarded_xla != dense  # the partial predictor really drops neurons


def test_generate_programs_key_on_the_engine(llama_checkpoint, rng):
    """Two engines give two programs (the engine is part of the model's static graph); an equal engine, the
    same program."""
    lm = load_model(llama_checkpoint.path, jnp.float32)
    model = Transformer(lm.cfg, lm.weights, XLA)
    preds = [_predictor(lm.cfg, rng, True)] * lm.cfg.n_layers
    texts = []
    for engine in (XLA, INTERPRET, EngineConfig()):
        gen = Generator(with_engine(model, engine), preds)
        gen.generate([[1, 2]], 2)
        texts.append(next(iter(gen.compiled.values())).as_text())
    assert texts[0] != texts[1] and texts[0] == texts[2]


def test_kernels_jit_without_recompiling_per_count(rng):
    """The count is data: a new candidate set reuses the compiled kernels."""
    w = [jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16) for _ in range(3)]
    x = jnp.asarray(rng.standard_normal((1, 32)), jnp.bfloat16)
    f = jax.jit(lambda x, m: eng.guarded_ffn(INTERPRET, x, Candidates(mask=m), *w, Activation("relu")))
    for p in (0.1, 0.5):
        f(x, jnp.asarray(rng.random((1, 64)) < p))
    assert f._cache_size() == 1


@pytest.mark.parametrize("d_ff", [1, 200, 1000])
@pytest.mark.parametrize("impl", ["xla", "interpret", "interpret, tiles of 16", "xla, scores", "interpret, scores"])
def test_compact_lists_each_tile_in_order(d_ff, impl, rng):
    """XLA's compaction and the Pallas programs (interpreted) against a NumPy-loop blocked list, and the flat
    list they give against NumPy's flatnonzero of the union; given scores and a bias, of scores + bias > 0."""
    tile = 16 if impl.endswith("16") else compaction.TILE
    for p in (0.0, 0.05, 0.5, 1.0):
        for batch in (1, 3):
            m = rng.random((batch, d_ff)) < p
            if impl.endswith("scores"):
                scores, bias = scores_for(rng, m)
                candidates = Candidates(scores=jnp.asarray(scores), bias=jnp.asarray(bias))
            else:
                candidates = Candidates(mask=jnp.asarray(m))
            if impl.startswith("xla"):
                tiles, counts, own = reference.compact(candidates, tile)
            else:
                tiles, counts, own = compaction.compact_pallas(candidates, tile=tile, interpret=True)
            want_tiles, want_counts, want_own = blocked_list_numpy(m, tile)
            np.testing.assert_array_equal(np.asarray(tiles), want_tiles)
            np.testing.assert_array_equal(np.asarray(counts), want_counts)
            assert (own is None) == (batch == 1)
            if batch > 1:
                np.testing.assert_array_equal(np.asarray(own), want_own)
            t, c = np.asarray(tiles), np.asarray(counts)
            listed = np.concatenate([t[i * tile: i * tile + n] for i, n in enumerate(c)])  # list order
            np.testing.assert_array_equal(listed, np.flatnonzero(m.any(0)))


def test_slots_locate_every_list_position(rng):
    """compaction.slots (the kernels' lookup) against the flat list, with empty tiles in between."""
    m = rng.random((1, 1000)) < 0.05
    m[0, 300:700] = False  # several empty tiles in a row
    tiles, counts, _ = reference.compact(Candidates(mask=jnp.asarray(m)), 16)
    before, total = compaction.locate(counts)
    k = jnp.arange(int(total), dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(tiles)[np.asarray(compaction.slots(before, k, 16))],
                                  np.flatnonzero(m[0]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("d,n", [(96, 24), (256, 8), (112, None)])
def test_add_rmsnorm_matches_float64(dtype, d, n, rng):
    """The fused residual add + RMSNorm (+ w @ normed) kernel, interpreted, against float64 NumPy on seeded random
    inputs with NaN-started outputs (d = 96 and 112 go in column pieces 64 + 32 and 64 + 32 + 16); the routed
    function equals XLA's version."""
    for batch in (1, 3):
        r = check_add_rmsnorm(d, n, dtype, rng=rng, batch=batch, interpret=True)
        assert r.ok, r
    x, delta = (jnp.asarray(rng.standard_normal((2, 1, d)), dtype) for _ in range(2))
    scale = jnp.asarray(rng.uniform(0.5, 1.5, d), dtype)
    w = None if n is None else jnp.asarray(rng.standard_normal((n, d)), dtype)
    got = eng.add_rmsnorm(INTERPRET, x, delta, scale, 1e-5, w)
    want = reference.add_rmsnorm(x, delta, scale, 1e-5, w)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))  # the sum rounds the same way
    for g, e in zip(got[1:], want[1:]):
        if e is None:
            assert g is None
        else:  # the mean's sum order differs: the last place of the dtype may too
            tol = TOLERANCE[jnp.dtype(dtype).name]
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="scale"):
        eng.add_rmsnorm(INTERPRET, x, delta, scale[:-1], 1e-5)
