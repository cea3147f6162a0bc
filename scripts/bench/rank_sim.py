"""A rank-against-candidates simulation for one FFN layer, in float32 NumPy on the CPU: a random W_gate [d, d_ff]
with column decay (j + 1)^-0.5 over the input dimensions (as `scripts/bench/user_path.py`'s checkpoint), isotropic
inputs, a gate threshold at the 0.9 quantile, plain SVD predictors of each rank with per-neuron thresholds at
recall 0.99 on one half of the tokens, measured on the other. Prints, per rank, the candidates' fraction, the
recall and the rows read for W_gate plus the predictor's factors in units of one d x d_ff matrix: the trade
`build-predictors --rank auto` measures per layer.

  python -m scripts.bench.rank_sim [--d 2048] [--d-ff 5504] [--tokens 8192] [--ranks 64 128 256 384 512 768 1024]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--d-ff", type=int, default=5504)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per half")
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256, 384, 512, 768, 1024])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    d, f, n = args.d, args.d_ff, args.tokens
    w = (rng.standard_normal((d, f)) / np.sqrt(d)).astype(np.float32) * ((np.arange(d) + 1.0)[:, None] ** -0.5)
    w = w[rng.permutation(d)]
    x = rng.standard_normal((2 * n, d)).astype(np.float32)
    gate = x @ w
    active = gate > np.quantile(gate[:n], 0.9)
    u, sig, vt = np.linalg.svd(w, full_matrices=False)
    print("rank  candidates  recall  W_gate rows + factors")
    for r in args.ranks:
        scores = (x @ (u[:, :r] * sig[:r])) @ vt[:r]
        thresholds = np.array([np.quantile(scores[:n, j][active[:n, j]], 0.01) if active[:n, j].any() else np.inf
                               for j in range(f)])
        cand = scores[n:] > thresholds
        recall = (cand & active[n:]).sum() / active[n:].sum()
        factors = r * (d + f) / (d * f)
        print(f"{r:>4}  {cand.mean():>10.3f}  {recall:>6.4f}  {cand.mean() + factors:>21.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
