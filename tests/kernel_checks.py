"""Kernel-versus-reference checks shared by the CPU tests (interpret mode, test_kernels.py) and the GPU tests
(compiled, test_kernels_gpu.py): seeded random inputs, a float64 oracle, outputs started as NaN so an element the
kernel never wrote cannot pass, and the relative error ||out - ref|| / ||ref||.

Where the arrays are large the work stays on the device: weights are drawn there (`device_normal`) and the
float64 oracles (`f64_*`) are jitted jax functions of float64 arrays (x64 enabled only around them), written
independently of the kernels and of `pallas_kernels.reference`, so a 152064 x 3584 check costs milliseconds on
a GPU instead of minutes of host float64 work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compaction, norm, reference
from pallas_kernels import gemv as gemv_mod
from pallas_kernels import gemv_mgpu
from pallas_kernels import sparse_ffn as sf
from pallas_kernels.candidates import Candidates
from pallas_kernels.numerics import Activation, rms_norm
from svdsparse_jax.engine import EngineConfig

TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-5}
F32, F64 = jnp.float32, jnp.float64


def device_normal(rng: np.random.Generator, shape: tuple[int, ...], dtype, scale: float = 1.0) -> jax.Array:
    """Standard normal draws times `scale`, made on the default device (jax.random keyed from rng), in dtype."""
    key = jax.random.key(int(rng.integers(1 << 31)))
    return (jax.random.normal(key, shape, F32) * scale).astype(dtype)


def _widen(a: jax.Array) -> jax.Array:
    """An array of any float dtype as float64 (exactly: every bf16 / f16 / f32 value is an f64 value)."""
    return a.astype(F32).astype(F64)


def _round_like(a: jax.Array, dtype) -> jax.Array:
    """float64 values rounded to dtype through f32 (as the kernels round their f32 results), back in float64."""
    return a.astype(F32).astype(dtype).astype(F32).astype(F64)


@functools.partial(jax.jit, static_argnames=("act",))
def _f64_sparse_ffn(x, cand, w_gate, w_up, w_down_t, act: Activation):
    """(the guarded FFN, the magnitude its f32 sums round at): the second is first-order propagation of each
    sum's terms' magnitudes, |a| |x| |W_up|^T + |x| |W_gate|^T |u| for h, through |W_down_t|, plus |h| |W_down_t|."""
    x, wg, wu, wd = (_widen(a) for a in (x, w_gate, w_up, w_down_t))
    g, u = x @ wg.T, x @ wu.T
    if act.kind == "fatrelu":
        a = jnp.where(g >= act.threshold, g, 0.0)
    else:
        a = jnp.maximum(g, 0.0)
    up = jnp.maximum(u, 0.0) if act.kind == "drelu" else u
    h = jnp.where(cand, a * up, 0.0)
    terms_h = jnp.where(cand & (a != 0), jnp.abs(a) * (jnp.abs(x) @ jnp.abs(wu).T)
                        + (jnp.abs(x) @ jnp.abs(wg).T) * jnp.abs(up), 0.0)
    return _round_like(h, w_down_t.dtype) @ wd, (terms_h + jnp.abs(h)) @ jnp.abs(wd)


def f64_sparse_ffn(x, candidates, w_gate, w_up, w_down_t, act: Activation, terms_too: bool = False):
    """The guarded FFN in float64 on the device: x [B, d], candidates bool [B, d_ff], weights [d_ff, d]; h
    rounded to the weights' dtype before W_down_t, as the model and the kernels round it. float64 [B, d].
    With terms_too also the magnitude of the terms its sums add (float64 [B, d]; `F32_ULPS`)."""
    if act.kind not in ("relu", "fatrelu", "drelu"):
        raise ValueError(f"f64_sparse_ffn: activation {act.kind!r}")
    with jax.enable_x64(True):
        y, terms = (np.asarray(a) for a in _f64_sparse_ffn(x, jnp.asarray(candidates), w_gate, w_up, w_down_t, act))
    return (y, terms) if terms_too else y


@jax.jit
def _f64_product(x, w):
    return _widen(x) @ _widen(w).T


@jax.jit
def _f64_product_t(x, w_t):
    return _widen(x) @ _widen(w_t)


def f64_product(x: jax.Array, w: jax.Array) -> np.ndarray:
    """x [B, k] @ w [n, k]^T in float64 on the device, float64 [B, n]."""
    with jax.enable_x64(True):
        return np.asarray(_f64_product(x, w))


def f64_product_t(x: jax.Array, w_t: jax.Array) -> np.ndarray:
    """x [B, k] @ w_t [k, n] in float64 on the device, float64 [B, n]."""
    with jax.enable_x64(True):
        return np.asarray(_f64_product_t(x, w_t))


@dataclasses.dataclass
class CheckResult:
    name: str
    rel_error: float
    finite: bool
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.finite and self.rel_error <= self.tolerance


def _rel(out: np.ndarray, ref: np.ndarray, rounding: float = 0.0) -> float:
    """||out - ref|| / ||ref|| (||out|| where ref is zero), less `rounding`: an absolute error that f32 sums may
    make whatever their order (`F32_ULPS`)."""
    err = max(0.0, float(np.linalg.norm(out - ref)) - rounding)
    scale = np.linalg.norm(ref)
    return err / float(scale) if scale > 0 else err


# An f32 sum is exact to a few units in the last place of its terms' magnitudes, not of its value: where the terms
# cancel (one neuron's up product of -0.00165 from terms of total magnitude 6.56, seed 885828537 of
# test_sparse_ffn_kernels_match_float64) f32's rounding alone is 6e-5 of the value, above the float32 tolerance.
# The sparse FFN's check allows F32_ULPS ulps (2^-24) of its sums' terms before its relative tolerance; a
# well-conditioned draw's terms add to about 8 times its value, so its allowance is about 4 x 2^-24 x 8 = 2e-6 of
# it, a fifth of that tolerance.
F32_ULPS = 4


def sparse_ffn_error(y: np.ndarray, ref: np.ndarray, terms: np.ndarray) -> float:
    """The sparse FFN check's error: relative to the oracle `ref`, beyond F32_ULPS ulps of its sums' `terms`
    (both from `f64_sparse_ffn(..., terms_too=True)`)."""
    return _rel(y, ref, F32_ULPS * 2.0 ** -24 * float(np.linalg.norm(terms)))


def random_weights(rng: np.random.Generator, d: int, d_ff: int, dtype) -> list[jax.Array]:
    """W_gate, W_up, W_down_t [d_ff, d] with entries of std 1/sqrt(d), in dtype, drawn on the device."""
    return [device_normal(rng, (d_ff, d), dtype, 1 / np.sqrt(d)) for _ in range(3)]


def candidate_mask(rng: np.random.Generator, batch: int, d_ff: int, count: int) -> np.ndarray:
    """bool [batch, d_ff] whose union has exactly `count` neurons (each sequence keeps a random 70-100% of the
    union, so sequences differ)."""
    union = np.zeros(d_ff, bool)
    union[rng.choice(d_ff, count, replace=False)] = True
    if batch == 1:
        return union[None]
    own = union[None] & (rng.random((batch, d_ff)) < rng.uniform(0.7, 1.0, (batch, 1)))
    own[0] |= union & ~own.any(0)  # keep the union exact
    return own


def check_sparse_ffn(d: int, d_ff: int, dtype, count: int, *, rng: np.random.Generator, batch: int = 1,
                     act: Activation = Activation(), cfg: sf.SparseFFNConfig | None = None, interpret: bool,
                     weights: list[jax.Array] | None = None) -> CheckResult:
    """The kernels through `sparse_ffn_indexed` (with NaN-started buffers) against the float64 oracle.
    For FATReLU the threshold is applied as given; with relu about half the candidates are active."""
    cfg = cfg or EngineConfig(backend="interpret").sparse_ffn_config(batch)  # the tuned one for this batch
    wg, wu, wd = weights if weights is not None else random_weights(rng, d, d_ff, dtype)
    x = jnp.asarray(rng.standard_normal((batch, d), np.float32), dtype)
    cand = candidate_mask(rng, batch, d_ff, count)
    tiles, counts, own = reference.compact(Candidates(mask=jnp.asarray(cand)))
    y, h = sf.sparse_ffn_indexed(x, tiles, counts, wg, wu, wd, own, act=act,
                                 cfg=cfg, interpret=interpret, poison=True)
    y = np.asarray(y, np.float64)
    finite = bool(np.isfinite(y).all()) and (h is None or bool(np.isfinite(np.asarray(h)).all()))
    if h is not None:  # the hidden buffer must be exactly zero past the count (programs that exited early)
        finite &= bool((np.asarray(h)[:, count:] == 0).all())
    name = (f"sparse_ffn {cfg.variant} d={d} d_ff={d_ff} {jnp.dtype(dtype).name} count={count} batch={batch} "
            f"{act.kind}")
    ref, terms = f64_sparse_ffn(x, cand, wg, wu, wd, act, terms_too=True)
    return CheckResult(name, sparse_ffn_error(y, ref, terms), finite, TOLERANCE[jnp.dtype(dtype).name])


def check_gemv(n: int, k: int, dtype, *, rng: np.random.Generator, batch: int = 1, interpret: bool,
               kernel: str = "plain", out_dtype=jnp.float32, **tile) -> CheckResult:
    """`gemv.gemv_pallas` against float64: kernel "plain" (x @ w^T) or "norm" (RMSNorm(x) @ w^T, the norm inside
    the kernel, against float64 products of `numerics.rms_norm`'s output), the result written as out_dtype."""
    if kernel not in ("plain", "norm"):
        raise ValueError(f"check_gemv: kernel {kernel!r}, expected 'plain' or 'norm'")
    w = device_normal(rng, (n, k), dtype)
    x = jnp.asarray(rng.standard_normal((batch, k), np.float32), dtype)
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(k), dtype) if kernel == "norm" else None
    y = gemv_mod.gemv_pallas(x, w, scale, 1e-5, out_dtype=jnp.dtype(out_dtype), interpret=interpret, poison=True,
                             **tile)
    ok_dtype = y.dtype == jnp.dtype(out_dtype)
    y = np.asarray(y.astype(jnp.float32), np.float64)
    xin = x if scale is None else rms_norm(x, scale, 1e-5)
    ref = f64_product(xin, w)
    return CheckResult(f"gemv {kernel} n={n} k={k} {jnp.dtype(dtype).name} batch={batch} "
                       f"out={jnp.dtype(out_dtype).name}", _rel(y, ref), bool(np.isfinite(y).all()) and ok_dtype,
                       TOLERANCE[jnp.dtype(dtype).name])


