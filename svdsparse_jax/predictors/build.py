"""Building predictors for every layer: calibration statistics -> factors (or baseline) -> biases.

One pass over the layers (calibration.layer_statistics); each layer's statistics are used and dropped before
the next layer is computed. Stage times are accumulated so the slowest stage can be named.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from svdsparse_jax.calibration import LayerStats, calibration_windows, layer_statistics
from svdsparse_jax.config import ModelConfig
from svdsparse_jax.errors import SvdsparseError, is_int, is_real
from svdsparse_jax.limits import check_count
from svdsparse_jax.engine import XLA
from svdsparse_jax.model import Block, Transformer, activation, linear
from svdsparse_jax.policy import BATCH_SIZES, UnionRows, ffn_rows, gate_rows_read, measure_union
from svdsparse_jax.predictors.base import LowRankPredictor, OraclePredictor, Predictor, PredictorSet
from svdsparse_jax.predictors.baselines import MLP_STEPS, mlp_predictor, signbit_predictor
from svdsparse_jax.predictors.svd import whitened_svd
from svdsparse_jax.predictors.thresholds import GUARD, Target, calibrate_bias, layer_target

METHODS = ("whitened", "plain", "signbit", "mlp", "oracle")
# The calibration's penalty grid moves in steps of about 1/256 of the tokens: a target missed by less than this
# is met (`target_met`, and build-predictors' table, say the same).
TARGET_TOLERANCE = 1e-3
RULES = ("s", "sparsity", "recall", "loss")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """method: one of METHODS. ranks: one rank for all layers or one per layer (SVD and MLP methods).
    rule/value: the per-layer target ('s': s x true sparsity with s - 0.1 on layers 0-1; 'sparsity': absolute;
    'recall': minimum recall; 'loss': maximum importance loss, `thresholds.Target`). tokens: calibration tokens
    used at most (split in two halves); window: tokens per context window. dtype: storage dtype of the factors
    (the model's by default). guard: calibration stops once this fraction of a layer's neurons is never
    predicted active (the reference's 1%). rank_search (SVD methods, recall or loss rules): when given, `ranks`
    is not used; each layer is calibrated at every rank listed and keeps the one whose predictor reads the
    fewest bytes per decoded token at batch 1 (`decode_bytes`): a higher rank costs its factors and saves
    candidate rows of W_gate, at the same recall or loss."""

    method: str = "whitened"
    ranks: int | tuple[int, ...] = 256
    rule: str = "s"
    value: float = 0.5
    tokens: int = 16384
    window: int = 512
    ridge: float = 1e-3
    dtype: str | None = None
    mlp_steps: int = MLP_STEPS
    seed: int = 0
    guard: float = GUARD
    rank_search: tuple[int, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise SvdsparseError(f"method {self.method!r}: expected one of {METHODS}")
        if self.rule not in RULES:
            raise SvdsparseError(f"target rule {self.rule!r}: expected one of {RULES}")
        ranks = (self.ranks,) if is_int(self.ranks) else self.ranks
        value_ok = is_real(self.value) and (0 <= self.value < 1 if self.rule == "sparsity" else 0 < self.value <= 1)
        checks = {
            "ranks": (isinstance(ranks, (tuple, list)) and len(ranks) > 0 and all(is_int(r) and r >= 1 for r in ranks),
                      "an integer >= 1 or a tuple of them"),
            "value": (value_ok, "in [0, 1) for rule 'sparsity', in (0, 1] for the others"),
            "tokens": (is_int(self.tokens) and self.tokens >= 1, "an integer >= 1"),
            "window": (is_int(self.window) and self.window >= 2, "an integer >= 2"),
            "ridge": (is_real(self.ridge) and self.ridge >= 0, "a finite number >= 0"),
            "dtype": (self.dtype in (None, "bfloat16", "float16", "float32"), "None, bfloat16, float16 or float32"),
            "mlp_steps": (is_int(self.mlp_steps) and self.mlp_steps >= 0, "an integer >= 0"),
            "seed": (is_int(self.seed) and 0 <= self.seed < 2 ** 32, "an integer from 0 to 2^32 - 1"),
            "guard": (is_real(self.guard) and 0 <= self.guard <= 1, "a number in [0, 1]"),
            "rank_search": (isinstance(self.rank_search, tuple) and all(is_int(r) and r >= 1 for r in self.rank_search)
                            and list(self.rank_search) == sorted(set(self.rank_search)),
                            "a tuple of ascending integers >= 1"),
        }
        for name, (ok, want) in checks.items():
            if not ok:
                raise SvdsparseError(f"BuildConfig {name}={getattr(self, name)!r}: expected {want}")
        if self.rank_search and not rank_search_fits(self.method, self.rule):
            raise SvdsparseError(f"BuildConfig rank_search: needs method whitened or plain and rule recall or loss, "
                                 f"got method {self.method!r}, rule {self.rule!r}")

    def rank_of(self, layer: int, n_layers: int) -> int:
        """The layer's rank; with a rank search, the largest searched (what the build may keep)."""
        if self.rank_search:
            return self.rank_search[-1]
        ranks = (self.ranks,) * n_layers if isinstance(self.ranks, int) else tuple(self.ranks)
        if len(ranks) != n_layers:
            raise SvdsparseError(f"{len(ranks)} ranks given for {n_layers} layers")
        return ranks[layer]


def layer_factors(st: LayerStats, block: Block, cfg: ModelConfig, bc: BuildConfig, target: Target,
                  dtype) -> Predictor:
    """One layer's predictor before bias calibration (for SVD and MLP: zero output bias)."""
    i = st.layer
    w_gate = block.ffn.w_gate[...]
    if bc.method in ("whitened", "plain"):
        a, b = whitened_svd(w_gate, st.gram if bc.method == "whitened" else None, bc.rank_of(i, cfg.n_layers),
                            bc.ridge)
        return LowRankPredictor(a.astype(dtype), b.astype(dtype), jnp.zeros(cfg.d_ff, dtype))
    if bc.method == "mlp":
        active1 = block.ffn.hidden(st.x1) != 0
        return mlp_predictor(st.x1, active1, bc.rank_of(i, cfg.n_layers), steps=bc.mlp_steps, seed=bc.seed + i,
                             dtype=dtype)
    if bc.method == "signbit":
        return signbit_predictor(w_gate, st.x2, st.h2 != 0, target)
    return OraclePredictor(activation(cfg).threshold)


def calibrate_layer(pred: Predictor, st: LayerStats, block: Block, target: Target, guard: float = GUARD
                    ) -> tuple[Predictor, dict]:
    """Sets a low-rank predictor's biases by the penalty objective (other types pass through) and returns it
    with its facts on the calibration half, among them the union row fractions of decode batches of
    `policy.BATCH_SIZES` sequences ("union_candidates", "union_active")."""
    active2 = st.h2 != 0
    if isinstance(pred, LowRankPredictor):
        raw = dataclasses.replace(pred, bias=jnp.zeros_like(pred.bias)).scores(st.x2)
        bias, _ = calibrate_bias(raw, st.importance, active2, target, guard=guard)
        pred = dataclasses.replace(pred, bias=bias.astype(pred.bias.dtype))
    gate = linear(XLA, st.x2, block.ffn.w_gate[...])  # as XLA's FFN computes it (f32 at full precision)
    predicted = pred.predict(st.x2, gate)
    sparsity = float(1 - jnp.mean(predicted))
    recall = float(jnp.sum(predicted & active2) / jnp.maximum(jnp.sum(active2), 1))
    m2 = st.importance ** 2
    loss = float(jnp.sum(jnp.where(predicted, 0.0, m2)) / jnp.maximum(jnp.sum(m2), 1e-30))
    # False when the guard stopped the calibration short: more than `guard` of the neurons switched off on every
    # calibration token (or, for the oracle, by construction)
    neurons_off = int(jnp.sum(~jnp.any(predicted, axis=0)))
    reached = {"sparsity": sparsity, "recall": recall, "loss": -loss}[target.kind]
    met = reached >= (-target.value if target.kind == "loss" else target.value) - TARGET_TOLERANCE
    union_candidates, union_active = measure_union(predicted, predicted & active2, BATCH_SIZES, seed=st.layer)
    info = {"layer": st.layer, "true_sparsity": st.true_sparsity, "target": dataclasses.asdict(target),
            "calib_predicted_sparsity": sparsity, "calib_recall": recall, "calib_importance_loss": loss,
            "target_met": met, "neurons_off": neurons_off,
            "union_candidates": union_candidates, "union_active": union_active}
    return pred, info


def rank_search_fits(method: str, rule: str) -> bool:
    """Whether a rank search applies: SVD factors (cut to each rank) and a recall or loss target (with a sparsity
    target every rank reads the same candidate rows, so the search would pick the smallest)."""
    return method in ("whitened", "plain") and rule in ("recall", "loss")


AUTO_RANK_DIVISORS = (16, 8, 4)  # `--rank auto` searches d/16, d/8 and d/4 (d/4: the default rank)


def auto_ranks(cfg: ModelConfig) -> tuple[int, ...]:
    """The ranks `--rank auto` searches: d/16, d/8 and d/4, at least 1 and at most min(d, d_ff), ascending."""
    top = min(cfg.d_model, cfg.d_ff)
    return tuple(sorted({min(top, max(1, cfg.d_model // k)) for k in AUTO_RANK_DIVISORS}))


def decode_bytes(pred: Predictor, facts: dict, cfg: ModelConfig, itemsize: int) -> float:
    """Bytes one decoded token reads in a layer's guarded FFN at batch 1, from its calibration facts: the
    predictor's tensors, the candidate rows of W_gate and the active candidates' rows of W_up and W_down_t."""
    rows = ffn_rows(gate_rows_read(pred, facts["union_candidates"][0]), facts["union_active"][0])
    return pred.nbytes() + rows * cfg.d_ff * cfg.d_model * itemsize


def search_rank(pred: LowRankPredictor, st: LayerStats, block: Block, target: Target, bc: BuildConfig,
                cfg: ModelConfig, itemsize: int) -> tuple[Predictor, dict]:
    """Calibrates the layer's SVD predictor truncated to each rank of `bc.rank_search` (`pred` has the largest;
    the truncated SVD of a smaller rank is its leading factors) and keeps the one whose decode reads the fewest
    bytes (`decode_bytes`), ties to the smaller rank. Its facts gain "rank" and "decode_bytes" {rank: bytes}."""
    calibrated = {r: calibrate_layer(dataclasses.replace(pred, a=pred.a[:r], b=pred.b[:, :r]), st, block, target,
                                     bc.guard) for r in bc.rank_search}
    tried = {r: decode_bytes(p, facts, cfg, itemsize) for r, (p, facts) in calibrated.items()}
    best = min(tried, key=lambda r: (tried[r], r))
    pred, facts = calibrated[best]
    return pred, facts | {"rank": best, "decode_bytes": {str(r): int(b) for r, b in tried.items()}}


def check_build(cfg: ModelConfig, bc: BuildConfig) -> None:
    if not cfg.is_sparse_activation:
        raise SvdsparseError(f"activation {cfg.activation!r} has no sparsity to predict; expected one of relu, "
                             "fatrelu, drelu")
    for i in range(cfg.n_layers):
        r = bc.rank_of(i, cfg.n_layers)
        if bc.method in ("whitened", "plain", "mlp") and not 1 <= r <= min(cfg.d_model, cfg.d_ff):
            raise SvdsparseError(f"rank {r} for layer {i}: expected 1 <= rank <= {min(cfg.d_model, cfg.d_ff)}")


def calibration_bytes_per_token(cfg: ModelConfig) -> int:
    """Memory the build holds per calibration token, about: the residual stream and the FFN inputs (d values
    each), and on the calibration half the activations, scores and their temporaries (d_ff each)."""
    return 8 * cfg.d_model + 8 * cfg.d_ff


def build_predictors(model: Transformer, calib_tokens: np.ndarray, bc: BuildConfig,
                     progress: bool = True) -> PredictorSet:
    """Builds one predictor per layer from calibration tokens (a 1-D token stream)."""
    cfg = model.cfg
    check_build(cfg, bc)
    window = min(bc.window, cfg.max_seq_len)
    calib_tokens = np.asarray(calib_tokens)
    if calib_tokens.ndim != 1 or not np.issubdtype(calib_tokens.dtype, np.integer):
        raise SvdsparseError(f"calibration tokens: expected a 1-D array of integer token ids, got "
                             f"{calib_tokens.dtype} {calib_tokens.shape}")
    bad = calib_tokens[(calib_tokens < 0) | (calib_tokens >= cfg.vocab_size)]
    if bad.size:
        raise SvdsparseError(f"calibration tokens {bad[:5].tolist()} outside the vocabulary [0, {cfg.vocab_size})")
    windows = calibration_windows(calib_tokens, window, bc.tokens)
    check_count("tokens (calibration)", int(windows.size), calibration_bytes_per_token(cfg))
    dtype = jnp.dtype(bc.dtype) if bc.dtype else model.dtype
    timings = {"statistics": 0.0, "factors": 0.0, "bias calibration": 0.0}
    layers, info = [], []
    stats_iter = layer_statistics(model, windows)
    if progress:
        from svdsparse_jax.progress import tqdm
        stats_iter = tqdm(stats_iter, total=cfg.n_layers, desc=f"build {bc.method}", leave=False,
                          disable=None)  # a bar on a terminal only
    t = time.perf_counter()
    for st in stats_iter:
        jax.block_until_ready(st.h2)
        timings["statistics"] += time.perf_counter() - t
        t = time.perf_counter()
        block = model.layers[st.layer]
        target = layer_target(bc.rule, bc.value, st.layer, st.true_sparsity)
        pred = jax.block_until_ready(layer_factors(st, block, cfg, bc, target, dtype))
        timings["factors"] += time.perf_counter() - t
        t = time.perf_counter()
        if bc.rank_search:
            pred, facts = search_rank(pred, st, block, target, bc, cfg, model.dtype.itemsize)
        else:
            pred, facts = calibrate_layer(pred, st, block, target, bc.guard)
        layers.append(pred)
        info.append(facts)
        timings["bias calibration"] += time.perf_counter() - t
        t = time.perf_counter()
    config = dataclasses.asdict(bc) | {"calibration_tokens": int(windows.size), "window": window,
                                       "dtype": jnp.dtype(dtype).name}
    if bc.rank_search:  # the ranks kept, so the manifest says what each layer is
        config |= {"ranks": [p.rank for p in layers], "rank_search": list(bc.rank_search)}
    return PredictorSet(bc.method, layers, config, info, timings, union_of(info))


def union_of(info: list[dict]) -> UnionRows:
    """The set's union row fractions, taken out of its per-layer build facts (so a manifest stores them once,
    as union_rows)."""
    candidates = [facts.pop("union_candidates") for facts in info]
    active = [facts.pop("union_active") for facts in info]
    return UnionRows(BATCH_SIZES, tuple(zip(*candidates)), tuple(zip(*active)))
