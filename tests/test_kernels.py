"""The Pallas kernels in interpret mode (CPU) against a float64 NumPy oracle on fresh random inputs, with
NaN-started outputs; the dispatch switch; sparse decoding through the kernels inside the generate program."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from pallas_kernels import compaction, dispatch, norm
from pallas_kernels import sparse_ffn as sf
from pallas_kernels.checks import (TOLERANCE, blocked_list_numpy, check_add_rmsnorm, check_gemv,
                                   check_sparse_ffn, scores_for)
from pallas_kernels.gemv import column_chunk, column_pieces, gemv_pallas
from pallas_kernels.reference import Activation
from svdsparse_jax import kv_cache
from svdsparse_jax.convert import load_model
from svdsparse_jax.generate import Generator
from svdsparse_jax.model import Transformer
from svdsparse_jax.predictors import LowRankPredictor

# Small blocks, so the tiny shapes below have several of each, and counts that are multiples of none.
SMALL = {"split": sf.SparseFFNConfig("split", rows=8, chunk=32, down_rows=16, down_cols=32, splits=3),
         "fused": sf.SparseFFNConfig("fused", rows=8, chunk=32),
         "stream": sf.SparseFFNConfig("stream", rows=8, chunk=32, programs=3)}
ACTS = [Activation("relu"), Activation("fatrelu", 0.4), Activation("drelu")]


@pytest.mark.parametrize("variant", sorted(SMALL))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("count", [0, 1, 200, 77])
def test_sparse_ffn_kernels_match_float64(variant, dtype, count):
    for batch, act in [(1, ACTS[count % 3]), (3, ACTS[(count + 1) % 3])]:
        r = check_sparse_ffn(96, 200, dtype, count, batch=batch, act=act, cfg=SMALL[variant], interpret=True)
        assert r.ok, r


@pytest.mark.parametrize("d", [256, 1536, 3584, 4096, 5120])
def test_sparse_ffn_default_config(d):
    """The default at every width of the model table, whose rows the kernels read in column pieces of at most
    2048 (bundled 256; 1536: 1024 + 512; Qwen2-7B 3584: 2048 + 1024 + 512; LLaMA2-7B 4096; LLaMA2-13B 5120:
    2048 + 2048 + 1024): stream for one sequence, split for batches; each checked on the kernels at d_ff = 512."""
    assert sf.default_config(d).variant == "stream"
    assert sf.default_config(d, batch=4).variant == "split"
    for batch in (1, 4):
        for count in (0, 1, 512, 131):
            r = check_sparse_ffn(d, 512, jnp.bfloat16, count, batch=batch, act=Activation("fatrelu", 0.3),
                                 interpret=True)
            assert r.ok, r


def test_sparse_ffn_f16():
    r = check_sparse_ffn(96, 200, jnp.float16, 33, act=Activation("relu"), cfg=SMALL["split"], interpret=True)
    assert r.ok, r


@pytest.mark.parametrize("n,k", [(200, 96), (64, 256), (24, 48)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_gemv_kernel_matches_float64(n, k, dtype):
    """The GEMV kernel, plain and with RMSNorm inside (k = 96 and 48 go in column pieces 64 + 32 and 32 + 16),
    with f32 results and results in the weights' dtype."""
    for batch in (1, 3):
        for kernel in ("plain", "norm"):
            for out_dtype in (jnp.float32, dtype):
                r = check_gemv(n, k, dtype, batch=batch, interpret=True, kernel=kernel, out_dtype=out_dtype,
                               rows=8, cap=64)
                assert r.ok, r


