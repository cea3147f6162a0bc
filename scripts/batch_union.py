#!/usr/bin/env python
"""How many FFN rows a decode batch reads when its sequences share one union of candidates, on real text.

The bundled model (trained, FATReLU) with whitened-SVD predictors built as `svdsparse demo` builds them; groups
of B held-out windows (different texts, at random places) teacher-forced together through the guarded FFNs.
Per batch size: the fraction of W_gate rows (candidates of some sequence) and of W_up / W_down rows (active
candidates of some sequence) per position, what independent sequences would give (1 - (1 - p)^B from the
per-token fractions), and the byte ceiling of the speedup for that batch (scripts/decode_bytes.py, bf16 weights,
the window as the KV cache).

  python scripts/batch_union.py [--batches 1 2 4 8 16] [--window 128] [--groups 8] [--json-out F]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from svdsparse_jax.cli import BUNDLED_MODEL, demo_build_config  # noqa: E402
from svdsparse_jax.convert import load_model  # noqa: E402
from svdsparse_jax.evaluate import ffn_rows_read  # noqa: E402
from svdsparse_jax.model import Transformer  # noqa: E402
from svdsparse_jax.predictors import build_predictors  # noqa: E402
import bench_report  # noqa: E402
import decode_bytes  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--groups", type=int, default=8, help="batches of windows averaged per batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    lm = load_model(BUNDLED_MODEL, jnp.float32)
    cfg, model = lm.cfg, Transformer(lm.cfg, lm.weights)
    corpus = BUNDLED_MODEL.parent / "corpus"
    bc = demo_build_config(cfg)
    pset = build_predictors(model, np.load(corpus / "calib.npy"), bc, progress=False)
    heldout = np.load(corpus / "heldout.npy")
    rng = np.random.default_rng(args.seed)
    predictor_bytes = decode_bytes.low_rank_bytes(cfg, bc.ranks, 2)  # in bf16, as decode reads them
    rows, per_token = [], None
    for b in args.batches:
        fractions = []
        for _ in range(args.groups):
            starts = rng.integers(0, len(heldout) - args.window, b)
            windows = np.stack([heldout[s:s + args.window] for s in starts])
            fractions.append(ffn_rows_read(model, pset.layers, windows, together=True))
        gate, up_down = (np.mean([f[i] for f in fractions], axis=0) for i in (0, 1))
        if b == 1:
            per_token = (gate, up_down)
        dense = decode_bytes.step_bytes(cfg, 2, b, args.window)
        sparse = decode_bytes.step_bytes(cfg, 2, b, args.window, gate, up_down, predictor_bytes)
        row = {"batch": b, "gate_rows": round(float(gate.mean()), 4), "up_down_rows": round(float(up_down.mean()), 4),
               "byte_ceiling": round(dense / sparse, 3)}
        if per_token is not None:
            row["independent_gate_rows"] = round(float(np.mean(1 - (1 - per_token[0]) ** b)), 4)
            row["independent_up_down_rows"] = round(float(np.mean(1 - (1 - per_token[1]) ** b)), 4)
        rows.append(row)
        print(row, flush=True)
    report = bench_report.report(device=jax.devices()[0].device_kind, model=str(BUNDLED_MODEL.name),
                                 predictor=f"whitened r{bc.ranks} s{bc.value}", window=args.window,
                                 groups=args.groups, runs=rows)
    bench_report.save(report, args.json_out)
    print(f"\n{'batch':>5}{'W_gate rows':>13}{'(independent)':>15}{'W_up/down rows':>16}{'(independent)':>15}"
          f"{'byte ceiling':>14}")
    for r in rows:
        print(f"{r['batch']:>5}{r['gate_rows']:>13}{r.get('independent_gate_rows', '-'):>15}"
              f"{r['up_down_rows']:>16}{r.get('independent_up_down_rows', '-'):>15}{r['byte_ceiling']:>13}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
