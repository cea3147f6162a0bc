"""The bundled default model: loads through the HF conversion path, matches its card, and equals transformers."""

import json

import jax.numpy as jnp
import numpy as np

from checkpoints import draw_well_conditioned, fatrelu_float64, torch_logits
from conftest import rel_err
from svdsparse_jax.assets import BUNDLED_MODEL, CORPUS
from svdsparse_jax.convert import load_model
from scripts.lab import evaluate_stream
from svdsparse_jax.model import Transformer

CARD = json.loads((BUNDLED_MODEL / "card.json").read_text())


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


WINDOW = 64


def test_transformers_with_patched_activation_gives_the_same_logits(rng):
    """Against transformers' Llama in float64 with FATReLU MLPs (transformers has none: built with relu, then
    patched), on a random held-out window that is well-conditioned (conftest.GATE_MARGIN)."""
    from transformers import AutoConfig, LlamaForCausalLM

    hf_cfg = AutoConfig.from_pretrained(BUNDLED_MODEL)
    threshold = hf_cfg.hidden_act_param
    hf_cfg.hidden_act = "relu"
    reference, gaps = fatrelu_float64(LlamaForCausalLM.from_pretrained(BUNDLED_MODEL, config=hf_cfg).eval(), threshold)
    heldout = np.load(CORPUS / "heldout.npy")

    def window():
        start = rng.integers(0, len(heldout) - WINDOW)
        return heldout[start:start + WINDOW].astype(np.int64)[None]

    ids = draw_well_conditioned(reference, gaps, window)
    from svdsparse_jax import kv_cache
    lm = load_model(BUNDLED_MODEL, jnp.float32)
    ours = Transformer(lm.cfg, lm.weights)
    h, _ = ours(jnp.asarray(ids, jnp.int32),
                kv_cache.init_cache(lm.cfg, jnp.zeros(1, jnp.int32), WINDOW, jnp.float32), jnp.int32(0))
    assert rel_err(np.asarray(ours.logits(h)), torch_logits(reference, ids)) <= 1e-5


def test_cli_uses_the_bundled_model_by_default(capsys):
    from svdsparse_jax.cli import main
    assert main(["generate", "--prompt", "import os\n", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    sample = out["results"][0]["samples"][0]
    assert len(sample["output_ids"]) <= 8 and isinstance(sample["text"], str)
