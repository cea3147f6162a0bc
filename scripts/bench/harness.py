"""The benchmarks' shared parts: one timing harness, one bandwidth baseline and one report header.

- Timing: `looped` runs a step `INNER` times inside one jitted call (so host dispatch is noise), `median_s`
  takes the median wall-clock time of repeated calls after a warm-up call, each call waited for. (The decode
  benchmark takes the medians of `GenerateResult.run_s`, the generate program's own timing of its compiled
  call, the same measure.)
- Baseline: `torch_copy_rate`, a torch device-to-device copy timed with CUDA events: the rate the GPU reaches.
- Report: `report` adds the device, the commit, the date and the command that reproduces the run; `save`
  writes it as JSON; `table` prints its rows.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[2]
INNER = 10  # passes over all layers inside one jitted call


def add_report_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json-out", help="write the report here")
    ap.add_argument("--commit", help="the commit measured (default: git rev-parse HEAD of this checkout)")


def looped(step: Callable, inner: int = INNER):
    """jit of `inner` passes of step(x, *rest) -> [B, d] f32; each pass's x depends on the previous result (by a
    zero-valued term XLA cannot fold), so no pass is hoisted or skipped."""
    @jax.jit
    def run(x, *rest):
        def body(i, acc):
            return acc + step(x + (acc[:, :1] * 0).astype(x.dtype), *rest)
        return jax.lax.fori_loop(0, inner, body, jnp.zeros(x.shape, jnp.float32))
    return run


def per_product_s(product: Callable, x: jax.Array, mats: list, repeats: int) -> float:
    """Seconds per product(x, w) -> [B, n], over the separate matrices `mats` in turn (reads from device memory,
    not L2), INNER passes in one jitted call; every output element feeds the result, so XLA cannot slice the
    product down."""
    step = looped(lambda x, ws: sum(jnp.sum(product(x, w), axis=1, keepdims=True) for w in ws)
                  * jnp.ones((1, x.shape[1])))
    return median_s(step, x, mats, repeats=repeats) / INNER / len(mats)


def median_s(fn: Callable, *args, repeats: int) -> float:
    """Median seconds of fn(*args) over `repeats` calls after one warm-up call (which compiles), each call's
    result waited for."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def torch_copy_rate(n_bytes: int = 2 << 30, repeats: int = 10) -> float | None:
    """Bytes read + written per second by a torch device-to-device copy of n_bytes of bf16 (median of repeats,
    CUDA events); None when torch has no CUDA device."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = n_bytes // 2
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n_bytes / statistics.median(times)


def hf_cache_kwargs(cache: str) -> dict:
    """transformers `generate` keyword arguments for a KV cache kind: "static" (with which generate compiles
    the decode step: torch.compile, CUDA graphs on a GPU) or "dynamic" (eager, the default)."""
    return {"cache_implementation": "static"} if cache == "static" else {}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None


def report(args: argparse.Namespace, **fields: Any) -> dict:
    """fields + the device, jax version, commit, date and the command line of this run."""
    dev = jax.devices()[0]
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    command = " ".join([*program, *map(shlex.quote, sys.argv[1:])])
    return {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "commit": getattr(args, "commit", None) or git_commit(), "date": time.strftime("%Y-%m-%d"),
            "command": command, **fields}


def save(rep: dict, path: str | None) -> None:
    """Writes the report as indented JSON when a path is given."""
    if path:
        Path(path).write_text(json.dumps(rep, indent=2) + "\n")


def table(rows: list[dict], columns: dict[str, str | Callable[[dict], Any]]) -> str:
    """Rows as a text table: one column per header, its cells the row's value under a key (missing: '-') or a
    function of the row; each column as wide as its widest cell."""
    cells = [[str(get(r) if callable(get) else r.get(get, "-")) for get in columns.values()] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(columns)]
    lines = [[*columns]] + cells
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
