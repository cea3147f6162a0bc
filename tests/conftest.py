"""Tiny random Hugging Face checkpoints of each supported family, built with transformers + torch and saved as
safetensors, plus the torch reference model (its MLP activation patched to fatrelu / drelu where needed)."""

from __future__ import annotations

import json
import dataclasses
from pathlib import Path

import numpy as np
import pytest
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


def make_hf_checkpoint(path: Path, family: str, seed: int = 0, **cfg_overrides) -> HFCheckpoint:
    """Builds, saves (safetensors) and returns a tiny random model of `family`, in float32."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    # initializer_range 0.1 spreads the logits so greedy argmax has no near-ties between implementations.
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="relu", initializer_range=0.1, max_position_embeddings=256, eos_token_id=None,
                  bos_token_id=None, pad_token_id=None)
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


@pytest.fixture(params=FAMILIES)
def hf_checkpoint(request, tmp_path) -> HFCheckpoint:
    return make_hf_checkpoint(tmp_path / request.param, request.param,
                              seed=int(np.random.default_rng().integers(1 << 30)))


@pytest.fixture
def llama_checkpoint(tmp_path) -> HFCheckpoint:
    return make_hf_checkpoint(tmp_path / "llama", "llama_relu", seed=int(np.random.default_rng().integers(1 << 30)))


def torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.double().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
