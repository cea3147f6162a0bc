"""Baseline predictors: SparseInfer's sign bits (alpha calibrated per layer), a trained low-rank MLP (Deja Vu /
PowerInfer style, d -> r -> ReLU -> d_ff, trained with optax on recorded activation labels), and the oracle."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from svdsparse_jax.predictors.base import LowRankPredictor, SignBitPredictor, pack_signs
from svdsparse_jax.predictors.thresholds import Target


def signbit_predictor(w_gate: jax.Array, x2: jax.Array, active2: jax.Array, target: Target) -> SignBitPredictor:
    """Packs the sign bits of w_gate [d_ff, d] and picks the layer's alpha on calibration inputs x2 [n, d].

    Neuron i is inactive on a token iff N_neg > alpha N_pos, i.e. iff alpha < c = N_neg / N_pos. The counts
    are integers, so c has ties, and alpha is taken as one of the observed fractions, kept exact: for a
    predicted-sparsity target, the largest c below the smallest one that must be switched off (so at least
    `value` of the (token, neuron) pairs are off); for a recall target, the smallest c keeping at least `value`
    of the truly active pairs (active2 [n, d_ff]) on. The pairs are ordered on the device by c in float32
    (two distinct fractions closer than float32 can resolve may swap, which moves the result by those pairs)."""
    d = w_gate.shape[1]
    probe = SignBitPredictor(pack_signs(w_gate), jnp.int32(1), jnp.int32(0), d)
    num, den = _signbit_alpha(probe, x2, active2, target.kind == "sparsity", jnp.float32(target.value))
    return SignBitPredictor(probe.bits, num, den, d)


@functools.partial(jax.jit, static_argnames=("by_sparsity",))
def _signbit_alpha(probe: SignBitPredictor, x, active, by_sparsity: bool, value):
    n_neg, n_pos = (c.reshape(-1) for c in probe.counts(x))
    ratio = jnp.where(n_pos > 0, n_neg / jnp.maximum(n_pos, 1).astype(jnp.float32), jnp.inf)
    if by_sparsity:
        order = jnp.argsort(ratio)
        ordered = ratio[order]
        off = jnp.ceil(value * ratio.size).astype(jnp.int32)
        first_off = ordered[jnp.clip(ratio.size - off, 0, ratio.size - 1)]
        n_below = jnp.searchsorted(ordered, first_off, side="left")
        pick = order[jnp.maximum(n_below - 1, 0)]
        num = jnp.where(off == 0, 1, jnp.where(n_below > 0, n_neg[pick], -1))
        den = jnp.where(off == 0, 0, jnp.where(n_below > 0, n_pos[pick], 1))
    else:
        keyed = jnp.where(active.reshape(-1), ratio, jnp.inf)  # inactive pairs sort last
        order = jnp.argsort(keyed)
        need = jnp.ceil(value * jnp.sum(active)).astype(jnp.int32)
        pick = order[jnp.maximum(need - 1, 0)]
        num = jnp.where(need > 0, n_neg[pick], -1)
        den = jnp.where(need > 0, n_pos[pick], 1)
    return num.astype(jnp.int32), den.astype(jnp.int32)


MLP_STEPS, MLP_LR, MLP_POS_WEIGHT = 3000, 3e-3, 4.0  # see mlp_predictor


@functools.partial(jax.jit, static_argnames=("rank", "steps", "batch", "dtype"))
def _train_mlp(x, labels, key, *, rank: int, steps: int, batch: int, lr: float, pos_weight, dtype):
    n, d = x.shape
    f = labels.shape[1]
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"a": jax.random.normal(k1, (rank, d)) / jnp.sqrt(d), "hb": jnp.zeros(rank),
              "b": jax.random.normal(k2, (f, rank)) / jnp.sqrt(rank), "bias": jnp.zeros(f)}
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

    def loss(p, xb, yb):
        z = jnp.maximum(xb @ p["a"].T + p["hb"], 0.0)
        logits = z @ p["b"].T + p["bias"]
        # active pairs weighted by pos_weight: the classes are about 1 : 13 on a 93%-sparse model
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, yb) * jnp.where(yb > 0, pos_weight, 1.0))

    def step(carry, k):
        p, s = carry
        idx = jax.random.randint(k, (batch,), 0, n)
        g = jax.grad(loss)(p, x[idx].astype(jnp.float32), labels[idx].astype(jnp.float32))
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(k3, steps))
    return LowRankPredictor(params["a"].astype(dtype), params["b"].astype(dtype), params["bias"].astype(dtype),
                            params["hb"].astype(dtype), relu=True)


def mlp_predictor(x1: jax.Array, active1: jax.Array, rank: int, *, steps: int = MLP_STEPS, batch: int = 1024,
                  lr: float = MLP_LR, pos_weight: float = MLP_POS_WEIGHT, seed: int = 0, dtype=jnp.bfloat16
                  ) -> LowRankPredictor:
    """Trains d -> rank -> ReLU -> d_ff with binary cross-entropy on the activity labels active1 [n, d_ff] of
    the calibration inputs x1 [n, d] (Adam, cosine decay; active pairs weighted by pos_weight). Its output bias
    is recalibrated afterwards with the same penalty objective as the SVD predictors, so every method shares
    one threshold rule. The defaults are the converged setting of `scripts/mlp_baseline.py` (docs/RESULTS.md)."""
    return _train_mlp(x1, active1, jax.random.key(seed), rank=rank, steps=steps, batch=min(batch, x1.shape[0]),
                      lr=lr, pos_weight=pos_weight, dtype=dtype)
