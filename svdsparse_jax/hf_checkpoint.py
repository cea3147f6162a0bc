"""The Hugging Face checkpoint format, both ways: reading a checkpoint into weights, and writing weights as one.

Reading is tensor by tensor (safetensors opened lazily, each tensor cast to the target dtype as it arrives),
so a 7B model never needs two full copies in host memory. Every expected tensor is checked for presence and
shape BEFORE any data is read, and all problems are reported in one error. Writing goes to a temporary
directory beside the output that is renamed at the end (`fsutil.atomic_directory`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path as FsPath
from typing import Any

import jax
import jax.numpy as jnp

from svdsparse_jax.config import ModelConfig
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import atomic_directory, copy_keeping_mode, inside
from svdsparse_jax.limits import read_json
from svdsparse_jax.progress import tqdm
from svdsparse_jax.sharding import spec_shardings
from svdsparse_jax.weights import Path, WeightSpec, check_weights_fit, weight_count, weight_specs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
# Tensors an HF checkpoint may hold that carry no weights of ours.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def copy_inside(source_dir: str | os.PathLike, name: str, out: FsPath) -> None:
    """Copies source_dir/name, which must stay inside source_dir (`fsutil.inside`: no link out of it), into out
    with its permissions (never widened: a 0600 file stays 0600)."""
    copy_keeping_mode(inside(source_dir, name, f"{source_dir}: {name}"), out / name)



def _checkpoint_index(hf_dir: FsPath, allow_pickle: bool) -> dict[str, FsPath]:
    """Maps every tensor name of the checkpoint to the file that holds it."""
    st_index = hf_dir / "model.safetensors.index.json"
    if st_index.is_file() or (hf_dir / "model.safetensors").is_file() or list(hf_dir.glob("*.safetensors")):
        return _safetensors_index(hf_dir, st_index)
    if list(hf_dir.glob("pytorch_model*.bin")):
        if not allow_pickle:
            raise SvdsparseError(f"{hf_dir}: only pickle (.bin) weights found; they are not loaded unless you pass "
                                 "allow_pickle=True (CLI: --allow-pickle), or convert them to safetensors first")
        return _bin_index(hf_dir)
    raise SvdsparseError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or *.safetensors found")


def _safetensors_index(hf_dir: FsPath, index_path: FsPath) -> dict[str, FsPath]:
    from safetensors import safe_open

    if index_path.is_file():
        return _index_files(hf_dir, index_path, ".safetensors")
    files = sorted(hf_dir.glob("*.safetensors"))
    if len(files) > 1 and not (hf_dir / "model.safetensors").is_file():
        raise SvdsparseError(f"{hf_dir}: {len(files)} safetensors shards but no model.safetensors.index.json")
    file_name = "model.safetensors" if (hf_dir / "model.safetensors").is_file() else files[0].name
    path = inside(hf_dir, file_name, f"{hf_dir}: weights")
    with _reading(path):
        with safe_open(str(path), framework="flax") as f:
            return {name: path for name in f.keys()}


def _index_files(hf_dir: FsPath, index_path: FsPath, suffix: str) -> dict[str, FsPath]:
    """An index's tensor -> shard map (its `weight_map`) as paths: every shard a file of this format (`suffix`, so
    a safetensors index cannot hand a pickle to the reader) inside the checkpoint directory (`fsutil.inside`),
    present."""
    index = read_json(index_path, "a checkpoint index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise SvdsparseError(f"{index_path}: not a valid index (weight_map must map tensor names to file names)")
    shards = {f: inside(hf_dir, f, f"{index_path}: shard") for f in set(weight_map.values())}
    wrong = sorted(f for f in shards if not f.endswith(suffix))
    if wrong:
        raise SvdsparseError(f"{index_path}: shards must be {suffix} files; the index lists {wrong}")
    missing_files = sorted(f for f, path in shards.items() if not path.is_file())
    if missing_files:
        raise SvdsparseError(f"{index_path}: shard files listed in the index are missing: {missing_files}")
    return {name: shards[f] for name, f in weight_map.items()}


def _bin_index(hf_dir: FsPath) -> dict[str, FsPath]:
    index_path = hf_dir / "pytorch_model.bin.index.json"
    if index_path.is_file():
        return _index_files(hf_dir, index_path, ".bin")
    path = inside(hf_dir, "pytorch_model.bin", f"{hf_dir}: weights")
    return {name: path for name in _torch_load(path)}


@contextlib.contextmanager
def _reading(path: FsPath):
    """Turns any failure to read a checkpoint file (damaged, truncated, not that format, a refused pickle) into
    one error that names the file."""
    try:
        yield
    except SvdsparseError:
        raise
    except Exception as e:  # safetensors, torch and pickle raise many types for a damaged file
        raise SvdsparseError(f"{path}: cannot read this checkpoint file ({type(e).__name__}: {e})") from None


def _torch_load(path: FsPath) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise SvdsparseError(f"{path}: reading .bin checkpoints needs torch (pip install torch)") from None
    with _reading(path):
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def checked_tensor(t: jax.Array, dtype: jnp.dtype, where: str) -> jax.Array:
    """t cast to `dtype`, refused (naming `where`) unless it is floating point and every value is finite, before
    and after the cast (a float32 value past float16's range becomes infinite)."""
    if not jnp.issubdtype(t.dtype, jnp.floating):
        raise SvdsparseError(f"{where} is {t.dtype}; only floating-point weights are read (bfloat16, float16, "
                             "float32)")
    bad = int(t.size - jnp.isfinite(t).sum())
    if bad:
        raise SvdsparseError(f"{where}: {bad} of {t.size} values are NaN or infinite")
    out = t.astype(dtype)
    narrower = jnp.finfo(dtype).max < jnp.finfo(t.dtype).max  # only a narrower range can overflow
    bad = int(out.size - jnp.isfinite(out).sum()) if narrower else 0
    if bad:
        raise SvdsparseError(f"{where}: {bad} values overflow {jnp.dtype(dtype).name} (largest "
                             f"{float(jnp.finfo(dtype).max):g}); convert with --dtype bfloat16 or float32")
    return out


class _TensorReader:
    """Opens each checkpoint file once and hands out tensors lazily, by HF name."""

    def __init__(self, index: dict[str, FsPath]):
        self.index = index
        self._open: dict[FsPath, Any] = {}

    def _file(self, path: FsPath):
        if path not in self._open:
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                with _reading(path):
                    self._open[path] = safe_open(str(path), framework="flax")
            else:
                self._open[path] = _torch_load(path)
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._file(self.index[name])
        if isinstance(f, dict):
            return tuple(f[name].shape)
        if name not in f.keys():
            raise SvdsparseError(f"{self.index[name]}: tensor {name} is listed in the index but not in the file")
        with _reading(self.index[name]):
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str, dtype: jnp.dtype) -> jax.Array:
        """The tensor cast to `dtype`, checked (`checked_tensor`)."""
        path = self.index[name]
        f = self._file(path)
        with _reading(path):
            if isinstance(f, dict):  # a torch tensor from a .bin file (bf16 has no NumPy type: read as f32)
                t = f[name]
                t = jnp.asarray((t.float() if t.is_floating_point() else t).numpy())
            else:
                t = f.get_tensor(name)
        return checked_tensor(t, dtype, f"{path}: tensor {name}")

    def close(self) -> None:
        for f in self._open.values():
            if hasattr(f, "__exit__"):
                f.__exit__(None, None, None)
        self._open.clear()