def test_gemv_out_dtype_is_the_f32_result_rounded():
    """Asked for bf16, the kernel writes exactly its f32 result rounded (what `.astype` after it would give)."""
    rng = np.random.default_rng()
    w = jnp.asarray(rng.standard_normal((64, 96)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((2, 96)), jnp.bfloat16)
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(96), jnp.bfloat16)
    for s in (None, scale):
        wide = gemv_pallas(x, w, s, 1e-5, interpret=True, rows=8, cap=64)
        narrow = gemv_pallas(x, w, s, 1e-5, out_dtype=jnp.dtype(jnp.bfloat16), interpret=True, rows=8, cap=64)
        assert narrow.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(narrow, np.float32), np.asarray(wide.astype(jnp.bfloat16), np.float32))


def test_dense_gemv_switch_decodes_like_xla(llama_checkpoint, monkeypatch):
    """SVDSPARSE_DENSE_GEMV=1 (the default): the decode projections through the GEMV kernels (interpreted; q/k/v
    with the attention norm inside) give XLA's hidden states, bf16, within the bf16 tolerance, for a 4-token step
    of two sequences and the next 1-token step; the Generator keeps a program per setting."""
    lm = load_model(llama_checkpoint.path, jnp.bfloat16)
    model = Transformer(lm.cfg, lm.weights)
    tokens = jnp.asarray(np.random.default_rng().integers(0, lm.cfg.vocab_size, (2, 5)), jnp.int32)

    @jax.jit  # traced anew per call: the model is a closure, the switch is read while tracing
    def steps(tokens):
        cache = kv_cache.init_cache(lm.cfg, jnp.zeros(2, jnp.int32), 8, jnp.bfloat16)
        first, cache = model(tokens[:, :4], cache, jnp.int32(0))
        return first, model(tokens[:, 4:], cache, jnp.int32(4))[0]

    def two_steps():
        steps.clear_cache()
        return [np.asarray(h, np.float32) for h in steps(tokens)]

    with dispatch.kernel_mode("interpret"):
        monkeypatch.setitem(os.environ, "SVDSPARSE_DENSE_GEMV", "0")
        off = two_steps()
        gen = Generator(model)
        gen.generate([[1, 2]], 2)
        monkeypatch.setitem(os.environ, "SVDSPARSE_DENSE_GEMV", "1")
        on = two_steps()
        gen.generate([[1, 2]], 2)
    assert [k[-1] for k in gen.compiled] == [("interpret", False), ("interpret", True)]
    assert len({c.as_text() for c in gen.compiled.values()}) == 2
    for a, b in zip(on, off):  # the checks' measure and bf16 tolerance (seen: about 5e-3, bf16 roundings)
        assert rel_err(a, b) <= TOLERANCE["bfloat16"]


@pytest.mark.parametrize("k", [4096, 3584, 5120, 1536, 96, 16])
def test_column_pieces_tile_the_row(k):
    pieces = column_pieces(k, 2048)
    assert [p.start for p in pieces] == list(np.cumsum([0] + [p.size for p in pieces[:-1]]))
    assert sum(p.size for p in pieces) == k
    for p in pieces:  # powers of two, at most the cap, each aligned to its size, largest first
        assert p.size & (p.size - 1) == 0 and 16 <= p.size <= 2048 and p.start % p.size == 0
    assert [p.size for p in pieces] == sorted((p.size for p in pieces), reverse=True)


def test_dispatch_switch(monkeypatch):
    assert dispatch.mode() == "xla"  # CPU: the reference
    with dispatch.kernel_mode("interpret"):
        assert dispatch.mode() == "interpret"
        with dispatch.kernel_mode("xla"):
            assert dispatch.mode() == "xla"
    with dispatch.kernel_mode("pallas"), pytest.raises(RuntimeError, match="needs a GPU"):
        dispatch.mode()
    monkeypatch.setitem(os.environ, "SVDSPARSE_KERNELS", "interpret")
    assert dispatch.mode() == "interpret"
    monkeypatch.setitem(os.environ, "SVDSPARSE_KERNELS", "fast")
    with pytest.raises(ValueError, match="SVDSPARSE_KERNELS"):
        dispatch.mode()


