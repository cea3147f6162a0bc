"""The Flax model against transformers + torch (f32 logits), and KV-cache decoding against recomputation."""

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints import torch_logits, well_conditioned
from conftest import rel_err
from svdsparse_jax import kv_cache
from svdsparse_jax.convert import load_model
from svdsparse_jax.model import Transformer


def _full_logits(model: Transformer, ids: np.ndarray) -> np.ndarray:
    cache = kv_cache.init_cache(model.cfg, jnp.zeros(ids.shape[0], jnp.int32), ids.shape[1], model.dtype)
    h, _ = model(jnp.asarray(ids, jnp.int32), cache, jnp.int32(0))
    return np.asarray(model.logits(h))


def test_logits_match_transformers_f32(hf_checkpoint, rng):
    lm = load_model(hf_checkpoint.path, jnp.float32)
    model = Transformer(lm.cfg, lm.weights)
    ids = well_conditioned(hf_checkpoint, lambda: rng.integers(0, lm.cfg.vocab_size, (2, 40)))  # > window 24
    assert rel_err(_full_logits(model, ids), torch_logits(hf_checkpoint.torch_model, ids)) <= 1e-4


def test_logits_bf16_close_to_f32_reference(llama_checkpoint, rng):
    lm = load_model(llama_checkpoint.path, jnp.bfloat16)
    model = Transformer(lm.cfg, lm.weights)
    assert all(w.dtype == jnp.bfloat16 for w in lm.weights.values())
    # two sequences: batched bf16 attention products, which the CPU's XLA runs only widened to f32
    ids = rng.integers(0, lm.cfg.vocab_size, (2, 24))
    assert rel_err(_full_logits(model, ids), torch_logits(llama_checkpoint.torch_model, ids)) <= 3e-2


def test_cached_decoding_equals_recomputation(hf_checkpoint, rng):
    """Prefill a left-padded batch, then feed tokens one at a time through the cache: every step's logits must
    equal those of the whole sequence computed from scratch (per sequence, without padding)."""
    lm = load_model(hf_checkpoint.path, jnp.float32)
    model = Transformer(lm.cfg, lm.weights)
    lengths, steps, prompt_len = [5, 9], 30, 16
    seqs = well_conditioned(hf_checkpoint, lambda: [rng.integers(0, lm.cfg.vocab_size, n + steps) for n in lengths])
    tokens = np.zeros((2, prompt_len), np.int32)
    pad = np.array([prompt_len - n for n in lengths], np.int32)
    for b, n in enumerate(lengths):
        tokens[b, pad[b]:] = seqs[b][:n]
    cache = kv_cache.init_cache(lm.cfg, jnp.asarray(pad), prompt_len + steps, jnp.float32)
    h, cache = model(jnp.asarray(tokens), cache, jnp.int32(0))
    step_fn = jax.jit(lambda m, t, c, s: m(t, c, s))
    got = [[np.asarray(model.logits(h[b, -1]))] for b in range(2)]
    for i in range(steps):
        tok = jnp.asarray([[seqs[b][lengths[b] + i]] for b in range(2)], jnp.int32)
        h, cache = step_fn(model, tok, cache, jnp.int32(prompt_len + i))
        for b in range(2):
            got[b].append(np.asarray(model.logits(h[b, 0])))
    for b, n in enumerate(lengths):
        ref = _full_logits(model, seqs[b][None, :])[0, n - 1:]
        assert rel_err(np.stack(got[b]), ref) <= 1e-5
