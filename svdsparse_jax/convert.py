"""Hugging Face checkpoint -> params, and the converted-directory format (orbax params + configs + tokenizer).

Reading is tensor by tensor (safetensors opened lazily, each tensor cast to the target dtype as it arrives),
so a 7B model never needs two full copies in host memory. Every expected tensor is checked for presence and
shape BEFORE any data is read, and all problems are reported in one error. Writing goes to a temporary
directory beside the output that is renamed at the end: an interrupted conversion leaves no output directory.

Converted directory layout:
  svdsparse.json   format version, ModelConfig, dtype, source
  config.json      the HF config, copied (so tools that expect an HF directory still find it)
  tokenizer files  copied when present
  params/          orbax checkpoint of the weights, nested by spec path
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from pathlib import Path as FsPath
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdsparse_jax.config import ModelConfig, read_hf_config
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import atomic_directory, check_free_space, copy_keeping_mode, inside, read_versioned_json
from svdsparse_jax.limits import read_json
from svdsparse_jax.sharding import spec_shardings
from svdsparse_jax.weights import Path, WeightSpec, check_weights_fit, model_fingerprint, weight_count, weight_specs

FORMAT_VERSION = 1
MARKER = "svdsparse.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
# Tensors an HF checkpoint may hold that carry no weights of ours.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def _copy_inside(source_dir: str | os.PathLike, name: str, out: FsPath) -> None:
    """Copies source_dir/name, which must stay inside source_dir (`fsutil.inside`: no link out of it), into out
    with its permissions (never widened: a 0600 file stays 0600)."""
    copy_keeping_mode(inside(source_dir, name, f"{source_dir}: {name}"), out / name)


def parse_dtype(name: str) -> jnp.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise SvdsparseError(f"dtype {name!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def weight_dtype(dtype: Any) -> jnp.dtype:
    """A weight dtype given by name or as a dtype, refused unless bfloat16, float16 or float32."""
    if isinstance(dtype, str):
        return parse_dtype(dtype)
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise SvdsparseError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    return dt


# ----------------------------------------------------------------------------------------------- reading HF

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
    path = hf_dir / "model.safetensors" if (hf_dir / "model.safetensors").is_file() else files[0]
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
    path = hf_dir / "pytorch_model.bin"
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
        from tqdm import tqdm
        for spec in tqdm(weight_specs(cfg), desc=f"reading {hf_dir.name}", unit="tensor", leave=False,
                         disable=None):  # a bar on a terminal only
            t = reader.get(spec.hf_name, dtype)
            t = t.T if spec.hf_transposed else t
            out[spec.path] = t if shardings is None else jax.device_put(t, shardings[spec.path])
        return out
    finally:
        reader.close()


# ------------------------------------------------------------------------------------- converted directories

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
                    _copy_inside(source_dir, name, tmp)
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
                    _copy_inside(tokenizer_dir, name, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return FsPath(out_dir).absolute()


# ------------------------------------------------------------------------------------------------ loading

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


def is_converted(model_dir: str | os.PathLike) -> bool:
    return (FsPath(model_dir) / MARKER).is_file()


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


def weights_equal(a: dict[Path, jax.Array], b: dict[Path, jax.Array]) -> bool:
    """True when both hold the same paths with identical dtypes and values."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
