"""The predictor types behind one interface (`Predictor`): every predictor owns its whole computation, from the
normed FFN input to the candidate set, even where the engine fuses a piece of it into a kernel:

  candidates(x, engine=, projected=, gate=) -> candidates.Candidates   which neurons to compute, per token
  scores(x, gate=)                          -> f32 [..., d_ff]         higher = more likely active (AUROC)
  input_projection                          -> [r, d] or None           a product of the normed input the
                                                                         engine may compute ahead (low-rank: A)
  needs_gate                                                             reads the exact gate W_gate x (oracle)

All are pytrees (arrays are leaves, shapes and flags are static), so a list of them, one per layer, passes
through `jax.jit` next to the model's weights. `PredictorSet` is one per layer plus what built them.

This module is the predictor format's types, so it imports nothing heavy: the engine (and with it the kernels) is
imported where a low-rank predictor's products are traced, not when the types are (the torch executor reads
predictor directories without the model or the kernels).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels.candidates import Candidates
from svdsparse_jax.config import ModelConfig
from svdsparse_jax.policy import UnionRows

if TYPE_CHECKING:
    from svdsparse_jax.engine import EngineConfig

F32 = jnp.float32


class Predictor(abc.ABC):
    """One layer's contextual-sparsity predictor (see the module docstring)."""

    needs_gate: ClassVar[bool] = False

    @property
    def input_projection(self) -> jax.Array | None:
        """A matrix [r, d] whose product with the normed FFN input `candidates` needs first; the engine may
        compute it in the kernel that forms that input and pass it as `projected`. None: no such product."""
        return None

    @abc.abstractmethod
    def candidates(self, x: jax.Array, *, engine: EngineConfig | None = None, projected: jax.Array | None = None,
                   gate: jax.Array | None = None) -> Candidates:
        """The candidate neurons of each token of x [..., d] (the normed FFN input), the products through `engine`
        (None: XLA's, `engine.XLA`). projected: x @
        input_projection^T f32 [..., r] when already computed; gate: W_gate x f32 [..., d_ff], given exactly
        when `needs_gate`."""

    @abc.abstractmethod
    def scores(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        """f32 [..., d_ff]: higher = more likely active."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes the predictor reads per token."""

    def predict(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        """bool [..., d_ff]: the candidate set of each token (XLA's products)."""
        return self.candidates(x, gate=gate).as_mask()


@dataclasses.dataclass(frozen=True)
class LowRankPredictor(Predictor):
    """score = B relu?(A x + hidden_bias) + bias: the SVD predictors (A [r, d], B [d_ff, r], no hidden bias, no
    ReLU; the paper's section on truncation-aware SVD) and the trained MLP baseline (Deja Vu / PowerInfer style,
    with both). Neuron i is a candidate iff its score is > 0; the bias is added and compared where the neuron
    list is built (`compaction`)."""

    a: jax.Array
    b: jax.Array
    bias: jax.Array
    hidden_bias: jax.Array | None = None
    relu: bool = False

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def input_projection(self) -> jax.Array:
        return self.a

    def candidates(self, x: jax.Array, *, engine: EngineConfig | None = None, projected: jax.Array | None = None,
                   gate: jax.Array | None = None) -> Candidates:
        from svdsparse_jax.engine import XLA, project  # the kernels, only where a predictor's products are traced

        engine = engine or XLA
        z = project(engine, x, self.a) if projected is None else projected
        if self.hidden_bias is not None:
            z = z + self.hidden_bias.astype(F32)
        if self.relu:
            z = jnp.maximum(z, 0.0)
        return Candidates(scores=project(engine, z.astype(self.b.dtype), self.b), bias=self.bias)

    def scores(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        c = self.candidates(x)
        return c.scores + c.bias.astype(F32)

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
class SignBitPredictor(Predictor):
    """SparseInfer (DATE 2025): N_neg = popcount(sign(w_i) XOR sign(x)) negative products, N_pos = d - N_neg;
    neuron i is predicted inactive iff N_neg > alpha * N_pos. bits: [d_ff, ceil(d/32)] uint32. alpha is kept as
    an exact fraction alpha_num / alpha_den (int32 scalars) and the rule is evaluated in integers,
    N_neg * den > num * N_pos, so it is the same on every backend (alpha = +inf: num 1, den 0)."""

    bits: jax.Array
    alpha_num: jax.Array
    alpha_den: jax.Array
    d: int

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

    def candidates(self, x: jax.Array, *, engine: EngineConfig | None = None, projected: jax.Array | None = None,
                   gate: jax.Array | None = None) -> Candidates:
        n_neg, n_pos = self.counts(x)
        return Candidates(mask=n_neg * self.alpha_den <= self.alpha_num * n_pos)

    def nbytes(self) -> int:
        return self.bits.size * 4 + 8


jax.tree_util.register_dataclass(SignBitPredictor, data_fields=["bits", "alpha_num", "alpha_den"], meta_fields=["d"])


@dataclasses.dataclass(frozen=True)
class OraclePredictor(Predictor):
    """The exact gate: candidates are exactly the neurons whose activation is non-zero (upper bound on accuracy,
    no saving on W_gate). threshold: FATReLU's (0 for relu / drelu)."""

    threshold: float = 0.0
    needs_gate: ClassVar[bool] = True  # it reads the exact gate, so it saves nothing on W_gate

    def scores(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        return gate - self.threshold

    def candidates(self, x: jax.Array, *, engine: EngineConfig | None = None, projected: jax.Array | None = None,
                   gate: jax.Array | None = None) -> Candidates:
        return Candidates(mask=gate >= self.threshold if self.threshold > 0 else gate > 0)

    def nbytes(self) -> int:
        return 0


jax.tree_util.register_dataclass(OraclePredictor, data_fields=[], meta_fields=["threshold"])


@dataclasses.dataclass
class PredictorSet:
    """One predictor per layer plus what built them. info: per-layer build facts (true sparsity on the
    calibration half, target, predicted sparsity there); timings: seconds per stage; union: the row fractions a
    decode batch reads, by batch size, on the calibration half (what the engine's sparsity policy reads; None
    for sets saved before it was measured)."""

    method: str
    layers: list[Predictor]
    config: dict
    info: list[dict] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    union: UnionRows | None = None


def ffn_bytes(cfg: ModelConfig, itemsize: int = 2) -> int:
    """Bytes of one layer's three FFN matrices."""
    return 3 * cfg.d_ff * cfg.d_model * itemsize


def predictor_cost(pred: Predictor, cfg: ModelConfig, itemsize: int = 2) -> float:
    """Bytes the predictor reads per token, as a fraction of the dense FFN (the oracle reads all of W_gate)."""
    if pred.needs_gate:
        return 1 / 3
    return pred.nbytes() / ffn_bytes(cfg, itemsize)
