"""The preallocated KV cache: an explicit pytree threaded through prefill and every decode step.

Sequences of a batch are LEFT-padded to one prompt length, so every sequence writes its next token to the
same slot and one `dynamic_update_slice` serves the whole batch. `pad[b]` is how many slots of sequence b
are padding; a token in slot s has RoPE position s - pad[b].
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
    """Writes new [batch, n_kv, T, head_dim] into slots [start, start + T) of one layer's cache."""
    return jax.lax.dynamic_update_slice(cache_layer, new.astype(cache_layer.dtype), (0, 0, start, 0))


def positions(pad: jax.Array, start: jax.Array, length: int) -> jax.Array:
    """RoPE positions [batch, length] int32 of the tokens in slots [start, start + length); 0 for padding."""
    slot = start + jnp.arange(length, dtype=jnp.int32)
    return jnp.maximum(slot[None, :] - pad[:, None], 0)


def attention_bias(cfg: ModelConfig, pad: jax.Array, start: jax.Array, length: int, slots: int) -> jax.Array:
    """Additive mask [batch, length, slots] f32 for queries in slots [start, start + length): key slot s is
    visible iff pad[b] <= s <= query slot (and, with a sliding window, s > query slot - window)."""
    q_slot = (start + jnp.arange(length, dtype=jnp.int32))[None, :, None]
    k_slot = jnp.arange(slots, dtype=jnp.int32)[None, None, :]
    visible = (k_slot <= q_slot) & (k_slot >= pad[:, None, None])
    if cfg.sliding_window is not None:
        visible &= k_slot > q_slot - cfg.sliding_window
    return jnp.where(visible, 0.0, MASKED).astype(jnp.float32)
