"""The trained-MLP baseline (Deja Vu / PowerInfer style, d -> r -> ReLU -> d_ff) trained to convergence on the
bundled model: a sweep of steps, learning rate, class weight and training tokens, scored by AUROC on held-out
FFN inputs (layers 0 and 4), against whitened SVD at the same rank (equal predictor bytes, up to the MLP's
two bias vectors).

  python -m scripts.mlp_baseline [--out docs/results/mlp_baseline.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split
from svdsparse_jax.calibration import calibration_windows, layer_inputs, layer_statistics
from svdsparse_jax.convert import load_model
from svdsparse_jax.engine import XLA
from svdsparse_jax.evaluate import auroc, pick_windows
from svdsparse_jax.model import Transformer, ffn_hidden, linear
from svdsparse_jax.predictors.baselines import mlp_predictor
from svdsparse_jax.predictors.svd import whitened_svd
from svdsparse_jax.predictors.base import LowRankPredictor

LAYERS = (0, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/mlp_baseline.json")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=16)
    args = ap.parse_args()
    t0 = time.time()
    lm = load_model(BUNDLED_MODEL, jnp.float32)
    cfg, model = lm.cfg, Transformer(lm.cfg, lm.weights)
    held = {i: x.reshape(-1, cfg.d_model) for i, x in layer_inputs(model, pick_windows(corpus_split("heldout"), 512,
                                                                                        args.eval_windows))
            if i in LAYERS}
    labels = {}
    for i, x in held.items():
        ffn = model.layers[i].ffn
        labels[i] = ffn_hidden(cfg, linear(XLA, x, ffn.w_gate[...]), linear(XLA, x, ffn.w_up[...])) != 0

    def score(pred: LowRankPredictor, i: int) -> float:
        x = held[i][:8192]
        return float(jnp.nanmean(auroc(pred.scores(x), labels[i][:8192])))

    rows = []
    for tokens in (16384, 131072):  # half builds / trains (x1), half calibrates
        stats = {st.layer: st for st in layer_statistics(model, calibration_windows(corpus_split("calib"), 512,
                                                                                    tokens)) if st.layer in LAYERS}
        for i in LAYERS:
            a, b = whitened_svd(model.layers[i].ffn.w_gate[...], stats[i].gram, args.rank)
            rows.append({"method": "whitened", "tokens": tokens, "layer": i,
                         "auroc": score(LowRankPredictor(a, b, jnp.zeros(cfg.d_ff)), i)})
        for steps, lr, pos_weight in itertools.product((400, 3000), (3e-3, 1e-2), (1.0, 4.0)):
            if tokens > 16384 and steps < 3000:  # the large set: only the long runs can use it
                continue
            for i in LAYERS:
                st = stats[i]
                ffn = model.layers[i].ffn
                active = ffn_hidden(cfg, linear(XLA, st.x1, ffn.w_gate[...]), linear(XLA, st.x1, ffn.w_up[...])) != 0
                t = time.time()
                pred = mlp_predictor(st.x1, active, args.rank, steps=steps, lr=lr, pos_weight=pos_weight,
                                     dtype=jnp.float32)
                rows.append({"method": "mlp", "tokens": tokens, "steps": steps, "lr": lr, "pos_weight": pos_weight,
                             "layer": i, "auroc": score(pred, i), "train_s": round(time.time() - t, 1)})
            print(rows[-1], f"({time.time() - t0:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rank": args.rank, "layers": LAYERS, "eval_windows": args.eval_windows,
                                          "rows": rows, "seconds": round(time.time() - t0, 1)}, indent=1) + "\n")
    keyed = {}
    for r in rows:
        keyed.setdefault((r["method"], r["tokens"], r.get("steps"), r.get("lr"), r.get("pos_weight")), []).append(
            r["auroc"])
    print("| method | train tokens | steps | lr | active weight | AUROC (layers 0, 4) | mean |\n"
          "|---|---|---|---|---|---|---|")
    for (m, tok, steps, lr, pw), v in keyed.items():
        print(f"| {m} | {tok // 2} | {steps or ''} | {lr or ''} | {pw or ''} | "
              f"{' / '.join(f'{a:.4f}' for a in v)} | {np.mean(v):.4f} |")


if __name__ == "__main__":
    main()
