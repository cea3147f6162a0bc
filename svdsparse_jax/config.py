"""ModelConfig: a static, hashable description of a ReGLU transformer, read from a Hugging Face config.json.

The config is a frozen dataclass, so it can be passed to `jax.jit` as a static argument and used as a cache key.
Both the transformers 4.x keys (`torch_dtype`, `rope_theta`, `rope_scaling`) and the 5.x keys (`dtype`,
`rope_parameters`) are read.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import inside
from svdsparse_jax.limits import read_json

# Activations the sparse method applies to: the FFN output is exactly zero for most neurons.
SPARSE_ACTIVATIONS = ("relu", "fatrelu", "drelu")
# Activations allowed only when the user asks for dense-only use (no predictors, no sparse kernels).
DENSE_ONLY_ACTIVATIONS = ("silu",)
SUPPORTED_MODEL_TYPES = ("llama", "sparsellama", "mistral", "qwen2")
# HF spellings of the same activation.
_ACT_ALIASES = {"swish": "silu", "fat_relu": "fatrelu", "shifted_relu": "fatrelu", "d_relu": "drelu"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of one decoder-only ReGLU transformer.

    FFN: y = W_down (act(W_gate x) * (W_up x)), with act one of
      relu:    max(g, 0)
      fatrelu: g if g >= act_threshold else 0
      drelu:   max(g, 0) * max(u, 0)  (ReLU on gate AND up)
      silu:    dense-only models (not sparse, predictors refuse them)
    """

    vocab_size: int
    d_model: int
    d_ff: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    activation: str = "relu"
    act_threshold: float = 0.0
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scale: float = 1.0  # "linear" RoPE scaling divides positions by this factor
    max_seq_len: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.activation not in SPARSE_ACTIVATIONS + DENSE_ONLY_ACTIVATIONS:
            raise SvdsparseError(f"activation {self.activation!r} is not supported; expected one of "
                                 f"{SPARSE_ACTIVATIONS + DENSE_ONLY_ACTIVATIONS}")
        if self.n_heads % self.n_kv_heads:
            raise SvdsparseError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for name in ("vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise SvdsparseError(f"config field {name} must be positive, got {getattr(self, name)}")
        for name in ("rms_eps", "rope_theta", "rope_scale"):
            if not getattr(self, name) > 0:
                raise SvdsparseError(f"config field {name} must be positive, got {getattr(self, name)}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def is_sparse_activation(self) -> bool:
        return self.activation in SPARSE_ACTIVATIONS

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise SvdsparseError(f"ModelConfig: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SvdsparseError(f"unknown ModelConfig fields {unknown}")
        d = dict(d)
        d["eos_ids"] = tuple(d.get("eos_ids", ()))
        try:
            return cls(**d)
        except TypeError as e:  # a required field missing
            raise SvdsparseError(f"ModelConfig: {e}") from None


_INTS = ("vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len")
_FLOATS = ("act_threshold", "rms_eps", "rope_theta", "rope_scale")
_OPTIONAL_IDS = ("sliding_window", "bos_id", "pad_id")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fields(cfg: ModelConfig) -> None:
    """Types and finiteness of every field (ranges are `ModelConfig.__post_init__`'s)."""
    bad = [f"{n}={getattr(cfg, n)!r} (expected an integer)" for n in _INTS if not _is_int(getattr(cfg, n))]
    bad += [f"{n}={getattr(cfg, n)!r} (expected a finite number)" for n in _FLOATS
            if not (isinstance(getattr(cfg, n), (int, float)) and not isinstance(getattr(cfg, n), bool)
                    and math.isfinite(getattr(cfg, n)))]
    bad += [f"{n}={getattr(cfg, n)!r} (expected a non-negative integer or null)" for n in _OPTIONAL_IDS
            if getattr(cfg, n) is not None and not (_is_int(getattr(cfg, n)) and getattr(cfg, n) >= 0)]
    if not (isinstance(cfg.eos_ids, tuple) and all(_is_int(e) and e >= 0 for e in cfg.eos_ids)):
        bad.append(f"eos_ids={cfg.eos_ids!r} (expected non-negative integers)")
    bad += [f"{n}={getattr(cfg, n)!r} (expected true or false)" for n in ("qkv_bias", "o_bias", "tie_embeddings")
            if not isinstance(getattr(cfg, n), bool)]
    if bad:
        raise SvdsparseError(f"config fields {'; '.join(bad)}")


def _rope(hf: dict[str, Any], where: str) -> tuple[float, float]:
    """(theta, linear scale) from either `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return _finite(theta, "rope_theta"), 1.0
    if rope_type == "linear":
        factor = params.get("factor", scaling.get("factor"))
        return _finite(theta, "rope_theta"), _finite(factor, "rope_scaling.factor")
    raise SvdsparseError(f"{where}: rope_type {rope_type!r} is not supported; expected 'default' or 'linear'")


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(_is_int(v) and v >= 0 for v in values):
        raise SvdsparseError(f"eos_token_id {value!r}: expected a non-negative integer or a list of them")
    return tuple(values)


def _integer(value: Any, name: str) -> int:
    """An HF config value that must be an integer (2.0 counts), by its key `name`."""
    if not (_is_int(value) or (isinstance(value, float) and value.is_integer())):
        raise SvdsparseError(f"{name}={value!r}: expected an integer")
    return int(value)


def _finite(value: Any, name: str) -> float:
    """An HF config value that must be a finite number, by its key `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SvdsparseError(f"{name}={value!r}: expected a finite number")
    return float(value)


def from_hf_config(hf: dict[str, Any], *, where: str = "config.json", **overrides: Any) -> ModelConfig:
    """`_from_hf_config` (see there), every problem with a field raised as one error that names `where`."""
    if not isinstance(hf, dict):
        raise SvdsparseError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    try:
        return _from_hf_config(hf, where=where, **overrides)
    except SvdsparseError as e:
        raise SvdsparseError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise SvdsparseError(f"{where}: a field has the wrong type or value ({type(e).__name__}: {e})") from None


def _from_hf_config(hf: dict[str, Any], *, where: str = "config.json", activation: str | None = None,
                    act_threshold: float | None = None, dense_only: bool = False,
                    max_seq_len: int | None = None) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF config.json.

    Args:
      hf: the parsed config.json.
      where: how to name the source in errors (the file path).
      activation: overrides `hidden_act` (e.g. "drelu" for TurboSparse / SparseQwen2 checkpoints whose config
        says "relu" but whose modelling code applies ReLU to up too).
      act_threshold: overrides `hidden_act_param` (the FATReLU threshold).
      dense_only: allow activations that are not sparse (silu); such a model can only run dense.
      max_seq_len: overrides `max_position_embeddings`.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SvdsparseError(f"{where}: model_type {model_type!r} is not supported; expected one of "
                             f"{SUPPORTED_MODEL_TYPES}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise SvdsparseError(f"{where}: missing keys {missing}")
    act = activation or str(hf.get("hidden_act", "silu")).lower()
    act = _ACT_ALIASES.get(act, act)
    if act not in SPARSE_ACTIVATIONS:
        if act in DENSE_ONLY_ACTIVATIONS and dense_only:
            pass
        elif act in DENSE_ONLY_ACTIVATIONS:
            raise SvdsparseError(
                f"{where}: hidden_act {act!r} gives no activation sparsity; the sparse method supports "
                f"{list(SPARSE_ACTIVATIONS)}. Pass dense_only=True (CLI: --dense-only) to run it dense.")
        else:
            raise SvdsparseError(f"{where}: hidden_act {act!r} is not supported; expected one of "
                                 f"{list(SPARSE_ACTIVATIONS)} (or {list(DENSE_ONLY_ACTIVATIONS)} with dense_only)")
    if act_threshold is not None and act != "fatrelu":
        raise SvdsparseError(f"act_threshold={act_threshold} (--act-threshold) applies to fatrelu; this model's "
                             f"activation is {act} (add --activation fatrelu to run it as FATReLU)")
    if act_threshold is None:
        act_threshold = _finite(hf.get("hidden_act_param") or 0.0, "hidden_act_param")
    threshold = act_threshold if act == "fatrelu" else 0.0
    if hf.get("mlp_bias"):
        raise SvdsparseError(f"{where}: mlp_bias=true is not supported (ReGLU FFNs here have no biases)")
    n_heads = _integer(hf["num_attention_heads"], "num_attention_heads")
    d_model = _integer(hf["hidden_size"], "hidden_size")
    head_dim = _integer(hf["head_dim"], "head_dim") if hf.get("head_dim") else d_model // max(n_heads, 1)
    theta, scale = _rope(hf, where)
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
        if hf.get("use_sliding_window"):
            raise SvdsparseError(f"{where}: Qwen2 with use_sliding_window=true is not supported")
        window = None
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        window = hf.get("sliding_window") if model_type == "mistral" else None
    max_len = max_seq_len or _integer(hf.get("max_position_embeddings", 4096), "max_position_embeddings")
    if window is not None and window >= max_len:
        window = None  # never binds
    return ModelConfig(
        vocab_size=_integer(hf["vocab_size"], "vocab_size"), d_model=d_model,
        d_ff=_integer(hf["intermediate_size"], "intermediate_size"),
        n_layers=_integer(hf["num_hidden_layers"], "num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=_integer(hf["num_key_value_heads"], "num_key_value_heads") if hf.get("num_key_value_heads")
        else n_heads,
        head_dim=head_dim, activation=act, act_threshold=float(threshold),
        rms_eps=_finite(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        rope_theta=theta, rope_scale=scale, max_seq_len=max_len, qkv_bias=qkv_bias, o_bias=o_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window is not None else None,
        bos_id=hf.get("bos_token_id"), eos_ids=_eos_ids(hf.get("eos_token_id")), pad_id=hf.get("pad_token_id"),
        model_type=model_type)


def read_hf_config(model_dir: str | Path, **overrides: Any) -> ModelConfig:
    """Reads `model_dir/config.json` (see `from_hf_config` for the overrides); a link out of model_dir is
    refused (`fsutil.inside`)."""
    path = inside(model_dir, "config.json", f"{model_dir}: config")
    if not path.is_file():
        raise SvdsparseError(f"{path}: not found (expected a Hugging Face model directory)")
    return from_hf_config(read_json(path, "a model config"), where=str(path), **overrides)


# Named shapes of the paper's models (and a tiny one), for benchmarks and random-weight models.
NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, d_model=64, d_ff=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16),
    "llama2-7b": dict(vocab_size=32000, d_model=4096, d_ff=11008, n_layers=32, n_heads=32, n_kv_heads=32,
                      head_dim=128, activation="fatrelu", act_threshold=0.01, rms_eps=1e-5),
    "llama2-13b": dict(vocab_size=32000, d_model=5120, d_ff=13824, n_layers=40, n_heads=40, n_kv_heads=40,
                       head_dim=128, activation="fatrelu", act_threshold=0.01, rms_eps=1e-5),
    "mistral-7b": dict(vocab_size=32000, d_model=4096, d_ff=14336, n_layers=32, n_heads=32, n_kv_heads=8,
                       head_dim=128, activation="drelu", rms_eps=1e-5, model_type="mistral"),
    "qwen2-7b": dict(vocab_size=152064, d_model=3584, d_ff=18944, n_layers=28, n_heads=28, n_kv_heads=4,
                     head_dim=128, activation="drelu", rope_theta=1e6, qkv_bias=True, model_type="qwen2"),
}


def named_config(name: str, **overrides: Any) -> ModelConfig:
    """A ModelConfig of one of NAMED_SHAPES (e.g. "llama2-7b"), with field overrides."""
    if name not in NAMED_SHAPES:
        raise SvdsparseError(f"unknown shape {name!r}; expected one of {sorted(NAMED_SHAPES)}")
    return ModelConfig(**{**NAMED_SHAPES[name], **overrides})


def to_hf_config(cfg: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """The HF config.json of a LLaMA-family ModelConfig (inverse of `from_hf_config`; 4.x and 5.x RoPE keys)."""
    if cfg.model_type not in ("llama", "sparsellama") or cfg.rope_scale != 1.0 or cfg.sliding_window:
        raise SvdsparseError(f"to_hf_config writes plain LLaMA configs only (got model_type {cfg.model_type!r}, "
                             f"rope_scale {cfg.rope_scale}, sliding_window {cfg.sliding_window})")
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": cfg.activation, "rms_norm_eps": cfg.rms_eps, "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.qkv_bias, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_id, "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) != 1 else cfg.eos_ids[0],
        "pad_token_id": cfg.pad_id, "dtype": dtype, "torch_dtype": dtype,
    }
    if cfg.qkv_bias != cfg.o_bias:
        raise SvdsparseError("a LLaMA config has one attention_bias for q, k, v and o")
    if cfg.activation == "fatrelu":
        hf["hidden_act_param"] = cfg.act_threshold
    return hf
