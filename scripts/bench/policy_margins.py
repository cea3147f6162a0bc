"""What the measured sparsity policy predicts for each layer of a user's-path report built with `--rank auto`
(`scripts/bench/user_path.sh --build-args "--rank auto"`: its `build_layers` carry each layer's rank and bytes,
its `union_rows` the unions by batch size), offline: per batch size with a cost row (`tuning.FFN_COSTS`), the
dense and guarded microseconds of each layer (`policy.layer_us`), the saving as a fraction of dense, and the
layers sparse without a margin and with `tuning.FFN_POLICY_MARGIN`.

  python -m scripts.bench.policy_margins docs/bench/user_path_rank_auto_6d6dbba.json [--itemsize 2]

A layer's predictor bytes are its `decode_bytes` at the rank kept less the rows it reads at batch 1 (how
`predictors.build.decode_bytes` formed them).
"""

from __future__ import annotations

import argparse
import json
import sys

from pallas_kernels import tuning
from svdsparse_jax.config import named_config
from svdsparse_jax.policy import ffn_rows, layer_us


def margins(report: dict, itemsize: int = 2) -> list[dict]:
    cfg = named_config(report["checkpoint"]["shape"])
    union, layers = report["union_rows"], report["build_layers"]
    matrix = cfg.d_ff * cfg.d_model * itemsize
    cand1, act1 = union["candidates"][union["batch_sizes"].index(1)], union["active"][union["batch_sizes"].index(1)]
    predictor = [layer["decode_bytes"][str(layer["rank"])] - ffn_rows(c, a) * matrix
                 for layer, c, a in zip(layers, cand1, act1)]
    rows = []
    for batch, cand, act in zip(union["batch_sizes"], union["candidates"], union["active"]):
        cost = next((row for row in tuning.FFN_COSTS if batch <= row.max_batch), None)
        if cost is None:
            continue
        us = [layer_us(cost, cfg, c, a, p, itemsize) for c, a, p in zip(cand, act, predictor)]
        saving = [(d - s) / d for d, s in us]
        rows.append({"batch": batch, "dense_us": round(us[0][0], 1),
                     "saved_us": [round(d - s, 1) for d, s in us], "saved_fraction": [round(f, 3) for f in saving],
                     "sparse_no_margin": [i for i, f in enumerate(saving) if f > 0],
                     "sparse_with_margin": [i for i, f in enumerate(saving) if f > tuning.FFN_POLICY_MARGIN]})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="a user_path*.json report of a --rank auto build")
    ap.add_argument("--itemsize", type=int, default=2, help="bytes per weight (bf16: 2)")
    args = ap.parse_args()
    with open(args.report) as f:
        for row in margins(json.load(f), args.itemsize):
            f_ = row["saved_fraction"]
            print(f"batch {row['batch']}: dense {row['dense_us']} us a layer; saved {min(f_):.3f} to {max(f_):.3f} of "
                  f"it; sparse without a margin {row['sparse_no_margin']} (saved us "
                  f"{[row['saved_us'][i] for i in row['sparse_no_margin']]}), with "
                  f"{tuning.FFN_POLICY_MARGIN}: {row['sparse_with_margin']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
