"""Training a small sparse ReGLU language model with optax, on this project's own modules.

Sparsity recipe (after ProSparse): a ReLU gate, plus an L1 penalty on the FFN activations h = relu(gate) * up
whose factor rises gradually. Rather than a fixed curve, the factor follows the measured sparsity: from
`l1_start` on it is multiplied every step by exp(l1_rate * (target - sparsity_ema)), so it climbs while the
model is less sparse than the target and eases off if it overshoots; sparsity then climbs smoothly without
wrecking the loss. After training, the ProSparse threshold shift (FATReLU) is searched on calibration text
(`fatrelu_search`). With `l1_target=None` the same code trains the dense baseline.

State is explicit: weights (f32 master copy, nested by spec path with string keys), the optax state, the step,
the L1 factor and the sparsity EMA. Compute runs in `compute_dtype` (bf16 on GPU) with f32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from svdsparse_jax import kv_cache
from svdsparse_jax.config import ModelConfig
from svdsparse_jax.convert import DTYPES, nest_weights, unnest_weights
from svdsparse_jax.engine import EngineConfig
from svdsparse_jax.model import Transformer
from svdsparse_jax.weights import init_weights


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch: int = 32
    seq_len: int = 512
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    clip: float = 1.0
    l1_target: float | None = 0.9  # mean FFN sparsity the L1 factor steers to; None trains without L1
    l1_start: int = 300
    l1_init: float = 1e-3
    l1_rate: float = 0.05
    l1_max: float = 10.0
    compute_dtype: str = "bfloat16"
    seed: int = 0


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay; weight decay on matrices only (not norms, not biases)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, tc.steps, tc.lr * tc.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim == 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(tc.clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask))


def init_state(cfg: ModelConfig, tc: TrainConfig) -> dict[str, Any]:
    weights = nest_weights(init_weights(cfg, jax.random.key(tc.seed), jnp.float32))
    return {"weights": weights, "opt_state": optimizer(tc).init(weights), "step": jnp.int32(0),
            "l1": jnp.float32(0.0), "sparsity_ema": jnp.float32(0.0)}


def sample_batch(data: np.ndarray, step: int, tc: TrainConfig) -> np.ndarray:
    """[batch, seq_len + 1] int32 windows at offsets drawn from (seed, step): reproducible on resume."""
    rng = np.random.default_rng([tc.seed, step])
    starts = rng.integers(0, len(data) - tc.seq_len - 1, tc.batch)
    return np.stack([data[s:s + tc.seq_len + 1] for s in starts]).astype(np.int32)


def loss_fn(weights, tokens, l1, cfg: ModelConfig, tc: TrainConfig, engine: EngineConfig):
    """Next-token cross-entropy + l1 * mean |h| (mean over layers, tokens and neurons).
    Returns (loss, (cross-entropy, per-layer sparsity [n_layers]))."""
    dtype = DTYPES[tc.compute_dtype]
    model = Transformer(cfg, {k: v.astype(dtype) for k, v in unnest_weights(weights, cfg).items()}, engine)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    cache = kv_cache.init_cache(cfg, jnp.zeros(inputs.shape[0], jnp.int32), inputs.shape[1], dtype)
    states, _, stats = model.forward_with_stats(inputs, cache, jnp.int32(0))
    hidden = [s.hidden for s in stats]
    logits = model.logits(states)
    ce = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])
    l1_term = jnp.mean(jnp.stack([jnp.mean(jnp.abs(a)) for a in hidden]))
    sparsity = jnp.stack([jnp.mean(a == 0) for a in hidden])
    return ce + l1 * l1_term, (ce, sparsity)


@functools.partial(jax.jit, static_argnames=("cfg", "tc", "engine"), donate_argnums=(0,))
def train_step(state: dict[str, Any], tokens: jax.Array, cfg: ModelConfig, tc: TrainConfig,
               engine: EngineConfig = EngineConfig()):
    """One AdamW step, then the L1 factor update. Returns (new state, metrics). engine: XLA's products on the
    platform it was resolved for (`EngineConfig.resolve("xla")`)."""
    (loss, (ce, sparsity)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["weights"], tokens, state["l1"], cfg, tc, engine)
    updates, opt_state = optimizer(tc).update(grads, state["opt_state"], state["weights"])
    weights = optax.apply_updates(state["weights"], updates)
    step = state["step"] + 1
    ema = 0.9 * state["sparsity_ema"] + 0.1 * jnp.mean(sparsity)
    if tc.l1_target is None:
        l1 = jnp.float32(0.0)
    else:
        grown = jnp.maximum(state["l1"], tc.l1_init) * jnp.exp(tc.l1_rate * (tc.l1_target - ema))
        l1 = jnp.where(step >= tc.l1_start, jnp.clip(grown, 0.0, tc.l1_max), 0.0).astype(jnp.float32)
    new = {"weights": weights, "opt_state": opt_state, "step": step, "l1": l1, "sparsity_ema": ema}
    metrics = {"loss": loss, "ce": ce, "sparsity": sparsity, "l1": state["l1"],
               "grad_norm": optax.global_norm(grads)}
    return new, metrics


def bf16_weights(state: dict[str, Any], cfg: ModelConfig, dtype=jnp.bfloat16):
    """The trained weights keyed by spec path, cast for inference/export."""
    return {k: v.astype(dtype) for k, v in unnest_weights(state["weights"], cfg).items()}


def save_checkpoint(path, state: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, state)
    ckpt.wait_until_finished()


def restore_checkpoint(path, cfg: ModelConfig, tc: TrainConfig) -> dict[str, Any]:
    import orbax.checkpoint as ocp
    target = jax.eval_shape(lambda: init_state(cfg, tc))
    return ocp.StandardCheckpointer().restore(path, target)
