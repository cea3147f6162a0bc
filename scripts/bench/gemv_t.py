"""The dense FFN's down product at decode, y = x [B, k] @ w_t [k, n] with W_down_t stored input-major, on the
GPU: XLA's dot against the Pallas kernel `gemv.gemv_t_pallas` over a sweep of tiles. Every tile is checked
against a float64 product on fresh inputs before it is timed; one that fails or does
not compile is reported and skipped. Each shape is timed over `--mats` separate matrices (reads from device
memory, not L2), INNER passes in one jitted call; bandwidth counts the matrix bytes once per product.

  python -m scripts.bench.gemv_t [--shapes 11008x4096 18944x3584] [--batch 1] [--rows 32 64] [--cols 128 256 512]
                                 [--splits 8 16 32] [--warps 4 8] [--stages 3] [--json-out F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import reference
from pallas_kernels.gemv import gemv_t_pallas
from scripts.bench import harness


def f64_error(k: int, n: int, batch: int, seed: int, **tile) -> float:
    """||kernel - float64|| / ||float64|| of the tile on fresh inputs (NaN-started partial sums), both on the device."""
    kw, kx = jax.random.split(jax.random.key(seed))
    w = (jax.random.normal(kw, (k, n), jnp.float32) / k ** 0.5).astype(jnp.bfloat16)
    x = jax.random.normal(kx, (batch, k), jnp.bfloat16)
    y = gemv_t_pallas(x, w, poison=True, **tile)
    with jax.enable_x64(True):
        ref = jax.jit(lambda x, w: x.astype(jnp.float64) @ w.astype(jnp.float64))(x.astype(jnp.float32),
                                                                              w.astype(jnp.float32))
        err = jnp.linalg.norm(y.astype(jnp.float64) - ref) / jnp.linalg.norm(ref)
        return float(jnp.where(jnp.all(jnp.isfinite(y)), err, jnp.inf))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mats", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--shapes", nargs="+", default=["11008x4096", "18944x3584"], help="k x n of w_t")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--cols", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--splits", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[3])
    harness.add_report_args(ap)
    args = ap.parse_args()
    rows = []
    for shape, batch in itertools.product(args.shapes, args.batch):
        k, n = map(int, shape.split("x"))
        mats = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(args.mats)]
        x = jax.random.normal(jax.random.key(99), (batch, k), jnp.bfloat16)

        def bench(fn, mats=mats):
            return harness.per_product_s(fn, x, mats, args.repeats)

        results = {"xla": bench(reference.gemv_t)}
        for r, c, sp, wps, st in itertools.product(args.rows, args.cols, args.splits, args.warps, args.stages):
            tile = dict(rows=r, cols=c, splits=sp, num_warps=wps, num_stages=st)
            key = " ".join(f"{a}={b}" for a, b in tile.items())
            try:
                err = f64_error(k, n, batch, len(results), **tile)
                if not err <= 1e-2:
                    print(f"  {shape} {key}: FAILED the float64 check (relative error {err:.3g})", flush=True)
                    continue
                results[key] = bench(lambda x, w, tile=tile: gemv_t_pallas(x, w, **tile))
            except Exception as e:  # a tile the compiler rejects is skipped
                print(f"  {shape} {key}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        best = min((v, key) for key, v in results.items() if key != "xla")
        row = {"k": k, "n": n, "batch": batch, "xla_us": round(results["xla"] * 1e6, 2),
               "pallas_us": round(best[0] * 1e6, 2), "pallas_config": best[1],
               "xla_tb_s": round(2 * n * k / results["xla"] / 1e12, 3),
               "pallas_tb_s": round(2 * n * k / best[0] / 1e12, 3),
               "all_us": {key: round(v * 1e6, 2) for key, v in sorted(results.items(), key=lambda kv: kv[1])}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del mats
    copy_bw = harness.torch_copy_rate()  # last: a torch CUDA context must not touch the timings
    report = harness.report(args, copy_tb_per_s=copy_bw and round(copy_bw / 1e12, 3), runs=rows)
    harness.save(report, args.json_out)
    print(f"\n{report['device']}, torch copy {report['copy_tb_per_s']} TB/s")
    print(harness.table(rows, {"shape": lambda r: f"{r['k']}x{r['n']}", "batch": "batch", "XLA us": "xla_us",
                               "XLA TB/s": "xla_tb_s", "Pallas us": "pallas_us", "Pallas TB/s": "pallas_tb_s",
                               "best tile": "pallas_config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
