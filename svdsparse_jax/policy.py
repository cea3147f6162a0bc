"""Which layers decode sparse at a batch size, fixed when the generate program is built.

A batch of B sequences reads the union of their candidate rows, which grows with B (docs/BENCHMARKS.md gives
measured unions), so a layer that pays sparse for one sequence may cost more than dense for eight. The engine's
policy (`EngineConfig.ffn_policy`):

  measured  per layer, sparse where the measured cost of the guarded FFN (`tuning.FFNCost`) at the union row
            fractions the calibration showed for that batch size (`UnionRows`) is below the dense FFN's by at
            least `EngineConfig.ffn_margin` of it (`tuning.FFN_POLICY_MARGIN`: near-ties stay dense)
  sparse    every layer sparse (tests, and measuring the sparse path where it loses)
  dense     every layer dense

Each sequence still zeroes its own inactive neurons exactly, so which layers run sparse is the only thing the
batch size changes in the output. The union fractions are measured at calibration time (`measure_union`) and
stored with the predictors; the decision is a static tuple per batch size, made on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdsparse_jax.config import ModelConfig
from svdsparse_jax.errors import SvdsparseError

POLICIES = ("measured", "sparse", "dense")
BATCH_SIZES = (1, 2, 4, 8, 16)  # the batch sizes calibration measures unions for


@dataclasses.dataclass(frozen=True)
class UnionRows:
    """Per batch size (`batch_sizes`, ascending) and layer: the mean fraction of d_ff in the union of B
    sequences' candidate sets (`candidates`: the W_gate rows a batch reads) and in the union of their active
    candidates (`active`: the W_up and W_down_t rows), over calibration tokens in random groups of B."""

    batch_sizes: tuple[int, ...]
    candidates: tuple[tuple[float, ...], ...]
    active: tuple[tuple[float, ...], ...]

    def at(self, batch: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(candidates, active) per layer for a batch: those of the smallest measured batch size >= batch (a
        union only grows with the batch, so this errs towards dense); None above every measured size."""
        for b, c, a in zip(self.batch_sizes, self.candidates, self.active):
            if b >= batch:
                return c, a
        return None

    def to_json(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "candidates": [list(c) for c in self.candidates],
                "active": [list(a) for a in self.active]}

    @classmethod
    def from_json(cls, d: dict, n_layers: int, where: str) -> "UnionRows":
        try:
            rows = lambda key: tuple(tuple(float(v) for v in per_batch) for per_batch in d[key])  # noqa: E731
            out = cls(tuple(int(b) for b in d["batch_sizes"]), rows("candidates"), rows("active"))
        except (KeyError, TypeError, ValueError) as e:
            raise SvdsparseError(f"{where}: union_rows is malformed ({type(e).__name__}: {e})") from None
        if not (len(out.batch_sizes) == len(out.candidates) == len(out.active)) or any(
                len(c) != n_layers for c in out.candidates + out.active):
            raise SvdsparseError(f"{where}: union_rows must give {n_layers} layers for each of its batch sizes")
        if not all(b >= 1 for b in out.batch_sizes) or list(out.batch_sizes) != sorted(set(out.batch_sizes)):
            raise SvdsparseError(f"{where}: union_rows batch_sizes {list(out.batch_sizes)}: expected ascending "
                                 "sizes >= 1")
        if not all(0.0 <= v <= 1.0 for rows in out.candidates + out.active for v in rows):  # NaN fails too
            raise SvdsparseError(f"{where}: union_rows fractions must lie in [0, 1] (NaN, negative or larger "
                                 "values would steer the sparsity policy)")
        return out


def measure_union(candidates: jax.Array, active: jax.Array, batch_sizes: Sequence[int] = BATCH_SIZES,
                  seed: int = 0) -> tuple[list[float], list[float]]:
    """One layer's union fractions: candidates and active bool [n_tokens, d_ff] (active: the candidates whose
    activation is non-zero), tokens drawn into random groups of B; per batch size, the mean over groups of the
    fraction of d_ff in each group's union. Sizes with fewer than one group are measured on one group of all
    tokens."""
    n = candidates.shape[0]
    perm = jnp.asarray(np.random.default_rng(seed).permutation(n))
    cand, act = [], []
    for b in batch_sizes:
        groups = max(1, n // b)
        take = perm[: groups * min(b, n)]
        for mask, out in ((candidates, cand), (active, act)):
            union = jnp.any(mask[take].reshape(groups, -1, mask.shape[1]), axis=1)
            out.append(float(jnp.mean(union)))
    return cand, act


def gate_rows_read(predictor, gate_rows: float) -> float:
    """The fraction of W_gate's rows a guarded FFN reads given its candidates' fraction: all of them for a
    predictor that reads the exact gate (`Predictor.needs_gate`, the oracle)."""
    return 1.0 if predictor.needs_gate else gate_rows


def ffn_rows(gate_rows, up_down_rows):
    """The rows a guarded FFN reads, in units of one matrix's rows (0 to 3, the dense FFN's three matrices):
    W_gate's (the candidates) plus W_up's and W_down's (the active candidates). Floats or arrays."""
    return gate_rows + 2 * up_down_rows


def layer_us(cost, cfg: ModelConfig, gate_rows: float, up_down_rows: float, predictor_bytes: float,
             itemsize: int) -> tuple[float, float]:
    """(dense, guarded) microseconds of one FFN layer by the cost row `cost` (`tuning.FFNCost`): the dense FFN's
    three matrices, and the guarded one's useful bytes (these row fractions of W_gate and of W_up / W_down_t,
    plus the predictor's)."""
    matrix = cfg.d_ff * cfg.d_model * itemsize
    return (cost.dense_us(3 * matrix),
            cost.sparse_us(ffn_rows(gate_rows, up_down_rows) * matrix + predictor_bytes))


def sparse_layers(engine, cfg: ModelConfig, predictors: Sequence, union: UnionRows | None, batch: int,
                  itemsize: int) -> tuple[bool, ...]:
    """Per layer, whether a decode batch of `batch` sequences runs it sparse (see the module docstring).
    Without union statistics the measured policy runs one sequence sparse and batches dense."""
    n = len(predictors)
    if engine.ffn_policy == "sparse":
        return (True,) * n
    if engine.ffn_policy == "dense":
        return (False,) * n
    cost = next((row for row in engine.ffn_costs if batch <= row.max_batch), None)
    rows = None if union is None else union.at(batch)
    if cost is None or (rows is None and batch > 1):
        return (False,) * n
    if rows is None:
        return (True,) * n
    out = []
    for p, g, a in zip(predictors, *rows):
        dense_us, sparse_us = layer_us(cost, cfg, gate_rows_read(p, g), a, p.nbytes(), itemsize)
        out.append(sparse_us < (1.0 - engine.ffn_margin) * dense_us)
    return tuple(out)
