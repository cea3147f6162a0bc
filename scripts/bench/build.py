"""Times `build-predictors` for every layer of a model of a named shape with random weights built on the device
and random calibration tokens: layer-by-layer statistics, factors, bias calibration, per stage.

  python -m scripts.bench.build --shape llama2-7b --tokens 16384 --rank 256 [--method whitened] [--json-out F]

The first run includes compilation; the script builds twice and reports both (compile is per shape, once).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from scripts.bench import harness
from svdsparse_jax.config import NAMED_SHAPES, named_config
from svdsparse_jax.model import Transformer
from svdsparse_jax.predictors import BuildConfig, build_predictors
from svdsparse_jax.weights import init_weights


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(NAMED_SHAPES))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--method", nargs="+", default=["whitened"])
    ap.add_argument("--s", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2)
    harness.add_report_args(ap)
    args = ap.parse_args()
    cfg = named_config(args.shape)
    model = Transformer(cfg, init_weights(cfg, jax.random.key(0), jnp.bfloat16))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, args.tokens)
    rows = []
    for method in args.method:
        for rep in range(args.repeats):
            bc = BuildConfig(method=method, ranks=args.rank, rule="s", value=args.s, tokens=args.tokens,
                             window=args.window)
            t = time.perf_counter()
            ps = build_predictors(model, tokens, bc, progress=False)
            jax.block_until_ready(ps.layers)
            total = time.perf_counter() - t
            row = {"method": method, "run": rep, "total_s": round(total, 2),
                   "stages_s": {k: round(v, 2) for k, v in ps.timings.items()},
                   "slowest_stage": max(ps.timings, key=ps.timings.get),
                   "mean_true_sparsity": float(np.mean([i["true_sparsity"] for i in ps.info])),
                   "targets_met": sum(i["target_met"] for i in ps.info)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    harness.save(harness.report(args, shape=args.shape, layers=cfg.n_layers, tokens=args.tokens, rank=args.rank,
                                runs=rows), args.json_out)
    print(harness.table(rows, {"method": "method", "run": "run", "total s": "total_s", "stages s": "stages_s"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
