"""Decode GEMVs (batch 1, bf16) on the GPU: XLA's dot vs the Pallas GEMV (`gemv.gemv_pallas`) over a few tiles.

"norm" columns time RMSNorm(x) @ w^T: XLA's norm and dot against the kernel with the norm inside, both at the
kernel's default tile (the one the model runs). "bf16 out" times the kernel writing bf16 instead of f32 (what
the attention projections ask for). Each shape is timed over `--mats` separate matrices (so reads come from
device memory, not L2), INNER passes inside one jitted call; bandwidth counts the matrix bytes once per product.

  python -m scripts.bench.gemv [--shapes 12288x4096 ...] [--batch 1 4] [--rows 4 8] [--caps 2048 4096]
                              [--warps 4 8] [--norm] [--out-dtype bfloat16] [--json-out F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import reference
from pallas_kernels.gemv import gemv_pallas
from pallas_kernels.reference import rms_norm
from scripts.bench import harness

SHAPES = ["12288x4096", "4096x4096", "11008x4096", "4096x11008", "32000x4096", "256x4096", "11008x256"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mats", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="n x k of w")
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--caps", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--norm", action="store_true",
                    help="sweep RMSNorm(x) @ w^T, the norm inside the kernel (decode's q/k/v); XLA: its norm and dot")
    ap.add_argument("--out-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the swept products' output dtype (decode's q/k/v and o_proj write bfloat16)")
    harness.add_report_args(ap)
    args = ap.parse_args()
    copy_bw = harness.torch_copy_rate()
    out_dtype, plain = jnp.dtype(args.out_dtype), not args.norm and args.out_dtype == "float32"
    rows = []
    for shape, batch in itertools.product(args.shapes, args.batch):
        n, k = map(int, shape.split("x"))
        mats = [jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16) for i in range(args.mats)]
        x = jax.random.normal(jax.random.key(99), (batch, k), jnp.bfloat16)
        scale = 1 + 0.1 * jax.random.normal(jax.random.key(98), (k,), jnp.bfloat16)
        norm_args = (scale, 1e-5) if args.norm else ()

        def bench(fn, mats=mats):
            return harness.per_product_s(fn, x, mats, args.repeats)

        def attempt(key, fn):
            try:
                results[key] = bench(fn)
            except Exception as e:  # a tile the compiler rejects is skipped
                print(f"  {n}x{k} {key}: {type(e).__name__}", flush=True)

        results = {"xla": bench(lambda x, w: reference.gemv(x, w, *norm_args).astype(out_dtype))}
        for r, c, wps in itertools.product(args.rows, args.caps, args.warps):
            attempt(f"rows={r} cap={c} warps={wps}",
                    lambda x, w, r=r, c=c, wps=wps: gemv_pallas(x, w, *norm_args, out_dtype=out_dtype, rows=r, cap=c,
                                                                num_warps=wps))
        if plain:  # the default tile's bf16 result beside the plain sweep (another product under --norm/--out-dtype)
            attempt("default, bf16 out", lambda x, w: gemv_pallas(x, w, out_dtype=jnp.dtype(jnp.bfloat16)))
        norm = {"xla": bench(lambda x, w: reference.gemv(rms_norm(x, scale, 1e-5), w)),
                "kernel": bench(lambda x, w: gemv_pallas(x, w, scale, 1e-5))}
        print(f"  {n}x{k}: " + ", ".join(f"{key} {v * 1e6:.2f} us" for key, v in results.items()), flush=True)
        best = min((v, key) for key, v in results.items() if key != "xla")
        row = {"n": n, "k": k, "batch": batch, "norm": args.norm, "out_dtype": args.out_dtype,
               "xla_us": round(results["xla"] * 1e6, 2),
               "pallas_us": round(best[0] * 1e6, 2),
               "pallas_config": best[1], "xla_tb_s": round(2 * n * k / results["xla"] / 1e12, 3),
               "pallas_tb_s": round(2 * n * k / best[0] / 1e12, 3),
               "norm_xla_us": round(norm["xla"] * 1e6, 2), "norm_kernel_us": round(norm["kernel"] * 1e6, 2),
               "all_us": {key: round(v * 1e6, 2) for key, v in results.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del mats
    report = harness.report(args, copy_tb_per_s=copy_bw and round(copy_bw / 1e12, 3), runs=rows)
    harness.save(report, args.json_out)
    print(f"\n{report['device']}, torch copy {report['copy_tb_per_s']} TB/s")
    print(harness.table(rows, {"shape": lambda r: f"{r['n']}x{r['k']}", "batch": "batch", "XLA us": "xla_us",
                               "XLA TB/s": "xla_tb_s", "Pallas us": "pallas_us", "Pallas TB/s": "pallas_tb_s",
                               "norm: XLA us": "norm_xla_us", "norm: kernel us": "norm_kernel_us",
                               "best tile": "pallas_config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