def test_dispatched_sparse_ffn_equals_reference_in_every_mode():
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)
    w = [jnp.asarray(rng.standard_normal((160, 64)) / 8, jnp.float32) for _ in range(3)]
    cand = jnp.asarray(rng.random((2, 160)) < 0.3)
    act = Activation("relu")
    with dispatch.kernel_mode("xla"):
        ref = sf.sparse_ffn(x, cand, *w, act)
    with dispatch.kernel_mode("interpret"):
        got = sf.sparse_ffn(x, cand, *w, act)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        column_chunk(100, 1024, "w")
    with pytest.raises(ValueError, match="variant"):
        sf.SparseFFNConfig(variant="atomic")
    x, w = jnp.zeros((1, 64)), jnp.zeros((32, 64))
    with pytest.raises(ValueError, match="w_up"):
        sf.sparse_ffn_indexed(x, jnp.zeros(32, jnp.int32), jnp.ones(1, jnp.int32), w, jnp.zeros((32, 48)), w,
                              act=Activation(), interpret=True)
    with dispatch.kernel_mode("interpret"), pytest.raises(ValueError, match="silu"):
        sf.sparse_ffn(x, jnp.ones((1, 32), bool), w, w, w, Activation("silu"))


def _predictor(cfg, rng, all_active: bool):
    r = 8
    a = jnp.asarray(rng.standard_normal((r, cfg.d_model)) / np.sqrt(cfg.d_model), jnp.float32)
    b = jnp.asarray(rng.standard_normal((cfg.d_ff, r)), jnp.float32)
    bias = jnp.full(cfg.d_ff, 1e4 if all_active else 0.0, jnp.float32)
    return LowRankPredictor(a, b, bias)


def test_sparse_decoding_through_the_kernels(llama_checkpoint):
    """The generate program with the kernels (interpret mode) gives the dense tokens under an all-active
    predictor, and the XLA-guarded tokens under a real partial one."""
    lm = load_model(llama_checkpoint.path, jnp.float32)
    cfg, model = lm.cfg, Transformer(lm.cfg, lm.weights)
    rng = np.random.default_rng()
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (4, 9)]
    dense = Generator(model).generate(prompts, 12).tokens
    everything = [_predictor(cfg, rng, True) for _ in range(cfg.n_layers)]
    partial = [_predictor(cfg, rng, False) for _ in range(cfg.n_layers)]
    with dispatch.kernel_mode("xla"):
        guarded_xla = Generator(model, partial).generate(prompts, 12).tokens
    with dispatch.kernel_mode("interpret"):
        assert Generator(model, everything).generate(prompts, 12).tokens == dense
        assert Generator(model, partial).generate(prompts, 12).tokens == guarded_xla
    assert guarded_xla != dense  # the partial predictor really drops neurons


def test_generator_keys_compiled_programs_by_kernel_mode(llama_checkpoint):
    lm = load_model(llama_checkpoint.path, jnp.float32)
    gen = Generator(Transformer(lm.cfg, lm.weights), [_predictor(lm.cfg, np.random.default_rng(0), True)] * 2)
    gen.generate([[1, 2]], 2)
    with dispatch.kernel_mode("interpret"):
        gen.generate([[1, 2]], 2)
    assert sorted(k[-1][0] for k in gen.compiled) == ["interpret", "xla"]
    # really two programs: JAX's trace cache does not see the mode, the program's static argument makes it
    xla_text, interpret_text = (c.as_text() for c in gen.compiled.values())
    assert xla_text != interpret_text


def test_kernels_jit_without_recompiling_per_count():
    """The count is data: a new candidate set reuses the compiled kernels."""
    rng = np.random.default_rng()
    w = [jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16) for _ in range(3)]
    x = jnp.asarray(rng.standard_normal((1, 32)), jnp.bfloat16)
    f = jax.jit(lambda x, m: sf.sparse_ffn(x, m, *w, Activation("relu"), SMALL["split"]))
    with dispatch.kernel_mode("interpret"):
        for p in (0.1, 0.5):
            f(x, jnp.asarray(rng.random((1, 64)) < p))
    assert f._cache_size() == 1


