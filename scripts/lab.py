"""The lab: measurement helpers the benchmarks, the bundled model's recipe and the tests use, kept out of the
product (nothing in svdsparse_jax/ uses them):

- `TopKPredictor`: Polar Sparsity's fixed-k alternative to the union of candidates for batches
  (scripts/bench/topk.py, scripts/bench/decode.py);
- `decode_steps`: the decode steps a generate call runs (scripts/bench/decode.py);
- `ffn_rows_read`: the FFN rows the guarded FFNs read, per token or by a batch (scripts/bench/decode.py);
- `evaluate_stream`: perplexity and FFN sparsity of a token stream (the bundled model's training and card).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from svdsparse_jax.calibration import cut_windows
from svdsparse_jax.engine import EngineConfig
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.evaluate import stream_pass, union_rows_read
from svdsparse_jax.model import Transformer
from pallas_kernels.candidates import Candidates
from svdsparse_jax.predictors.base import Predictor

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TopKPredictor(Predictor):
    """Polar Sparsity's alternative to the union for batches: a fixed number k of candidates per layer and batch
    size, shared by the batch's sequences: the k neurons whose best score over the batch's sequences (`base`'s
    scores) is highest, at each position. Static shapes and no per-sequence sets. x's rows must come
    sequence-major from `batch` sequences ([batch * tokens, d], as a forward pass flattens [B, T, d])."""

    base: Predictor
    k: int
    batch: int

    @property
    def input_projection(self) -> jax.Array | None:
        return self.base.input_projection

    @property
    def needs_gate(self) -> bool:  # type: ignore[override]
        return self.base.needs_gate

    def candidates(self, x: jax.Array, *, engine: EngineConfig | None = None, projected: jax.Array | None = None,
                   gate: jax.Array | None = None) -> Candidates:
        c = self.base.candidates(x, engine=engine, projected=projected, gate=gate)
        s = c.as_mask().astype(F32) if c.scores is None else c.scores + c.bias.astype(F32)
        d_ff = s.shape[-1]
        flat = s.reshape(-1, d_ff)
        if flat.shape[0] % self.batch:
            raise ValueError(f"top-k predictor: {flat.shape[0]} rows do not come from {self.batch} sequences")
        best = jnp.max(flat.reshape(self.batch, -1, d_ff), axis=0)  # [tokens, d_ff]
        _, idx = jax.lax.top_k(best, self.k)
        chosen = jnp.zeros(best.shape, bool).at[jnp.arange(best.shape[0])[:, None], idx].set(True)
        return Candidates(mask=jnp.broadcast_to(chosen, (self.batch, *chosen.shape)).reshape(s.shape))

    def scores(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        return self.base.scores(x, gate)

    def nbytes(self) -> int:
        return self.base.nbytes()


jax.tree_util.register_dataclass(TopKPredictor, data_fields=["base"], meta_fields=["k", "batch"])


def decode_steps(max_new: int, steps_per_check: int) -> int:
    """Decode steps a call runs for max_new new tokens (the first comes from the prefill) when no sequence stops
    early: whole groups of steps_per_check."""
    return -(-(max_new - 1) // steps_per_check) * steps_per_check


def ffn_rows_read(model: Transformer, predictors: list, sequences: np.ndarray, batch: int = 4,
                  together: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The fraction of W_gate rows (candidates) and of W_up / W_down rows (active candidates) the guarded FFNs
    read, per layer [n_layers] f64, teacher-forced over every token of sequences [n, L] int: per token, or, with
    `together`, per position of the n sequences decoded as one batch, which reads the union of their rows."""
    sequences = np.asarray(sequences, np.int32)
    if together:
        return union_rows_read(model, predictors, sequences, len(sequences))
    _, _, gate_rows, up_down_rows = stream_pass(model, predictors, sequences, batch)
    return gate_rows, up_down_rows


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
    windows = cut_windows(stream, window, max_windows)
    if len(windows) == 0:
        raise SvdsparseError(f"the stream has {len(stream)} tokens, fewer than one window of {window}")
    lp, _, _, active = stream_pass(model, None, windows, batch)
    nll = -float(lp.mean())
    return StreamResult(windows.size, nll, math.exp(nll), (1 - active).tolist())
