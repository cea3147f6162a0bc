"""The predictor types behind one interface: `predict(x, gate) -> bool [..., d_ff]` (which neurons to compute)
and `scores(x, gate) -> f32 [..., d_ff]` (higher = more likely active; used for AUROC). `gate` is the
pre-activation W_gate x, which only the oracle reads (the XLA path computes it anyway; a sparse kernel
computes it on the candidates only, so the oracle has no savings on W_gate).

All are pytrees (arrays are leaves, shapes and flags are static), so a list of them, one per layer, passes
through `jax.jit` next to the model's weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.gemv import gemv
from svdsparse_jax.config import ModelConfig

F32 = jnp.float32


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [out, in]^T -> [..., out] f32 (decode-sized inputs through the dispatched GEMV)."""
    flat = x.reshape(-1, x.shape[-1])
    return gemv(flat, w).reshape(*x.shape[:-1], w.shape[0])


@dataclasses.dataclass(frozen=True)
class LowRankPredictor:
    """score = B relu?(A x + hidden_bias) + bias: the SVD predictors (A [r, d], B [d_ff, r], no hidden bias, no
    ReLU; REFERENCE.md section 2) and the trained MLP baseline (Deja Vu / PowerInfer style, with both)."""

    a: jax.Array
    b: jax.Array
    bias: jax.Array
    hidden_bias: jax.Array | None = None
    relu: bool = False

    needs_gate = False

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def score_terms(self, x: jax.Array, z: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(B relu?(A x + hidden_bias) f32 [..., d_ff], bias [d_ff] as stored): the scores before their bias,
        which the guarded FFN's compaction adds (in f32) and compares itself. z: A x f32 [..., r] when the
        caller has it (decode computes it in the kernel that normalises x)."""
        z = _dot(x, self.a) if z is None else z
        if self.hidden_bias is not None:
            z = z + self.hidden_bias.astype(F32)
        if self.relu:
            z = jnp.maximum(z, 0.0)
        return _dot(z.astype(self.b.dtype), self.b), self.bias

    def scores(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        raw, bias = self.score_terms(x)
        return raw + bias.astype(F32)

    def predict(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        return self.scores(x) > 0

    def nbytes(self) -> int:
        return sum(t.size * t.dtype.itemsize for t in (self.a, self.b, self.bias, self.hidden_bias) if t is not None)


jax.tree_util.register_dataclass(LowRankPredictor, data_fields=["a", "b", "bias", "hidden_bias"],
                                 meta_fields=["relu"])


def pack_signs(v: jax.Array) -> jax.Array:
    """Sign bits (1 where v < 0) of [..., d] packed into [..., ceil(d/32)] uint32 (zero padding = positive)."""
    d = v.shape[-1]
    words = -(-d // 32)
    neg = jnp.pad(v < 0, [(0, 0)] * (v.ndim - 1) + [(0, words * 32 - d)])
    neg = neg.reshape(*v.shape[:-1], words, 32).astype(jnp.uint32)
    return jnp.sum(neg << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


@dataclasses.dataclass(frozen=True)
class SignBitPredictor:
    """SparseInfer (DATE 2025): N_neg = popcount(sign(w_i) XOR sign(x)) negative products, N_pos = d - N_neg;
    neuron i is predicted inactive iff N_neg > alpha * N_pos. bits: [d_ff, ceil(d/32)] uint32. alpha is kept as
    an exact fraction alpha_num / alpha_den (int32 scalars) and the rule is evaluated in integers,
    N_neg * den > num * N_pos, so it is the same on every backend (alpha = +inf: num 1, den 0)."""

    bits: jax.Array
    alpha_num: jax.Array
    alpha_den: jax.Array
    d: int

    needs_gate = False

    @property
    def alpha(self) -> float:
        return float(self.alpha_num) / float(self.alpha_den) if int(self.alpha_den) else float("inf")

    def counts(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(N_neg, N_pos) int32 [..., d_ff]. Decode-sized inputs XOR packed bits and count them; larger batches
        use the same counts through an exact +-1 matmul, N_neg = (d - sign(w) . sign(x)) / 2, which needs no
        [tokens, d_ff, words] intermediate."""
        rows = x.size // x.shape[-1]
        if rows <= 16:
            xb = pack_signs(x)[..., None, :]  # [..., 1, words]
            n_neg = jnp.sum(jax.lax.population_count(self.bits ^ xb), axis=-1, dtype=jnp.int32)
        else:
            shifts = jnp.arange(32, dtype=jnp.uint32)
            neg_w = ((self.bits[..., None] >> shifts) & 1).reshape(self.bits.shape[0], -1)[:, : self.d]
            sw = (1 - 2 * neg_w.astype(jnp.int32)).astype(jnp.bfloat16)  # +-1, exact in bf16
            sx = jnp.where(x < 0, -1.0, 1.0).astype(jnp.bfloat16)
            dot = jnp.einsum("...i,fi->...f", sx, sw, preferred_element_type=F32)  # |dot| <= d < 2^24: exact
            n_neg = ((self.d - dot) / 2).astype(jnp.int32)
        return n_neg, self.d - n_neg

    def scores(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        """-N_neg / N_pos (f32): higher = more likely active (the rule itself is exact, in `predict`)."""
        n_neg, n_pos = self.counts(x)
        return -n_neg.astype(F32) / jnp.maximum(n_pos, 1).astype(F32)

    def predict(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        n_neg, n_pos = self.counts(x)
        return n_neg * self.alpha_den <= self.alpha_num * n_pos

    def nbytes(self) -> int:
        return self.bits.size * 4 + 8


jax.tree_util.register_dataclass(SignBitPredictor, data_fields=["bits", "alpha_num", "alpha_den"], meta_fields=["d"])


@dataclasses.dataclass(frozen=True)
class OraclePredictor:
    """The exact gate: candidates are exactly the neurons whose activation is non-zero (upper bound on accuracy,
    no saving on W_gate). threshold: FATReLU's (0 for relu / drelu)."""

    threshold: float = 0.0
    needs_gate = True  # it reads the exact gate, so it saves nothing on W_gate

    def scores(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        return gate - self.threshold

    def predict(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        return gate >= self.threshold if self.threshold > 0 else gate > 0

    def nbytes(self) -> int:
        return 0


jax.tree_util.register_dataclass(OraclePredictor, data_fields=[], meta_fields=["threshold"])

LayerPredictor = LowRankPredictor | SignBitPredictor | OraclePredictor


def ffn_bytes(cfg: ModelConfig, itemsize: int = 2) -> int:
    """Bytes of one layer's three FFN matrices."""
    return 3 * cfg.d_ff * cfg.d_model * itemsize


def predictor_cost(pred: LayerPredictor, cfg: ModelConfig, itemsize: int = 2) -> float:
    """Bytes the predictor reads per token, as a fraction of the dense FFN (the oracle reads all of W_gate)."""
    if isinstance(pred, OraclePredictor):
        return 1 / 3
    return pred.nbytes() / ffn_bytes(cfg, itemsize)
