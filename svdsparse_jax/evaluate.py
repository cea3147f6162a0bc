"""Evaluation of a model on text: per-token log-probabilities, negative log-likelihood and perplexity.

Texts longer than the window are scored in windows that overlap by one token, so every token after the first
is predicted exactly once; each window restarts the context (no state carries across windows).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from svdsparse_jax import kv_cache
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.generate import bucket
from svdsparse_jax.model import Transformer


@jax.jit(static_argnums=(0,))
def _window_stats(graphdef, state, tokens: jax.Array, pad: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tokens [B, L] left-padded -> (log p(tokens[:, j+1] | tokens[:, :j+1]) [B, L-1] f32,
    the number of zero FFN activations per layer over the non-padding tokens [n_layers] f32)."""
    model: Transformer = nnx.merge(graphdef, state)
    cache = kv_cache.init_cache(model.cfg, pad, tokens.shape[1], model.dtype)
    hidden: list[jax.Array] = []
    h, _ = model(tokens, cache, jnp.int32(0), hidden)
    logp = jax.nn.log_softmax(model.logits(h[:, :-1]), axis=-1)
    real = (jnp.arange(tokens.shape[1])[None, :] >= pad[:, None])[..., None]
    zeros = jnp.stack([jnp.sum((a == 0) & real, dtype=jnp.float32) for a in hidden])
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0], zeros


@dataclasses.dataclass
class ScoreResult:
    """logprobs[j] = log p(ids[j+1] | ids[:j+1]) (natural log); nll = -mean(logprobs); ppl = exp(nll)."""

    logprobs: list[float]
    nll: float
    ppl: float


def score_tokens(model: Transformer, ids: Sequence[int], window: int | None = None) -> ScoreResult:
    """Scores a token sequence (at least 2 tokens) in windows of at most `window` tokens (default: the
    model's context)."""
    cfg = model.cfg
    window = min(window or cfg.max_seq_len, cfg.max_seq_len)
    if len(ids) < 2:
        raise SvdsparseError(f"scoring needs at least 2 tokens, got {len(ids)}")
    if window < 2:
        raise SvdsparseError(f"window must be >= 2, got {window}")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise SvdsparseError(f"token ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
    graphdef, state = nnx.split(model)
    logprobs: list[float] = []
    start = 0
    while start < len(ids) - 1:
        chunk = np.asarray(ids[start:start + window], np.int32)
        length = min(bucket(len(chunk)), window) if len(chunk) < window else window
        tokens = np.zeros((1, length), np.int32)
        tokens[0, length - len(chunk):] = chunk
        pad = np.array([length - len(chunk)], np.int32)
        lp = np.asarray(_window_stats(graphdef, state, jnp.asarray(tokens), jnp.asarray(pad))[0])[0]
        logprobs += lp[length - len(chunk):].tolist()
        start += len(chunk) - 1
    nll = -float(np.mean(logprobs))
    return ScoreResult(logprobs, nll, math.exp(nll))


@dataclasses.dataclass
class StreamResult:
    """nll / ppl over every predicted token; sparsity[l] = fraction of layer l's FFN activations
    (act(gate) * up) that are exactly zero, over every token of the windows."""

    tokens: int
    nll: float
    ppl: float
    sparsity: list[float]

    @property
    def mean_sparsity(self) -> float:
        return float(np.mean(self.sparsity))


def evaluate_stream(model: Transformer, stream: np.ndarray, window: int = 512, batch: int = 8,
                    max_windows: int | None = None) -> StreamResult:
    """Perplexity and FFN sparsity of a token stream cut into non-overlapping windows of `window` tokens
    (each window predicts its last window-1 tokens from a fresh context; a shorter tail is dropped)."""
    n = len(stream) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise SvdsparseError(f"the stream has {len(stream)} tokens, fewer than one window of {window}")
    windows = np.asarray(stream[: n * window], np.int32).reshape(n, window)
    graphdef, state = nnx.split(model)
    total_lp, zeros, count = 0.0, np.zeros(model.cfg.n_layers), 0
    for i in range(0, n, batch):
        chunk, real = windows[i:i + batch], min(batch, n - i)
        # Keep one compiled shape: fill a short last batch with rows that are all padding (never counted).
        chunk = np.concatenate([chunk, np.zeros((batch - real, window), np.int32)])
        pad = np.asarray([0] * real + [window] * (batch - real), np.int32)
        lp, z = _window_stats(graphdef, state, jnp.asarray(chunk), jnp.asarray(pad))
        total_lp += np.asarray(lp, np.float64)[:real].sum()
        zeros += np.asarray(z, np.float64)
        count += real
    nll = -total_lp / (count * (window - 1))
    return StreamResult(count * window, nll, math.exp(nll),
                        (zeros / (count * window * model.cfg.d_ff)).tolist())
