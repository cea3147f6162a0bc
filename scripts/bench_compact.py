#!/usr/bin/env python
"""The candidates -> neuron-list step alone: the Pallas compaction programs (by tile size and warps) against
XLA's version of the same blocked list, per call, at batch 1 and a model's d_ff, on the GPU.

`--layers` different random masks (a fraction `--candidates` set) go through one jitted loop of 10 passes; each
pass's masks depend on the previous pass's result (by a term that is always false but that XLA cannot fold), so
nothing is hoisted. Per-call time = median loop time / (10 x layers).

  python scripts/bench_compact.py --d-ff 11008 18944 [--json-out F]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import compaction  # noqa: E402
import bench_report  # noqa: E402

INNER = 10


def time_per_call(compact, inputs: list, repeats: int) -> float:
    """Median us of one compaction call on each of the masks `inputs`."""
    def perturb(c, acc):  # acc >= 0 always; XLA cannot know, so nothing is hoisted out of the loop
        return c ^ (acc < 0)

    @jax.jit
    def run(inputs):
        def body(i, acc):
            total = acc
            for c in inputs:
                tiles, counts, _ = compact(perturb(c, acc))
                total = total + counts[0] + tiles[0]
            return total
        return jax.lax.fori_loop(0, INNER, body, jnp.int32(0))

    jax.block_until_ready(run(inputs))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(run(inputs))
        times.append(time.perf_counter() - t)
    return statistics.median(times) / (INNER * len(inputs)) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-ff", type=int, nargs="+", default=[11008, 18944])
    ap.add_argument("--candidates", type=float, default=0.17)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    dev = jax.devices()[0]
    rows = []
    for d_ff in args.d_ff:
        rng = np.random.default_rng(d_ff)
        inputs = [jnp.asarray(rng.random((1, d_ff)) < args.candidates) for _ in range(args.layers)]
        variants = [("xla", compaction.TILE, None, compaction.compact_reference)]
        for tile, warps in itertools.product(args.tiles, args.warps):
            variants.append(("pallas", tile, warps, lambda c, t=tile, w=warps: compaction.compact_pallas(
                c, tile=t, num_warps=w)))
        for impl, tile, warps, fn in variants:
            try:
                us = time_per_call(fn, inputs, args.repeats)
            except Exception as e:  # a configuration the compiler rejects is reported, not fatal
                print(f"d_ff={d_ff} {impl} tile={tile} warps={warps}: failed: {type(e).__name__}: "
                      f"{str(e)[:200]}", flush=True)
                continue
            rows.append({"d_ff": d_ff, "impl": impl, "tile": tile, "num_warps": warps,
                         "us": round(us, 2)})
            print(f"d_ff={d_ff:>6} {impl:<7} tile={tile:>4} warps={str(warps):>4}  {us:7.2f} us",
                  flush=True)
    bench_report.save(bench_report.report(device=dev.device_kind, jax=jax.__version__, candidates=args.candidates,
                                          layers=args.layers, runs=rows), args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
