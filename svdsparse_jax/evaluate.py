"""Evaluation: a model on text, and predictors against the dense model.

- `score_tokens` / `score_stream`: per-token log-probabilities, NLL and perplexity. Texts longer than the window
  are scored in windows that overlap by one token, so every token after the first is predicted once; each
  window restarts the context. `score_stream` takes the tokens piece by piece (`text_pieces`), in bounded memory.
- `forward_stats` / `stream_pass`: the teacher-forced pass over windows with per-layer candidate and activation
  counts (`Transformer.forward_with_stats`), one batch or a stream of windows.
- `evaluate_predictors`: per-layer predictor metrics (sparsity, recall, precision, exact AUROC, FFN error) and
  whole-model ones (perplexity dense vs sparse, top-1 agreement, rows read), streamed over batches of windows in
  bounded memory, plus `write_plots`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from svdsparse_jax import kv_cache
from svdsparse_jax.errors import SvdsparseError, is_int
from svdsparse_jax.fsutil import max_name_bytes
from svdsparse_jax.limits import check_count
from svdsparse_jax.generate import bucket
from svdsparse_jax.engine import XLA
from svdsparse_jax.model import Transformer, einsum, ffn_hidden, linear
from svdsparse_jax.policy import ffn_rows, gate_rows_read


@jax.jit(static_argnums=(0,))
def forward_stats(graphdef, state, predictors, tokens: jax.Array, pad: jax.Array):
    """Teacher-forced pass over left-padded windows tokens [B, L] (every token through the guarded FFNs when
    predictors are given, as the model's engine runs them). Returns (log p(tokens[:, j+1] | tokens[:, :j+1])
    [B, L-1] f32, the argmax next token [B, L-1], and per layer, over the non-padding tokens, the number of
    candidate neurons [n_layers] and of non-zero FFN activations [n_layers], f32)."""
    model: Transformer = nnx.merge(graphdef, state)
    cache = kv_cache.init_cache(model.cfg, pad, tokens.shape[1], model.dtype)
    states, _, stats = model.forward_with_stats(tokens, cache, jnp.int32(0), predictors)
    logp = jax.nn.log_softmax(model.logits(states[:, :-1]), axis=-1)
    lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    real = (jnp.arange(tokens.shape[1])[None, :] >= pad[:, None])[..., None]
    count = lambda m: jnp.sum(m & real, dtype=jnp.float32)  # noqa: E731
    # a dense layer (no predictor) computes every neuron
    candidates = [count(real) * model.cfg.d_ff if s.candidates is None else count(s.candidates) for s in stats]
    return lp, jnp.argmax(logp, -1), jnp.stack(candidates), jnp.stack([count(s.hidden != 0) for s in stats])


def stream_pass(model: Transformer, predictors, windows: np.ndarray, batch: int):
    """`forward_stats` over windows [n, W] in batches of `batch` (a short last batch is filled with all-padding
    rows, so one program serves every batch). Returns (log-probs [n, W-1] f64, argmax [n, W-1], candidate and
    active fractions per layer [n_layers])."""
    graphdef, state = nnx.split(model)
    n, window = windows.shape
    lps, tops, cands, active = [], [], 0.0, 0.0
    for i in range(0, n, batch):
        chunk, real = windows[i:i + batch], min(batch, n - i)
        chunk = np.concatenate([chunk, np.zeros((batch - real, window), np.int32)])
        pad = np.asarray([0] * real + [window] * (batch - real), np.int32)
        lp, top, c, a = forward_stats(graphdef, state, predictors, jnp.asarray(chunk), jnp.asarray(pad))
        lps.append(np.asarray(lp, np.float64)[:real])
        tops.append(np.asarray(top)[:real])
        cands, active = cands + np.asarray(c, np.float64), active + np.asarray(a, np.float64)
    total = n * window * model.cfg.d_ff
    return np.concatenate(lps), np.concatenate(tops), cands / total, active / total


@jax.jit(static_argnums=(0,))
def _union_fractions(graphdef, state, predictors, tokens: jax.Array):
    """tokens [B, L], one decode batch teacher-forced through the guarded FFNs: per layer [n_layers] f32, the
    fraction of neurons that are a candidate for some sequence of the batch, and the fraction that are active
    for some sequence, averaged over the L positions."""
    model: Transformer = nnx.merge(graphdef, state)
    b, length = tokens.shape
    _, _, stats = model.forward_with_stats(
        tokens, kv_cache.init_cache(model.cfg, jnp.zeros(b, jnp.int32), length, model.dtype), jnp.int32(0), predictors)
    union = lambda masks: jnp.stack([jnp.mean(jnp.any(m, axis=0)) for m in masks])  # noqa: E731
    return union([s.candidates for s in stats]), union([s.hidden != 0 for s in stats])


def union_rows_read(model: Transformer, predictors: list, windows: np.ndarray, batch: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The rows decode batches of `batch` sequences read: windows [n, L] teacher-forced in groups of `batch`
    consecutive windows (a short last group is left out), per layer [n_layers] f64, the union's fraction of
    W_gate rows (candidates) and of W_up / W_down rows (active candidates), averaged over positions and groups."""
    graphdef, state = nnx.split(model)
    windows = np.asarray(windows, np.int32)
    unions = [_union_fractions(graphdef, state, predictors, jnp.asarray(windows[g:g + batch]))
              for g in range(0, len(windows) // batch * batch, batch)]
    return tuple(np.mean([np.asarray(u[i], np.float64) for u in unions], axis=0) for i in (0, 1))


@dataclasses.dataclass
class ScoreResult:
    """logprobs[j] = log p(ids[j+1] | ids[:j+1]) (natural log; empty when not kept); tokens: the tokens scored;
    nll = -mean of the log-probabilities; ppl = exp(nll)."""

    logprobs: list[float]
    nll: float
    ppl: float
    tokens: int = 0


def score_tokens(model: Transformer, ids: Sequence[int], window: int | None = None) -> ScoreResult:
    """Scores a token sequence (at least 2 tokens) in windows of at most `window` tokens (default: the
    model's context)."""
    return score_stream(model, [np.asarray(ids, np.int64)], window)


SCORE_BATCH = 8  # full windows scored in one forward pass


def score_stream(model: Transformer, pieces: Iterable[np.ndarray], window: int | None = None,
                 keep_logprobs: bool = True) -> ScoreResult:
    """`score_tokens` of the concatenation of token pieces that arrive one at a time (a long text tokenized
    piece by piece), in memory bounded by a few windows' tokens (and 4 bytes a token for the log-probabilities,
    if kept). Windows of `window` tokens overlap by one, so every token after the first is predicted once; full
    windows go SCORE_BATCH to a forward pass. The last, shorter window is extended back over the tokens before it
    to a full window of context, predicting only its own tokens (as lm-evaluation-harness' rolling windows)."""
    cfg = model.cfg
    if window is not None and not (is_int(window) and window >= 2):
        raise SvdsparseError(f"window={window!r}: expected an integer >= 2 (or None: the model's context)")
    window = min(window or cfg.max_seq_len, cfg.max_seq_len)
    # SCORE_BATCH windows at a time, each token with its f32 log-probabilities over the vocabulary
    check_count("window (--window; default: the model's context)", window,
                SCORE_BATCH * (evaluation_bytes_per_token(cfg) + 8 * cfg.vocab_size))
    graphdef, state = nnx.split(model)
    kept: list[np.ndarray] = []
    total, count = 0.0, 0
    buffer = np.zeros(0, np.int64)
    full: list[np.ndarray] = []  # full windows waiting for a batch
    last = np.zeros(0, np.int64)  # the last full window: the context of a shorter tail

    def score(chunks: list[np.ndarray], predicted: int | None = None) -> None:
        """Scores chunks of one length (full windows, or the tail with its context), padded to a bucket of
        rows; counts every prediction of a chunk, or its last `predicted`."""
        nonlocal total, count
        n = len(chunks[0])
        for chunk in chunks:
            bad = chunk[(chunk < 0) | (chunk >= cfg.vocab_size)]
            if bad.size:
                raise SvdsparseError(f"token ids {bad[:5].tolist()} outside the vocabulary [0, {cfg.vocab_size})")
        length = min(bucket(n), window) if n < window else window
        rows = bucket(len(chunks), minimum=1)  # a few static batch shapes, not one per count
        tokens = np.zeros((rows, length), np.int32)
        tokens[:len(chunks), length - n:] = np.stack(chunks)
        pad = np.full(rows, length - n, np.int32)
        lp = np.asarray(forward_stats(graphdef, state, None, jnp.asarray(tokens), jnp.asarray(pad))[0])
        for row in lp[:len(chunks), length - n:]:
            row = row[len(row) - (predicted or len(row)):]
            total, count = total + float(np.sum(row, dtype=np.float64)), count + len(row)
            if keep_logprobs:
                kept.append(row.astype(np.float32))

    for piece in pieces:
        buffer = np.concatenate([buffer, np.asarray(piece, np.int64).reshape(-1)])
        while len(buffer) > window:  # a full window, and at least one token after it
            full.append(buffer[:window])
            last = buffer[:window]
            buffer = buffer[window - 1:]
            if len(full) == SCORE_BATCH:
                score(full)
                full = []
    if full:
        score(full)
    if count + len(buffer) < 2:
        raise SvdsparseError(f"scoring needs at least 2 tokens, got {count + len(buffer)}")
    if len(buffer) >= 2:  # last[-1] is buffer[0]: together, the tokens before the tail and the tail
        score([np.concatenate([last[:-1], buffer])[-window:]], len(buffer) - 1)
    nll = -total / count
    logprobs = np.concatenate(kept).tolist() if kept else []
    return ScoreResult(logprobs, nll, math.exp(nll), count + 1)


_LINE_CUT = re.compile(r"\n(?=\S)")  # a line end before a non-space: pre-tokenizers split on both sides
_SPACE_CUT = re.compile(r"(?<=\S) (?=\S)")  # one space between words: the start of a " word" pre-token


def text_pieces(path: str | os.PathLike, chars: int = 1 << 20) -> Iterator[str]:
    """A UTF-8 text file in pieces of about `chars` characters (at most 2 x chars), read lazily in blocks, so
    memory stays bounded whatever the file holds. A piece ends where byte-level BPE pre-tokenizers (GPT-2's
    pattern) split anyway, so tokenizing piece by piece gives the whole text's tokens: before a line end followed
    by a non-space (the next piece starts with it), else, in a text with no such line end, before a single space
    between two words; a run of 2 x chars characters with neither is cut where it is (a tokenizer that adds a
    prefix space to every call adds one per piece)."""
    buffer = ""
    try:
        with open(path, encoding="utf-8") as f:
            while True:
                block = f.read(chars)
                buffer += block
                if not block:
                    if buffer:
                        yield buffer
                    return
                while len(buffer) >= 2 * chars:
                    head = buffer[:2 * chars]
                    cut = _last_match(_LINE_CUT, head, chars // 2) or _last_match(_SPACE_CUT, head, chars // 2) \
                        or 2 * chars
                    yield buffer[:cut]
                    buffer = buffer[cut:]
    except UnicodeDecodeError as e:
        raise SvdsparseError(f"{path}: not UTF-8 text (byte {e.start} of a block: {e.reason})") from None
    except OSError as e:
        raise SvdsparseError(f"{path}: cannot read ({e.strerror})") from None


def _last_match(pattern: re.Pattern, text: str, start: int) -> int | None:
    """The position of pattern's last match in text at or after `start` (None if there is none)."""
    last = None
    for m in pattern.finditer(text, start):
        last = m.start()
    return last


def pick_windows(tokens: np.ndarray, window: int, max_windows: int | None = None) -> np.ndarray:
    """The evaluation's windows [n, window] int32: all of them, or `max_windows` spread evenly over the stream
    (`calibration.cut_windows`); at least one."""
    from svdsparse_jax.calibration import cut_windows

    if window < 2 or len(tokens) < window:
        raise SvdsparseError(f"{len(tokens)} tokens: too few to evaluate (need at least one window of 2)")
    return cut_windows(tokens, window, max_windows, spread=True)


def windowing(summary: dict) -> str:
    """How an evaluation's perplexity was measured, in words (from an `evaluate_predictors` summary): windows
    spread evenly over a longer stream, or every window of the tokens read (`eval --text-file` reads only as many
    as its windows take)."""
    n, w, total = summary["windows"], summary["window"], summary["stream_tokens"]
    if n >= total // w:
        return f"{n} windows of {w} tokens, every window of the {total:,} tokens read"
    return f"{n} windows of {w} tokens spread evenly over {total:,} tokens"


# ------------------------------------------------------------------------------------ predictor evaluation

def auroc(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Exact rank-based AUROC per column (ties get average ranks). scores [n, f], labels [n, f] bool ->
    [f] f32, NaN where a column has only one class."""
    s = jnp.asarray(scores, jnp.float32)
    sorted_s = jnp.sort(s, axis=0)
    rank = jax.vmap(lambda col_sorted, col: (jnp.searchsorted(col_sorted, col, "left")
                                            + jnp.searchsorted(col_sorted, col, "right") + 1) / 2.0,
                    in_axes=(1, 1), out_axes=1)(sorted_s, s)
    y = labels.astype(jnp.float32)
    n_pos = jnp.sum(y, 0)
    n_neg = y.shape[0] - n_pos
    u = jnp.sum(rank * y, 0) - n_pos * (n_pos + 1) / 2
    return jnp.where((n_pos > 0) & (n_neg > 0), u / jnp.maximum(n_pos * n_neg, 1), jnp.nan)


@jax.jit(static_argnums=(0,))
def _ffn_inputs(graphdef, state, tokens: jax.Array) -> list[jax.Array]:
    """Every layer's FFN input [B * L, d] of the dense model over windows tokens [B, L] (`forward_with_stats`;
    the statistics it does not return are not computed)."""
    model: Transformer = nnx.merge(graphdef, state)
    b, length = tokens.shape
    cache = kv_cache.init_cache(model.cfg, jnp.zeros(b, jnp.int32), length, model.dtype)
    _, _, stats = model.forward_with_stats(tokens, cache, jnp.int32(0))
    return [st.inputs.reshape(b * length, -1) for st in stats]


@functools.partial(jax.jit, static_argnums=(5,))
def _layer_sums(pred, x, w_gate, w_up, w_down_t, cfg) -> dict[str, jax.Array]:
    """One predictor's sums over dense FFN inputs x [n, d] (int32 counts, f32 squared norms): active neurons,
    predicted ones, both, and the FFN outputs' ||y_sparse - y||^2 and ||y||^2."""
    gate, up = linear(XLA, x, w_gate), linear(XLA, x, w_up)
    h = ffn_hidden(cfg, gate, up)
    active = h != 0
    predicted = pred.predict(x, gate)
    dt = w_down_t.dtype
    y = einsum("nf,fd->nd", h.astype(dt), w_down_t)
    y_sparse = einsum("nf,fd->nd", jnp.where(predicted, h, 0).astype(dt), w_down_t)
    count = lambda m: jnp.sum(m, dtype=jnp.int32)  # noqa: E731
    return {"active": count(active), "predicted": count(predicted), "hit": count(predicted & active),
            "err2": jnp.sum(jnp.square(y_sparse - y)), "y2": jnp.sum(jnp.square(y))}


@functools.partial(jax.jit, static_argnums=(4,))
def _layer_auroc(pred, x, w_gate, w_up, cfg) -> jax.Array:
    """The mean per-neuron AUROC (`auroc`) of the predictor's scores on dense FFN inputs x [n, d]."""
    gate = linear(XLA, x, w_gate)
    active = ffn_hidden(cfg, gate, linear(XLA, x, w_up)) != 0
    return jnp.nanmean(auroc(pred.scores(x, gate), active))


def _layer_reports(model: Transformer, predictor_sets: dict, windows: np.ndarray, batch: int, auroc_tokens: int
                   ) -> dict[str, list[dict]]:
    """Per predictor set and layer, the metrics of `evaluate_predictors` on the dense model's FFN inputs, from
    `batch` windows at a time: the sums of `_layer_sums` add up over the batches and the first `auroc_tokens`
    inputs of each layer are kept for the AUROC, so memory is bounded by one batch's activations whatever the
    number of windows."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    weights = [(layer.ffn.w_gate[...], layer.ffn.w_up[...], layer.ffn.w_down_t[...]) for layer in model.layers]
    sums = {name: [{} for _ in range(cfg.n_layers)] for name in predictor_sets}
    held: list[list[jax.Array]] = [[] for _ in range(cfg.n_layers)]  # the first auroc_tokens inputs per layer
    kept = 0
    for s in range(0, len(windows), batch):
        inputs = _ffn_inputs(graphdef, state, jnp.asarray(windows[s:s + batch], jnp.int32))
        for i, x in enumerate(inputs):
            for name, ps in predictor_sets.items():
                for k, v in _layer_sums(ps.layers[i], x, *weights[i], cfg).items():
                    sums[name][i][k] = sums[name][i].get(k, 0.0) + float(v)
            if kept < auroc_tokens:
                held[i].append(x[:auroc_tokens - kept])
        kept = min(auroc_tokens, kept + len(inputs[0]))
    total = windows.size * cfg.d_ff  # (token, neuron) pairs
    reports = {}
    for name, ps in predictor_sets.items():
        reports[name] = []
        for i, t in enumerate(sums[name]):
            x = jnp.concatenate(held[i])
            reports[name].append({
                "layer": i, "true_sparsity": 1 - t["active"] / total, "predicted_sparsity": 1 - t["predicted"] / total,
                "recall": t["hit"] / max(t["active"], 1), "precision": t["hit"] / max(t["predicted"], 1),
                "auroc": float(_layer_auroc(ps.layers[i], x, *weights[i][:2], cfg)),
                "ffn_rel_error": math.sqrt(t["err2"]) / max(math.sqrt(t["y2"]), 1e-30)})
    return reports


# What an evaluation keeps per token of its windows, whatever their number: the token (int32) and, per pass
# (dense, each predictor set and batch size), its log-probability (f64) and argmax (int64); a forward pass's
# activations are bounded by one batch of windows.
EVALUATION_BYTES_KEPT = 4 + 3 * 16


def evaluation_bytes_per_token(cfg) -> int:
    """Memory a forward pass with statistics holds per token, about: the residual stream and FFN inputs (d values
    each, and the FFN outputs dense and sparse), the gate, up, activations and scores with their masks (d_ff
    each)."""
    return 16 * cfg.d_model + 20 * cfg.d_ff


def evaluate_predictors(model: Transformer, predictor_sets: dict, tokens: np.ndarray, window: int = 512,
                        max_windows: int | None = None, batch: int = 4, auroc_tokens: int = 4096,
                        batch_sizes: Sequence[int] = (), progress: bool = False) -> dict[str, dict]:
    """Evaluates predictor sets (name -> predictors.PredictorSet) on a held-out token stream cut into windows.

    Per layer (on the dense model's FFN inputs): true and predicted sparsity, recall and precision over (token,
    neuron) pairs, mean per-neuron AUROC (exact, on the first `auroc_tokens` tokens: a column sort of every
    token is the costliest step on a CPU), and the FFN output's relative error. Whole model (every token through
    the guarded FFNs, teacher-forced): perplexity dense vs sparse, top-1 next-token agreement with the dense
    model, and the fraction of W_gate / W_up / W_down rows read (gate: candidates; up and down: active
    candidates). With batch_sizes, each report also has "batches" (`evaluate_batches`). The windows:
    `pick_windows` (all, or max_windows spread evenly over the stream). progress: a progress bar on a terminal.
    Returns {name: {"summary": {...}, "layers": [...]}}.
    """
    from svdsparse_jax.predictors.base import ffn_bytes

    cfg = model.cfg
    for name, v, low in (("window", window, 2), ("batch", batch, 1), ("auroc_tokens", auroc_tokens, 1)):
        if not (is_int(v) and v >= low):
            raise SvdsparseError(f"{name}={v!r}: expected an integer >= {low}")
    if max_windows is not None and not (is_int(max_windows) and max_windows >= 1):
        raise SvdsparseError(f"max_windows={max_windows!r}: expected an integer >= 1 or None")
    window = min(window, cfg.max_seq_len, len(tokens))
    windows = pick_windows(tokens, window, max_windows)
    n = len(windows)
    check_count("max_windows (evaluation windows)", n, window * EVALUATION_BYTES_KEPT)
    bad = [b for b in batch_sizes if not 1 <= b <= n]
    if bad:  # before the long work, not after it
        raise SvdsparseError(f"--batch-sizes {bad[0]}: expected 1 <= B <= {n}, the windows evaluated")
    from svdsparse_jax.progress import tqdm
    bar = tqdm(total=2 + (1 + len(batch_sizes)) * len(predictor_sets), desc="evaluate", unit="pass", leave=False,
               disable=None if progress else True)
    layers = _layer_reports(model, predictor_sets, windows, batch, auroc_tokens)
    bar.update()

    def run(preds):
        bar.update()
        return stream_pass(model, preds, windows, batch)

    dense_lp, dense_top, _, _ = run(None)
    ppl_dense = math.exp(-dense_lp.mean())
    reports = {}
    itemsize = jnp.dtype(model.dtype).itemsize
    from svdsparse_jax.predictors.base import predictor_cost
    for name, ps in predictor_sets.items():
        lp, top, gate_rows, updown_rows = run(ps.layers)
        # a predictor that reads the exact gate (the oracle) reads every W_gate row
        gate_rows = np.asarray([gate_rows_read(p, g) for p, g in zip(ps.layers, gate_rows)])
        for rec, g, u in zip(layers[name], gate_rows, updown_rows):
            rec.update(gate_rows_read=float(g), up_down_rows_read=float(u),
                       predictor_cost=predictor_cost(ps.layers[rec["layer"]], cfg, itemsize))
        rows_read = float(np.mean(ffn_rows(gate_rows, updown_rows) / 3))
        per = layers[name]
        summary = {k: float(np.mean([r[k] for r in per])) for k in
                   ("true_sparsity", "predicted_sparsity", "recall", "precision", "auroc", "ffn_rel_error",
                    "predictor_cost")}
        summary.update(ppl_dense=ppl_dense, ppl_sparse=math.exp(-lp.mean()),
                       top1_agreement=float(np.mean(top == dense_top)), rows_read_fraction=rows_read,
                       effective_sparsity=1 - rows_read, gate_rows_read=float(np.mean(gate_rows)),
                       up_down_rows_read=float(np.mean(updown_rows)), tokens=int(n * window),
                       windows=n, window=window, stream_tokens=len(tokens))
        summary["ppl_increase"] = summary["ppl_sparse"] / ppl_dense - 1
        reports[name] = {"method": ps.method, "config": ps.config, "summary": summary, "layers": per,
                         "ffn_bytes_per_layer": ffn_bytes(cfg, itemsize)}
        if batch_sizes:
            reports[name]["batches"] = evaluate_batches(model, ps, windows, batch_sizes, dense_lp, dense_top, batch,
                                                        step=bar.update)
    bar.close()
    return reports


def evaluate_batches(model: Transformer, pset, windows: np.ndarray, batch_sizes: Sequence[int], dense_lp: np.ndarray,
                     dense_top: np.ndarray, batch: int = 4, step=lambda: None) -> list[dict]:
    """For each decode batch size B: which layers the engine's policy runs sparse (from the calibration's union
    fractions, `pset.union`), the union row fractions on these windows (B windows decoded together, the union at
    each position, per layer, averaged), and that policy's accuracy: perplexity and top-1 agreement against the
    dense model (`dense_lp`, `dense_top` of the same windows). Each sequence keeps only its own candidates, so
    the tokens of a batch depend on B only through the layers the policy runs sparse."""
    from svdsparse_jax.policy import sparse_layers

    itemsize = jnp.dtype(model.dtype).itemsize
    out = []
    for b in batch_sizes:
        step()  # progress
        gate_rows, up_down_rows = union_rows_read(model, pset.layers, windows, b)
        gate_rows = np.asarray([gate_rows_read(p, g) for p, g in zip(pset.layers, gate_rows)])
        layers = sparse_layers(model.engine, model.cfg, pset.layers, pset.union, b, itemsize)
        preds = [p if s else None for p, s in zip(pset.layers, layers)]
        lp, top, _, _ = stream_pass(model, preds if any(layers) else None, windows, batch)
        read = np.where(layers, ffn_rows(gate_rows, up_down_rows) / 3, 1.0)
        out.append({"batch": b, "sparse_layers": int(sum(layers)), "layers": [int(v) for v in layers],
                    "gate_rows_union": float(np.mean(gate_rows)), "up_down_rows_union": float(np.mean(up_down_rows)),
                    "gate_rows_union_per_layer": [round(float(v), 4) for v in gate_rows],
                    "up_down_rows_union_per_layer": [round(float(v), 4) for v in up_down_rows],
                    "rows_read_fraction": float(np.mean(read)), "ppl_dense": math.exp(-dense_lp.mean()),
                    "ppl": math.exp(-lp.mean()), "top1_agreement": float(np.mean(top == dense_top))})
    return out


PLOTS = (("predicted_sparsity", "predicted sparsity"), ("recall", "recall"), ("auroc", "AUROC"))
PLOT_FILES = tuple(f"{key}.png" for key, _ in PLOTS) + ("batches.png",)  # batches: with --batch-sizes


def check_plot_dir(out_dir: str | os.PathLike, flag: str = "--plots") -> None:
    """Refuses, before any work, a plot directory that holds a file a plot would replace, or that cannot be
    written (or created)."""
    from pathlib import Path

    out = Path(out_dir).absolute()
    existing = next(p for p in (out, *out.parents) if _lexists(p))
    name_max = max_name_bytes(existing)
    long = next((n for n in out.relative_to(existing).parts if len(n.encode()) > name_max), None)
    if long is not None:  # the directories the plots would create
        raise SvdsparseError(f"{out} ({flag}): a name of {len(long.encode())} bytes; at most {name_max} fit this "
                             "filesystem")
    if out.exists() and not out.is_dir():
        raise SvdsparseError(f"{out} ({flag}): exists and is not a directory")
    taken = [str(out / name) for name in PLOT_FILES if (out / name).exists() or (out / name).is_symlink()]
    if taken:
        raise SvdsparseError(f"{taken[0]} ({flag}): already exists; plots never replace files (choose another "
                             "directory)")
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SvdsparseError(f"{out} ({flag}): cannot be written ({existing} is not a writable directory)")


def _lexists(path) -> bool:
    try:
        return os.path.lexists(path)
    except OSError:  # a name too long for the filesystem
        return False


TITLES = {"predicted_sparsity": "Predicted against true sparsity, per layer",
          "recall": "Recall per layer: the share of active neurons the predictor keeps",
          "auroc": "AUROC per layer: how well the scores rank active above inactive neurons",
          "batches": "Rows a decode batch reads (the union of its sequences' rows)"}


def write_plots(reports: dict[str, dict], out_dir: str, targets: dict[str, tuple[str, float]] | None = None
                ) -> list[str]:
    """PNG plots, one line per report: per layer, predicted against true sparsity, recall and AUROC, each with
    its calibration target where one applies (targets: report name -> (rule, value) of its build, as
    `thresholds.layer_target` reads them); and, for reports with batches (`evaluate_batches`), the rows read
    against the batch size. Every figure has a title and the windows it was measured on; recall and AUROC axes
    end at 1 and start low enough to show how far from it a layer is. Each file is created new (an existing one
    is refused, never replaced)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    from svdsparse_jax.predictors.thresholds import layer_target

    check_plot_dir(out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(reports.values()))
    figures = []
    for key, label in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        values = []
        for name, rep in reports.items():
            layers = [r["layer"] for r in rep["layers"]]
            ys = [r[key] for r in rep["layers"]]
            values += ys
            line, = ax.plot(layers, ys, marker="o", label=name)
            rule = (targets or {}).get(name)
            if rule is not None:
                goal = [layer_target(rule[0], rule[1], r["layer"], r["true_sparsity"]) for r in rep["layers"]]
                kind = {"predicted_sparsity": "sparsity", "recall": "recall"}.get(key)
                if kind is not None and all(g.kind == kind for g in goal):
                    ax.plot(layers, [g.value for g in goal], ":", color=line.get_color(),
                            label=f"{name}: target ({rule[0]} {rule[1]:g})")
                    values += [g.value for g in goal]
        if key == "predicted_sparsity":
            ax.plot([r["layer"] for r in first["layers"]], [r["true_sparsity"] for r in first["layers"]], "k--",
                    label="true sparsity")
            ax.set_ylim(0, 1)
        else:
            low = min(values) if values else 0.0
            ax.set_ylim(max(0.0, low - 0.25 * (1 - low) - 0.005), 1.005)
        figures.append((key, fig, ax, "layer", label))
    if any(rep.get("batches") for rep in reports.values()):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, rep in reports.items():
            bs = rep.get("batches") or []
            sizes = [b["batch"] for b in bs]
            ax.plot(sizes, [b["gate_rows_union"] for b in bs], marker="o", label=f"{name}: W_gate rows (union)")
            ax.plot(sizes, [b["up_down_rows_union"] for b in bs], marker="s", label=f"{name}: W_up / W_down rows")
            ax.plot(sizes, [b["rows_read_fraction"] for b in bs], marker="^", label=f"{name}: read, with the policy")
        ax.set_xscale("log", base=2)
        sizes = sorted({b["batch"] for rep in reports.values() for b in rep.get("batches") or []})
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_ylim(0, 1.02)
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="dense (every row)")
        figures.append(("batches", fig, ax, "decode batch size", "fraction of FFN rows"))
    written = []
    for key, fig, ax, xlabel, ylabel in figures:
        ax.set_title(f"{TITLES[key]}\n{windowing(first['summary'])}", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        path = out / f"{key}.png"
        try:
            with open(path, "xb") as f:  # exclusive: a file that appeared meanwhile is not overwritten
                fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
        except FileExistsError:
            raise SvdsparseError(f"{path} (--plots): appeared while evaluating; not replaced") from None
        finally:
            plt.close(fig)
        written.append(str(path))
    return written
