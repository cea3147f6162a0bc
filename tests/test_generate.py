"""Generation: greedy tokens equal transformers' greedy generate; sampling is seeded; no recompilation within a
bucket; stops and errors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from svdsparse_jax.convert import load_model
from svdsparse_jax.engine import EngineConfig
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


def test_greedy_matches_transformers_batch_of_different_lengths(hf_checkpoint, rng):
    gen = _generator(hf_checkpoint)
    prompts = [rng.integers(0, 128, n).tolist() for n in (3, 11, 7)]
    result = gen.generate(prompts, 32, Sampler())
    for prompt, got in zip(prompts, result.tokens):
        assert got == _hf_greedy(hf_checkpoint.torch_model, prompt, 32)


def test_repetition_penalty_matches_transformers(hf_checkpoint, rng):
    """Greedy decoding with a repetition penalty (prompt and output tokens penalised) gives transformers' tokens,
    at a batch of different lengths; the penalty changes them."""
    gen = _generator(hf_checkpoint)
    prompts = [rng.integers(0, 128, n).tolist() for n in (4, 9)]
    result = gen.generate(prompts, 24, Sampler(repetition_penalty=1.8))
    plain = gen.generate(prompts, 24)
    for prompt, got in zip(prompts, result.tokens):
        with torch.no_grad():
            out = hf_checkpoint.torch_model.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                                                     do_sample=False, repetition_penalty=1.8)
        assert got == out[0, len(prompt):].tolist()
    assert result.tokens != plain.tokens


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


def test_sampler_filters_follow_their_definition(seed):
    """Empirical frequencies of top-k / top-p sampling on fixed logits match the renormalised distribution."""
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0]])
    probs = np.exp(np.asarray(logits[0])) / np.exp(np.asarray(logits[0])).sum()
    import jax
    keys = jax.random.split(jax.random.key(seed), 4000)
    for sampler, keep in ((Sampler(1.0, 2, 1.0), [0, 1]), (Sampler(1.0, 0, 0.8), [0, 1, 2])):
        draws = np.asarray(jax.vmap(lambda k: sampler.sample(logits, k))(keys))[:, 0]
        assert set(draws.tolist()) <= set(keep)
        expected = probs[keep] / probs[keep].sum()
        observed = np.bincount(draws, minlength=5)[keep] / len(draws)
        assert np.abs(observed - expected).max() < 0.03


def test_no_recompilation_within_a_bucket(llama_checkpoint):
    """One program per bucket for greedy decoding and one for sampling, whatever the sampling parameters."""
    gen = _generator(llama_checkpoint)
    gen.generate([[1, 2, 3]], 10)
    assert gen.generate([[9, 8, 7, 6, 5]], 12).compile_s == 0.0
    gen.generate([[1, 2, 3]], 10, Sampler(temperature=0.5), seed=1)
    r = gen.generate([[9, 8, 7, 6, 5]], 12, Sampler(temperature=1.3, top_k=5, top_p=0.9), seed=2)
    assert len(gen.compiled) == 2 and r.compile_s == 0.0
    gen.generate([list(range(20))], 10)  # a longer prompt: the next bucket
    assert len(gen.compiled) == 3


@pytest.mark.parametrize("steps_per_check", [1, 3, 8])
def test_every_stopping_point_whatever_the_steps_per_check(llama_checkpoint, steps_per_check):
    """Steps run past max_new or EOS (the rest of a group of steps_per_check) write nothing: each call returns
    exactly the first max_new tokens of a longer greedy run, or those through the first EOS."""
    lm = load_model(llama_checkpoint.path, jnp.float32)
    gen = Generator(Transformer(lm.cfg, lm.weights, EngineConfig(steps_per_check=steps_per_check)))
    prompts = [[4, 5, 6], [7, 8, 9, 10, 11, 12]]
    free = gen.generate(prompts, 32, eos_ids=()).tokens
    assert free == _generator(llama_checkpoint).generate(prompts, 32, eos_ids=()).tokens
    for n in (1, 2, 7, 8, 9, 17, 31):
        assert gen.generate(prompts, n, eos_ids=()).tokens == [t[:n] for t in free]
    eos = free[0][10]  # the first sequence stops there; the second where (if) it produces that token
    got = gen.generate(prompts, 32, eos_ids=[eos]).tokens
    assert got == [t[:t.index(eos) + 1] if eos in t else t for t in free]


@pytest.mark.parametrize("sampler", [Sampler(), Sampler(temperature=0.8, top_k=10)])
def test_decode_loop_checks_its_stop_condition_once_per_group(llama_checkpoint, sampler):
    """No host round trip per token: the compiled program has no conditional, its decode steps run in an inner
    loop whose trip count XLA knows (a GPU then runs it without copying a condition to the host), and the one
    loop whose trip count it cannot know is the one around groups of steps (the random-number loops of
    sampling have known counts too)."""
    gen = _generator(llama_checkpoint)
    gen.generate([[1, 2, 3]], 40, sampler)
    text = next(iter(gen.compiled.values())).as_text()
    assert " conditional(" not in text
    loops = [line for line in text.splitlines() if " while(" in line]
    assert len([line for line in loops if "known_trip_count" not in line]) == 1
    assert any(f'"known_trip_count":{{"n":"{EngineConfig().steps_per_check}"}}' in line for line in loops)


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
    cfg, model = lm.cfg, Transformer(lm.cfg, lm.weights, EngineConfig(ffn_policy="sparse"))
    everything = LowRankPredictor(jnp.zeros((4, cfg.d_model)), jnp.zeros((cfg.d_ff, 4)), jnp.ones(cfg.d_ff))
    prompts = [[3, 4, 5], [9, 10, 11, 12, 13]]
    dense = Generator(model).generate(prompts, 32).tokens
    assert Generator(model, [everything] * cfg.n_layers).generate(prompts, 32).tokens == dense
    assert Generator(model, [OraclePredictor()] * cfg.n_layers).generate(prompts, 32).tokens == dense
    with pytest.raises(SvdsparseError, match="predictors for"):
        Generator(model, [everything])
