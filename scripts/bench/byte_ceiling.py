"""The bytes one decoded token reads at batch 1, dense and sparse, from a user's-path report
(`scripts/bench/user_path.sh`, its `build_layers`), and their ratio: the speedup sparse decode would reach if it
ran at dense decode's rate. Weights only (the KV cache and activations are small at these lengths).

  python -m scripts.bench.byte_ceiling docs/bench/user_path_b1_3ef9f3b.json [--itemsize 2]

Per layer a dense token reads q/k/v, o and the FFN's three matrices; a sparse one reads the same attention
weights, the predictor's factors and bias, the candidate rows of W_gate and the active candidates' rows of W_up
and W_down. With `--rank auto` a layer's figure is its `decode_bytes` at the rank kept; otherwise its candidates
are 1 - calib_predicted_sparsity and its active rows (1 - true_sparsity) x calib_recall, all on the calibration
half. Both models read the LM head once.
"""

from __future__ import annotations

import argparse
import json
import sys

from svdsparse_jax.config import named_config
from svdsparse_jax.policy import ffn_rows


def ceiling(report: dict, itemsize: int = 2) -> dict:
    cfg = named_config(report["checkpoint"]["shape"])
    d, f = cfg.d_model, cfg.d_ff
    attention = (cfg.n_heads * cfg.head_dim * 2 + cfg.n_kv_heads * cfg.head_dim * 2) * d * itemsize
    matrix = d * f * itemsize
    head = cfg.vocab_size * d * itemsize
    rank = report["build_config"]["ranks"]
    sparse = head
    for i, layer in enumerate(report["build_layers"]):
        if "decode_bytes" in layer:
            ffn = layer["decode_bytes"][str(layer["rank"])]
        else:
            r = rank[i] if isinstance(rank, list) else rank
            candidates = 1 - layer["calib_predicted_sparsity"]
            active = (1 - layer["true_sparsity"]) * layer["calib_recall"]
            ffn = ffn_rows(candidates, active) * matrix + (r * (d + f) + f) * itemsize
        sparse += attention + ffn
    dense = cfg.n_layers * (attention + 3 * matrix) + head
    return {"dense_gb": round(dense / 1e9, 3), "sparse_gb": round(sparse / 1e9, 3), "ceiling": round(dense / sparse, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="a user_path*.json report")
    ap.add_argument("--itemsize", type=int, default=2, help="bytes per weight (bf16: 2)")
    args = ap.parse_args()
    with open(args.report) as f:
        print(json.dumps(ceiling(json.load(f), args.itemsize)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
