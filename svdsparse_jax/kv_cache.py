"""The preallocated KV cache: an explicit pytree threaded through prefill and every decode step.

Sequences of a batch are LEFT-padded to one prompt length, so every sequence writes its next token to the
same slot and one `dynamic_update_slice` serves the whole batch. `pad[b]` is how many slots of sequence b
are padding; a token in slot s has RoPE position s - pad[b].

Where the sequences of a batch are at different places (the server's decode slots, `svdsparse_jax.serving`),
`start` is a vector [batch] instead of one slot: sequence b writes its tokens from slot start[b] on, one
`dynamic_update_slice` per sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from svdsparse_jax.config import ModelConfig

# Finite (not -inf) so that a row whose keys are all masked (a padding query) stays finite, and
# exp(MASKED - max) is exactly 0 for every masked key of a real query.
MASKED = -1e30


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k[i], v[i]: layer i's keys and values, [batch, n_kv_heads, slots, head_dim], the model's dtype.
    pad: [batch] int32, the number of left-padding slots of each sequence."""

    k: list[jax.Array]
    v: list[jax.Array]
    pad: jax.Array

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]


def init_cache(cfg: ModelConfig, pad: jax.Array, slots: int, dtype: jnp.dtype) -> KVCache:
    """An all-zero cache of `slots` slots per sequence; pad: [batch] int32."""
    shape = (pad.shape[0], cfg.n_kv_heads, slots, cfg.head_dim)
    return KVCache(k=[jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
                   v=[jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
                   pad=pad.astype(jnp.int32))


def write(cache_layer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes new [batch, n_kv, T, head_dim] into slots [start, start + T) of one layer's cache; start: int32, one
    slot for the batch ([]) or one per sequence ([batch])."""
    new = new.astype(cache_layer.dtype)
    if jnp.ndim(start) == 0:
        return jax.lax.dynamic_update_slice(cache_layer, new, (0, 0, start, 0))
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (0, s, 0)))(cache_layer, new, start)


def _slots(start: jax.Array, length: int) -> jax.Array:
    """The slots [start, start + length): [length] int32 for a scalar start, [batch, length] for start [batch]."""
    return jnp.asarray(start, jnp.int32)[..., None] + jnp.arange(length, dtype=jnp.int32)


def positions(pad: jax.Array, start: jax.Array, length: int) -> jax.Array:
    """RoPE positions [batch, length] int32 of the tokens in slots [start, start + length) (start [] or [batch]);
    0 for padding."""
    return jnp.maximum(_slots(start, length) - pad[:, None], 0)


def attention_bias(cfg: ModelConfig, pad: jax.Array, start: jax.Array, length: int, slots: int) -> jax.Array:
    """Additive mask [batch, length, slots] f32 for queries in slots [start, start + length) (start [] or
    [batch]): key slot s is visible iff pad[b] <= s <= query slot (and, with a sliding window, s > query slot -
    window)."""
    q_slot = _slots(start, length)[..., None]
    k_slot = jnp.arange(slots, dtype=jnp.int32)[None, None, :]
    visible = (k_slot <= q_slot) & (k_slot >= pad[:, None, None])
    if cfg.sliding_window is not None:
        visible &= k_slot > q_slot - cfg.sliding_window
    return jnp.where(visible, 0.0, MASKED).astype(jnp.float32)
