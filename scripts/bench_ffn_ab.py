#!/usr/bin/env python
"""Stream-kernel shapes compared head to head: the kernels alone (`bench_ffn.run_config`) on 16 random layers at
90% sparsity with 3% extra candidates, each configuration timed four times in turn, so drift between the pool's
runs hits all alike (one-run sweeps moved by 2-3 us). Prints each run and the median, us per layer.

  python scripts/bench_ffn_ab.py
"""
import statistics
import sys
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import bench_ffn as b  # noqa: E402
from pallas_kernels import sparse_ffn as sf  # noqa: E402
from svdsparse_jax.config import named_config  # noqa: E402
cfgs = {"r4w4p264": sf.SparseFFNConfig(variant="stream", rows=4, num_warps=4, programs=264),
        "r2w4p396": sf.SparseFFNConfig(variant="stream", rows=2, num_warps=4, programs=396),
        "r2w4p528": sf.SparseFFNConfig(variant="stream", rows=2, num_warps=4, programs=528),
        "r2w2p396": sf.SparseFFNConfig(variant="stream", rows=2, num_warps=2, programs=396),
        "r2w4p264": sf.SparseFFNConfig(variant="stream", rows=2, num_warps=4, programs=264)}
for shape in ("qwen2-7b", "llama2-7b"):
    L = b.make_layers(named_config(shape), 16, 0.9, 0.03, 256)
    res = {k: [] for k in cfgs}
    for rep in range(4):
        for name, c in cfgs.items():
            res[name].append(b.run_config(L, c, 10, only_kernels=True)["kernels_us"])
    for name, v in res.items():
        print(shape, name, "median %.2f" % statistics.median(v), " ".join("%.2f" % t for t in v), flush=True)
    del L