def _hf_shape(spec: WeightSpec) -> tuple[int, ...]:
    return spec.shape[::-1] if spec.hf_transposed else spec.shape


def _few(names: list[str], n: int = 8) -> list[str]:
    """The first n names, and how many more (so an error stays one readable line)."""
    return names if len(names) <= n else names[:n] + [f"... {len(names) - n} more"]


def check_hf_tensors(cfg: ModelConfig, reader: _TensorReader, where: FsPath) -> None:
    """Raises one SvdsparseError naming the missing, extra and misshapen tensors (the first few of each)."""
    want = weight_count(cfg)[0]
    if len(reader.index) < want:  # before a hostile layer count's specs are listed
        raise SvdsparseError(f"{where}: checkpoint does not match config.json: it holds {len(reader.index)} tensors, "
                             f"the config describes {want}")
    specs = weight_specs(cfg)
    expected = {s.hf_name: s for s in specs}
    present = set(reader.index)
    ignorable = {n for n in present if n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints still write the (identical) head
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected) - ignorable)
    misshapen = [f"{n}: {reader.shape(n)} (expected {_hf_shape(s)})" for n, s in expected.items()
                 if n in present and reader.shape(n) != _hf_shape(s)]
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if extra:
        problems.append(f"unexpected tensors {_few(extra)}")
    if misshapen:
        problems.append(f"misshapen tensors [{'; '.join(_few(misshapen))}]")
    if problems:
        raise SvdsparseError(f"{where}: checkpoint does not match config.json: " + "; ".join(problems))


def read_hf_weights(hf_dir: str | os.PathLike, cfg: ModelConfig, dtype: jnp.dtype = jnp.bfloat16,
                    allow_pickle: bool = False, mesh=None) -> dict[Path, jax.Array]:
    """Reads an HF checkpoint into {spec path: array in `dtype`}, one tensor at a time, after checking it; with a
    device mesh each tensor goes straight to its shards (`sharding.spec_shardings`)."""
    hf_dir = FsPath(hf_dir)
    check_weights_fit(cfg, dtype, str(hf_dir / "config.json"), 1 if mesh is None else mesh.size)
    shardings = None if mesh is None else spec_shardings(cfg, mesh)
    reader = _TensorReader(_checkpoint_index(hf_dir, allow_pickle))
    try:
        check_hf_tensors(cfg, reader, hf_dir)
        out = {}
        for spec in tqdm(weight_specs(cfg), desc=f"reading {hf_dir.name}", unit="tensor", leave=False,
                         disable=None):  # a bar on a terminal only
            t = reader.get(spec.hf_name, dtype)
            t = t.T if spec.hf_transposed else t
            out[spec.path] = t if shardings is None else jax.device_put(t, shardings[spec.path])
        return out
    finally:
        reader.close()


def write_hf_checkpoint(out_dir: str | os.PathLike, cfg: ModelConfig, weights: dict[Path, jax.Array],
                        tokenizer_dir: str | os.PathLike | None = None, extra_files: dict[str, str] | None = None,
                        dtype: jnp.dtype = jnp.bfloat16) -> FsPath:
    """Writes an HF-format directory (config.json, model.safetensors in `dtype`, tokenizer files, extra text
    files such as a README card), atomically like `save_converted`. Inverse of `read_hf_weights`."""
    from safetensors.flax import save_file

    from svdsparse_jax.config import to_hf_config

    with atomic_directory(out_dir) as tmp:
        tensors = {s.hf_name: (weights[s.path].T if s.hf_transposed else weights[s.path]).astype(dtype)
                   for s in weight_specs(cfg)}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = to_hf_config(cfg, jnp.dtype(dtype).name)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (FsPath(tokenizer_dir) / name).is_file():
                    copy_inside(tokenizer_dir, name, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return FsPath(out_dir).absolute()


