"""The server's decode slots without the server: time per decode step of `SlotDecoder` with every slot occupied,
copying each chunk's context bucket or reading it in place (`SlotConfig.window_reads`, the default), against
`Generator` on the same prompts at the same batch (the step the server should match). No HTTP, no tokenizer, no
queue: what is left of the server's gap to `generate` is the host's (scripts/bench/serve.py measures it whole).

With --admits N...: only the admit (prefill) calls instead, each of N prompts of --prompt-len tokens in one call of
`SlotConfig.admit_rows(N)` rows, the median of 5 after one that compiles (device synchronised): what a round of
the server's arrivals costs by how it is grouped.

Every slot admits a random prompt of --prompt-len tokens, then chunks of --chunk steps run until --steps tokens;
the figure is the median time of a chunk over its steps (device synchronised), after one untimed pass that
compiles every program it meets. Greedy, dense; whether the variants' tokens equal each other's and `Generator`'s is
reported (bf16 roundings that differ with the batch's composition can move a near-tie of random weights).

  python -m scripts.bench.slots [--shape llama2-7b | --model DIR] [--dtype bfloat16] [--slots 8]
                                [--prompt-len 100] [--steps 128] [--chunk 8] [--context-buckets 6] [--json-out F]
                                [--admits 1 2 4 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np

from scripts.bench import harness
from scripts.bench.decode import random_weights
from svdsparse_jax.convert import load_model, parse_dtype
from svdsparse_jax.engine import EngineConfig
from svdsparse_jax.generate import Generator, Sampler, seed_key
from svdsparse_jax.model import Transformer
from svdsparse_jax.serving.slots import SlotConfig, SlotDecoder, Start


def run_slots(decoder: SlotDecoder, prompts: list[list[int]], steps: int) -> tuple[list[float], list[list[int]]]:
    """Admits every prompt into its own slot, then decodes chunks until `steps` tokens a slot. Returns (each
    chunk's seconds, each slot's tokens)."""
    decoder.reset()
    first, _ = decoder.admit([Start(s, p, steps, seed_key(0), Sampler()) for s, p in enumerate(prompts)])
    tokens = [[int(t)] for t in first.token]
    live = np.ones(len(prompts), bool)
    times = []
    while len(tokens[0]) < steps:
        needed = len(prompts[0]) + len(tokens[0]) + decoder.sc.chunk
        t = time.perf_counter()
        out = jax.tree.map(np.asarray, decoder.decode(live, needed, True))  # the host reads: synchronised
        times.append(time.perf_counter() - t)
        for s in range(len(prompts)):
            tokens[s] += [int(x) for x in out.token[s] if x >= 0]
    return times, [t[:steps] for t in tokens]


def time_admits(decoder: SlotDecoder, prompts: list[list[int]], counts: list[int]) -> list[dict]:
    """Seconds of one admit call of the first n prompts (slots 0..n-1) for each n in counts: the median of 5
    after one that compiles."""
    rows = []
    for n in counts:
        starts = [Start(s, p, 1, seed_key(0), Sampler()) for s, p in enumerate(prompts[:n])]
        times = []
        for _ in range(6):
            t = time.perf_counter()
            decoder.admit(starts)  # returns the first tokens as NumPy: synchronised
            times.append(time.perf_counter() - t)
        sc = decoder.sc
        rows.append({"mode": f"admit {n}", "prompts": n, "rows": sc.admit_rows(n),
                     "prompt_bucket": sc.prompt_bucket(len(prompts[0])),
                     "admit_ms": round(1e3 * statistics.median(times[1:]), 2)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b", help="a named shape with random weights (without --model)")
    ap.add_argument("--model", help="a converted model directory instead of random weights")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--context-buckets", type=int, default=6)
    ap.add_argument("--context", type=int, help="cache slots per sequence (default: the model's positions)")
    ap.add_argument("--admits", type=int, nargs="+", help="time only admit calls of these numbers of prompts")
    harness.add_report_args(ap)
    args = ap.parse_args()
    if args.admits and not all(1 <= n <= args.slots for n in args.admits):
        ap.error(f"--admits: each count must be 1 to --slots ({args.slots})")
    dtype = parse_dtype(args.dtype)
    if args.model:
        lm = load_model(args.model, dtype)
        cfg, weights = lm.cfg, lm.weights
    else:
        cfg, weights = random_weights(args.shape, dtype, None, 0.0)
    model = Transformer(cfg, weights, EngineConfig.resolve())
    del weights
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.slots)]
    context = args.context or cfg.max_seq_len
    if args.admits:
        rows = time_admits(SlotDecoder(model, SlotConfig(args.slots, context, args.chunk)), prompts, args.admits)
        harness.save(harness.report(args, model=args.model or args.shape, dtype=args.dtype, slots=args.slots,
                                    prompt_len=args.prompt_len, rows=rows), args.json_out)
        print(harness.table(rows, {"prompts": "prompts", "rows": "rows", "prompt bucket": "prompt_bucket",
                                   "admit ms": "admit_ms"}))
        return 0
    rows, outputs = [], {}
    for window in (False, True):
        sc = SlotConfig(args.slots, context, args.chunk, context_buckets=args.context_buckets, window_reads=window)
        decoder = SlotDecoder(model, sc)
        run_slots(decoder, prompts, args.steps)  # compiles every program the timed pass meets
        times, outputs[window] = run_slots(decoder, prompts, args.steps)
        rows.append({"mode": "window reads" if window else "copied window", "context_buckets": sc.context_sizes(),
                     "step_ms": round(1e3 * statistics.median(times) / args.chunk, 3),
                     "chunks": len(times), "compiled": dict(decoder.compiles)})
        del decoder
    gen = Generator(model)
    gen.generate(prompts, args.steps, eos_ids=())  # compiles
    full, one = (min(gen.generate(prompts, n, eos_ids=()).run_s for _ in range(3)) for n in (args.steps, 1))
    want = gen.generate(prompts, args.steps, eos_ids=()).tokens
    rows.append({"mode": f"generate, batch {args.slots}", "step_ms": round(1e3 * (full - one) / (args.steps - 1), 3)})
    for row in rows[:2]:
        row["x_generate_step"] = round(rows[2]["step_ms"] / row["step_ms"], 3)
    equal = {"window_equals_copy": outputs[True] == outputs[False], "copy_equals_generate": outputs[False] == want}
    rep = harness.report(args, model=args.model or args.shape, dtype=args.dtype, slots=args.slots,
                         prompt_len=args.prompt_len, steps=args.steps, chunk=args.chunk, context=context,
                         rows=rows, **equal)
    harness.save(rep, args.json_out)
    print(harness.table(rows, {"mode": "mode", "step ms": "step_ms", "generate's / this": "x_generate_step",
                               "chunks": "chunks"}))
    print(f"{rep['device']}; tokens: window = copy {equal['window_equals_copy']}, copy = generate "
          f"{equal['copy_equals_generate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
