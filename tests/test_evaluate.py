"""Scoring against torch log-softmax, including windows that restart the context."""

import jax.numpy as jnp
import numpy as np
import torch

from conftest import torch_logits
from svdsparse_jax.convert import load_model
from svdsparse_jax.evaluate import score_tokens
from svdsparse_jax.model import Transformer


def _torch_logprobs(model, ids):
    logits = torch.as_tensor(torch_logits(model, np.asarray([ids])))[0]
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_score_matches_torch(llama_checkpoint):
    lm = load_model(llama_checkpoint.path, jnp.float32)
    model = Transformer(lm.cfg, lm.weights)
    ids = np.random.default_rng().integers(0, 128, 50).tolist()
    r = score_tokens(model, ids)
    ref = _torch_logprobs(llama_checkpoint.torch_model, ids)
    np.testing.assert_allclose(r.logprobs, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r.nll, -ref.mean(), rtol=1e-5)
    np.testing.assert_allclose(r.ppl, np.exp(-ref.mean()), rtol=1e-5)
    # windows of 16 tokens overlapping by one: each window is scored from a fresh context
    w = score_tokens(model, ids, window=16)
    starts = range(0, len(ids) - 1, 15)
    ref_w = np.concatenate([_torch_logprobs(llama_checkpoint.torch_model, ids[s:s + 16]) for s in starts])
    assert len(w.logprobs) == len(ids) - 1
    np.testing.assert_allclose(w.logprobs, ref_w, rtol=1e-4, atol=1e-5)
