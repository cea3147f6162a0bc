"""The per-layer predictor files of the SVDP paper's public code, which PowerInfer's predictors share:
`model_{layer}.pt`, each a state dict with `fc1.weight` [r, d], `fc2.weight` [d_ff, r] and `fc2.bias` [d_ff]
in fp16, scoring x as fc2(fc1(x)) (candidate iff > 0). This project's A, B and bias are exactly fc1.weight,
fc2.weight and fc2.bias, so predictors move both ways; MLP predictors (a ReLU and a hidden bias between the
two layers) have no place in this layout and are refused. Reading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import atomic_directory, check_free_space, inside
from torch_npu_bridge.factors import LayerFactors, check_layers


def layer_file(i: int) -> str:
    return f"model_{i}.pt"


UNION_FILE = "union_rows.json"  # beside the paper's files: the set's measured unions, so a round trip keeps its policy


def write_svdp(out_dir: str | os.PathLike, layers: list[LayerFactors], union_rows: dict | None = None) -> Path:
    """Writes model_{i}.pt for every layer (fp16), and the predictor set's union row fractions (`UNION_FILE`,
    `policy.UnionRows.to_json`) when given, atomically as a directory."""
    import torch

    states = []
    for i, f in enumerate(layers):
        if f.relu or f.hidden_bias is not None:
            raise SvdsparseError(f"layer {i}: an MLP predictor (ReLU + hidden bias) has no SVDP-layout equivalent")
        # np.array copies: torch warns on every read-only array it wraps
        state = {"fc1.weight": torch.from_numpy(np.array(f.a, np.float32)).half(),
                 "fc2.weight": torch.from_numpy(np.array(f.b, np.float32)).half(),
                 "fc2.bias": torch.from_numpy(np.array(f.bias, np.float32)).half()}
        for k in ("fc1.weight", "fc2.weight"):  # an infinite bias is meaningful (always / never); a factor is not
            bad = int((~torch.isfinite(state[k])).sum())
            if bad:
                raise SvdsparseError(f"layer {i}: {k}: {bad} values overflow float16, the SVDP files' dtype")
        states.append(state)
    check_free_space(out_dir, sum(2 * sum(t.numel() for t in st.values()) + 4096 for st in states), "--out")
    with atomic_directory(out_dir) as tmp:
        for i, state in enumerate(states):
            try:
                torch.save(state, tmp / layer_file(i))
            except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError of its writer
                raise SvdsparseError(f"{tmp / layer_file(i)}: cannot write ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if union_rows is not None:
            (tmp / UNION_FILE).write_text(json.dumps(union_rows) + "\n")
    return Path(out_dir).absolute()


def read_union_rows(svdp_dir: str | os.PathLike, n_layers: int):
    """The `UNION_FILE` an export wrote beside the layer files, as `policy.UnionRows` (None without one: files
    from the paper's code carry none)."""
    from svdsparse_jax.limits import read_json
    from svdsparse_jax.policy import UnionRows

    path = inside(svdp_dir, UNION_FILE, f"{svdp_dir}: union rows")
    if not path.is_file():
        return None
    return UnionRows.from_json(read_json(path, "the union row fractions"), n_layers, str(path))


def read_svdp(svdp_dir: str | os.PathLike, n_layers: int, d: int, d_ff: int, allow_pickle: bool = False
              ) -> list[LayerFactors]:
    """Reads model_0.pt ... model_{n_layers-1}.pt (float32 NumPy); a missing file, a missing key or a wrong
    shape is an error naming the file. The files are pickles (read with torch's weights-only unpickler), so
    they are read only with allow_pickle (CLI: --allow-pickle), as .bin checkpoints are."""
    import torch

    root = Path(svdp_dir)
    if not allow_pickle:
        raise SvdsparseError(f"{root}: SVDP files (model_{{layer}}.pt) are pickles; they are read only with "
                             "allow_pickle=True (CLI: --allow-pickle)")
    if not root.is_dir():
        raise SvdsparseError(f"{root}: not a directory of model_{{layer}}.pt predictor files")
    extra = sorted(p.name for p in root.glob("model_*.pt") if p.name not in {layer_file(i) for i in range(n_layers)})
    if extra:
        raise SvdsparseError(f"{root}: files {extra} beyond the model's {n_layers} layers")
    layers = []
    for i in range(n_layers):
        path = inside(root, layer_file(i), f"{root}: predictor file")
        if not path.is_file():
            raise SvdsparseError(f"{path}: missing (the model has {n_layers} layers)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # empty, truncated, random bytes, a refused pickle payload
            raise SvdsparseError(f"{path}: cannot read this predictor file ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(state, dict):
            raise SvdsparseError(f"{path}: expected a state dict, got {type(state).__name__}")
        keys = ("fc1.weight", "fc2.weight", "fc2.bias")
        missing = [k for k in keys if k not in state]
        if missing:
            raise SvdsparseError(f"{path}: missing {missing} (expected fc1.weight [r, d], fc2.weight [d_ff, r], "
                                 "fc2.bias [d_ff])")
        extra = sorted(set(state) - set(keys))
        if extra:  # e.g. fc1.bias: a predictor this format cannot hold, not to be dropped in silence
            raise SvdsparseError(f"{path}: unexpected tensors {extra} (the format holds fc1.weight, fc2.weight, "
                                 "fc2.bias)")
        for k in keys:
            t = state[k]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise SvdsparseError(f"{path}: {k} is {getattr(t, 'dtype', type(t).__name__)}, expected floating point")
            # an infinite bias means always (+) or never (-) a candidate (fp16 holds the calibration's 3e38 so)
            bad, what = ((int(torch.isnan(t).sum()), "NaN") if k == "fc2.bias"
                         else (int((~torch.isfinite(t)).sum()), "NaN or infinite"))
            if bad:
                raise SvdsparseError(f"{path}: {k}: {bad} of {t.numel()} values are {what}")
        arr = {k: state[k].float().numpy() for k in keys}
        layers.append(LayerFactors(arr["fc1.weight"], arr["fc2.weight"], arr["fc2.bias"]))
        check_layers(layers[-1:], 1, d, d_ff, str(path))
    check_layers(layers, n_layers, d, d_ff, str(root))
    return layers
