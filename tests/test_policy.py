"""Batched sparse decode and the sparsity policy: each sequence of a batch gets exactly the tokens it gets alone
(its own candidates only, over the batch's union of rows); all-active predictors give the dense tokens; the
policy's per-layer choice from union fractions and measured costs, and the layers it runs dense really run
dense; the union fractions calibration measures and stores."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import tuning
from pallas_kernels.tuning import FFNCost, ProjectionRule
from svdsparse_jax.convert import load_model
from svdsparse_jax.engine import EngineConfig
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.generate import Generator
from svdsparse_jax.model import Transformer, with_engine
from svdsparse_jax.policy import BATCH_SIZES, UnionRows, measure_union, sparse_layers
from svdsparse_jax.predictors import LowRankPredictor, load_predictors, save_predictors
from svdsparse_jax.predictors.build import PredictorSet

SPARSE = EngineConfig(ffn_policy="sparse")  # XLA, every layer of every batch sparse


def _model(ckpt, engine=SPARSE):
    lm = load_model(ckpt.path, jnp.float32)
    return lm.cfg, Transformer(lm.cfg, lm.weights, engine)


def _predictor(cfg, rng, bias: float | None = None) -> LowRankPredictor:
    """A rank-8 random predictor (about half the neurons candidates for a token), or with `bias` one whose
    scores are negligible next to that bias (+1e4: every neuron; -1e4: none)."""
    a = jnp.asarray(rng.standard_normal((8, cfg.d_model)) / np.sqrt(cfg.d_model), jnp.float32)
    b = jnp.asarray(rng.standard_normal((cfg.d_ff, 8)), jnp.float32)
    return LowRankPredictor(a, b, jnp.full(cfg.d_ff, 0.0 if bias is None else bias, jnp.float32))


def _prompts(rng, cfg, batch: int) -> list[list[int]]:
    return [rng.integers(0, cfg.vocab_size, n).tolist() for n in rng.integers(2, 21, batch)]


@pytest.mark.parametrize("batch", [2, 3, 4, 8, 16])
def test_batched_sparse_decode_equals_each_sequence_alone(llama_checkpoint, rng, batch):
    """f32, every layer sparse: prompts of different lengths decoded together give each sequence the tokens it
    gets alone, also when they stop at EOS at different steps; the predictors really change the tokens."""
    cfg, model = _model(llama_checkpoint)
    gen = Generator(model, [_predictor(cfg, rng) for _ in range(cfg.n_layers)])
    prompts = _prompts(rng, cfg, batch)
    alone = [gen.generate([p], 24, eos_ids=()).tokens[0] for p in prompts]
    assert gen.generate(prompts, 24, eos_ids=()).tokens == alone
    eos = alone[0][6]  # the first sequence stops after 7 tokens, the others where (if) they produce it
    want = [t[:t.index(eos) + 1] if eos in t else t for t in alone]
    assert gen.generate(prompts, 24, eos_ids=[eos]).tokens == want
    assert len({len(t) for t in want}) > 1 or batch == 2  # stops at different steps
    assert Generator(model).generate(prompts, 24, eos_ids=()).tokens != alone  # the predictors matter


def test_batched_kernels_equal_each_sequence_alone(llama_checkpoint, rng):
    """Through the kernels (interpreted): a batch of 3 (the mma kernels over the union) gives each sequence
    the tokens of the one-sequence kernels (stream)."""
    engine = EngineConfig(backend="interpret", ffn_policy="sparse", projections=(ProjectionRule(16, 0, "gemv"),))
    cfg, model = _model(llama_checkpoint, engine)
    assert engine.sparse_ffn_config(3).variant == "mma" and engine.sparse_ffn_config(1).variant == "stream"
    gen = Generator(model, [_predictor(cfg, rng) for _ in range(cfg.n_layers)])
    prompts = _prompts(rng, cfg, 3)
    alone = [gen.generate([p], 6, eos_ids=()).tokens[0] for p in prompts]
    assert gen.generate(prompts, 6, eos_ids=()).tokens == alone


@pytest.mark.parametrize("batch", [4, 16])
def test_all_active_predictors_give_the_dense_tokens(llama_checkpoint, rng, batch):
    cfg, model = _model(llama_checkpoint)
    prompts = _prompts(rng, cfg, batch)
    everything = [_predictor(cfg, rng, 1e4) for _ in range(cfg.n_layers)]
    assert Generator(model, everything).generate(prompts, 16).tokens == Generator(model).generate(prompts, 16).tokens


def test_sparse_layers_compares_measured_costs(rng):
    """The measured policy against the cost model written out in float64: per layer, sparse iff fixed +
    (union W_gate rows + 2 x union W_up / W_down rows + predictor bytes) / sparse rate < (1 - margin) x 3 d_ff d
    / dense rate, with the row fractions of the smallest measured batch size >= the batch (none above the
    largest), for no margin, the default one and a large one."""
    from svdsparse_jax.config import named_config
    cfg = named_config("tiny")
    n = cfg.n_layers
    preds = [_predictor(cfg, rng) for _ in range(n)]
    cost = FFNCost(max_batch=8, dense_tb_s=3.0, sparse_fixed_us=0.5e-3, sparse_tb_s=2.0)
    engine = EngineConfig(ffn_costs=(cost,))
    sizes = (1, 4, 8)
    cand = [tuple(rng.uniform(0.05, 0.9, n)) for _ in sizes]
    act = [tuple(c * rng.uniform(0.3, 0.9) for c in row) for row in cand]
    cand[1], act[1] = (0.05, 0.95), (0.02, 0.9)  # at batch sizes 2-4: layer 0 cheap, layer 1 dearer than dense
    union = UnionRows(sizes, tuple(cand), tuple(act))
    for margin in (0.0, tuning.FFN_POLICY_MARGIN, 0.3):
        for batch, at in ((1, 0), (2, 1), (3, 1), (4, 1), (8, 2)):
            row = cfg.d_model * 4
            dense = 3 * cfg.d_ff * row / 3.0e12 * 1e6
            want = tuple(0.5e-3 + ((g + 2 * a) * cfg.d_ff * row + p.nbytes()) / 2.0e12 * 1e6 < (1 - margin) * dense
                         for g, a, p in zip(cand[at], act[at], preds))
            got = sparse_layers(dataclasses.replace(engine, ffn_margin=margin), cfg, preds, union, batch, 4)
            assert got == want, (margin, batch)
    # a near-tie: union fractions whose predicted cost is 2% under dense's (equal rates, no fixed cost) run
    # sparse without a margin and dense with the default one
    row = cfg.d_model * 4
    g = [(2.94 * cfg.d_ff * row - p.nbytes()) / (3 * cfg.d_ff * row) for p in preds]
    assert all(0.9 < x < 1 for x in g)
    tie = UnionRows((8,), (tuple(g),), (tuple(g),))
    even = dataclasses.replace(engine, ffn_costs=(FFNCost(8, dense_tb_s=3.0, sparse_fixed_us=0.0, sparse_tb_s=3.0),))
    assert sparse_layers(dataclasses.replace(even, ffn_margin=0.0), cfg, preds, tie, 8, 4) == (True,) * n
    assert sparse_layers(even, cfg, preds, tie, 8, 4) == (False,) * n
    with pytest.raises(SvdsparseError, match="ffn_margin"):
        EngineConfig(ffn_margin=1.0)
    assert sparse_layers(engine, cfg, preds, union, 4, 4) == (True, False)
    assert sparse_layers(engine, cfg, preds, union, 9, 4) == (False,) * n  # beyond the cost table
    assert sparse_layers(engine, cfg, preds, UnionRows((1, 2), cand[:2], act[:2]), 4, 4) == (False,) * n
    assert sparse_layers(engine, cfg, preds, None, 1, 4) == (True,) * n  # no statistics: one sequence sparse
    assert sparse_layers(engine, cfg, preds, None, 2, 4) == (False,) * n  # ... batches dense
    for policy, want in (("sparse", True), ("dense", False)):
        assert sparse_layers(dataclasses.replace(engine, ffn_policy=policy), cfg, preds, union, 4, 4) == (want,) * n
    with pytest.raises(SvdsparseError, match="ffn_policy"):
        EngineConfig(ffn_policy="sometimes")


def test_the_policy_runs_the_dense_ffn_where_it_says(llama_checkpoint, rng):
    """Layer 0 all-active, layer 1 no candidates at all: the measured policy (union fractions 0 and 1, costs
    that make a full union dearer than dense) runs layer 0 sparse and layer 1 dense, which gives the dense
    tokens; every layer sparse does not. The policy's program checks its stop condition once per group of
    steps, as the dense one does (no host round trip per token)."""
    engine = EngineConfig(ffn_costs=(FFNCost(max_batch=16, dense_tb_s=1.0, sparse_fixed_us=0.0, sparse_tb_s=1.0),))
    cfg, model = _model(llama_checkpoint, engine)
    assert cfg.n_layers == 2
    preds = [_predictor(cfg, rng, 1e4), _predictor(cfg, rng, -1e4)]
    union = UnionRows(BATCH_SIZES, ((0.0, 1.0),) * 5, ((0.0, 1.0),) * 5)
    gen = Generator(model, preds, union)
    prompts = _prompts(rng, cfg, 4)
    result = gen.generate(prompts, 16)
    assert result.sparse_layers == (True, False)
    assert result.tokens == Generator(model).generate(prompts, 16).tokens
    assert Generator(with_engine(model, SPARSE), preds).generate(prompts, 16).tokens != result.tokens
    text = next(iter(gen.compiled.values())).as_text()
    assert " conditional(" not in text
    loops = [line for line in text.splitlines() if " while(" in line]
    assert len([line for line in loops if "known_trip_count" not in line]) == 1


def test_measure_union_counts_the_rows_a_batch_reads():
    """Exact cases: tokens with one distinct neuron each (a group of B reads B rows) and identical tokens (a
    group reads one token's rows); fewer tokens than B: one group of all."""
    n = 64
    distinct = jnp.eye(n, dtype=bool)
    cand, act = measure_union(distinct, distinct & False, (1, 2, 4, 16, 128))
    assert cand == pytest.approx([1 / n, 2 / n, 4 / n, 16 / n, 1.0]) and act == [0.0] * 5
    same = jnp.tile(jnp.arange(n) % 3 == 0, (40, 1))
    cand, act = measure_union(same, same, (1, 8, 16))
    assert cand == act == pytest.approx([22 / 64] * 3)


def test_union_rows_are_stored_with_the_predictors(tmp_path, rng):
    from svdsparse_jax.config import named_config
    cfg = named_config("tiny")
    n = cfg.n_layers
    union = UnionRows(BATCH_SIZES, tuple(tuple(rng.random(n)) for _ in BATCH_SIZES),
                      tuple(tuple(rng.random(n)) for _ in BATCH_SIZES))
    pset = PredictorSet("whitened", [_predictor(cfg, rng) for _ in range(n)], {}, union=union)
    save_predictors(tmp_path / "p", pset, cfg, "w2-fp")
    assert load_predictors(tmp_path / "p", cfg, "w2-fp").union == union
    manifest = tmp_path / "p" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["union_rows"]["candidates"][0] = m["union_rows"]["candidates"][0][:-1]
    manifest.write_text(json.dumps(m))
    with pytest.raises(SvdsparseError, match=f"{manifest}: union_rows must give {n} layers"):
        load_predictors(tmp_path / "p", cfg, "w2-fp")
    del m["union_rows"]  # a set built before the unions were measured
    manifest.write_text(json.dumps(m))
    assert load_predictors(tmp_path / "p", cfg, "w2-fp").union is None


def test_top_k_candidates_are_the_batch_best_scores(llama_checkpoint, rng):
    """TopKPredictor: at every position the same k neurons for all B sequences, those with the highest score of
    any sequence (float64 NumPy on the base predictor's scores); k = d_ff decodes the dense tokens."""
    from scripts.lab import TopKPredictor
    cfg, model = _model(llama_checkpoint)
    base = _predictor(cfg, rng)
    batch, tokens, k = 3, 5, 17
    x = jnp.asarray(rng.standard_normal((batch * tokens, cfg.d_model)), jnp.float32)
    got = np.asarray(TopKPredictor(base, k, batch).candidates(x).as_mask()).reshape(batch, tokens, cfg.d_ff)
    scores = np.asarray(x, np.float64) @ np.asarray(base.a, np.float64).T @ np.asarray(base.b, np.float64).T
    best = (scores + np.asarray(base.bias, np.float64)).reshape(batch, tokens, cfg.d_ff).max(axis=0)
    for t in range(tokens):
        want = np.zeros(cfg.d_ff, bool)
        want[np.argsort(-best[t])[:k]] = True
        assert all((got[b, t] == want).all() for b in range(batch))
    with pytest.raises(ValueError, match="do not come from 4 sequences"):
        TopKPredictor(base, k, 4).candidates(x)
    prompts = _prompts(rng, cfg, 4)
    everything = [TopKPredictor(_predictor(cfg, rng), cfg.d_ff, 4) for _ in range(cfg.n_layers)]
    assert Generator(model, everything).generate(prompts, 12).tokens == Generator(model).generate(prompts, 12).tokens
