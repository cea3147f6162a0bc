"""The one public loader: a model directory, a dtype, predictors, kernels, a sparsity policy and devices -> a
`Session`, a model ready to run. The CLI's commands, the lm-eval model, `svdsparse serve` and the torch bridge's
commands all load through `load`.

    from svdsparse_jax import session
    s = session.load("MODEL_DIR", predictors="PRED_DIR", ffn_policy="sparse")   # no MODEL_DIR: the bundled model
    out = s.generator().generate([s.encode("def read_config(path):\\n")], 48)
    print(s.decode(out.tokens[0]))

`Session.build_predictors(tokens, BuildConfig(...), out=DIR)` builds a predictor set for the model (refusing an
existing DIR before any work, as `svdsparse build-predictors` does), saves it, and returns the session with it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path as FsPath
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from svdsparse_jax.assets import BUNDLED_MODEL
from svdsparse_jax.checkpoint import load_model
from svdsparse_jax.config import ModelConfig
from svdsparse_jax.dtypes import weight_dtype
from svdsparse_jax.engine import EngineConfig, from_environment
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import check_new_output
from svdsparse_jax.generate import Generator
from svdsparse_jax.model import Transformer
from svdsparse_jax.predictors import PredictorSet, build_predictors, load_predictors, save_predictors
from svdsparse_jax.sharding import make_mesh, mesh_size, module_path
from svdsparse_jax.weights import FUSED, Path, model_fingerprint, unfuse_qkv


class Session:
    """A loaded model, ready to run: its config, the model (`model.Transformer`, under its engine
    configuration), its tokenizer (None when the directory has none: token ids only), its directory, and the
    predictor set it decodes with (None: dense).

    The separate q/k/v weights of the checkpoint are not kept (the model holds them fused); the fingerprint
    (`weights.model_fingerprint`, which predictor directories record) is computed from the model's arrays the
    first time it is asked for, unless loading predictors computed it already."""

    def __init__(self, cfg: ModelConfig, model: Transformer, tokenizer: Any, path: FsPath,
                 predictors: PredictorSet | None = None, fingerprint: str | None = None):
        self.cfg, self.model, self.tokenizer, self.path, self.predictors = cfg, model, tokenizer, path, predictors
        if fingerprint is not None:
            self.__dict__["fingerprint"] = fingerprint

    def __repr__(self) -> str:
        pset = f"{self.predictors.method} predictors" if self.predictors is not None else "dense"
        return (f"Session({str(self.path)!r}, {self.cfg.n_layers} layers, {self.dtype.name}, "
                f"{self.engine.backend}, ffn_policy={self.engine.ffn_policy!r}, {pset})")

    @property
    def engine(self) -> EngineConfig:
        """How decode runs (kernels, sparsity policy, device mesh)."""
        return self.model.engine

    @property
    def dtype(self) -> np.dtype:
        """The weights' dtype."""
        return np.dtype(self.model.dtype)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The checkpoint's fingerprint, from the model's arrays (each fused q/k/v split back: the same tensors
        the checkpoint holds, so the same digest as `LoadedModel.fingerprint`)."""
        return model_fingerprint(self.cfg, checkpoint_weights(self.model))

    def generator(self, dense: bool = False) -> Generator:
        """A `generate.Generator` for this model: with the session's predictors (sparse decode on the layers the
        engine's policy picks), or dense when there are none or `dense` says so."""
        pset = None if dense else self.predictors
        return Generator(self.model, pset and pset.layers, pset and pset.union)

    def encode(self, text: str) -> list[int]:
        """The tokenizer's ids for text (special tokens such as BOS included, as the CLI's --prompt)."""
        return self._tokenizer("encode")(text)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text (special tokens skipped)."""
        return self._tokenizer("decode").decode(list(ids), skip_special_tokens=True)

    def _tokenizer(self, what: str):
        if self.tokenizer is None:
            raise SvdsparseError(f"{self.path}: the model has no tokenizer files, which {what} needs; use token ids")
        return self.tokenizer

    def with_predictors(self, pset: PredictorSet | None) -> "Session":
        """The same model (shared arrays) decoding with another predictor set (None: dense)."""
        return Session(self.cfg, self.model, self.tokenizer, self.path, pset, self.__dict__.get("fingerprint"))

    def load_predictors(self, pred_dir: str | os.PathLike) -> "Session":
        """The session with the predictor directory `pred_dir`, checked against this model (shapes and
        fingerprint; the factors cast to the model's dtype)."""
        return self.with_predictors(load_predictors(pred_dir, self.cfg, self.fingerprint, self.dtype))

    def save_predictors(self, out: str | os.PathLike, pset: PredictorSet | None = None) -> FsPath:
        """Writes a predictor set (default: the session's) as a predictor directory for this model; refuses an
        existing `out`. Returns its path."""
        pset = pset if pset is not None else self.predictors
        if pset is None:
            raise SvdsparseError("save_predictors: the session has no predictors; build or load them first")
        return save_predictors(out, pset, self.cfg, self.fingerprint)

    def build_predictors(self, calib_tokens: np.ndarray, config: Any, out: str | os.PathLike | None = None,
                         progress: bool = True) -> "Session":
        """Builds predictors (`predictors.build_predictors`, a `BuildConfig`) from calibration tokens (a 1-D
        token stream) and returns the session with them; with `out`, saves them there, refusing an existing
        `out` before the build (which takes minutes on a large model)."""
        if out is not None:
            check_new_output(out, "out")
        pset = build_predictors(self.model, calib_tokens, config, progress=progress)
        if out is not None:
            self.save_predictors(out, pset)
        return self.with_predictors(pset)


def checkpoint_weights(model: Transformer) -> dict[Path, jax.Array]:
    """A model's weights keyed by spec path, as its checkpoint holds them: the arrays the model holds (by their
    module paths, `weights.module_view`), each FUSED group split back into its parts (`weights.unfuse_qkv`)."""
    _, state = nnx.split(model)
    shards = mesh_size(model.engine.mesh)
    out: dict[Path, jax.Array] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        key = module_path(path)
        parts = FUSED.get(key[-1])
        if parts is None:
            out[key] = x
        else:
            out.update(zip([key[:-1] + (p,) for p in parts], unfuse_qkv(x, model.cfg, shards)))
    return out


def load(model: str | os.PathLike | None = None, *, dtype: Any = "bfloat16",
         predictors: str | os.PathLike | None = None, kernels: str | None = None, ffn_policy: str = "measured",
         devices: int = 1, allow_pickle: bool = False, dense_only: bool = False, activation: str | None = None,
         act_threshold: float | None = None) -> Session:
    """Loads a model ready to run.

    model: a converted or Hugging Face directory (converted in memory); None: the bundled model. dtype: the
    weights' (bfloat16, float16 or float32; products accumulate in float32). predictors: a predictor directory
    (checked against the model) to decode with; None: dense. kernels: the engine's backend (auto, pallas,
    interpret, xla; None: SVDSPARSE_KERNELS, else auto = the Pallas kernels on a GPU, XLA elsewhere).
    ffn_policy: which layers of a decode batch run sparse (`policy.POLICIES`: measured, sparse, dense).
    devices: tensor parallel over this many devices (more than one: a mesh, every tensor loaded straight onto
    its shards). allow_pickle: read .bin checkpoints. dense_only, activation, act_threshold: config overrides
    for an HF directory (`config.read_hf_config`)."""
    if model is None:
        if not (BUNDLED_MODEL / "config.json").is_file():
            raise SvdsparseError("no model given and no bundled model is installed; pass a model directory")
        model = BUNDLED_MODEL
    if not isinstance(devices, int) or devices < 1:
        raise SvdsparseError(f"devices={devices!r}: expected an integer >= 1")
    engine = from_environment(kernels, ffn_policy=ffn_policy, mesh=make_mesh(devices) if devices > 1 else None)
    overrides: dict[str, Any] = {"dense_only": True} if dense_only else {}
    if activation is not None:
        overrides["activation"] = activation
    if act_threshold is not None:
        overrides["act_threshold"] = act_threshold
    lm = load_model(model, weight_dtype(dtype), allow_pickle=allow_pickle, mesh=engine.mesh, **overrides)
    pset = None if predictors is None else load_predictors(predictors, lm.cfg, lm.fingerprint,
                                                           lm.weights[("embed",)].dtype)
    fingerprint = lm.__dict__.get("fingerprint")  # computed already where the predictors were checked
    return Session(lm.cfg, Transformer(lm.cfg, lm.weights, engine), lm.tokenizer, lm.path, pset, fingerprint)
