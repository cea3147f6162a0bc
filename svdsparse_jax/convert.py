"""`convert`: a Hugging Face checkpoint -> a converted directory (`converted`), checked and written atomically.

The model-loading names that lived here have their own modules: `hf_checkpoint` (reading and writing the HF
format), `converted` (the converted directory), `checkpoint` (`load_model`, `LoadedModel`, `load_tokenizer`),
`dtypes`; and `session.load` is the one public loader of a ready model. They are imported here too, for the
callers (scripts, training) that still import them from this module.
"""

from __future__ import annotations

import os
from pathlib import Path as FsPath
from typing import Any

import jax.numpy as jnp

from svdsparse_jax.checkpoint import LoadedModel, load_model, load_tokenizer  # noqa: F401  (older callers)
from svdsparse_jax.config import read_hf_config
from svdsparse_jax.converted import nest_weights, read_converted, save_converted, unnest_weights  # noqa: F401
from svdsparse_jax.dtypes import DTYPES, parse_dtype, weight_dtype  # noqa: F401  (older callers)
from svdsparse_jax.fsutil import check_free_space
from svdsparse_jax.hf_checkpoint import read_hf_weights, write_hf_checkpoint  # noqa: F401  (older callers)
from svdsparse_jax.weights import check_weights_fit, weight_count


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: jnp.dtype = jnp.bfloat16, *,
            allow_pickle: bool = False, **config_overrides: Any) -> FsPath:
    """HF directory -> converted directory (see the module docstring). Returns the output path."""
    dtype = weight_dtype(dtype)
    cfg = read_hf_config(hf_dir, **config_overrides)
    check_weights_fit(cfg, dtype, str(FsPath(hf_dir) / "config.json"))
    # both before the weights are read
    check_free_space(out_dir, weight_count(cfg)[1] * jnp.dtype(dtype).itemsize, "OUT_DIR")
    weights = read_hf_weights(hf_dir, cfg, dtype, allow_pickle=allow_pickle)
    return save_converted(out_dir, cfg, weights, hf_dir, source=str(FsPath(hf_dir).absolute()))
