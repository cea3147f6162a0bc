"""Predictor-guarded decoding for transformers LLaMA / Mistral / Qwen2 models: `patch_hf_model` swaps every
decoder layer's MLP for a module that runs `executor.GuardedFFN` (guarded for one-token decode steps, dense
with the predictors' activation for prefill), so `model.generate` uses the predictors; `unpatch` puts the
original MLPs back. The predictor directory's model fingerprint is checked against the model first.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch

# sparse_mlp's one copy is the bundled model's remote code (transformers loads it from beside config.json)
from svdsparse_jax.assets.default_model.sparse_mlp import set_sparse_activation
from svdsparse_jax.config import from_hf_config
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.weights import model_fingerprint, weight_specs
from torch_npu_bridge.executor import (DEFAULT_GATHER, DEFAULT_SELECTION, MODES, GuardedFFN, measured_capacities,
                                       pick_device)
from torch_npu_bridge.factors import PredictorFactors, read_factors


class PatchedMLP(torch.nn.Module):
    """Stands in for a decoder layer's MLP; keeps the original for `unpatch`."""

    def __init__(self, original: torch.nn.Module, guarded: GuardedFFN):
        super().__init__()
        self.original = original
        self.guarded = guarded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.guarded(x)


def _layers(model) -> list:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise SvdsparseError(f"{type(model).__name__}: expected a transformers LLaMA / Mistral / Qwen2 causal LM "
                             "(model.model.layers[i].mlp)")
    return list(layers)


class _HFWeights:
    """A transformers model's weights by this project's spec paths, each read (as float32 NumPy, transposed as
    the spec table says) only when asked for, so fingerprinting holds one extra tensor at a time."""

    def __init__(self, model, cfg):
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.specs = {s.path: s for s in weight_specs(cfg)}

    def __getitem__(self, path):
        spec = self.specs[path]
        name = spec.hf_name
        if name not in self.params:  # a patched layer keeps its MLP as mlp.original
            name = name.replace(".mlp.", ".mlp.original.")
        if name not in self.params and spec.hf_name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        w = self.params[name].detach()
        return (w.T if spec.hf_transposed else w).float().cpu().numpy()


def hf_fingerprint(model, activation: str, threshold: float) -> str:
    """This project's model fingerprint (`weights.model_fingerprint`: every weight) of a transformers model, read
    with the predictors' activation (transformers has no FATReLU, so such models are often built as relu)."""
    cfg = from_hf_config(model.config.to_dict(), where=f"{type(model).__name__}.config")
    cfg = dataclasses.replace(cfg, activation=activation, act_threshold=threshold if activation == "fatrelu"
                              else cfg.act_threshold)
    return model_fingerprint(cfg, _HFWeights(model, cfg))


