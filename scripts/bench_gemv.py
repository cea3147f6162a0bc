#!/usr/bin/env python
"""Decode GEMVs (batch 1, bf16) on the GPU: XLA's dot vs the Pallas row-block GEMV over a few tile choices.

Each shape is timed over `--mats` separate matrices (so reads come from device memory, not L2), INNER passes
inside one jitted call; bandwidth counts the matrix bytes once per product.

  python scripts/bench_gemv.py [--json-out F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_ffn import copy_bandwidth, looped, timeit  # noqa: E402
from pallas_kernels import reference  # noqa: E402
from pallas_kernels.gemv import gemv_pallas  # noqa: E402
import bench_report  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (11008, 4096), (4096, 11008), (32000, 4096), (256, 4096), (11008, 256)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mats", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    copy_bw, how = copy_bandwidth()
    rows = []
    for n, k in SHAPES:
        mats = [jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16) for i in range(args.mats)]
        x = jax.random.normal(jax.random.key(99), (1, k), jnp.bfloat16)

        def bench(fn, mats=mats, k=k):
            # every output element feeds the result, so XLA cannot slice the product down
            step = looped(lambda x, ws: sum(jnp.sum(fn(x, w), axis=1, keepdims=True) for w in ws) * jnp.ones((1, k)))
            return timeit(step, x, mats, repeats=args.repeats) / len(mats)

        results = {"xla": bench(reference.gemv)}
        for r, c, wps in itertools.product((4, 8), (1024, 2048), (4, 8)):
            try:
                results[f"pallas rows={r} chunk={c} warps={wps}"] = bench(
                    lambda x, w, r=r, c=c, wps=wps: gemv_pallas(x, w, rows=r, chunk=c, num_warps=wps))
            except Exception as e:  # a tile the compiler rejects is skipped
                print(f"  {n}x{k} rows={r} chunk={c} warps={wps}: {type(e).__name__}", flush=True)
        best = min((v, key) for key, v in results.items() if key != "xla")
        row = {"n": n, "k": k, "xla_us": round(results["xla"] * 1e6, 2), "pallas_us": round(best[0] * 1e6, 2),
               "pallas_config": best[1], "xla_tb_s": round(2 * n * k / results["xla"] / 1e12, 3),
               "pallas_tb_s": round(2 * n * k / best[0] / 1e12, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del mats
    report = bench_report.report(device=jax.devices()[0].device_kind, jax=jax.__version__,
                                 copy_tb_per_s=round(copy_bw / 1e12, 3), copy_measured_with=how, runs=rows)
    bench_report.save(report, args.json_out)
    print(f"\ncopy {report['copy_tb_per_s']} TB/s ({how})")
    print(f"{'shape':<13}{'XLA us':>9}{'TB/s':>7}{'Pallas us':>11}{'TB/s':>7}  config")
    for r in rows:
        print(f"{r['n']}x{r['k']:<8}{r['xla_us']:>9}{r['xla_tb_s']:>7}{r['pallas_us']:>11}{r['pallas_tb_s']:>7}  "
              f"{r['pallas_config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
