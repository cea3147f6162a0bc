"""The bridge's commands for the `svdsparse` CLI, a plug-in (entry point group `svdsparse.commands`):

  svdsparse export-svdp [MODEL] --predictors DIR --out SVDP_DIR   predictors -> the paper's model_{layer}.pt files
  svdsparse import-svdp [MODEL] --svdp SVDP_DIR --allow-pickle --out DIR   model_{layer}.pt -> a predictor directory

The torch executor itself reads predictor directories as they are (`hf_patch.patch_hf_model(model, DIR)`).
torch is imported only when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from svdsparse_jax.cli.arguments import Command, load_session, model_options, require
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import check_free_space, check_new_output


def register(sub) -> dict[str, Command]:
    """Adds the bridge's commands to the CLI's subparsers; returns their handlers by name."""
    p = sub.add_parser("export-svdp", help="write predictors as the SVDP / PowerInfer per-layer files "
                                           "(model_{layer}.pt)")
    model_options(p)
    p.add_argument("--predictors", required=True, help="predictor directory (build-predictors)")
    p.add_argument("--out", required=True, help="directory for the model_{layer}.pt files")

    p = sub.add_parser("import-svdp", help="import SVDP / PowerInfer per-layer predictor files (model_{layer}.pt)")
    model_options(p)
    p.add_argument("--svdp", required=True, help="directory of model_{layer}.pt files")
    p.add_argument("--out", required=True, help="predictor directory to write (usable by generate / eval)")
    return {"export-svdp": cmd_export_svdp, "import-svdp": cmd_import_svdp}


def cmd_export_svdp(args: argparse.Namespace) -> None:
    from svdsparse_jax.predictors.store import TENSORS
    from torch_npu_bridge.factors import factors_of
    from torch_npu_bridge.svdp_format import write_svdp

    require("torch", "torch", "export-svdp")
    check_new_output(args.out, "--out")  # before any work
    tensors = Path(args.predictors) / TENSORS  # float16 files hold about as many bytes as bf16 factors (f32: half)
    check_free_space(args.out, tensors.stat().st_size if tensors.is_file() else 0, "--out")
    pset = load_session(args, args.predictors).predictors
    layers = [factors_of(p, i) for i, p in enumerate(pset.layers)]
    union = pset.union.to_json() if pset.union is not None else None
    print(f"SVDP-layout files of {len(layers)} layers ({pset.method}) in {write_svdp(args.out, layers, union)}")


def cmd_import_svdp(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    from svdsparse_jax.predictors import LowRankPredictor, PredictorSet
    from svdsparse_jax.predictors.store import check_predictor_tensors, predictor_bytes
    from torch_npu_bridge.svdp_format import read_svdp, read_union_rows

    require("torch", "torch", "import-svdp")
    if not args.allow_pickle:  # before the model is loaded
        raise SvdsparseError(f"{args.svdp} (--svdp): SVDP files (model_{{layer}}.pt) are pickles; pass "
                             "--allow-pickle to read them")
    check_new_output(args.out, "--out")  # before any work
    lm = load_session(args)
    cfg, dt = lm.cfg, lm.dtype
    layers = read_svdp(args.svdp, cfg.n_layers, cfg.d_model, cfg.d_ff, args.allow_pickle)
    preds = [LowRankPredictor(jnp.asarray(f.a, dt), jnp.asarray(f.b, dt), jnp.asarray(f.bias, jnp.float32))
             for f in layers]
    check_predictor_tensors({f"layers.{i}.{k}": getattr(p, k) for i, p in enumerate(preds) for k in ("a", "b")},
                            f"{args.svdp} (as --dtype {args.dtype})")  # a float16 cast can overflow
    check_free_space(args.out, predictor_bytes(cfg, "whitened", tuple(p.rank for p in preds), dt.itemsize), "--out")
    union = read_union_rows(args.svdp, cfg.n_layers)  # written by export-svdp; the paper's files have none
    pset = PredictorSet("svdp-import", preds, {"source": str(args.svdp)}, [], {}, union)
    out = lm.save_predictors(args.out, pset)
    print(f"imported {len(preds)} layers from {args.svdp} to {out}")
