"""transformers LLaMA / Mistral / Qwen2 models with the ReGLU activations transformers lacks.

- FATReLU (ProSparse): the gate is kept where it is >= the threshold `hidden_act_param`, else zero.
- dReLU (TurboSparse, SparseQwen2): ReLU on both the gate and the up projection.

`set_sparse_activation(model, activation, threshold)` gives a loaded model's MLPs that activation. The
`Sparse*ForCausalLM` classes build a model whose config.json says `hidden_act` fatrelu or drelu: a model
directory whose config.json holds `"auto_map": {"AutoModelForCausalLM": "sparse_mlp.SparseLlamaForCausalLM"}`
beside a copy of this file loads in stock transformers with `trust_remote_code=True` (the bundled model does).
This file imports only torch and transformers, so that transformers can load it as a model's remote code.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

SPARSE_ACTIVATIONS = ("relu", "fatrelu", "drelu")


class FATReLU(torch.nn.Module):
    """x where x >= threshold, else 0 (at threshold 0: ReLU)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= self.threshold, x, torch.zeros_like(x))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


def _relu_output(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return torch.relu(output)


def _layers(model) -> list:
    return list(model.model.layers)


def set_sparse_activation(model, activation: str, threshold: float = 0.0):
    """Gives every decoder layer's MLP of `model` the activation: relu, fatrelu (x >= threshold kept) or
    drelu (ReLU on the gate and on up_proj's output, through a forward hook so the weights keep their names).
    Returns the model."""
    if activation not in SPARSE_ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: expected one of {SPARSE_ACTIVATIONS}")
    for layer in _layers(model):
        mlp = layer.mlp
        mlp.act_fn = FATReLU(threshold) if activation == "fatrelu" else torch.nn.ReLU()
        for handle in getattr(mlp, "_drelu_hooks", []):
            handle.remove()
        mlp._drelu_hooks = [mlp.up_proj.register_forward_hook(_relu_output)] if activation == "drelu" else []
    return model


def _init_with_relu(init, config) -> None:
    """Runs a transformers model's __init__ with hidden_act relu (ACT2FN has no fatrelu or drelu), keeping the
    config's own value."""
    act = config.hidden_act
    config.hidden_act = "relu"
    try:
        init(config)
    finally:
        config.hidden_act = act


class SparseLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose config's hidden_act may be fatrelu (threshold hidden_act_param) or drelu."""

    def __init__(self, config):
        _init_with_relu(super().__init__, config)
        set_sparse_activation(self, config.hidden_act, getattr(config, "hidden_act_param", 0.0) or 0.0)


class SparseMistralForCausalLM(MistralForCausalLM):
    """MistralForCausalLM whose config's hidden_act may be fatrelu or drelu."""

    def __init__(self, config):
        _init_with_relu(super().__init__, config)
        set_sparse_activation(self, config.hidden_act, getattr(config, "hidden_act_param", 0.0) or 0.0)


class SparseQwen2ForCausalLM(Qwen2ForCausalLM):
    """Qwen2ForCausalLM whose config's hidden_act may be fatrelu or drelu."""

    def __init__(self, config):
        _init_with_relu(super().__init__, config)
        set_sparse_activation(self, config.hidden_act, getattr(config, "hidden_act_param", 0.0) or 0.0)
