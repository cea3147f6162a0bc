"""Serving benchmark: `svdsparse serve` under N concurrent streaming clients on loopback, dense then sparse.

Each mode starts a server (a subprocess, --port 0), compiles the programs the workload meets (unmeasured: a few
requests with 1, 2, 4, ... clients, then the workload until a run compiles nothing, at most 3 times), then runs
the workload once more and measures: request throughput, output tokens/s, time to first token and time per
output token after the first (median and p99 over requests, as clients see them: TTFT from sending the request
to the first text, TPOT = (last text - first text) / (completion tokens - 1)). The workload: `--requests` greedy
completions of held-out text of mixed lengths (`--prompt-min` to `--prompt-max` tokens), each asking for `--max-
tokens` new tokens (a request ends earlier at EOS), issued by `--clients` clients back to back. The report also
gives the programs the server compiled during the measured run (0: no compilation in the figures).

Sparse needs predictors: --predictors DIR, or, for the bundled model, whitened-SVD predictors built first
(rank 64, recall 0.99 on 8,192 calibration tokens: `svdsparse build-predictors`). The sparse server runs
`--ffn-policy` (default sparse: every layer; the measured policy runs a model as small as the bundled one dense).

  python -m scripts.bench.serve [--model DIR] [--dtype float32] [--clients 8] [--requests 48] [--max-tokens 32]
                                [--max-batch 8] [--modes dense sparse] [--predictors DIR] [--json-out F]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from scripts.bench import harness


class Server:
    """`svdsparse serve` in a subprocess on a free loopback port."""

    def __init__(self, flags: list[str], log: Path, timeout: float = 300):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "svdsparse_jax.cli", "serve", "--port", "0", *flags],
                                     stdout=subprocess.DEVNULL, stderr=open(log, "w"), env={**os.environ})
        deadline = time.monotonic() + timeout
        while not (m := re.search(r"on (http://\S+) ", log.read_text())):
            self._alive(deadline)
        self.url = m[1]
        while not self._healthy():
            self._alive(deadline)

    def _alive(self, deadline: float) -> None:
        if self.proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"serve did not start:\n{self.log.read_text()[-3000:]}")
        time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health").status_code == 200
        except httpx.TransportError:
            return False

    def samples(self, pattern: str) -> list[float]:
        """The values of the /metrics samples whose name (and labels) match `pattern`, a regular expression."""
        text = httpx.get(self.url + "/metrics").text
        return [float(v) for v in re.findall(rf"^{pattern} (\S+)$", text, re.M)]

    def programs(self) -> int:
        return int(sum(self.samples(r"svdsparse_programs\{[^}]*\}")))

    def admits(self) -> tuple[float, float]:
        """(prompts prefilled, prefill calls) so far."""
        return self.samples("svdsparse_admit_prompts_sum")[0], self.samples("svdsparse_admit_prompts_count")[0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def one_request(client: httpx.Client, url: str, body: dict) -> dict:
    """A streamed completion: TTFT, TPOT (None for a single token), tokens, seconds."""
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["text"] for c in chunk["choices"]) or (chunk["choices"] and first is None):
                last = time.perf_counter()
                first = first or last
    end = time.perf_counter()
    return {"ttft": first - t0, "tpot": (last - first) / (tokens - 1) if tokens > 1 else None, "tokens": tokens,
            "seconds": end - t0}


def run_workload(server: Server, prompts: list[list[int]], args) -> dict:
    """The requests issued by `args.clients` clients back to back; the figures over them."""
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=args.clients + 2))
    bodies = [{"model": "bench", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}} for p in prompts]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(lambda b: one_request(client, server.url, b), bodies))
    wall = time.perf_counter() - t0
    client.close()
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    q = lambda xs, p: float(np.percentile(xs, p)) if xs else None  # noqa: E731
    return {"requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "output_tokens": sum(r["tokens"] for r in results),
            "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_median_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * q(ttft, 99),
            "tpot_median_ms": 1e3 * statistics.median(tpot) if tpot else None,
            "tpot_p99_ms": 1e3 * q(tpot, 99) if tpot else None}


def idle_ttft(server: Server, prompts: list[list[int]], args) -> dict:
    """TTFT with an idle queue: `--idle-requests` of the workload's prompts sent one at a time (each after the
    last ended), asking for one token each; median and p99 over them."""
    if not args.idle_requests:
        return {}
    with httpx.Client(timeout=600) as client:
        ttft = [one_request(client, server.url, {"model": "bench", "prompt": p, "max_tokens": 1, "temperature": 0,
                                                 "stream": True})["ttft"] for p in prompts[:args.idle_requests]]
    return {"idle_requests": len(ttft), "idle_ttft_median_ms": 1e3 * statistics.median(ttft),
            "idle_ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99))}


def generate_baseline(prompts: list[list[int]], args) -> dict:
    """The same prompts through `Generator` (what `svdsparse generate` runs), dense, in batches of max_batch in
    arrival order: output tokens over the programs' run time (a first pass compiles)."""
    import jax.numpy as jnp

    from svdsparse_jax.assets import BUNDLED_MODEL
    from svdsparse_jax.convert import load_model
    from svdsparse_jax.engine import EngineConfig
    from svdsparse_jax.generate import Generator
    from svdsparse_jax.model import Transformer

    lm = load_model(args.model or BUNDLED_MODEL, getattr(jnp, args.dtype))
    gen = Generator(Transformer(lm.cfg, lm.weights, EngineConfig.resolve()))
    groups = [prompts[i:i + args.max_batch] for i in range(0, len(prompts), args.max_batch)]
    for g in groups:
        gen.generate(g, args.max_tokens)
    runs = [gen.generate(g, args.max_tokens) for g in groups]
    tokens, run_s = sum(len(t) for r in runs for t in r.tokens), sum(r.run_s for r in runs)
    return {"mode": f"generate, batch {args.max_batch}", "output_tokens": tokens, "wall_s": run_s,
            "output_tokens_per_s": tokens / run_s, "requests_per_s": len(prompts) / run_s}


