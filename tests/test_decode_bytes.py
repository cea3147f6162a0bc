"""scripts.bench.bytes: the bytes a decode step reads, against a count over the model's own arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdsparse_jax.config import named_config
from svdsparse_jax.weights import init_weights

from scripts.bench import bytes as decode_bytes


@pytest.mark.parametrize("shape", ["tiny", "qwen2-7b"])
def test_step_bytes_counts_every_array_once(shape, rng):
    cfg = named_config(shape)
    if shape != "tiny":  # the real shapes' arrays are only described: count them abstractly
        weights = jax.eval_shape(lambda: init_weights(cfg, jax.random.key(0), jnp.bfloat16))
    else:
        weights = init_weights(cfg, jax.random.key(0), jnp.bfloat16)
    batch, slots = int(rng.integers(1, 5)), int(rng.integers(16, 512))
    gate, up_down = rng.uniform(size=cfg.n_layers), rng.uniform(size=cfg.n_layers)
    size = {path: int(np.prod(w.shape)) * 2 for path, w in weights.items()}
    embed = size.pop(("embed",))
    head = embed if cfg.tie_embeddings else 0
    kv = 2 * cfg.n_layers * batch * slots * cfg.kv_dim * 2
    dense = sum(size.values()) + batch * cfg.d_model * 2 + head + kv
    assert decode_bytes.step_bytes(cfg, 2, batch, slots) == dense
    ffn = cfg.d_ff * cfg.d_model * 2
    skipped = sum((1 - g) * ffn + 2 * (1 - u) * ffn for g, u in zip(gate, up_down))
    sparse = decode_bytes.step_bytes(cfg, 2, batch, slots, gate, up_down, predictor_bytes=12345)
    assert abs(sparse - (dense - skipped + 12345)) <= cfg.n_layers * 3  # each layer's FFN term is truncated once
