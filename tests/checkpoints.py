"""Tiny random Hugging Face checkpoints of each supported family, built with transformers + torch and saved as
safetensors (optionally with a real BPE tokenizer), plus the torch reference model (its MLP activation patched
to fatrelu / drelu where needed) and the float64 FATReLU reference. The one builder of test checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("llama_relu", "mistral_gqa", "qwen2_tied", "llama_fatrelu", "llama_drelu")
FAT_THRESHOLD = 0.05


@dataclasses.dataclass
class HFCheckpoint:
    path: Path
    torch_model: torch.nn.Module
    family: str


def _torch_activation(family: str):
    if family == "llama_fatrelu":
        return lambda g, u: torch.where(g >= FAT_THRESHOLD, g, torch.zeros_like(g)) * u
    if family == "llama_drelu":
        return lambda g, u: torch.relu(g) * torch.relu(u)
    return None


def make_hf_checkpoint(path: Path, family: str, seed: int, tokenizer: bool = False,
                       **cfg_overrides) -> HFCheckpoint:
    """Builds, saves (safetensors) and returns a tiny random model of `family`, in float32. tokenizer: also a
    byte-level BPE tokenizer trained offline on a standard-library source file (vocabulary 512, BOS / EOS ids
    in the config), so text prompts work."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    # initializer_range 0.1 spreads the logits so greedy argmax has no near-ties between implementations.
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="relu", initializer_range=0.1, max_position_embeddings=256, eos_token_id=None,
                  bos_token_id=None, pad_token_id=None)
    hf_tok = None
    if tokenizer:
        from scripts.bundled_model.corpus import train_bpe_tokenizer
        hf_tok = train_bpe_tokenizer([inspect.getsource(os)], 512)
        common.update(vocab_size=len(hf_tok), bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                      max_position_embeddings=512)
    common.update(cfg_overrides)
    if family.startswith("llama"):
        model = LlamaForCausalLM(LlamaConfig(**{"num_key_value_heads": 4, **common}))
    elif family == "mistral_gqa":
        model = MistralForCausalLM(MistralConfig(**{"num_key_value_heads": 2, "sliding_window": 24, **common}))
    elif family == "qwen2_tied":
        model = Qwen2ForCausalLM(Qwen2Config(**{"num_key_value_heads": 2, "tie_word_embeddings": True,
                                                "rope_theta": 1e6, **common}))
        with torch.no_grad():  # random qkv biases (they are zero-initialised) so the test sees them
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    else:
        raise ValueError(family)
    model.eval()
    model.save_pretrained(path)
    if hf_tok is not None:
        hf_tok.save_pretrained(path)
    act = _torch_activation(family)
    if act is not None:
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.forward = (lambda m: lambda x: m.down_proj(act(m.gate_proj(x), m.up_proj(x))))(mlp)
        cfg_path = path / "config.json"
        hf = json.loads(cfg_path.read_text())
        hf["hidden_act"] = "fatrelu" if family == "llama_fatrelu" else "drelu"
        if family == "llama_fatrelu":
            hf["hidden_act_param"] = FAT_THRESHOLD
        cfg_path.write_text(json.dumps(hf))
    return HFCheckpoint(path, model, family)


def torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.double().numpy()


# FATReLU jumps from 0 to its threshold t, so a gate within f32 rounding of t can switch a neuron on in one f32
# implementation and off in another; the logits then differ by 1e-4..1e-3 (the bundled model: 1 window of 128
# tokens in ~30; a tiny random checkpoint: 1 draw in ~200). The largest f32 gate error against float64 measured
# on the bundled model was 2.3e-6 over 12 windows: inputs with a float64 gate closer to t than GATE_MARGIN are
# ill-conditioned for an f32 comparison, and tests draw them again.
GATE_MARGIN = 5e-6


def fatrelu_float64(model: torch.nn.Module, threshold: float) -> tuple[torch.nn.Module, list[float]]:
    """A float64 copy of the transformers model `model` with FATReLU(threshold) MLPs, and the list into which each
    MLP call appends its smallest |gate - threshold|."""
    ref, gaps = copy.deepcopy(model).double(), []

    def fatrelu_mlp(m, x):
        gate = m.gate_proj(x)
        gaps.append(float((gate - threshold).abs().min()))
        return m.down_proj(torch.where(gate >= threshold, gate, 0.0) * m.up_proj(x))

    for layer in ref.model.layers:
        layer.mlp.forward = (lambda m: lambda x: fatrelu_mlp(m, x))(layer.mlp)
    return ref, gaps


def draw_well_conditioned(ref: torch.nn.Module, gaps: list[float], draw, tries: int = 100):
    """Calls draw() -> token sequences (each 1-D) until `ref` (from `fatrelu_float64`) sees no gate within
    GATE_MARGIN of the threshold on any of them; returns those sequences."""
    for _ in range(tries):
        seqs = draw()
        gaps.clear()
        for seq in seqs:
            torch_logits(ref, np.asarray(seq)[None])
        if min(gaps) > GATE_MARGIN:
            return seqs
    raise AssertionError(f"no input in {tries} draws with every gate more than {GATE_MARGIN} from the threshold")


def well_conditioned(checkpoint: HFCheckpoint, draw):
    """draw() for a checkpoint without a discontinuous activation; for FATReLU, draw_well_conditioned."""
    if checkpoint.family != "llama_fatrelu":
        return draw()
    return draw_well_conditioned(*fatrelu_float64(checkpoint.torch_model, FAT_THRESHOLD), draw)
