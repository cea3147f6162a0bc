"""Scoring against torch log-softmax, including windows that restart the context."""

import math

import jax.numpy as jnp
import numpy as np
import torch

from checkpoints import torch_logits
from svdsparse_jax.convert import load_model
from svdsparse_jax.evaluate import score_tokens
from svdsparse_jax.model import Transformer


def _torch_logprobs(model, ids):
    logits = torch.as_tensor(torch_logits(model, np.asarray([ids])))[0]
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_score_matches_torch(llama_checkpoint, rng):
    lm = load_model(llama_checkpoint.path, jnp.float32)
    model = Transformer(lm.cfg, lm.weights)
    ids = rng.integers(0, 128, 50).tolist()
    r = score_tokens(model, ids)
    ref = _torch_logprobs(llama_checkpoint.torch_model, ids)
    np.testing.assert_allclose(r.logprobs, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r.nll, -ref.mean(), rtol=1e-5)
    np.testing.assert_allclose(r.ppl, np.exp(-ref.mean()), rtol=1e-5)
    # windows of 16 tokens overlapping by one: each window is scored from a fresh context; the last, shorter one
    # (tokens 45-49) after the 11 tokens before it, a full window
    w = score_tokens(model, ids, window=16)
    ref_w = np.concatenate([_torch_logprobs(llama_checkpoint.torch_model, ids[s:s + 16]) for s in (0, 15, 30)]
                           + [_torch_logprobs(llama_checkpoint.torch_model, ids[34:])[-4:]])
    assert len(w.logprobs) == len(ids) - 1
    np.testing.assert_allclose(w.logprobs, ref_w, rtol=1e-4, atol=1e-5)


def test_long_texts_are_scored_piece_by_piece(tmp_path, rng):
    """A text file read in pieces (`text_pieces`, cut at line ends) tokenizes to the whole text's tokens, and
    scoring tokens that arrive in pieces of any size equals scoring them at once, window for window."""
    import inspect
    import json.decoder
    import textwrap

    from svdsparse_jax.assets import BUNDLED_MODEL
    from svdsparse_jax.engine import XLA
    from svdsparse_jax.evaluate import score_stream, text_pieces

    text = inspect.getsource(json.decoder) + inspect.getsource(textwrap)
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(text_pieces(path, chars=2000))
    assert len(pieces) > 5 and "".join(pieces) == text
    lm = load_model(BUNDLED_MODEL, jnp.float32)
    whole = lm.tokenizer(text)["input_ids"]
    piecewise = sum((lm.tokenizer(p, add_special_tokens=i == 0)["input_ids"] for i, p in enumerate(pieces)), [])
    assert piecewise == whole
    model = Transformer(lm.cfg, lm.weights, XLA)
    ids = np.asarray(whole[:1500])
    # pieces shorter and longer than a window
    cuts = np.sort(rng.choice(np.arange(1, len(ids)), size=12, replace=False))
    want = score_tokens(model, ids.tolist(), window=200)
    got = score_stream(model, iter(np.split(ids, cuts)), window=200)
    assert got.tokens == len(ids) and len(got.logprobs) == len(ids) - 1
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.nll, want.nll, rtol=1e-6)
    assert score_stream(model, iter(np.split(ids, cuts)), window=200, keep_logprobs=False).logprobs == []


def test_auroc_matches_pairwise_counting_with_ties(rng):
    from svdsparse_jax.evaluate import auroc
    scores = np.round(rng.normal(size=(60, 7)) * 2)  # integer scores: many ties
    labels = rng.random((60, 7)) < 0.3
    labels[:, 6] = False  # one class only: undefined
    got = np.asarray(auroc(jnp.asarray(scores), jnp.asarray(labels)))
    for j in range(6):
        pos, neg = scores[labels[:, j], j], scores[~labels[:, j], j]
        ref = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
        assert abs(got[j] - ref) < 1e-6
    assert np.isnan(got[6])


