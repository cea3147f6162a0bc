"""A model directory, converted or Hugging Face (converted in memory), loaded as a `LoadedModel`: config,
weights keyed by spec path, tokenizer. `session.load` builds a ready model on it."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path as FsPath
from typing import Any

import jax
import jax.numpy as jnp

from svdsparse_jax.config import ModelConfig, read_hf_config
from svdsparse_jax.converted import is_converted, read_converted
from svdsparse_jax.dtypes import weight_dtype
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import inside
from svdsparse_jax.hf_checkpoint import TOKENIZER_FILES, read_hf_weights
from svdsparse_jax.weights import Path, model_fingerprint


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: its config, weights keyed by spec path, and its tokenizer (None if the directory
    has no tokenizer files; then only token ids can be used)."""

    cfg: ModelConfig
    weights: dict[Path, jax.Array]
    tokenizer: Any
    path: FsPath

    @functools.cached_property
    def fingerprint(self) -> str:
        """The model's fingerprint (`weights.model_fingerprint`: every weight hashed), which predictor
        directories record; computed once."""
        return model_fingerprint(self.cfg, self.weights)



def load_tokenizer(model_dir: str | os.PathLike):
    """transformers' tokenizer for the directory, or None when it has no tokenizer files."""
    model_dir = FsPath(model_dir)
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    for name in TOKENIZER_FILES:  # the library opens these itself: none may lead out of the directory
        if (model_dir / name).exists() or (model_dir / name).is_symlink():
            inside(model_dir, name, f"{model_dir}: tokenizer file")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # tokenizers and transformers raise many types for damaged files
        raise SvdsparseError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_model(model_dir: str | os.PathLike, dtype: jnp.dtype | None = None, *, allow_pickle: bool = False,
               mesh=None, **config_overrides: Any) -> LoadedModel:
    """Loads a converted directory, or an HF directory converted in memory (bf16 unless `dtype` says); with a
    device mesh, every tensor is placed straight onto its shards."""
    model_dir = FsPath(model_dir)
    dtype = None if dtype is None else weight_dtype(dtype)
    if not model_dir.is_dir():
        raise SvdsparseError(f"{model_dir}: not a directory (expected a converted or Hugging Face model)")
    if is_converted(model_dir):
        if config_overrides:
            raise SvdsparseError(f"{model_dir}: config overrides {sorted(config_overrides)} apply to HF "
                                 "directories only; this one is already converted")
        cfg, weights = read_converted(model_dir, dtype, mesh)
    else:
        cfg = read_hf_config(model_dir, **config_overrides)
        weights = read_hf_weights(model_dir, cfg, dtype or jnp.bfloat16, allow_pickle=allow_pickle, mesh=mesh)
    return LoadedModel(cfg, weights, load_tokenizer(model_dir), model_dir)