@pytest.mark.parametrize("d_ff", [1, 200, 1000])
@pytest.mark.parametrize("impl", ["xla", "interpret", "interpret, tiles of 16", "xla, scores", "interpret, scores"])
def test_compact_lists_each_tile_in_order(d_ff, impl):
    """XLA's compaction and the Pallas programs (interpreted) against a NumPy-loop blocked list, and the flat
    list they give against NumPy's flatnonzero of the union; given scores and a bias, of scores + bias > 0."""
    rng = np.random.default_rng()
    tile = 16 if impl.endswith("16") else compaction.TILE
    for p in (0.0, 0.05, 0.5, 1.0):
        for batch in (1, 3):
            m = rng.random((batch, d_ff)) < p
            args = [jnp.asarray(a) for a in scores_for(rng, m)] if impl.endswith("scores") else [jnp.asarray(m)]
            with dispatch.kernel_mode(impl.split(",")[0]):
                tiles, counts, own = compaction.compact(args[0], tile, *args[1:])
            want_tiles, want_counts, want_own = blocked_list_numpy(m, tile)
            np.testing.assert_array_equal(np.asarray(tiles), want_tiles)
            np.testing.assert_array_equal(np.asarray(counts), want_counts)
            assert (own is None) == (batch == 1)
            if batch > 1:
                np.testing.assert_array_equal(np.asarray(own), want_own)
            t, c = np.asarray(tiles), np.asarray(counts)
            listed = np.concatenate([t[i * tile: i * tile + n] for i, n in enumerate(c)])  # list order
            np.testing.assert_array_equal(listed, np.flatnonzero(m.any(0)))


def test_slots_locate_every_list_position():
    """compaction.slots (the kernels' lookup) against the flat list, with empty tiles in between."""
    rng = np.random.default_rng()
    m = rng.random((1, 1000)) < 0.05
    m[0, 300:700] = False  # several empty tiles in a row
    tiles, counts, _ = compaction.compact_reference(jnp.asarray(m), 16)
    before, total = compaction.locate(counts)
    k = jnp.arange(int(total), dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(tiles)[np.asarray(compaction.slots(before, k, 16))],
                                  np.flatnonzero(m[0]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("d,n", [(96, 24), (256, 8), (112, None)])
def test_add_rmsnorm_matches_float64(dtype, d, n):
    """The fused residual add + RMSNorm (+ w @ normed) kernel, interpreted, against float64 NumPy on fresh random
    inputs with NaN-started outputs (d = 96 and 112 go in column pieces 64 + 32 and 64 + 32 + 16); the dispatched
    function equals XLA's version."""
    for batch in (1, 3):
        r = check_add_rmsnorm(d, n, dtype, batch=batch, interpret=True)
        assert r.ok, r
    rng = np.random.default_rng()
    x, delta = (jnp.asarray(rng.standard_normal((2, 1, d)), dtype) for _ in range(2))
    scale = jnp.asarray(rng.uniform(0.5, 1.5, d), dtype)
    w = None if n is None else jnp.asarray(rng.standard_normal((n, d)), dtype)
    with dispatch.kernel_mode("interpret"):
        got = norm.add_rmsnorm(x, delta, scale, 1e-5, w)
    want = norm.add_rmsnorm_reference(x, delta, scale, 1e-5, w)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))  # the sum rounds the same way
    for g, e in zip(got[1:], want[1:]):
        if e is None:
            assert g is None
        else:  # the mean's sum order differs: the last place of the dtype may too
            tol = TOLERANCE[jnp.dtype(dtype).name]
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="scale"):
        norm.add_rmsnorm(x, delta, scale[:-1], 1e-5)
