#!/usr/bin/env python
"""Checks every Pallas kernel, compiled for the GPU, against the float64 reference: all (d, d_ff) of the model
table and the bundled model, bf16 and f16 (and f32 for the small shapes), candidate counts 0, 1, all and not a
multiple of any block size, batch 1 and 3, relu / FATReLU / dReLU, every sparse-FFN variant, outputs started
as NaN; the compaction programs' lists exactly; the fused residual add + RMSNorm (+ A x) at every width. Run after
every kernel change; exits non-zero on any failure.

  python scripts/gpu_check.py [--quick] [--interpret]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import sparse_ffn as sf  # noqa: E402
from pallas_kernels.checks import (check_add_rmsnorm, check_compact, check_gemv, check_sparse_ffn,  # noqa: E402
                                   random_weights)
from pallas_kernels.reference import Activation  # noqa: E402

SHAPES = [(4096, 11008), (5120, 13824), (4096, 14336), (3584, 18944), (1536, 3840), (256, 1024)]
VARIANTS = {"split": sf.SPLIT, "stream": sf.STREAM, "fused": sf.SparseFFNConfig(variant="fused")}
FAMILIES = ("sparse_ffn", "compact", "gemv", "norm")
GEMV_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096), (32000, 4096), (256, 4096),
               (11008, 256), (152064, 3584), (256, 256), (8192, 256)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape per family of checks")
    ap.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                    help="which families of checks to run")
    ap.add_argument("--interpret", action="store_true", help="run the kernels in interpret mode (any backend)")
    ap.add_argument("--variants", nargs="+", default=["split", "stream", "fused"], choices=list(VARIANTS),
                    help="the sparse FFN configurations to check")
    args = ap.parse_args()
    interpret = args.interpret
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, interpret={interpret}", flush=True)
    results = []

    def record(r):
        results.append(r)
        if not r.ok:
            print("FAIL", r, flush=True)

    variants = [VARIANTS[v] for v in args.variants]
    shapes = SHAPES[:1] + SHAPES[-1:] if args.quick else SHAPES
    for d, d_ff in shapes if "sparse_ffn" in args.only else []:
        for dtype in (jnp.bfloat16, jnp.float16) + ((jnp.float32,) if d_ff <= 4096 else ()):
            weights = random_weights(np.random.default_rng(), d, d_ff, dtype)
            counts = [0, 1, d_ff, d_ff // 7 + 3, int(0.12 * d_ff) + 1]
            for cfg in variants:
                for count in counts:
                    for batch, act in ((1, Activation("fatrelu", 0.5)), (3, Activation("relu")),
                                       (1, Activation("drelu"))):
                        if dtype != jnp.bfloat16 and batch == 3:
                            continue
                        record(check_sparse_ffn(d, d_ff, dtype, count, batch=batch, act=act, cfg=cfg,
                                                interpret=interpret, weights=weights))
    for _, d_ff in SHAPES if "compact" in args.only else []:  # cheap: every shape, also with --quick
        for count in (0, 1, d_ff, d_ff // 7 + 3, int(0.17 * d_ff)):
            for batch, with_bias in ((1, False), (3, False), (1, True), (3, True)):
                record(check_compact(d_ff, count, batch=batch, interpret=interpret, with_bias=with_bias))
    for n, k in (GEMV_SHAPES[:3] if args.quick else GEMV_SHAPES) if "gemv" in args.only else []:
        for dtype in (jnp.bfloat16, jnp.float16):
            for batch in (1, 4):
                for kernel in ("plain", "norm"):
                    for out_dtype in (jnp.float32, dtype):
                        record(check_gemv(n, k, dtype, batch=batch, interpret=interpret, kernel=kernel,
                                          out_dtype=out_dtype))
    for d, _ in SHAPES if "norm" in args.only else []:  # cheap: every width, also with --quick
        for n in (None, 256):
            for dtype, batch in ((jnp.bfloat16, 1), (jnp.bfloat16, 3), (jnp.float16, 1)):
                record(check_add_rmsnorm(d, n, dtype, batch=batch, interpret=interpret))
    bad = [r for r in results if not r.ok]
    worst = {}
    for r in results:
        key = r.name.split()[0] + " " + r.name.split()[-1 if r.name.startswith(("gemv", "compact", "add")) else 1]
        worst[key] = max(worst.get(key, 0.0), r.rel_error)
    print(f"\n{len(results)} checks, {len(bad)} failed")
    for key, err in sorted(worst.items()):
        print(f"  worst rel error {key:<28} {err:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