def test_evaluate_oracle_and_all_active(llama_checkpoint, rng):
    """The oracle and an all-active predictor leave the model exactly dense; the report's numbers say so."""
    import dataclasses
    from svdsparse_jax.evaluate import evaluate_predictors
    from svdsparse_jax.predictors import LowRankPredictor, OraclePredictor, PredictorSet
    lm = load_model(llama_checkpoint.path, jnp.float32)
    cfg = lm.cfg
    model = Transformer(cfg, lm.weights)
    everything = LowRankPredictor(jnp.zeros((2, cfg.d_model)), jnp.zeros((cfg.d_ff, 2)), jnp.ones(cfg.d_ff))
    nothing = dataclasses.replace(everything, bias=-jnp.ones(cfg.d_ff))
    sets = {name: PredictorSet(name, [p] * cfg.n_layers, {}) for name, p in
            (("oracle", OraclePredictor()), ("all", everything), ("none", nothing))}
    tokens = rng.integers(0, cfg.vocab_size, 200)
    rep = evaluate_predictors(model, sets, tokens, window=64)
    dense_ppl = math.exp(-np.mean(score_tokens(model, tokens[:64].tolist()).logprobs
                                  + score_tokens(model, tokens[64:128].tolist()).logprobs
                                  + score_tokens(model, tokens[128:192].tolist()).logprobs))
    for name in ("oracle", "all"):
        s = rep[name]["summary"]
        assert s["ppl_sparse"] == s["ppl_dense"] and s["top1_agreement"] == 1.0 and s["recall"] == 1.0
        assert abs(s["ppl_dense"] / dense_ppl - 1) < 1e-5 and s["ffn_rel_error"] == 0.0
    assert rep["all"]["summary"]["rows_read_fraction"] > rep["oracle"]["summary"]["up_down_rows_read"]
    assert rep["oracle"]["summary"]["gate_rows_read"] == 1.0
    assert rep["oracle"]["summary"]["auroc"] == 1.0
    none = rep["none"]["summary"]
    assert none["predicted_sparsity"] == 1.0 and none["recall"] == 0.0 and none["rows_read_fraction"] == 0.0
    assert none["ffn_rel_error"] == 1.0


def test_rows_read_per_token_and_by_a_batch(llama_checkpoint, rng):
    """ffn_rows_read: per token, the mean of each sequence's own candidate / active fractions; `together`, the
    union over the sequences at each position, against masks collected from each sequence run alone."""
    from svdsparse_jax import kv_cache
    from scripts.lab import ffn_rows_read
    from svdsparse_jax.predictors import LowRankPredictor
    lm = load_model(llama_checkpoint.path, jnp.float32)
    cfg = lm.cfg
    model = Transformer(cfg, lm.weights)
    preds = [LowRankPredictor(jnp.asarray(rng.normal(size=(8, cfg.d_model)), jnp.float32),
                              jnp.asarray(rng.normal(size=(cfg.d_ff, 8)), jnp.float32),
                              jnp.full(cfg.d_ff, -1.0, jnp.float32)) for _ in range(cfg.n_layers)]
    seqs = rng.integers(0, cfg.vocab_size, (3, 20))
    cand, active = [], []  # [sequence][layer] -> [20, d_ff] bool
    for s in seqs:
        _, _, stats = model.forward_with_stats(
            jnp.asarray(s[None], jnp.int32), kv_cache.init_cache(cfg, jnp.zeros(1, jnp.int32), 20, jnp.float32),
            jnp.int32(0), preds)
        cand.append([np.asarray(st.candidates[0]) for st in stats])
        active.append([np.asarray(st.hidden[0]) != 0 for st in stats])
    layers = range(cfg.n_layers)
    per_token = ffn_rows_read(model, preds, seqs, batch=2)
    union = ffn_rows_read(model, preds, seqs, together=True)
    for got, masks in zip(per_token, (cand, active)):
        np.testing.assert_allclose(got, [np.mean([m[i] for m in masks]) for i in layers], rtol=1e-6)
    for got, masks in zip(union, (cand, active)):
        np.testing.assert_allclose(got, [np.any([m[i] for m in masks], axis=0).mean() for i in layers], rtol=1e-6)
    assert np.all(union[0] > per_token[0]) and np.all(union[0] < 1)  # the random predictor flags part of d_ff


