"""Per-kernel GPU time from a `jax.profiler.trace` directory: what a decode step spends its time on.

`kernel_times(trace_dir)` reads the XSpace file(s) the profiler wrote and sums, per kernel name, the device
time and the number of launches on every GPU stream, plus the busy time (the union of all kernel intervals)
and the span from the first kernel's start to the last one's end. `per_step(long, short, steps)` divides the
difference of two traces (a generate call of N new tokens and one of 1) by the N - 1 extra decode steps, so
prefill and the first token cancel out.

  python -m scripts.bench.trace TRACE_DIR [--top 30]
"""

from __future__ import annotations

import argparse
import glob
import sys
from collections import defaultdict

from jax.profiler import ProfileData


def kernel_times(trace_dir: str) -> dict:
    """{'kernels': {name: [total_us, launches]}, 'busy_us': float, 'span_us': float} over the GPU planes."""
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        raise FileNotFoundError(f"{trace_dir}: no *.xplane.pb written by jax.profiler.trace")
    kernels: dict[str, list] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for path in files:
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if not line.name.startswith("Stream"):
                    continue
                for ev in line.events:
                    k = kernels[ev.name]
                    k[0] += ev.duration_ns / 1e3
                    k[1] += 1
                    intervals.append((ev.start_ns, ev.start_ns + ev.duration_ns))
    intervals.sort()
    busy, end = 0.0, float("-inf")
    for a, b in intervals:  # union of the kernel intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    span = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
    return {"kernels": dict(kernels), "busy_us": busy / 1e3, "span_us": span / 1e3}


def per_step(long: dict, short: dict, steps: int) -> dict:
    """(long - short) / steps, per kernel name and for busy time: the cost of one more decode step."""
    names = set(long["kernels"]) | set(short["kernels"])
    kernels = {}
    for n in names:
        a, b = long["kernels"].get(n, [0.0, 0]), short["kernels"].get(n, [0.0, 0])
        if a[1] - b[1] > 0:
            kernels[n] = [(a[0] - b[0]) / steps, (a[1] - b[1]) / steps]
    return {"kernels": kernels, "busy_us": (long["busy_us"] - short["busy_us"]) / steps,
            "launches": sum(v[1] for v in kernels.values())}


def table(summary: dict, top: int = 30) -> str:
    """The `top` kernel names by time, then the totals."""
    rows = sorted(summary["kernels"].items(), key=lambda kv: -kv[1][0])
    total = sum(v[0] for v in summary["kernels"].values())
    out = [f"{'us':>9} {'launches':>9} {'us/launch':>10}  kernel"]
    for name, (us, n) in rows[:top]:
        out.append(f"{us:9.1f} {n:9.1f} {us / max(n, 1e-9):10.2f}  {name[:90]}")
    out.append(f"{total:9.1f} {sum(v[1] for v in summary['kernels'].values()):9.1f}"
               f" {'':>10}  all kernels (busy {summary['busy_us']:.1f} us)")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace_dir")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    print(table(kernel_times(args.trace_dir), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