def check_gate_up(n: int, k: int, dtype, act: Activation, *, rng: np.random.Generator, batch: int = 1,
                  interpret: bool, out_dtype=jnp.float32, **tile) -> CheckResult:
    """`gemv.gate_up_pallas` against float64: act(x W_gate^T) * up(x W_up^T) from float64 products of the same
    inputs, the result written as out_dtype."""
    w_gate, w_up = device_normal(rng, (n, k), dtype, 1 / np.sqrt(k)), device_normal(rng, (n, k), dtype, 1 / np.sqrt(k))
    x = jnp.asarray(rng.standard_normal((batch, k), np.float32), dtype)
    h = gemv_mod.gate_up_pallas(x, w_gate, w_up, act, out_dtype=jnp.dtype(out_dtype), interpret=interpret,
                                poison=True, **tile)
    ok_dtype = h.dtype == jnp.dtype(out_dtype)
    h = np.asarray(h.astype(jnp.float32), np.float64)
    with jax.enable_x64(True):  # the activation rule on the float64 products, in float64
        ref = np.asarray(act.hidden(jnp.asarray(f64_product(x, w_gate)), jnp.asarray(f64_product(x, w_up))))
    assert ref.dtype == np.float64
    return CheckResult(f"gate_up {act.kind} n={n} k={k} {jnp.dtype(dtype).name} batch={batch} "
                       f"out={jnp.dtype(out_dtype).name}", _rel(h, ref),
                       bool(np.isfinite(h).all()) and ok_dtype, TOLERANCE[jnp.dtype(dtype).name])