def patch_hf_model(model, predictors: str | os.PathLike | PredictorFactors, device: str | torch.device | None = None,
                   check_fingerprint: bool = True, mode: str = "exact",
                   capacity: int | str | Sequence[int] | None = None, batch: int = 1, margin: float = 1.5,
                   selection: str | None = None, gather: str | None = None):
    """Makes every MLP of `model` predictor-guarded for decode with a predictor directory (`svdsparse
    build-predictors`), on `device` (default: npu if torch_npu sees one, else cuda, else cpu; the model is moved
    there). Returns the model. Refuses a model with another layer count, other shapes or (unless
    check_fingerprint=False) another fingerprint than the predictors'.

    mode "exact" (the default) compacts the candidates with two host synchronisations per layer; "sync_free"
    gathers a fixed `capacity` of rows per layer without any (graph-capturable; `executor` says how): capacity
    None is d_ff (exact always), an int (or one per layer) that many rows, "measured" the set's measured mean
    candidate union at `batch` sequences x `margin`, rounded up to 64 rows (`executor.measured_capacities`).
    Candidates beyond the capacity are dropped and counted (`overflow_count`). selection ("topk" or "prefix")
    and gather ("copy" or "fused": for torch.compile) choose how the sync-free path picks and reads the rows
    (`executor`; None: `executor.DEFAULT_SELECTION` and `DEFAULT_GATHER`, prefix and copy; pass gather="fused"
    under torch.compile, the H200's fastest there)."""
    if mode not in MODES:
        raise SvdsparseError(f"executor mode {mode!r}: expected one of {MODES}")
    if capacity is not None and mode != "sync_free":
        raise SvdsparseError("capacity is for mode='sync_free' (the exact path reads every candidate)")
    if (selection, gather) != (None, None) and mode != "sync_free":
        raise SvdsparseError("selection and gather are for mode='sync_free' (the exact path compacts on the host)")
    ex = predictors if isinstance(predictors, PredictorFactors) else read_factors(predictors)
    layers = _layers(model)
    if any(isinstance(layer.mlp, PatchedMLP) for layer in layers):
        raise SvdsparseError("the model is already patched; unpatch it first")
    if len(layers) != len(ex.layers):
        raise SvdsparseError(f"predictors for {len(ex.layers)} layers, but the model has {len(layers)}")
    mlp0 = layers[0].mlp
    shape = tuple(mlp0.gate_proj.weight.shape)
    if shape != (ex.d_ff, ex.d_model):
        raise SvdsparseError(f"predictors for d_ff x d = {(ex.d_ff, ex.d_model)}, but the model's gate_proj is "
                             f"{shape}")
    if any(getattr(layer.mlp, n).bias is not None for layer in layers for n in ("gate_proj", "up_proj", "down_proj")):
        raise SvdsparseError("MLPs with biases are not supported by the guarded FFN")
    if check_fingerprint:
        got = hf_fingerprint(model, ex.activation, ex.threshold)
        if got != ex.fingerprint:
            raise SvdsparseError(f"the predictors were built for model fingerprint {ex.fingerprint}, but this "
                                 f"model's is {got} (another checkpoint or config)")
    if capacity == "measured":
        capacities = measured_capacities(ex.union, batch, ex.d_ff, margin)
    elif capacity is None or isinstance(capacity, int):
        capacities = [capacity] * len(layers)
    elif isinstance(capacity, str):
        raise SvdsparseError(f"capacity {capacity!r}: expected None, a number of rows, one per layer, or 'measured'")
    else:
        capacities = [int(c) for c in capacity]
        if len(capacities) != len(layers):
            raise SvdsparseError(f"{len(capacities)} capacities for a model with {len(layers)} layers")
    dev = pick_device(device)
    model.to(dev)
    for layer, factors, cap in zip(layers, ex.layers, capacities):
        mlp = layer.mlp
        guarded = GuardedFFN(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                             mlp.down_proj.weight.detach().T.contiguous(), factors, ex.activation, ex.threshold,
                             mode, cap, selection or DEFAULT_SELECTION, gather or DEFAULT_GATHER)
        layer.mlp = PatchedMLP(mlp, guarded)
    return model


def overflow_count(model) -> tuple[int, list[int]]:
    """(candidates dropped for lack of capacity, summed over every sync-free decode call and layer since
    patching; per layer the largest candidate union seen). Reads the device counters (one synchronisation: call
    it after generation, not per token)."""
    mods = guarded_modules(model)
    return int(sum(int(m.overflow) for m in mods)), [int(m.max_candidates) for m in mods]


def unpatch(model):
    """Restores the original MLPs, with the activation they had (a no-op for layers that are not patched).
    Returns the model."""
    for layer in _layers(model):
        if isinstance(layer.mlp, PatchedMLP):
            layer.mlp = layer.mlp.original
    return model


def guarded_modules(model) -> list[GuardedFFN]:
    """The GuardedFFN of every patched layer (e.g. to set `.record = []`)."""
    return [layer.mlp.guarded for layer in _layers(model) if isinstance(layer.mlp, PatchedMLP)]


def load_hf_model(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16):
    """AutoModelForCausalLM from a Hugging Face directory, also when its hidden_act is one transformers lacks:
    fatrelu (threshold hidden_act_param) or drelu, which `sparse_mlp.set_sparse_activation` puts in (the model's
    config keeps its own hidden_act). No remote code runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    act = cfg.hidden_act
    if act in ("fatrelu", "drelu"):
        cfg.hidden_act = "relu"
    model = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=dtype).eval()
    if act in ("fatrelu", "drelu"):
        set_sparse_activation(model, act, getattr(cfg, "hidden_act_param", 0.0) or 0.0)
        model.config.hidden_act = act
    return model
