"""The predictor comparison of docs/RESULTS.md: whitened SVD, plain SVD, sign bits (SparseInfer), a trained MLP
and the oracle on the bundled model, at s in {0.5, 0.6, 0.7, 0.8} and ranks {d/8, d/4, d/2}, evaluated on the
held-out split. Calibration statistics are computed once, factors once per (method, rank), biases per s.

  python -m scripts.results [--out docs/results] [--max-windows 32] [--dtype float32]

Writes OUT/results.json (every configuration's summary and per-layer metrics), OUT/*.png and prints the table
that docs/RESULTS.md holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from svdsparse_jax.calibration import calibration_windows, layer_statistics
from svdsparse_jax.assets import BUNDLED_MODEL, CORPUS
from svdsparse_jax.convert import load_model, parse_dtype
from svdsparse_jax.evaluate import evaluate_predictors, write_plots
from svdsparse_jax.model import Transformer
from svdsparse_jax.predictors.build import BuildConfig, PredictorSet, calibrate_layer, layer_factors
from svdsparse_jax.predictors.thresholds import layer_target

S_VALUES = (0.5, 0.6, 0.7, 0.8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", nargs="+", default=["whitened", "plain", "signbit", "mlp", "oracle"])
    args = ap.parse_args()
    t0 = time.time()
    lm = load_model(BUNDLED_MODEL, parse_dtype(args.dtype))
    cfg, model = lm.cfg, Transformer(lm.cfg, lm.weights)
    corpus = CORPUS
    windows = calibration_windows(np.load(corpus / "calib.npy"), 512, args.calib_tokens)
    stats = list(layer_statistics(model, windows))
    d = cfg.d_model
    ranks = (d // 8, d // 4, d // 2)
    configs = []  # (name, method, rank, s)
    for method in args.methods:
        for rank in (ranks if method in ("whitened", "plain", "mlp") else (None,)):
            for s in (S_VALUES if method != "oracle" else (None,)):
                configs.append((method, rank, s))
    sets: dict[str, PredictorSet] = {}
    factors: dict = {}
    for method, rank, s in configs:
        bc = BuildConfig(method=method, ranks=rank or 1, rule="s", value=s or 0.5, tokens=args.calib_tokens)
        layers, info = [], []
        for st in stats:
            block = model.layers[st.layer]
            target = layer_target("s", bc.value, st.layer, st.true_sparsity)
            key = (method, rank, st.layer) if method != "signbit" else (method, s, st.layer)
            if key not in factors:
                factors[key] = layer_factors(st, block, cfg, bc, target, model.dtype)
            pred, facts = calibrate_layer(factors[key], st, block, target)
            layers.append(pred)
            info.append(facts)
        name = method + (f" r={rank}" if rank else "") + (f" s={s}" if s else "")
        sets[name] = PredictorSet(method, layers, {"method": method, "rank": rank, "s": s}, info)
        print(f"built {name} ({time.time() - t0:.0f} s)", flush=True)
    reports = evaluate_predictors(model, sets, np.load(corpus / "heldout.npy"), 512, args.max_windows)
    for name, ps in sets.items():  # layers whose calibration reached its target (the 1% guard can stop it)
        reports[name]["targets_met"] = sum(i["target_met"] for i in ps.info)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "bundled default model", "dtype": args.dtype, "calibration_tokens": int(windows.size),
            "heldout_windows": args.max_windows, "window": 512, "seconds": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "reports": reports}, indent=1) + "\n")
    for s in S_VALUES:  # per-layer plots at rank d/4 for each s
        chosen = {n: r for n, r in reports.items() if n.endswith(f"s={s}") and ("r=" not in n or f"r={d // 4} " in n)}
        write_plots(chosen, out / f"s{s}")
    print(table(reports))
    print(f"\n{meta}")
    return 0


def table(reports: dict) -> str:
    head = ("| configuration | predicted sparsity | effective sparsity | recall | AUROC | ppl increase | "
            "top-1 agreement | predictor cost |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for name, r in reports.items():
        s = r["summary"]
        rows.append(f"| {name} | {s['predicted_sparsity']:.4f} | {s['effective_sparsity']:.4f} | {s['recall']:.4f} | "
                    f"{s['auroc']:.4f} | {100 * s['ppl_increase']:+.2f}% | {s['top1_agreement']:.4f} | "
                    f"{s['predictor_cost']:.4f} |")
    return head + "\n" + "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