def check_gemv_t(k: int, n: int, dtype, *, rng: np.random.Generator, batch: int = 1, interpret: bool,
                 out_dtype=jnp.float32, **tile) -> CheckResult:
    """`gemv.gemv_t_pallas` (x [B, k] @ w_t [k, n]) against float64, the result written as out_dtype."""
    w_t = device_normal(rng, (k, n), dtype, 1 / np.sqrt(k))
    x = jnp.asarray(rng.standard_normal((batch, k), np.float32), dtype)
    y = gemv_mod.gemv_t_pallas(x, w_t, out_dtype=jnp.dtype(out_dtype), interpret=interpret, poison=True, **tile)
    ok_dtype = y.dtype == jnp.dtype(out_dtype)
    y = np.asarray(y.astype(jnp.float32), np.float64)
    return CheckResult(f"gemv_t k={k} n={n} {jnp.dtype(dtype).name} batch={batch} out={jnp.dtype(out_dtype).name}",
                       _rel(y, f64_product_t(x, w_t)), bool(np.isfinite(y).all()) and ok_dtype,
                       TOLERANCE[jnp.dtype(dtype).name])


def check_gemv_mgpu(n: int, k: int, dtype, *, rng: np.random.Generator, batch: int = 1, interpret: bool,
                    transposed: bool = False, out_dtype=jnp.float32, **tile) -> CheckResult:
    """`gemv_mgpu.gemv_mgpu` against float64: x [B, k] @ w [n, k]^T, or transposed x @ w_t [k, n] (W_down_t), the
    result written as out_dtype (interpret mode: the partial sums started as NaN)."""
    w = device_normal(rng, (k, n) if transposed else (n, k), dtype, 1 / np.sqrt(k))
    x = jnp.asarray(rng.standard_normal((batch, k), np.float32), dtype)
    y = gemv_mgpu.gemv_mgpu(x, w, transposed=transposed, out_dtype=jnp.dtype(out_dtype), interpret=interpret,
                            poison=interpret, **tile)
    ok = y.dtype == jnp.dtype(out_dtype) and y.shape == (batch, n)
    y = np.asarray(y.astype(jnp.float32), np.float64)
    ref = f64_product_t(x, w) if transposed else f64_product(x, w)
    return CheckResult(f"gemv_mgpu{' transposed' if transposed else ''} n={n} k={k} {jnp.dtype(dtype).name} "
                       f"batch={batch} out={jnp.dtype(out_dtype).name} {tile}", _rel(y, ref),
                       bool(np.isfinite(y).all()) and ok, TOLERANCE[jnp.dtype(dtype).name])


