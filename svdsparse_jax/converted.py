"""The converted-model directory: what `svdsparse convert` writes and every command reads fastest.

Layout:
  svdsparse.json   format version, ModelConfig, dtype, source
  config.json      the HF config, copied (so tools that expect an HF directory still find it)
  tokenizer files  copied when present
  params/          orbax checkpoint of the weights, nested by spec path

Writing goes to a temporary directory beside the output that is renamed at the end: an interrupted conversion
leaves no output directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path as FsPath
from typing import Any

import jax
import jax.numpy as jnp

from svdsparse_jax.config import ModelConfig
from svdsparse_jax.dtypes import parse_dtype
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import atomic_directory, inside, read_versioned_json
from svdsparse_jax.hf_checkpoint import TOKENIZER_FILES, copy_inside
from svdsparse_jax.sharding import spec_shardings
from svdsparse_jax.weights import Path, check_weights_fit, weight_specs

FORMAT_VERSION = 1
MARKER = "svdsparse.json"


def nest_weights(flat: dict[Path, Any]) -> dict[str, Any]:
    """{('layers', 0, 'attn', 'wq'): a} -> {'layers': {'0': {'attn': {'wq': a}}}} (string keys for orbax)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = value
    return tree


def unnest_weights(tree: dict[str, Any], cfg: ModelConfig) -> dict[Path, Any]:
    out = {}
    for spec in weight_specs(cfg):
        node = tree
        for p in spec.path:
            node = node[str(p)]
        out[spec.path] = node
    return out


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def save_converted(out_dir: str | os.PathLike, cfg: ModelConfig, weights: dict[Path, jax.Array],
                   source_dir: str | os.PathLike | None = None, *, source: str = "") -> FsPath:
    """Writes a converted directory atomically: everything goes to a temporary sibling that is renamed to
    out_dir only when complete. Refuses to overwrite an existing out_dir."""
    with atomic_directory(out_dir) as tmp:
        dtype = next(iter(weights.values())).dtype
        ckpt = _checkpointer()
        try:
            ckpt.save(tmp / "params", nest_weights(weights))
            ckpt.wait_until_finished()
        except Exception as e:  # orbax reports a full disk as ValueError / RuntimeError from its writer threads
            if "No space left on device" in str(e) or "RESOURCE_EXHAUSTED" in str(e):
                raise SvdsparseError(f"{FsPath(out_dir).absolute()}: no space left on the device while writing "
                                     "the parameters") from None
            raise
        if source_dir is not None:
            for name in ("config.json",) + TOKENIZER_FILES:
                if (FsPath(source_dir) / name).is_file():
                    copy_inside(source_dir, name, tmp)
        meta = {"format": FORMAT_VERSION, "config": cfg.to_dict(), "dtype": jnp.dtype(dtype).name,
                "source": source or (str(source_dir) if source_dir else "")}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return FsPath(out_dir).absolute()


def _no_links_out(model_dir: FsPath, *paths: FsPath) -> None:
    """Every file under `paths` (orbax reads a tree of them) must stay inside model_dir (`fsutil.inside`)."""
    for top in paths:
        for parent, dirs, files in os.walk(top):
            for name in dirs + files:
                inside(model_dir, os.path.relpath(os.path.join(parent, name), model_dir), f"{model_dir}: file")


def read_converted(model_dir: str | os.PathLike, dtype: jnp.dtype | None = None, mesh=None
                   ) -> tuple[ModelConfig, dict[Path, jax.Array]]:
    """Loads a converted directory: (config, weights), weights cast to `dtype` if given; with a device mesh orbax
    restores each tensor's shards straight onto their devices (`sharding.spec_shardings`)."""
    model_dir = FsPath(model_dir).absolute()
    _no_links_out(model_dir, inside(model_dir, MARKER, f"{model_dir}: description"), inside(model_dir, "params",
                                                                                         f"{model_dir}: parameters"))
    meta = read_versioned_json(model_dir / MARKER, (FORMAT_VERSION,), "a converted-model description")
    try:
        cfg = ModelConfig.from_dict(meta.get("config"))
        saved_dtype = parse_dtype(meta.get("dtype"))
    except SvdsparseError as e:
        raise SvdsparseError(f"{model_dir / MARKER}: {e}") from None
    check_weights_fit(cfg, dtype or saved_dtype, str(model_dir / MARKER), 1 if mesh is None else mesh.size)
    shardings = {} if mesh is None else spec_shardings(cfg, mesh)
    target = nest_weights({s.path: jax.ShapeDtypeStruct(s.shape, saved_dtype, sharding=shardings.get(s.path))
                           for s in weight_specs(cfg)})
    try:
        restored = _checkpointer().restore(model_dir / "params", target)
    except Exception as e:  # orbax raises several types for a damaged or mismatched checkpoint
        raise SvdsparseError(f"{model_dir / 'params'}: cannot restore the parameters ({type(e).__name__}: {e})") \
            from None
    weights = unnest_weights(restored, cfg)
    if dtype is not None and jnp.dtype(dtype) != saved_dtype:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    return cfg, weights


def is_converted(model_dir: str | os.PathLike) -> bool:
    return (FsPath(model_dir) / MARKER).is_file()