def workload(args) -> list[list[int]]:
    """Held-out token ids of mixed lengths, uniformly from prompt_min to prompt_max tokens (seeded)."""
    from svdsparse_jax.assets import corpus_split
    heldout = corpus_split("heldout")
    rng = np.random.default_rng(args.seed)
    out = []
    for n in rng.integers(args.prompt_min, args.prompt_max + 1, args.requests):
        start = int(rng.integers(0, len(heldout) - n))
        out.append([int(t) for t in heldout[start:start + n]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: the bundled model)")
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-min", type=int, default=8)
    ap.add_argument("--prompt-max", type=int, default=100)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--decode-chunk", type=int, default=8, help="the server's --decode-chunk (its default)")
    ap.add_argument("--admit-together", type=int, help="the server's --admit-together (default: its own)")
    ap.add_argument("--admit-wait-ms", type=float, help="the server's --admit-wait-ms (default: its own)")
    ap.add_argument("--modes", nargs="+", default=["dense", "sparse", "generate"],
                    choices=["dense", "sparse", "generate"],
                    help="generate: the prompts through Generator in batches of --max-batch (no server)")
    ap.add_argument("--predictors", help="predictor directory for the sparse mode (default: built for the bundled "
                                         "model)")
    ap.add_argument("--ffn-policy", default="sparse", choices=["measured", "sparse", "dense"])
    ap.add_argument("--idle-requests", type=int, default=16,
                    help="after the workload, this many of its prompts one at a time, for TTFT with an idle queue "
                         "(0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-dir", help="keep the servers' logs here (default: discarded)")
    ap.add_argument("--log-level", default="warning", help="the servers' --log-level (info: every compilation)")
    harness.add_report_args(ap)
    args = ap.parse_args()
    t_start = time.perf_counter()
    prompts = workload(args)
    model = [args.model] if args.model else []
    common = [*model, "--dtype", args.dtype, "--max-batch", str(args.max_batch), "--max-queue",
              str(args.requests), "--decode-chunk", str(args.decode_chunk), "--served-model-name", "bench",
              "--log-level", args.log_level,
              *(["--admit-together", str(args.admit_together)] if args.admit_together else []),
              *(["--admit-wait-ms", str(args.admit_wait_ms)] if args.admit_wait_ms is not None else [])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mode in args.modes:
            if mode == "generate":
                rows.append(generate_baseline(prompts, args))
                continue
            flags = list(common)
            if mode == "sparse":
                pred = args.predictors
                if pred is None:
                    if args.model:
                        sys.exit("--predictors DIR is needed for a model other than the bundled one")
                    pred = str(tmp / "predictors")
                    subprocess.run([sys.executable, "-m", "svdsparse_jax.cli", "build-predictors", "--out", pred,
                                    "--rank", "64", "--target-recall", "0.99", "--tokens", "8192", "--dtype",
                                    args.dtype], check=True, stdout=subprocess.DEVNULL)
                flags += ["--predictors", pred, "--ffn-policy", args.ffn_policy]
            t0 = time.perf_counter()
            log_dir = Path(args.log_dir or tmp)
            log_dir.mkdir(parents=True, exist_ok=True)
            server = Server(flags, log_dir / f"{mode}.log")
            started = time.perf_counter() - t0
            try:
                # compile what the workload meets: fewer clients first (the slot buckets its tail runs in), then
                # the workload until a run compiles nothing (its occupancy varies with timing)
                for clients in sorted({min(args.clients, 1 << k) for k in range(args.clients.bit_length())}):
                    run_workload(server, prompts[:2 * clients], argparse.Namespace(**{**vars(args),
                                                                                      "clients": clients}))
                idle_ttft(server, prompts, args)  # the one-prompt admits it meets (with an admission wait, the
                compiled = server.programs()      # workload may group every arrival and compile none of them)
                for _ in range(3):
                    run_workload(server, prompts, args)
                    if compiled == (compiled := server.programs()):
                        break
                before = server.admits()
                row = {"mode": mode, **run_workload(server, prompts, args)}
                after = server.admits()
                row["prompts_per_prefill"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                row |= idle_ttft(server, prompts, args)
                row["programs_compiled_while_measured"] = server.programs() - compiled
                row["startup_s"], row["warmup_round_programs"] = started, compiled
            finally:
                server.stop()
            rows.append(row)
            print(f"{mode}: {row['requests_per_s']:.2f} req/s, {row['output_tokens_per_s']:.0f} tok/s", file=sys.stderr)
    fmt = lambda key, f=".1f": (lambda r: "-" if r.get(key) is None else format(r[key], f))  # noqa: E731
    print(harness.table(rows, {"mode": "mode", "req/s": fmt("requests_per_s", ".2f"),
                               "out tok/s": fmt("output_tokens_per_s", ".0f"),
                               "TTFT med ms": fmt("ttft_median_ms"), "TTFT p99 ms": fmt("ttft_p99_ms"),
                               "TPOT med ms": fmt("tpot_median_ms", ".2f"), "TPOT p99 ms": fmt("tpot_p99_ms", ".2f"),
                               "idle TTFT p99 ms": fmt("idle_ttft_p99_ms"),
                               "prompts a prefill": fmt("prompts_per_prefill", ".2f"),
                               "tokens": "output_tokens", "compiled while measured":
                                   "programs_compiled_while_measured"}))
    total = time.perf_counter() - t_start
    print(f"{args.requests} requests, {args.clients} clients, prompts {args.prompt_min}-{args.prompt_max} tokens, "
          f"max_tokens {args.max_tokens}, {args.max_batch} slots, chunk {args.decode_chunk}; {total:.0f} s in all")
    copy_rate = harness.torch_copy_rate()  # after the servers stopped: the device is this process's alone
    harness.save(harness.report(args, rows=rows, total_s=total, settings=vars(args),
                                copy_tb_per_s=copy_rate and round(copy_rate / 1e12, 3)), args.json_out)


if __name__ == "__main__":
    main()
