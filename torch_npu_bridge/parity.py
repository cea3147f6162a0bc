"""Decode parity between the JAX sparse model and a transformers model patched with the same predictors: the
check behind tests/test_torch_bridge.py (CPU) and `python -m scripts.bench.torch_bridge` (CUDA / NPU)."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import torch

from svdsparse_jax import kv_cache
from svdsparse_jax.model import Transformer
from torch_npu_bridge.hf_patch import guarded_modules, load_hf_model, patch_hf_model


def jax_decode(model: Transformer, predictors: list, prompt: np.ndarray, steps: int):
    """Dense prefill then `steps` guarded greedy decode steps (f32). Returns (logits per step incl. the
    prefill's [steps + 1, vocab], greedy tokens [steps + 1], per step and layer (candidate ids, active ids))."""
    cfg = model.cfg
    cache = kv_cache.init_cache(cfg, jnp.zeros(1, jnp.int32), len(prompt) + steps + 1, jnp.float32)
    states, cache = model(jnp.asarray(prompt[None], jnp.int32), cache, jnp.int32(0))
    logits = [np.asarray(model.logits(states[0, -1]))]
    tokens, sets = [int(np.argmax(logits[0]))], []
    for i in range(steps):  # each step through the FFN the model's engine runs in decode, with its statistics
        states, cache, stats = model.forward_with_stats(jnp.asarray([[tokens[-1]]], jnp.int32), cache,
                                                        jnp.int32(len(prompt) + i), predictors)
        sets.append([(np.flatnonzero(np.asarray(s.candidates)[0, 0]), np.flatnonzero(np.asarray(s.hidden)[0, 0]))
                     for s in stats])
        logits.append(np.asarray(model.logits(states[0, -1])))
        tokens.append(int(np.argmax(logits[-1])))
    return np.stack(logits), tokens, sets


TIE = 1e-5  # a decision value within this fraction of its layer's largest is a rounding tie


def torch_decode(hf, prompt: np.ndarray, tokens: list[int], device: str):
    """Feeds the patched model the prompt, then `tokens[:-1]` one at a time (teacher forcing with the JAX
    tokens, so a difference shows at its step). Returns (logits [steps + 1, vocab], per step and layer the
    GuardedFFN record (candidate ids, active ids, scores, gate) and the layer's activation threshold)."""
    mods = guarded_modules(hf)
    for g in mods:
        g.record = []
    with torch.no_grad():
        out = hf(torch.tensor(prompt[None], dtype=torch.long, device=device), use_cache=True)
        past, logits = out.past_key_values, [out.logits[0, -1].float().cpu().numpy()]
        for tok in tokens[:-1]:
            out = hf(torch.tensor([[tok]], device=device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[0, -1].float().cpu().numpy())
    steps = [[tuple(t.numpy() for t in m.record[s]) + (m.threshold if m.activation == "fatrelu" else 0.0,)
              for m in mods] for s in range(len(tokens) - 1)]
    for g in mods:
        g.record = None
    return np.stack(logits), steps


def compare_sets(j_sets: list, t_steps: list) -> dict[str, int]:
    """Counts the neurons whose candidate or active decision differs between the two runs, split into rounding
    ties (the torch score within TIE of 0, or the gate within TIE of the threshold, relative to the layer's
    largest value: two correct f32 implementations that sum in different orders may decide those either way)
    and real disagreements (everything else)."""
    counts = {"candidate_diffs": 0, "active_diffs": 0, "rounding_ties": 0, "disagreements": 0}
    for js, ts in zip(j_sets, t_steps):
        for (jc, ja), (tc, ta, scores, gate, threshold) in zip(js, ts):
            cand_diff = np.setxor1d(jc, tc)
            active_diff = np.setdiff1d(np.setxor1d(ja, ta), cand_diff)  # not already explained by a candidate
            counts["candidate_diffs"] += cand_diff.size
            counts["active_diffs"] += active_diff.size
            s, g = scores[0], gate[0]
            ties = np.concatenate([np.abs(s[cand_diff]) <= TIE * np.abs(s).max(),
                                   np.abs(g[active_diff] - threshold) <= TIE * np.nanmax(np.abs(g))])
            counts["rounding_ties"] += int(ties.sum())
            counts["disagreements"] += int((~ties).sum())
    return counts


def decode_parity(lm, model: Transformer, predictors: list, pred_dir: str | os.PathLike, prompt: np.ndarray,
                  steps: int, device: str) -> dict:
    """Runs both and compares every step: logits (relative error), greedy tokens, candidate and active sets.
    ok: identical tokens, logits within 1e-4, no real disagreement in any set, and at most a handful of rounding
    ties (1 in 100,000 decisions, at least 2 allowed)."""
    j_logits, tokens, j_sets = jax_decode(model, predictors, prompt, steps)
    hf = patch_hf_model(load_hf_model(lm.path, torch.float32), pred_dir, device=device)
    t_logits, t_steps = torch_decode(hf, prompt, tokens, device)
    rel = [float(np.linalg.norm(a - b) / np.linalg.norm(a)) for a, b in zip(j_logits, t_logits)]
    tokens_equal = [int(np.argmax(t)) for t in t_logits] == tokens
    diffs = compare_sets(j_sets, t_steps)
    decisions = steps * model.cfg.n_layers * model.cfg.d_ff
    result = {"device": device, "steps": steps, "max_logit_rel_error": max(rel), "tokens_equal": tokens_equal,
              "candidates_equal": diffs["candidate_diffs"] == 0, "active_equal": diffs["active_diffs"] == 0,
              **diffs,
              "mean_active_fraction": float(np.mean([len(a) for s in j_sets for _, a in s])) / model.cfg.d_ff,
              "mean_candidate_fraction": float(np.mean([len(c) for s in j_sets for c, _ in s])) / model.cfg.d_ff}
    result["ok"] = (tokens_equal and max(rel) <= 1e-4 and diffs["disagreements"] == 0
                    and diffs["rounding_ties"] <= max(2, decisions // 100_000))
    return result
