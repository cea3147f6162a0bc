#!/usr/bin/env python
"""Decode throughput of the jitted generate program on random weights of a named shape, built on the device.

Runs the same `Generator` that `svdsparse generate` uses (prefill + lax.while_loop decode in one program) and
reports, per shape: end-to-end tokens/s (prefill included, as the CLI prints), decode-only tokens/s
((N-1) new tokens over the time beyond a 1-token call), bytes read per decode step and the bandwidth that
implies, against a measured device copy bandwidth. The bytes (scripts/decode_bytes.py): every weight (of the
embedding the batch's rows), the KV cache slots and, sparse, only the FFN rows the predictors select (for a batch
the union over its sequences), measured teacher-forced on the decoded tokens, plus the predictors; the report ends with the byte ceiling of the speedup.

  python scripts/bench_decode.py --shape llama2-7b --new-tokens 128 --prompt-len 64 [--json-out F]
  python scripts/bench_decode.py --shape llama2-7b --sparse [--inactive 0.9 --s 0.95 --rank 256]
                                 [--dense-gemv 0 1]   # XLA's decode projections, then the Pallas GEMVs

--sparse: the model gets a FATReLU gate whose threshold leaves about `--inactive` of the neurons at zero
(random weights give gate ~ N(0, (std sqrt(d))^2) after the unit-scale RMSNorm: threshold = that std times the
normal quantile), whitened-SVD predictors are built for it by the project's own pipeline (build_predictors on
random calibration tokens) and the same prompts are decoded dense and sparse. --gate-decay A scales column j of
every W_gate by (j + 1)^-A (same gate variance), so the gate sees a decaying input spectrum as in a trained model;
plain random weights (A = 0) leave no low-rank structure for a predictor to find. Launches per decode step are
counted from the compiled program (top-level kernels of the decode loop's body).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import dispatch  # noqa: E402
from svdsparse_jax.config import NAMED_SHAPES, named_config  # noqa: E402
from svdsparse_jax.convert import parse_dtype  # noqa: E402
from svdsparse_jax.generate import STEPS_PER_CHECK, Generator, bucket, decode_steps  # noqa: E402
from svdsparse_jax.model import Transformer  # noqa: E402
from svdsparse_jax.predictors import BuildConfig, build_predictors  # noqa: E402
from svdsparse_jax.evaluate import ffn_rows_read  # noqa: E402
from svdsparse_jax.weights import init_weights  # noqa: E402
import bench_report  # noqa: E402
import decode_bytes  # noqa: E402
import trace_summary  # noqa: E402


def copy_bandwidth(n_bytes: int = 2 << 30, repeats: int = 10) -> float:
    """Bytes read + written per second by a jitted elementwise pass over n_bytes of bf16."""
    x = jax.random.normal(jax.random.key(0), (n_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n_bytes / statistics.median(times)


NOT_KERNELS = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant")


def launches_per_step(compiled) -> int:
    """Top-level kernels in the body of the decode while-loop (the loop whose body has the most of them)."""
    text = compiled.as_text()
    bodies = re.findall(r"body=%?([\w.\-]+)", text)
    best = 0
    for name in bodies:
        m = re.search(r"\n%?" + re.escape(name) + r" [^\n]*\{\n(.*?)\n\}", text, re.S)
        if not m:
            continue
        ops = re.findall(r"=\s*\S+\s+([a-z\-]+)\(", m.group(1))
        best = max(best, sum(op not in NOT_KERNELS for op in ops))
    return best


def decay_gate_columns(weights: dict, cfg, alpha: float) -> dict:
    """Scales column j of every W_gate by (j + 1)^-alpha, normalised to mean square 1 (the gate's variance, and so
    the FATReLU quantile, stay as they were): the gate then sees inputs with a decaying spectrum, as a trained
    model's do, instead of the isotropic ones of plain random weights, where no low-rank predictor can work."""
    s = (jnp.arange(cfg.d_model, dtype=jnp.float32) + 1.0) ** -alpha
    s = s / jnp.sqrt(jnp.mean(s * s))
    out = dict(weights)
    for i in range(cfg.n_layers):
        key = ("layers", i, "ffn", "w_gate")
        out[key] = (weights[key].astype(jnp.float32) * s[None, :]).astype(weights[key].dtype)
    return out


def random_model(shape: str, dtype, inactive: float | None, gate_decay: float) -> Transformer:
    """Random weights of a named shape; with `inactive`, a FATReLU gate whose threshold leaves about that fraction
    of neurons at zero (random weights give gate ~ N(0, (std sqrt(d))^2) after the unit-scale RMSNorm)."""
    cfg = named_config(shape)
    std = 0.02
    if inactive is not None:
        threshold = statistics.NormalDist().inv_cdf(inactive) * std * cfg.d_model ** 0.5
        cfg = dataclasses.replace(cfg, activation="fatrelu", act_threshold=threshold)
    weights = init_weights(cfg, jax.random.key(0), dtype, std=std)
    if gate_decay:
        weights = decay_gate_columns(weights, cfg, gate_decay)
    jax.block_until_ready(weights)
    return Transformer(cfg, weights)


