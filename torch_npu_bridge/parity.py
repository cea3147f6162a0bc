"""Decode parity between the JAX sparse model and a transformers model patched with the same predictors: the
check behind tests/test_torch_bridge.py (CPU) and scripts/bench_torch_bridge.py (CUDA / NPU)."""

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
    h, cache = model(jnp.asarray(prompt[None], jnp.int32), cache, jnp.int32(0))
    logits = [np.asarray(model.logits(h[0, -1]))]
    tokens, sets = [int(np.argmax(logits[0]))], []
    for i in range(steps):
        collect: dict = {}
        h, cache = model(jnp.asarray([[tokens[-1]]], jnp.int32), cache, jnp.int32(len(prompt) + i), predictors,
                         collect)
        sets.append([(np.flatnonzero(np.asarray(c)[0, 0]), np.flatnonzero(np.asarray(hid)[0, 0]))
                     for c, hid in zip(collect["candidates"], collect["hidden"])])
        logits.append(np.asarray(model.logits(h[0, -1])))
        tokens.append(int(np.argmax(logits[-1])))
    return np.stack(logits), tokens, sets


def torch_decode(hf, prompt: np.ndarray, tokens: list[int], device: str):
    """Feeds the patched model the prompt, then `tokens[:-1]` one at a time (teacher forcing with the JAX
    tokens, so a difference shows at its step). Returns (logits [steps + 1, vocab], per step and layer
    (candidate ids, active ids))."""
    for g in guarded_modules(hf):
        g.record = []
    with torch.no_grad():
        out = hf(torch.tensor(prompt[None], dtype=torch.long, device=device), use_cache=True)
        past, logits = out.past_key_values, [out.logits[0, -1].float().cpu().numpy()]
        for tok in tokens[:-1]:
            out = hf(torch.tensor([[tok]], device=device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[0, -1].float().cpu().numpy())
    mods = guarded_modules(hf)
    sets = [[(m.record[s][0].numpy(), m.record[s][1].numpy()) for m in mods] for s in range(len(tokens) - 1)]
    for g in mods:
        g.record = None
    return np.stack(logits), sets


def decode_parity(lm, model: Transformer, predictors: list, export_dir: str | os.PathLike, prompt: np.ndarray,
                  steps: int, device: str) -> dict:
    """Runs both and compares every step: logits (relative error), greedy tokens, candidate and active sets."""
    j_logits, tokens, j_sets = jax_decode(model, predictors, prompt, steps)
    hf = patch_hf_model(load_hf_model(lm.path, torch.float32), export_dir, device=device)
    t_logits, t_sets = torch_decode(hf, prompt, tokens, device)
    rel = [float(np.linalg.norm(a - b) / np.linalg.norm(a)) for a, b in zip(j_logits, t_logits)]
    same = lambda x, y: len(x) == len(y) and bool((x == y).all())  # noqa: E731
    cand_equal = all(same(jc, tc) for js, ts in zip(j_sets, t_sets) for (jc, _), (tc, _) in zip(js, ts))
    active_equal = all(same(ja, ta) for js, ts in zip(j_sets, t_sets) for (_, ja), (_, ta) in zip(js, ts))
    tokens_equal = [int(np.argmax(t)) for t in t_logits] == tokens
    result = {"device": device, "steps": steps, "max_logit_rel_error": max(rel), "tokens_equal": tokens_equal,
              "candidates_equal": cand_equal, "active_equal": active_equal,
              "mean_active_fraction": float(np.mean([len(a) for s in j_sets for _, a in s])) / model.cfg.d_ff,
              "mean_candidate_fraction": float(np.mean([len(c) for s in j_sets for c, _ in s])) / model.cfg.d_ff}
    result["ok"] = tokens_equal and cand_equal and active_equal and max(rel) <= 1e-4
    return result