def test_forward_with_stats_against_torch_float64(llama_checkpoint, rng):
    """The statistics pass (`Transformer.forward_with_stats`, what evaluation and calibration read) against
    float64 references: dense, every layer's FFN input and activations h = act(gate) * up against transformers
    run in float64 (hooks on each MLP's input and on down_proj's); guarded by a random low-rank predictor, the
    candidate mask and masked activations against a float64 NumPy recomputation from the pass's own FFN inputs,
    and `forward_stats`' per-layer counts against those masks."""
    import copy

    from svdsparse_jax import kv_cache
    from svdsparse_jax.evaluate import forward_stats
    from svdsparse_jax.predictors import LowRankPredictor
    from flax import nnx
    lm = load_model(llama_checkpoint.path, jnp.float32)
    cfg = lm.cfg
    model = Transformer(cfg, lm.weights)
    ids = rng.integers(0, cfg.vocab_size, (2, 24))
    ref = copy.deepcopy(llama_checkpoint.torch_model).double()
    seen: dict[str, list] = {"inputs": [], "hidden": []}
    hooks = [m.register_forward_hook(lambda mod, args, out, k=k: seen[k].append(args[0].numpy()))
             for layer in ref.model.layers for m, k in ((layer.mlp, "inputs"), (layer.mlp.down_proj, "hidden"))]
    with torch.no_grad():
        ref(torch.as_tensor(ids))
    for h in hooks:
        h.remove()
    cache = kv_cache.init_cache(cfg, jnp.zeros(2, jnp.int32), 24, jnp.float32)
    _, _, dense = model.forward_with_stats(jnp.asarray(ids, jnp.int32), cache, jnp.int32(0))
    for i, st in enumerate(dense):
        assert st.candidates is None
        np.testing.assert_allclose(np.asarray(st.inputs), seen["inputs"][i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(st.hidden), seen["hidden"][i], rtol=1e-4, atol=1e-5)

    r = 8
    preds = [LowRankPredictor(jnp.asarray(rng.normal(size=(r, cfg.d_model)), jnp.float32),
                              jnp.asarray(rng.normal(size=(cfg.d_ff, r)), jnp.float32),
                              jnp.asarray(rng.normal(size=cfg.d_ff), jnp.float32)) for _ in range(cfg.n_layers)]
    _, _, sparse = model.forward_with_stats(jnp.asarray(ids, jnp.int32), cache, jnp.int32(0), preds)
    np.testing.assert_array_equal(np.asarray(sparse[0].inputs), np.asarray(dense[0].inputs))  # before any FFN
    for i, (st, p) in enumerate(zip(sparse, preds)):
        x = np.asarray(st.inputs, np.float64)
        ffn = model.layers[i].ffn
        scores = x @ np.asarray(p.a, np.float64).T @ np.asarray(p.b, np.float64).T + np.asarray(p.bias, np.float64)
        clear = np.abs(scores) > 1e-3  # away from the boundary, where f32 rounding cannot flip the sign
        np.testing.assert_array_equal(np.asarray(st.candidates)[clear], (scores > 0)[clear])
        g, u = (x @ np.asarray(w[...], np.float64).T for w in (ffn.w_gate, ffn.w_up))
        h = np.where(np.asarray(st.candidates), np.maximum(g, 0) * u, 0.0)
        np.testing.assert_allclose(np.asarray(st.hidden), h, rtol=1e-4, atol=1e-5)
    graphdef, state = nnx.split(model)
    _, _, cands, active = forward_stats(graphdef, state, preds, jnp.asarray(ids, jnp.int32), jnp.zeros(2, jnp.int32))
    np.testing.assert_array_equal(np.asarray(cands), [np.sum(np.asarray(st.candidates)) for st in sparse])
    np.testing.assert_array_equal(np.asarray(active), [np.sum(np.asarray(st.hidden) != 0) for st in sparse])
