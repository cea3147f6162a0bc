"""The predictor directory, the project's one predictor interchange format, read by the JAX engine and by the
torch executor (`torch_npu_bridge`) alike:

  predictors.safetensors  per layer i: low-rank `layers.{i}.a` [r, d], `layers.{i}.b` [d_ff, r], `layers.{i}.bias`
                          [d_ff] (and `layers.{i}.hidden_bias` [r] for the trained MLP); sign bits
                          `layers.{i}.bits` [d_ff, ceil(d/32)] int32 and `layers.{i}.alpha` [2] int32; the oracle
                          has no tensors
  manifest.json           format, kind, method and its configuration, the model's shapes, activation and
                          threshold, the factors' dtype, per-layer types, the model's fingerprint, build facts,
                          and `union_rows` (`policy.UnionRows`: the rows a decode batch reads, by batch size;
                          absent in sets built before it was measured)

A neuron is a candidate iff its score (B relu?(A x + hidden_bias))_i + bias_i is > 0 (the paper's section on the
predictor). Loading into a model of other shapes or another fingerprint is refused. Writes are atomic
(temporary directory, then rename). Format 1 (before the torch executor read these directories) loads too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import jax.numpy as jnp

from svdsparse_jax.config import DENSE_ONLY_ACTIVATIONS, SPARSE_ACTIVATIONS, ModelConfig
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import atomic_directory, inside, read_versioned_json
from svdsparse_jax.policy import UnionRows
from svdsparse_jax.predictors.base import LowRankPredictor, OraclePredictor, PredictorSet, SignBitPredictor
from svdsparse_jax.weights import FINGERPRINT_SCHEME, READABLE_FINGERPRINT_SCHEMES

FORMAT = 3  # 3: the manifest binds its tensor file (tensors_sha256)
READABLE_FORMATS = (1, 2, 3)
KIND = "svdsparse-predictors"
MANIFEST = "manifest.json"
TENSORS = "predictors.safetensors"


def _layer_entry(i: int, p) -> tuple[dict, dict]:
    if isinstance(p, LowRankPredictor):
        tensors = {f"layers.{i}.a": p.a, f"layers.{i}.b": p.b, f"layers.{i}.bias": p.bias}
        if p.hidden_bias is not None:
            tensors[f"layers.{i}.hidden_bias"] = p.hidden_bias
        return {"type": "lowrank", "relu": p.relu, "rank": p.rank}, tensors
    if isinstance(p, SignBitPredictor):
        return {"type": "signbit", "d": p.d}, {f"layers.{i}.bits": p.bits.view(jnp.int32),
                                               f"layers.{i}.alpha": jnp.stack([p.alpha_num, p.alpha_den])}
    return {"type": "oracle", "threshold": p.threshold}, {}


def predictor_bytes(cfg: ModelConfig, method: str, ranks: tuple[int, ...], itemsize: int) -> int:
    """About the size of a predictor directory, known before the build: low-rank factors A [r, d] and B [d_ff, r]
    in the factors' dtype with f32 biases, or sign bits; plus the manifest."""
    manifest = 1 << 16
    if method == "oracle":
        return manifest
    if method == "signbit":
        return manifest + cfg.n_layers * (cfg.d_ff * (-(-cfg.d_model // 32)) * 4 + 8)
    return manifest + sum(r * (cfg.d_model + cfg.d_ff) * itemsize + 4 * (cfg.d_ff + r) for r in ranks)


def save_predictors(out_dir: str | os.PathLike, pset: PredictorSet, cfg: ModelConfig, fingerprint: str) -> Path:
    from safetensors.flax import save_file

    entries, tensors = [], {}
    for i, p in enumerate(pset.layers):
        e, t = _layer_entry(i, p)
        entries.append(e)
        tensors.update(t)
    dtypes = {jnp.dtype(p.a.dtype).name for p in pset.layers if isinstance(p, LowRankPredictor)}
    manifest = {"format": FORMAT, "kind": KIND, "method": pset.method, "config": pset.config,
                "n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_ff": cfg.d_ff, "activation": cfg.activation,
                "threshold": cfg.act_threshold if cfg.activation == "fatrelu" else 0.0,
                "dtype": dtypes.pop() if len(dtypes) == 1 else None, "fingerprint": fingerprint,
                "layers": entries, "info": pset.info, "timings": pset.timings}
    if pset.union is not None:
        manifest["union_rows"] = pset.union.to_json()
    with atomic_directory(out_dir) as tmp:
        manifest["tensors_sha256"] = None
        if tensors:
            save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp / TENSORS))
            manifest["tensors_sha256"] = file_sha256(tmp / TENSORS)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return Path(out_dir).absolute()


def check_fingerprint(m: dict, cfg: ModelConfig, fingerprint: str, mpath: Path) -> None:
    """Refuses a manifest recorded for another model, saying why where it can: the activation or its threshold
    differ (an --activation / --act-threshold override), the set predates the current fingerprint, or the weights
    or config differ."""
    scheme, _, digest = str(m["fingerprint"]).partition("-")
    if scheme not in READABLE_FINGERPRINT_SCHEMES:
        raise SvdsparseError(f"{mpath}: records the older model fingerprint, which sampled a few weights and "
                             "cannot tell models apart; rebuild these predictors for the model (svdsparse "
                             "build-predictors MODEL --out DIR)")
    if digest == fingerprint.partition("-")[2]:
        return
    threshold = cfg.act_threshold if cfg.activation == "fatrelu" else 0.0
    if "activation" in m and (m["activation"], float(m.get("threshold", 0.0))) != (cfg.activation, threshold):
        why = (f"built for activation {m['activation']} (threshold {m.get('threshold', 0.0)}), but the model runs "
               f"{cfg.activation} (threshold {threshold}): check --activation / --act-threshold")
    elif scheme != FINGERPRINT_SCHEME:
        why = (f"built under fingerprint scheme {scheme}, which differs from {FINGERPRINT_SCHEME}'s for float32 "
               "weights just below 2^-14; rebuild these predictors for the model (svdsparse build-predictors)")
    else:
        why = "another checkpoint, or its weights or config differ (the weight dtype alone does not matter)"
    raise SvdsparseError(f"{mpath}: built for model fingerprint {m['fingerprint']}, but this model's is "
                         f"{fingerprint}: {why}")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def check_tensor_file(pred_dir: str | os.PathLike, m: dict) -> Path | None:
    """The directory's tensor file (None when the set has none), refused unless it is the one the manifest
    records (format 3 and later: its SHA-256), so another set's tensors cannot pass under this manifest."""
    path = inside(pred_dir, TENSORS, f"{pred_dir}: tensors")
    present = path.is_file()
    if m["format"] < 3:
        return path if present else None
    want = m.get("tensors_sha256")
    if want is None:
        if present:
            raise SvdsparseError(f"{path}: the manifest records no tensor file, but one is present")
        return None
    if not present:
        raise SvdsparseError(f"{path}: missing (the manifest records one)")
    if file_sha256(path) != want:
        raise SvdsparseError(f"{path}: is not the tensor file this manifest was written with (SHA-256 differs); "
                             "a file of another predictor set, or damaged")
    return path


def load_predictors(pred_dir: str | os.PathLike, cfg: ModelConfig, fingerprint: str | None,
                    dtype: jnp.dtype | None = None) -> PredictorSet:
    """Loads a predictor directory for a model; refuses other shapes and, when `fingerprint` is given, another
    model. dtype: the model's weight dtype, which the low-rank factors A and B are cast to (decode then reads
    them at the model's width, whatever dtype they were built in)."""
    pred_dir = Path(pred_dir)
    mpath = pred_dir / MANIFEST
    m = read_manifest(pred_dir)
    shape = (m["n_layers"], m["d_model"], m["d_ff"])
    if shape != (cfg.n_layers, cfg.d_model, cfg.d_ff):
        raise SvdsparseError(f"{mpath}: predictors for (layers, d_model, d_ff) = {shape}, but the model has "
                             f"{(cfg.n_layers, cfg.d_model, cfg.d_ff)}")
    if fingerprint is not None:
        check_fingerprint(m, cfg, fingerprint, mpath)
    tensors = {}
    tensor_file = check_tensor_file(pred_dir, m)
    if tensor_file is not None:
        from safetensors import safe_open
        try:
            with safe_open(str(tensor_file), framework="flax") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a damaged file
            raise SvdsparseError(f"{pred_dir / TENSORS}: cannot read ({type(e).__name__}: {e})") from None
    check_predictor_tensors(tensors, str(pred_dir / TENSORS))
    check_no_stray_tensors(tensors, m, pred_dir / TENSORS)
    layers = []
    for i, e in enumerate(m["layers"]):
        def t(name):
            key = f"layers.{i}.{name}"
            if key not in tensors:
                raise SvdsparseError(f"{pred_dir / TENSORS}: tensor {key} is missing")
            return tensors[key]
        if e["type"] == "lowrank":
            p = LowRankPredictor(t("a"), t("b"), t("bias"), t("hidden_bias") if e["relu"] else None, e["relu"])
            want = {"a": (e["rank"], cfg.d_model), "b": (cfg.d_ff, e["rank"]), "bias": (cfg.d_ff,)}
            bad = [f"{k} {getattr(p, k).shape} (expected {v})" for k, v in want.items() if getattr(p, k).shape != v]
            if bad:
                raise SvdsparseError(f"{pred_dir / TENSORS}: layer {i}: misshapen tensors {bad}")
            if dtype is not None:
                p = dataclasses.replace(p, a=p.a.astype(dtype), b=p.b.astype(dtype))
        elif e["type"] == "signbit":
            p = SignBitPredictor(t("bits").view(jnp.uint32), t("alpha")[0], t("alpha")[1], e["d"])
        elif e["type"] == "oracle":
            p = OraclePredictor(e["threshold"])
        else:
            raise SvdsparseError(f"{mpath}: layer {i}: unknown predictor type {e['type']!r}")
        layers.append(p)
    union = None if "union_rows" not in m else UnionRows.from_json(m["union_rows"], cfg.n_layers, str(mpath))
    return PredictorSet(m["method"], layers, m["config"], m.get("info", []), m.get("timings", {}), union)


def check_no_stray_tensors(tensors: dict, m: dict, where: str | os.PathLike) -> None:
    """Refuses tensors that no layer entry of the manifest uses (a layer the model lacks, a misnamed one)."""
    names = {"lowrank": ("a", "b", "bias"), "signbit": ("bits", "alpha"), "oracle": ()}
    used = set()
    for i, e in enumerate(m["layers"]):
        used |= {f"layers.{i}.{n}" for n in names.get(e["type"], ())}
        if e["type"] == "lowrank" and e.get("relu"):
            used.add(f"layers.{i}.hidden_bias")
    stray = sorted(set(tensors) - used)
    if stray:
        raise SvdsparseError(f"{where}: tensors no layer of the manifest uses: {stray[:8]}"
                             f"{f' and {len(stray) - 8} more' if len(stray) > 8 else ''}")


FACTOR_DTYPES = ("bfloat16", "float16", "float32")  # the manifest's `dtype` of the factors
INT_TENSORS = (".bits", ".alpha")  # the sign-bit predictor's packed signs and its threshold ratio


def check_predictor_tensors(tensors: dict, where: str) -> None:
    """Refuses predictor tensors of the wrong kind (factors and biases must be floating point, sign bits and
    ratios int32), factors with NaN or infinite values and biases with NaN, naming the tensor."""
    for name, t in tensors.items():
        if name.endswith(INT_TENSORS):
            if jnp.dtype(t.dtype) != jnp.int32:
                raise SvdsparseError(f"{where}: tensor {name} is {t.dtype}, expected int32")
            if name.endswith(".alpha") and not (t.shape == (2,) and int(t[1]) > 0):
                raise SvdsparseError(f"{where}: tensor {name} must be [numerator, denominator > 0]")
            continue
        if not jnp.issubdtype(t.dtype, jnp.floating):
            raise SvdsparseError(f"{where}: tensor {name} is {t.dtype}, expected floating point")
        if name.endswith(".bias"):  # an infinite bias means always (+) or never (-) a candidate; NaN means nothing
            bad, what = int(jnp.isnan(t).sum()), "NaN"
        else:
            bad, what = int(t.size - jnp.isfinite(t).sum()), "NaN or infinite"
        if bad:
            raise SvdsparseError(f"{where}: tensor {name}: {bad} of {t.size} values are {what}")


def read_manifest(pred_dir: str | os.PathLike) -> dict:
    """The manifest of a predictor directory, checked for its format, kind and the fields loading reads."""
    mpath = inside(pred_dir, MANIFEST, f"{pred_dir}: manifest")
    m = read_versioned_json(mpath, READABLE_FORMATS, "a predictor manifest")
    if m.get("kind", KIND) != KIND:
        raise SvdsparseError(f"{mpath}: kind {m.get('kind')!r}, expected {KIND!r}")
    missing = [k for k in ("method", "n_layers", "d_model", "d_ff", "fingerprint", "layers") if k not in m]
    if missing:
        raise SvdsparseError(f"{mpath}: missing fields {missing}")
    for k in ("n_layers", "d_model", "d_ff"):
        if not (isinstance(m[k], int) and not isinstance(m[k], bool) and m[k] > 0):
            raise SvdsparseError(f"{mpath}: {k} {m[k]!r}: expected a positive integer")
    if not isinstance(m["method"], str) or not isinstance(m.get("config", {}), dict):
        raise SvdsparseError(f"{mpath}: method must be a string and config an object")
    if not isinstance(m["fingerprint"], str):
        raise SvdsparseError(f"{mpath}: fingerprint {m['fingerprint']!r}: expected a string")
    known = SPARSE_ACTIVATIONS + DENSE_ONLY_ACTIVATIONS  # what a ModelConfig accepts
    if "activation" in m and m["activation"] not in known:
        raise SvdsparseError(f"{mpath}: activation {m['activation']!r}: expected one of {known}")
    t = m.get("threshold", 0.0)
    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)):
        raise SvdsparseError(f"{mpath}: threshold {t!r}: expected a finite number")
    if m.get("dtype") not in (None, *FACTOR_DTYPES):
        raise SvdsparseError(f"{mpath}: dtype {m['dtype']!r}: expected one of {FACTOR_DTYPES} or null")
    if m["format"] >= 3 and not (m.get("tensors_sha256") is None or (
            isinstance(m["tensors_sha256"], str) and len(m["tensors_sha256"]) == 64)):
        raise SvdsparseError(f"{mpath}: tensors_sha256 {m.get('tensors_sha256')!r}: expected 64 hex digits or null")
    if not (isinstance(m["layers"], list) and len(m["layers"]) == m["n_layers"]
            and all(isinstance(e, dict) and "type" in e for e in m["layers"])):
        raise SvdsparseError(f"{mpath}: layers must list {m['n_layers']} entries with a type, one per layer")
    for i, e in enumerate(m["layers"]):
        _check_layer_entry(e, m["d_model"], f"{mpath}: layer {i}")
    return m


def _check_layer_entry(e: dict, d_model: int, where: str) -> None:
    """One manifest layer entry's fields, by its type (`_layer_entry` writes them)."""
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0
    if e["type"] == "lowrank":
        ok = positive_int(e.get("rank")) and isinstance(e.get("relu"), bool)
        want = "rank a positive integer and relu true or false"
    elif e["type"] == "signbit":
        ok, want = e.get("d") == d_model, f"d = d_model = {d_model}"
    elif e["type"] == "oracle":
        t = e.get("threshold")
        ok = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
        want = "threshold a finite number"
    else:
        raise SvdsparseError(f"{where}: unknown predictor type {e['type']!r}")
    if not ok:
        raise SvdsparseError(f"{where}: {e['type']} entry {e}: expected {want}")
