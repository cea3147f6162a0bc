"""Generation: greedy tokens equal transformers' greedy generate; sampling is seeded; no recompilation within a
bucket; stops and errors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from svdsparse_jax.convert import load_model
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.generate import Generator, Sampler, bucket
from svdsparse_jax.model import Transformer


def _hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def _generator(ckpt, dtype=jnp.float32) -> Generator:
    lm = load_model(ckpt.path, dtype)
    return Generator(Transformer(lm.cfg, lm.weights))


def test_greedy_matches_transformers_batch_of_different_lengths(hf_checkpoint):
    gen = _generator(hf_checkpoint)
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 128, n).tolist() for n in (3, 11, 7)]
    result = gen.generate(prompts, 32, Sampler())
    for prompt, got in zip(prompts, result.tokens):
        assert got == _hf_greedy(hf_checkpoint.torch_model, prompt, 32)


def test_sampling_is_reproducible_and_seed_dependent(llama_checkpoint):
    gen = _generator(llama_checkpoint)
    sampler = Sampler(temperature=1.0, top_k=50, top_p=0.95)
    a = gen.generate([[1, 2, 3]], 24, sampler, seed=7).tokens
    b = gen.generate([[1, 2, 3]], 24, sampler, seed=7).tokens
    c = gen.generate([[1, 2, 3]], 24, sampler, seed=8).tokens
    assert a == b and a != c


def test_top_k_one_is_greedy(llama_checkpoint):
    gen = _generator(llama_checkpoint)
    greedy = gen.generate([[5, 6, 7, 8]], 16).tokens
    assert gen.generate([[5, 6, 7, 8]], 16, Sampler(temperature=0.7, top_k=1), seed=3).tokens == greedy


def test_sampler_filters_follow_their_definition():
    """Empirical frequencies of top-k / top-p sampling on fixed logits match the renormalised distribution."""
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0]])
    probs = np.exp(np.asarray(logits[0])) / np.exp(np.asarray(logits[0])).sum()
    import jax
    keys = jax.random.split(jax.random.key(np.random.default_rng().integers(1 << 30)), 4000)
    for sampler, keep in ((Sampler(1.0, 2, 1.0), [0, 1]), (Sampler(1.0, 0, 0.8), [0, 1, 2])):
        draws = np.asarray(jax.vmap(lambda k: sampler(logits, k))(keys))[:, 0]
        assert set(draws.tolist()) <= set(keep)
        expected = probs[keep] / probs[keep].sum()
        observed = np.bincount(draws, minlength=5)[keep] / len(draws)
        assert np.abs(observed - expected).max() < 0.03


def test_no_recompilation_within_a_bucket(llama_checkpoint):
    gen = _generator(llama_checkpoint)
    gen.generate([[1, 2, 3]], 10)
    r = gen.generate([[9, 8, 7, 6, 5]], 12, Sampler(temperature=0.5), seed=1)
    assert len(gen.compiled) == 1 and r.compile_s == 0.0
    gen.generate([list(range(20))], 10)  # a longer prompt: the next bucket
    assert len(gen.compiled) == 2


def test_stops_at_eos(llama_checkpoint):
    gen = _generator(llama_checkpoint)
    free = gen.generate([[4, 5, 6]], 20, eos_ids=()).tokens[0]
    eos = free[5]
    stopped = gen.generate([[4, 5, 6]], 20, eos_ids=[eos]).tokens[0]
    assert stopped == free[: free.index(eos) + 1]


def test_prompt_longer_than_context_is_refused(llama_checkpoint):
    gen = _generator(llama_checkpoint)
    with pytest.raises(SvdsparseError, match="context of 256"):
        gen.generate([list(range(100)) * 3], 4)
    with pytest.raises(SvdsparseError, match="outside the vocabulary"):
        gen.generate([[1, 500]], 4)
    with pytest.raises(SvdsparseError, match="empty"):
        gen.generate([[]], 4)


def test_bucket():
    assert [bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]


def test_sparse_decoding_with_an_all_active_predictor_equals_dense(llama_checkpoint):
    from svdsparse_jax.predictors import LowRankPredictor, OraclePredictor
    lm = load_model(llama_checkpoint.path, jnp.float32)
    cfg, model = lm.cfg, Transformer(lm.cfg, lm.weights)
    everything = LowRankPredictor(jnp.zeros((4, cfg.d_model)), jnp.zeros((cfg.d_ff, 4)), jnp.ones(cfg.d_ff))
    prompts = [[3, 4, 5], [9, 10, 11, 12, 13]]
    dense = Generator(model).generate(prompts, 32).tokens
    assert Generator(model, [everything] * cfg.n_layers).generate(prompts, 32).tokens == dense
    assert Generator(model, [OraclePredictor()] * cfg.n_layers).generate(prompts, 32).tokens == dense
    with pytest.raises(SvdsparseError, match="predictors for"):
        Generator(model, [everything])
