"""Layer-by-layer calibration statistics (like GPTQ): the dense model is run over the calibration tokens one
layer at a time, keeping only the hidden states of all tokens plus the current layer's statistics, so a 7B
model with 16k calibration tokens needs ~0.1 GB of hidden states per copy, never the whole activation history.

For each layer the FFN inputs X (after the post-attention RMSNorm) of the calibration tokens are split in
two halves by window: the first half builds the predictor factors (S = X1^T X1, accumulated in float32), the
second half calibrates the biases (the FFN inputs X2, the true activations h2 = act(gate) * up and the
importance m = |h2| * ||W_down[:, i]||).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from svdsparse_jax import kv_cache
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.model import Block, Transformer, einsum

F32 = jnp.float32


@dataclasses.dataclass
class LayerStats:
    """Statistics of one layer. gram: [d, d] f32, S = X1^T X1; x1: [n1, d] and x2: [n2, d] FFN inputs in the
    model dtype; h2: [n2, d_ff] f32 true FFN activations of x2; down_norms: [d_ff] f32, ||W_down[:, i]||."""

    layer: int
    gram: jax.Array
    x1: jax.Array
    x2: jax.Array
    h2: jax.Array
    down_norms: jax.Array

    @property
    def importance(self) -> jax.Array:
        """m = |h2| * ||W_down[:, i]||, [n2, d_ff] f32."""
        return jnp.abs(self.h2) * self.down_norms[None, :]

    @property
    def true_sparsity(self) -> float:
        return float(jnp.mean(self.h2 == 0))


@jax.jit(static_argnums=(0,))
def _block_pass(graphdef, state, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, T, d] (the residual stream, each row its own context) -> (the residual stream after the layer,
    the layer's FFN input [B, T, d]): the block as every forward pass runs it, its FFN input from the block's
    trace."""
    block: Block = nnx.merge(graphdef, state)
    b, t, _ = x.shape
    cfg = block.attn.cfg
    zeros = jnp.zeros((b, cfg.n_kv_heads, t, cfg.head_dim), x.dtype)
    pad = jnp.zeros(b, jnp.int32)
    pos = kv_cache.positions(pad, jnp.int32(0), t)
    mask = kv_cache.attention_bias(cfg, pad, jnp.int32(0), t, t)
    out, _, _, trace = block(x, zeros, zeros, jnp.int32(0), pos, mask)
    return out, trace.inputs


@jax.jit
def _gram(x: jax.Array) -> jax.Array:
    return einsum("nd,ne->de", x, x)


def layer_inputs(model: Transformer, windows: np.ndarray, batch: int = 8) -> Iterator[tuple[int, jax.Array]]:
    """Yields (layer index, the FFN inputs [n_windows, W, d] of that layer) for the dense model, one layer at a
    time. windows: [n_windows, W] int tokens (each window is its own context)."""
    x = model.embed[...][jnp.asarray(windows, jnp.int32)]
    for i, block in enumerate(model.layers):
        graphdef, state = nnx.split(block)
        outs, ffn_ins = zip(*(_block_pass(graphdef, state, x[s:s + batch]) for s in range(0, x.shape[0], batch)))
        yield i, jnp.concatenate(ffn_ins)
        x = jnp.concatenate(outs)


def layer_statistics(model: Transformer, windows: np.ndarray, batch: int = 8) -> Iterator[LayerStats]:
    """Yields the LayerStats of every layer in order (see the module docstring). The first half of the windows
    builds S, the second half is kept for bias calibration. Needs at least 2 windows."""
    if len(windows) < 2:
        raise SvdsparseError(f"calibration needs at least 2 windows of tokens, got {len(windows)}")
    half = len(windows) // 2
    for i, ffn_in in layer_inputs(model, windows, batch):
        block = model.layers[i]
        d = ffn_in.shape[-1]
        x1 = ffn_in[:half].reshape(-1, d)
        x2 = ffn_in[half:].reshape(-1, d)
        gram = sum(_gram(x1[s:s + 8192]) for s in range(0, x1.shape[0], 8192))
        h2 = jnp.concatenate([block.ffn.hidden(x2[s:s + 8192]) for s in range(0, x2.shape[0], 8192)])
        down_norms = jnp.linalg.norm(block.ffn.w_down_t[...].astype(F32), axis=1)
        yield LayerStats(i, gram, x1, x2, h2, down_norms)


def cut_windows(tokens: np.ndarray, window: int, max_windows: int | None = None, spread: bool = False
                ) -> np.ndarray:
    """A token stream [n_tokens] cut into non-overlapping windows [n, window] int32 (a shorter tail dropped): all
    of them, or at most `max_windows`: the first ones, or with `spread` ones spread evenly over the stream (the
    first and the last included), so that a few windows of a text whose parts differ stand for the whole text,
    not its beginning. The one place token streams become windows (calibration, evaluation, the lab)."""
    total = len(tokens) // window
    every = np.asarray(tokens[: total * window], np.int32).reshape(total, window)
    if max_windows is None or max_windows >= total:
        return every
    if not spread:
        return every[:max_windows]
    return every[np.linspace(0, total - 1, max_windows).round().astype(int)]


def calibration_windows(tokens: np.ndarray, window: int, max_tokens: int | None = None) -> np.ndarray:
    """The calibration's windows: the first ones of the stream (`cut_windows`), at most max_tokens tokens in all;
    at least 2."""
    windows = cut_windows(tokens, window, None if max_tokens is None else max_tokens // window)
    if len(windows) < 2:
        raise SvdsparseError(f"{len(tokens)} calibration tokens give fewer than 2 windows of {window}; "
                             "give more text or a smaller window")
    return windows
