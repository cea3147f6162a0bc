#!/usr/bin/env python
"""Sparse FFN kernel time per layer against the length of the neuron list (random lists; relu, so about half the
listed neurons are active), for several kernel configurations, on 16 separate layers of random bf16 weights.
Shows the fixed cost (count 0: launch, partial sums and their sum) and the steps where programs take a second
list block. Prints one line per count.

  python scripts/bench_ffn_count.py [llama2-7b | qwen2-7b]
"""
import sys
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import bench_ffn as b  # noqa: E402
from pallas_kernels import sparse_ffn as sf, compaction  # noqa: E402
from pallas_kernels.reference import Activation  # noqa: E402
from svdsparse_jax.config import named_config  # noqa: E402
cfg = named_config(sys.argv[1] if len(sys.argv) > 1 else "llama2-7b")
d, d_ff, n = cfg.d_model, cfg.d_ff, 16
key = jax.random.key(0)
W = [[(jax.random.normal(jax.random.fold_in(key, 3 * l + i), (d_ff, d), jnp.float32) / 64).astype(jnp.bfloat16)
      for i in range(3)] for l in range(n)]
x = jax.random.normal(key, (1, d), jnp.bfloat16)
act = Activation("relu")
rng = np.random.default_rng(0)
configs = {"stream": sf.STREAM, "split": sf.SPLIT}
def make(c):
    @b.looped
    def kern(x, W, lists):
        return sum(sf.sparse_ffn_indexed(x, t, k, *w, act=act, cfg=c)[0] for (t, k), w in zip(lists, W))
    return kern
kerns = {name: make(c) for name, c in configs.items()}
for count in (0, 8, 64, 256, 528, 1056, 1431, 2112, 3000):
    lists = []
    for l in range(n):
        m = np.zeros((1, d_ff), bool); m[0, rng.choice(d_ff, count, replace=False)] = True
        lists.append(compaction.compact_reference(jnp.asarray(m))[:2])
    row = []
    for name, kern in kerns.items():
        row.append(f"{name} {b.timeit(kern, x, W, lists, repeats=10) / n * 1e6:6.2f}")
    # bytes if all listed rows are read thrice (relu: ~half active, so less)
    print(f"count {count:5d} ({count / d_ff:.3f}):", "  ".join(row), flush=True)
