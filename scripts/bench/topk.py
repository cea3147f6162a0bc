"""Polar Sparsity's fixed top-k against the union, at equal accuracy (the rows each reads), on a real model.

For each batch size B the held-out windows go in groups of B sequences, teacher-forced. The union: each
sequence keeps its own candidates and the batch reads the union of their rows (what decode runs). Top-k: per
layer a fixed k, the same for every position of every batch of B, taken from the neurons' best score over the
batch (`scripts.lab.TopKPredictor`), shared by the sequences; k = m x the union's mean row count of that
layer for multipliers m (`--multipliers`). Reported: W_gate rows (union: mean; top-k: k), the union of active
rows (W_up / W_down), perplexity and top-1 agreement with the dense model over the same windows. A kernel that
reads listed rows costs in proportion to the rows (docs/BENCHMARKS.md), so at equal accuracy the one that reads
fewer rows is faster with the same kernels; the top-k's static shapes would also allow XLA's gather and GEMM.

  python -m scripts.bench.topk [--model DIR --predictors DIR --text-file F] [--batch 2 4 8 16] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from scripts.bench import harness
from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split
from svdsparse_jax.convert import load_model, parse_dtype
from svdsparse_jax.engine import EngineConfig
from svdsparse_jax.evaluate import stream_pass as _stream_pass, union_rows_read
from scripts.lab import TopKPredictor
from svdsparse_jax.model import Transformer
from svdsparse_jax.predictors import build_predictors, load_predictors

COLUMNS = {"batch": "batch", "selection": "selection", "W_gate rows": lambda r: f"{r['gate_rows']:.4f}",
           "W_up/down rows": lambda r: f"{r['up_down_rows']:.4f}", "ppl": lambda r: f"{r['ppl']:.4f}",
           "top-1 agreement": lambda r: f"{r['top1_agreement']:.4f}"}


def run(model: Transformer, preds: list, windows: np.ndarray, batch: int, dense_top: np.ndarray) -> dict:
    """Accuracy and rows read of `preds` over windows decoded in groups of `batch`."""
    lp, top, _, _ = _stream_pass(model, preds, windows, batch)
    gate_rows, up_down_rows = union_rows_read(model, preds, windows, batch)
    return {"gate_rows_per_layer": gate_rows, "up_down_rows": float(np.mean(up_down_rows)),
            "ppl": math.exp(-lp.mean()), "top1_agreement": float(np.mean(top == dense_top))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(BUNDLED_MODEL))
    ap.add_argument("--predictors", help="a predictor directory (default: build the demo's for the bundled model)")
    ap.add_argument("--text-file", help="held-out text (default: the bundled model's held-out split)")
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    harness.add_report_args(ap)
    args = ap.parse_args()
    lm = load_model(args.model, parse_dtype(args.dtype))
    model = Transformer(lm.cfg, lm.weights, EngineConfig())
    cfg = lm.cfg
    if args.predictors:
        pset = load_predictors(args.predictors, cfg, lm.fingerprint)
    else:
        from svdsparse_jax.cli import demo_build_config
        pset = build_predictors(model, corpus_split("calib"), demo_build_config(cfg), progress=False)
    if args.text_file:
        from svdsparse_jax.cli import _calibration_tokens
        tokens = _calibration_tokens([args.text_file], lm, args.windows * args.window)
    else:
        tokens = corpus_split("heldout")
    n = min(args.windows, len(tokens) // args.window)
    windows = np.asarray(tokens[: n * args.window], np.int32).reshape(n, args.window)
    _, dense_top, _, _ = _stream_pass(model, None, windows, 8)
    rows = []
    for batch in args.batch:
        used = windows[: len(windows) // batch * batch]
        top_dense = dense_top[: len(used)]
        union = run(model, pset.layers, used, batch, top_dense)
        rows.append({"batch": batch, "selection": "union", "gate_rows": float(np.mean(union["gate_rows_per_layer"])),
                     **{k: union[k] for k in ("up_down_rows", "ppl", "top1_agreement")}})
        print(json.dumps(rows[-1]), flush=True)
        for m in args.multipliers:
            ks = [min(cfg.d_ff, max(1, round(m * g * cfg.d_ff))) for g in union["gate_rows_per_layer"]]
            topk = run(model, [TopKPredictor(p, k, batch) for p, k in zip(pset.layers, ks)], used, batch, top_dense)
            rows.append({"batch": batch, "selection": f"top-k, {m} x union", "k": ks,
                         "gate_rows": float(np.mean(ks)) / cfg.d_ff,
                         **{k: topk[k] for k in ("up_down_rows", "ppl", "top1_agreement")}})
            print(json.dumps(rows[-1]), flush=True)
    report = harness.report(args, runs=rows, windows=int(n), window=args.window, model=args.model)
    harness.save(report, args.json_out)
    print(harness.table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
