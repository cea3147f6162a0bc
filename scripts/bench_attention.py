#!/usr/bin/env python
"""Decode attention alone (one new token, batch 1, bf16) on the GPU: the model's XLA path (RoPE, the two cache
writes, scores, softmax, values) against the Pallas kernel (`pallas_kernels.attention`) over slot-block sizes
and warps. Each of 32 layers has its own cache (so the loop reads device memory, not L2) with the new token at
slot `start`; per-layer time = median call time / (32 x INNER).

  python scripts/bench_attention.py --shape llama2-7b --slots 192 1024 4096 [--json-out F]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import attention  # noqa: E402
from svdsparse_jax.config import named_config  # noqa: E402
from svdsparse_jax.model import rope  # noqa: E402
import bench_report  # noqa: E402

F32 = jnp.float32
INNER = 10
LAYERS = 32


def xla_attention(cfg, qkv, pos, mask, start, k_cache, v_cache):
    """The model's XLA decode path from the fused projection on (Attention.__call__ without the kernel)."""
    b, dt = qkv.shape[0], qkv.dtype
    q, k, v = jnp.split(qkv[:, None], [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=-1)
    q = rope(q.reshape(b, 1, cfg.n_heads, cfg.head_dim), pos, cfg)
    k = rope(k.reshape(b, 1, cfg.n_kv_heads, cfg.head_dim), pos, cfg)
    v = v.reshape(b, 1, cfg.n_kv_heads, cfg.head_dim)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3), (0, 0, start, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3), (0, 0, start, 0))
    q = q.reshape(b, 1, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k_cache, preferred_element_type=F32) * cfg.head_dim ** -0.5
    probs = jax.nn.softmax(scores + mask[:, None, None, None, :], axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v_cache, preferred_element_type=F32)
    return out.astype(dt).reshape(b, cfg.q_dim), k_cache, v_cache


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--slots", nargs="+", type=int, default=[192, 1024, 4096])
    ap.add_argument("--blocks", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--interpret", action="store_true", help="the kernel in interpret mode (a CPU smoke test)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    cfg = named_config(args.shape)
    key = jax.random.key(0)
    rows = []
    for slots in args.slots:
        start = slots - 1  # the last slot: every earlier one is visible
        shape = (1, cfg.n_kv_heads, slots, cfg.head_dim)
        caches = [[jax.random.normal(jax.random.fold_in(key, 2 * i + j), shape, jnp.bfloat16) for j in range(2)]
                  for i in range(LAYERS)]
        qkv = jax.random.normal(key, (1, cfg.q_dim + 2 * cfg.kv_dim), jnp.bfloat16)
        pos = jnp.full((1, 1), start, jnp.int32)
        mask = jnp.zeros((1, slots), F32)
        angle = pos[:, 0, None].astype(F32) / cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2) / cfg.head_dim)

        def timed(one, caches) -> float:
            @jax.jit
            def run(qkv, caches):
                def body(i, carry):
                    x, caches = carry
                    new = []
                    for k, v in caches:
                        out, k, v = one(x, k, v)
                        x = x + (out[:, :1] * 0).astype(x.dtype)  # a dependence between layers
                        new.append([k, v])
                    return x, new
                return jax.lax.fori_loop(0, INNER, body, (qkv, caches))
            jax.block_until_ready(run(qkv, caches))
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                jax.block_until_ready(run(qkv, caches))
                times.append(time.perf_counter() - t)
            return statistics.median(times) / (INNER * LAYERS) * 1e6

        s = jnp.int32(start)
        row = {"shape": args.shape, "slots": slots,
               "xla_us": round(timed(lambda x, k, v: xla_attention(cfg, x, pos, mask, s, k, v), caches), 2)}
        for block, warps in itertools.product(args.blocks, args.warps):
            row[f"pallas_b{block}_w{warps}_us"] = round(timed(lambda x, k, v, block=block, warps=warps:
                attention.decode_attention_pallas(x, jnp.cos(angle), jnp.sin(angle), mask, s, k, v,
                                                  n_kv=cfg.n_kv_heads, scale=cfg.head_dim ** -0.5, block=block,
                                                  num_warps=warps, interpret=args.interpret), caches), 2)
        print(row, flush=True)
        rows.append(row)
        del caches
    bench_report.save(bench_report.report(device=jax.devices()[0].device_kind, jax=jax.__version__, runs=rows),
                      args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