def build(model: Transformer, predictor: dict | None) -> tuple[list | None, dict]:
    """(rank, s, calib_tokens, guard) -> whitened-SVD predictors built for `model` by `build_predictors` on random
    calibration tokens, and what to report about them; None -> (None, {}) for dense decoding."""
    if predictor is None:
        return None, {}
    cfg = model.cfg
    bc = BuildConfig(method="whitened", ranks=predictor["rank"], rule="s", value=predictor["s"],
                     tokens=predictor["calib_tokens"], guard=predictor["guard"])
    t = time.perf_counter()
    pset = build_predictors(model, np.random.default_rng(1).integers(0, cfg.vocab_size, bc.tokens), bc,
                            progress=False)
    return pset.layers, {
        "act_threshold": round(cfg.act_threshold, 4), "build_s": round(time.perf_counter() - t, 1),
        "calib_true_sparsity": round(float(np.mean([i["true_sparsity"] for i in pset.info])), 4),
        "calib_predicted_sparsity": round(float(np.mean([i["calib_predicted_sparsity"] for i in pset.info])), 4),
        "calib_recall": round(float(np.mean([i["calib_recall"] for i in pset.info])), 4),
        "predictor": f"whitened r{predictor['rank']} s{predictor['s']} guard{predictor['guard']}"}


