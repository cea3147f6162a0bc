"""Tile sweep of the Mosaic GPU GEMV (`pallas_kernels.gemv_mgpu`: TMA-pipelined row tiles on the tensor cores)
against the Triton-lowered `pallas_kernels.gemv` and XLA at the LLaMA2-7B decode shapes, one product alone
(y [B, n] = x [B, k] @ w [n, k]^T, or x @ w_t for W_down_t); `tuning.MGPU_TILE` comes from it.

Each configuration is checked against a float64 NumPy product of the same bf16 inputs before it is timed.

  python -m scripts.bench.probe_mgpu_gemv [--lower-only] [--batch 1] [--shapes qkv o gate_up down] [--json-out F]

--lower-only lowers every configuration for CUDA without running it (works on a CPU machine: catches shape and
layout errors of the Mosaic GPU lowering; jax 0.10's Mosaic GPU interpreter runs neither the pipeline nor
wgmma, so no CPU run checks the arithmetic).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gemv_mgpu import fits, gemv_mgpu
from scripts.bench import harness

SHAPES = {"qkv": (12288, 4096, False), "o": (4096, 4096, False), "gate_up": (11008, 4096, False),
          "down": (4096, 11008, True)}  # name: (n, k, stored input-major)


def configs() -> list[dict]:
    out = []
    for tile_m, tile_k, stages, splits in itertools.product((64, 128), (128, 256), (3, 4, 6), (1, 2, 4)):
        if tile_m * tile_k * 2 * stages <= 160 * 1024:
            out.append({"tile_m": tile_m, "tile_k": tile_k, "stages": stages, "splits": splits})
    return out


def oracle(x: np.ndarray, w: np.ndarray, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(x @ w^T, |x| @ |w|^T) in float64 (w_t without the transpose)."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    w64 = w64 if transposed else w64.T
    return x64 @ w64, np.abs(x64) @ np.abs(w64)


def relative_error(got, want: np.ndarray, scale: np.ndarray) -> float:
    """Largest |got - want| over the float64 product, each in units of its |x| @ |w| (the sum f32 rounding
    errors scale with)."""
    return float((np.abs(np.asarray(got, np.float64) - want) / np.maximum(scale, 1e-30)).max())


def baselines(transposed: bool, n: int, k: int) -> dict:
    """The products decode runs today at this shape (the tuned Triton-lowered Pallas kernel) and XLA's."""
    from pallas_kernels import reference
    from pallas_kernels.gemv import gemv_pallas, gemv_t_pallas
    from pallas_kernels.tuning import GEMV_SHAPE_TILES, GEMV_T_TILE, GEMV_TILE, gemv_tile_for
    if transposed:
        t = GEMV_T_TILE
        return {"pallas": lambda x, w: gemv_t_pallas(x, w, rows=t.rows, cols=t.cols, splits=t.splits,
                                                     num_warps=t.num_warps, num_stages=t.num_stages),
                "xla": reference.gemv_t}
    t = gemv_tile_for(n, k, GEMV_TILE, GEMV_SHAPE_TILES)
    return {"pallas": lambda x, w: gemv_pallas(x, w, rows=t.rows, cap=t.cap, num_warps=t.num_warps),
            "xla": reference.gemv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lower-only", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--mats", type=int, default=4, help="separate matrices per timing (reads from HBM, not L2)")
    ap.add_argument("--repeats", type=int, default=5)
    harness.add_report_args(ap)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    copy = None if args.lower_only else harness.torch_copy_rate()
    rows = []
    for name in args.shapes:
        n, k, transposed = SHAPES[name]
        wshape = (k, n) if transposed else (n, k)
        x = jnp.asarray(rng.normal(size=(args.batch, k)), jnp.bfloat16)
        w = jnp.asarray(rng.normal(size=wshape) * 0.02, jnp.bfloat16)
        nbytes = w.size * 2
        mats, want = None, None
        impls = [("mgpu", cfg, functools.partial(gemv_mgpu, transposed=transposed, **cfg))
                 for cfg in configs() if fits(n, k, args.batch, **cfg)]
        if not args.lower_only:
            impls = [(key, {}, fn) for key, fn in baselines(transposed, n, k).items()] + impls
        for impl, cfg, f in impls:
            row = {"shape": name, "n": n, "k": k, "batch": args.batch, "impl": impl, **cfg}
            try:
                if args.lower_only:
                    jax.jit(f).trace(x, w).lower(lowering_platforms=("cuda",))
                    row["lowered"] = True
                else:
                    if want is None:
                        want, scale = oracle(np.asarray(x, np.float32), np.asarray(w, np.float32), transposed)
                        mats = [w] + [jax.random.normal(jax.random.key(i), wshape, jnp.bfloat16) * 0.02
                                      for i in range(args.mats - 1)]
                    row["rel_err"] = relative_error(f(x, w), want, scale)
                    row["ok"] = row["rel_err"] < 1e-4  # f32 accumulation: ~1e-6; a wrong tile: ~1
                    if row["ok"]:
                        row["us"] = harness.per_product_s(f, x, mats, args.repeats) * 1e6
                        row["tb_s"] = nbytes / row["us"] / 1e6
            except Exception as e:  # a configuration the lowering refuses: recorded, the sweep goes on
                row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [repr(e)])[0][:200]}"
            rows.append(row)
            print(row, flush=True)
        del mats
    rep = harness.report(args, copy_tb_per_s=copy and round(copy / 1e12, 3), rows=rows)
    harness.save(rep, args.json_out)
    timed = [r for r in rows if "us" in r]
    best = {}
    for r in timed:
        key = (r["shape"], r["impl"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print(harness.table(sorted(best.values(), key=lambda r: (r["shape"], r["us"])),
                        {"shape": "shape", "impl": "impl", "us": lambda r: f"{r['us']:.2f}",
                         "TB/s": lambda r: f"{r['tb_s']:.2f}",
                         "tile": lambda r: " ".join(f"{c}={r[c]}" for c in ("tile_m", "tile_k", "stages", "splits")
                                                    if c in r)}))
    bad = [r for r in rows if "error" in r or r.get("ok") is False]
    print(f"{len(rows) - len(bad)} of {len(rows)} configurations passed; torch copy {rep.get('copy_tb_per_s')} "
          "TB/s", file=sys.stderr)


if __name__ == "__main__":
    main()