def blocked_list_numpy(candidates: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The blocked list (`compaction.compact`) of bool [B, d_ff], built with NumPy loops: (tiles, counts, own)."""
    batch, d_ff = candidates.shape
    union = np.flatnonzero(candidates.any(0))
    n = compaction.n_tiles(d_ff, tile)
    tiles, counts = np.zeros(n * tile, np.int64), np.zeros(n, np.int64)
    own = np.zeros((n * tile, batch), np.int64)
    for t in range(n):
        mine = union[(union >= t * tile) & (union < (t + 1) * tile)]
        tiles[t * tile: t * tile + mine.size] = mine
        own[t * tile: t * tile + mine.size] = candidates[:, mine].T
        counts[t] = mine.size
    return tiles, counts, own if batch > 1 else None


def scores_for(rng: np.random.Generator, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Random f32 scores [B, d_ff] and bias [d_ff] whose scores + bias > 0 is exactly cand (every sum is at
    least 0.1 away from 0)."""
    bias = rng.standard_normal(cand.shape[1]).astype(np.float32)
    margin = (rng.random(cand.shape) + 0.1) * np.where(cand, 1, -1)
    scores = (margin - bias).astype(np.float32)
    assert ((scores + bias > 0) == cand).all()
    return scores, bias


def check_compact(d_ff: int, count: int, *, rng: np.random.Generator, batch: int = 1, tile: int = compaction.TILE,
                  interpret: bool, with_bias: bool = False) -> CheckResult:
    """The compaction programs against `blocked_list_numpy`: rel_error is the fraction of slots, counts and own
    flags that differ, so only an exact list passes. with_bias: the programs get f32 scores and a bias and
    compare them themselves."""
    cand = candidate_mask(rng, batch, d_ff, count)
    if with_bias:
        scores, bias = scores_for(rng, cand)
        candidates = Candidates(scores=jnp.asarray(scores), bias=jnp.asarray(bias))
    else:
        candidates = Candidates(mask=jnp.asarray(cand))
    out = compaction.compact_pallas(candidates, tile=tile, interpret=interpret)
    want = blocked_list_numpy(cand, tile)
    name = f"compact{'+bias' if with_bias else ''} d_ff={d_ff} count={count} batch={batch}"
    wrong, total = 0, 0
    for got, exp in zip(out, want):
        if (got is None) != (exp is None) or (got is not None and got.shape != exp.shape):
            return CheckResult(f"{name}: outputs {[None if o is None else o.shape for o in out]}", 1.0, True, 0.0)
        if got is not None:
            wrong += np.count_nonzero(np.asarray(got) != exp)
            total += exp.size
    return CheckResult(name, wrong / total, True, 0.0)


def check_add_rmsnorm(d: int, n: int | None, dtype, *, rng: np.random.Generator, batch: int = 1,
                      interpret: bool) -> CheckResult:
    """The fused residual add + RMSNorm (+ w @ normed, w [n, d]) kernel, with NaN-started outputs, against
    float64 NumPy; rel_error is the worst of its outputs."""
    x, delta = (jnp.asarray(rng.standard_normal((batch, d), np.float32), dtype) for _ in range(2))
    scale = jnp.asarray(rng.uniform(0.5, 1.5, d), dtype)
    w = None if n is None else jnp.asarray(rng.standard_normal((n, d), np.float32) / np.sqrt(d), dtype)
    got = norm.add_rmsnorm_pallas(x, delta, scale, 1e-5, w, interpret=interpret, poison=True)
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    total = f64(x) + f64(delta)
    normed = total / np.sqrt(np.mean(total ** 2, axis=-1, keepdims=True) + 1e-5) * f64(scale)
    want = [total, normed] + ([] if w is None else [normed @ f64(w).T])
    outs = [f64(o) for o in got if o is not None]
    return CheckResult(f"add_rmsnorm d={d} n={n} {jnp.dtype(dtype).name} batch={batch}",
                       max(_rel(o, r) for o, r in zip(outs, want)),
                       len(outs) == len(want) and all(np.isfinite(o).all() for o in outs),
                       TOLERANCE[jnp.dtype(dtype).name])


@jax.jit
def _f64_decode_attention(q, k_cache, v_cache, bias):
    q, k, v = (_widen(a) for a in (q, k_cache, v_cache))
    batch, heads, head_dim = q.shape
    kv_heads, window = k.shape[1], bias.shape[-1]
    k, v = (jnp.repeat(a[:, :, :window], heads // kv_heads, axis=1) for a in (k, v))  # query head h: kv h // groups
    scores = jnp.einsum("bhd,bhsd->bhs", q, k) * head_dim ** -0.5 + bias.astype(F64)[:, None, :]
    return jnp.einsum("bhs,bhsd->bhd", jax.nn.softmax(scores, axis=-1), v)


def check_decode_attention(batch: int, heads: int, kv_heads: int, slots: int, head_dim: int, dtype, *,
                           rng: np.random.Generator, interpret: bool, sliding_window: int | None = None,
                           window: int | None = None, **tile) -> CheckResult:
    """`attention.decode_attention_pallas` against float64 softmax attention over the whole window with the model's
    mask (kv_cache.attention_bias: a random left padding and query slot per sequence, a sliding window): the
    kernel's skipping of the slots past each query must not change a value. The output starts as NaN."""
    from pallas_kernels import attention
    from svdsparse_jax import kv_cache
    from svdsparse_jax.config import named_config

    window = slots if window is None else window
    q = device_normal(rng, (batch, heads, head_dim), dtype)
    k_cache, v_cache = (device_normal(rng, (batch, kv_heads, slots, head_dim), dtype) for _ in range(2))
    query_slot = rng.integers(0, window, batch).astype(np.int32)
    pad = np.minimum(rng.integers(0, window // 2 + 1, batch), query_slot).astype(np.int32)
    cfg = named_config("tiny", sliding_window=sliding_window)
    bias = kv_cache.attention_bias(cfg, jnp.asarray(pad), jnp.asarray(query_slot), 1, window)[:, 0]
    got = attention.decode_attention_pallas(q, k_cache, v_cache, bias, jnp.asarray(query_slot + 1),
                                            interpret=interpret, poison=True, **tile)
    ok = got.dtype == q.dtype and got.shape == q.shape
    got = np.asarray(got.astype(F32), np.float64)
    with jax.enable_x64(True):
        want = np.asarray(_f64_decode_attention(q, k_cache, v_cache, bias))
    return CheckResult(f"decode_attention B={batch} H={heads} KVH={kv_heads} S={slots} W={window} hd={head_dim} "
                       f"{jnp.dtype(dtype).name} sliding={sliding_window} {tile}", _rel(got, want),
                       bool(np.isfinite(got).all()) and ok, TOLERANCE[jnp.dtype(dtype).name])