def bench_model(model: Transformer, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                preds: list | None = None, profile_dir: str | None = None,
                steps_per_check: int = STEPS_PER_CHECK) -> dict:
    """Decode timing of `model`, dense, or sparse with `preds` (one predictor per layer). With `profile_dir`, one
    more call of each length runs under `jax.profiler.trace` and the row gets the GPU time per decode step by
    kernel. Per step means per step the program runs: whole groups of steps_per_check (`decode_steps`)."""
    cfg, dtype = model.cfg, model.dtype
    extra = {}
    gen = Generator(model, preds, steps_per_check)
    steps = decode_steps(new_tokens, steps_per_check)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, prompt_len).tolist() for _ in range(batch)]

    def timed(n: int) -> tuple[float, float, list[list[int]]]:
        first = gen.generate(prompts, n, eos_ids=())  # compiles (once per bucket)
        runs = [gen.generate(prompts, n, eos_ids=()).run_s for _ in range(repeats)]
        assert all(len(t) == n for t in first.tokens)
        return statistics.median(runs), first.compile_s, first.tokens

    full_s, compile_s, first_tokens = timed(new_tokens)
    launches = launches_per_step(next(iter(gen.compiled.values())))
    one_s, _, _ = timed(1)
    step_s = (full_s - one_s) / steps
    if profile_dir:
        mode = "sparse" if preds is not None else "dense"
        traces = {}
        for n in (new_tokens, 1):
            d = f"{profile_dir}/{mode}_{n}"
            shutil.rmtree(d, ignore_errors=True)  # a trace directory holds every trace written into it
            with jax.profiler.trace(d):
                gen.generate(prompts, n, eos_ids=())
            traces[n] = trace_summary.kernel_times(d)
        prof = trace_summary.per_step(traces[new_tokens], traces[1], steps)
        Path(f"{profile_dir}/{mode}_hlo.txt").write_text(next(iter(gen.compiled.values())).as_text())
        print(trace_summary.table(prof, 40), flush=True)
        top = sorted(prof["kernels"].items(), key=lambda kv: -kv[1][0])[:60]
        extra["profile"] = {"busy_us_per_step": round(prof["busy_us"], 1), "kernels_per_step": prof["launches"],
                            "top_kernels_us_launches": {k: [round(v[0], 2), v[1]] for k, v in top}}
    itemsize = jnp.dtype(dtype).itemsize
    slots = bucket(prompt_len) + bucket(new_tokens) + steps_per_check  # the cache's slots, all read per step
    if preds is None:
        step_bytes = decode_bytes.step_bytes(cfg, itemsize, batch, slots)
    else:  # rows the guarded FFNs read on these very tokens (teacher-forced: the same FFN inputs as in decode),
        # the union over the batch at each position
        sequences = np.asarray([p + t for p, t in zip(prompts, first_tokens)])
        gate_rows, up_down_rows = ffn_rows_read(model, preds, sequences, together=True)
        predictor_bytes = sum(p.nbytes() for p in preds)
        step_bytes = decode_bytes.step_bytes(cfg, itemsize, batch, slots, gate_rows, up_down_rows, predictor_bytes)
        extra.update(gate_rows_read=[round(float(v), 4) for v in gate_rows],
                     up_down_rows_read=[round(float(v), 4) for v in up_down_rows],
                     predictor_gb=round(predictor_bytes / 1e9, 4))
    return {
        "dtype": jnp.dtype(dtype).name, "batch": batch, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "steps_per_check": steps_per_check, "decode_steps": steps,
        "compile_s": round(compile_s, 2),
        "end_to_end_tokens_per_s": round(batch * new_tokens / full_s, 1),
        "decode_tokens_per_s": round(batch / step_s, 1), "decode_step_ms": round(step_s * 1e3, 3),
        "prefill_plus_first_token_ms": round(one_s * 1e3, 2),
        "slots": slots, "gb_per_step": round(step_bytes / 1e9, 4),
        "decode_tb_per_s": round(step_bytes / step_s / 1e12, 3),
        "launches_per_step": launches, "kernels": dispatch.mode(), "dense_gemv": dispatch.dense_gemv(),
        "sparse": preds is not None, **extra,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["llama2-7b"], choices=sorted(NAMED_SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sparse", action="store_true", help="also decode with predictors (see above)")
    ap.add_argument("--inactive", type=float, default=0.9)
    ap.add_argument("--s", type=float, default=0.95)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--guard", type=float, nargs="+", default=[0.01],
                    help="calibration guard(s) (fraction of neurons never predicted active; the reference's 0.01)")
    ap.add_argument("--gate-decay", type=float, nargs="+", default=[0.0],
                    help="W_gate column decay exponent(s) (0: plain random weights; 0.5 gives the rank-256 "
                         "predictor the per-neuron AUROC the paper reports on ProSparse-LLaMA2-7B, ~0.93)")
    ap.add_argument("--profile", metavar="DIR", help="also trace one call of each length; GPU time per kernel "
                    "(traces and the compiled HLO under DIR/SHAPE_decayA_gemvG/)")
    ap.add_argument("--dense-gemv", nargs="+", default=[dispatch.dense_gemv()], type=lambda v: v == "1",
                    help="1 / 0: decode projections through the Pallas GEMVs or XLA (SVDSPARSE_DENSE_GEMV; "
                         "both: 0 1)")
    ap.add_argument("--steps-per-check", nargs="+", type=int, default=[STEPS_PER_CHECK],
                    help="decode steps between two checks of the stop condition (generate.STEPS_PER_CHECK; 1: a "
                         "device-to-host wait after every token)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    dev = jax.devices()[0]
    copy_bw = copy_bandwidth()
    rows = []
    dtype = parse_dtype(args.dtype)
    for shape, decay in itertools.product(args.shape, args.gate_decay):
        model = random_model(shape, dtype, args.inactive if args.sparse else None, decay)
        predictors = [dict(rank=args.rank, s=args.s, calib_tokens=args.calib_tokens, guard=g) for g in args.guard]
        dense = {}
        for spec in [None, *predictors] if args.sparse else [None]:
            preds, about = build(model, spec)
            for gemv, check in itertools.product(args.dense_gemv, args.steps_per_check):
                os.environ["SVDSPARSE_DENSE_GEMV"] = "1" if gemv else "0"  # read while the program is traced
                profile = args.profile and f"{args.profile}/{shape}_decay{decay}_gemv{int(gemv)}_check{check}"
                row = {**bench_model(model, args.batch, args.prompt_len, args.new_tokens, args.repeats, preds,
                                     profile, check), **about, "shape": shape, "gate_decay": decay}
                row["fraction_of_copy_bw"] = round(row["decode_tb_per_s"] * 1e12 / copy_bw, 3)
                if spec is None:
                    dense[gemv, check] = row
                else:  # against the dense run of the same FATReLU model with the same GEMVs and checks
                    dense_tps = dense[gemv, check]["decode_tokens_per_s"]
                    row["speedup_vs_dense"] = round(row["decode_tokens_per_s"] / dense_tps, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = bench_report.report(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                                 copy_tb_per_s=round(copy_bw / 1e12, 3), runs=rows)
    bench_report.save(report, args.json_out)
    print(f"\n{dev.device_kind}  copy {report['copy_tb_per_s']} TB/s")
    print(f"{'shape':<12}{'mode':<7}{'gemv':<7}{'check':>6}{'e2e tok/s':>10}{'decode tok/s':>14}{'step ms':>9}"
          f"{'TB/s':>7}{'of copy':>9}{'launch':>7}{'compile s':>11}")
    for r in rows:
        mode, gemv = "sparse" if r["sparse"] else "dense", "pallas" if r["dense_gemv"] else "xla"
        print(f"{r['shape']:<12}{mode:<7}{gemv:<7}{r['steps_per_check']:>6}{r['end_to_end_tokens_per_s']:>10}"
              f"{r['decode_tokens_per_s']:>14}{r['decode_step_ms']:>9}{r['decode_tb_per_s']:>7}"
              f"{r['fraction_of_copy_bw']:>9}{r['launches_per_step']:>7}{r['compile_s']:>11}")
        if r["sparse"]:
            print(f"   gate decay {r['gate_decay']}, {r['predictor']}: {r['speedup_vs_dense']}x dense; "
                  f"calib true sparsity {r['calib_true_sparsity']}, predicted {r['calib_predicted_sparsity']}, "
                  f"recall {r['calib_recall']}")
    print("\nbytes per step (scripts/decode_bytes.py):")
    print("\n".join(decode_bytes.analyse(report, goal=2.1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
