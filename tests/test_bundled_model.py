"""The bundled default model: loads through the HF conversion path, matches its card, and equals transformers."""

import json

import jax.numpy as jnp
import numpy as np
import torch

from conftest import rel_err, torch_logits
from svdsparse_jax.cli import BUNDLED_MODEL
from svdsparse_jax.convert import load_model
from svdsparse_jax.evaluate import evaluate_stream
from svdsparse_jax.model import Transformer

CARD = json.loads((BUNDLED_MODEL / "card.json").read_text())
CORPUS = BUNDLED_MODEL.parent / "corpus"


def test_card_claims():
    assert CARD["heldout_full"]["mean_sparsity"] >= 0.88
    assert CARD["ppl_ratio_vs_baseline"] <= 1.10
    assert sum(p.stat().st_size for p in BUNDLED_MODEL.iterdir()) <= 30e6


def test_perplexity_and_sparsity_are_what_the_card_says():
    lm = load_model(BUNDLED_MODEL, jnp.float32)
    assert lm.cfg.activation == CARD["activation"] and lm.cfg.act_threshold == CARD["act_threshold"]
    check = CARD["check_subset"]
    r = evaluate_stream(Transformer(lm.cfg, lm.weights), np.load(CORPUS / "heldout.npy"), check["window"],
                        max_windows=check["windows"])
    assert abs(r.ppl / check["ppl"] - 1) < 1e-3
    np.testing.assert_allclose(r.sparsity, check["sparsity"], atol=1e-3)
    assert r.mean_sparsity >= 0.88


def test_transformers_with_patched_activation_gives_the_same_logits():
    from transformers import AutoConfig, LlamaForCausalLM

    hf_cfg = AutoConfig.from_pretrained(BUNDLED_MODEL)
    threshold = hf_cfg.hidden_act_param
    hf_cfg.hidden_act = "relu"  # transformers has no FATReLU: construct with relu, then patch the MLPs
    model = LlamaForCausalLM.from_pretrained(BUNDLED_MODEL, config=hf_cfg, dtype=torch.float32).eval()
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.forward = (lambda m: lambda x: m.down_proj(
            torch.where(m.gate_proj(x) >= threshold, m.gate_proj(x), 0.0) * m.up_proj(x)))(mlp)
    lm = load_model(BUNDLED_MODEL, jnp.float32)
    heldout = np.load(CORPUS / "heldout.npy")
    start = np.random.default_rng().integers(0, len(heldout) - 128)
    ids = heldout[start:start + 128].astype(np.int64)[None]
    from svdsparse_jax import kv_cache
    ours = Transformer(lm.cfg, lm.weights)
    h, _ = ours(jnp.asarray(ids, jnp.int32), kv_cache.init_cache(lm.cfg, jnp.zeros(1, jnp.int32), 128, jnp.float32),
                jnp.int32(0))
    assert rel_err(np.asarray(ours.logits(h)), torch_logits(model, ids)) <= 1e-4


def test_cli_uses_the_bundled_model_by_default(capsys):
    from svdsparse_jax.cli import main
    assert main(["generate", "--prompt", "import os\n", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["output_ids"]) <= 8 and isinstance(out["text"], str)
