"""Decode throughput of the jitted generate program on random weights of a named shape, built on the device.

Runs the same `Generator` that `svdsparse generate` uses (prefill + lax.while_loop decode in one program) and
reports, per shape, batch size and engine setting: end-to-end tokens/s (prefill included, as the CLI prints),
decode tokens/s ((N-1) new tokens over the time beyond a 1-token call), the bytes a decode step reads
(`scripts.bench.bytes`: every weight, of the embedding the batch's rows, the KV slots and, sparse, only the FFN
rows the predictors select, measured teacher-forced on the decoded tokens, for a batch the union over its
sequences, plus the predictors), the rate that implies and its fraction of a torch copy measured in the same run.

  python -m scripts.bench.decode --shape llama2-7b [--batch 1 4] [--sparse --gate-decay 0.5]
                                 [--projections table mgpu xla] [--steps-per-check 1 8] [--profile DIR] [--json-out F]

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
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from scripts.bench import bytes as decode_bytes
from scripts.bench import harness, trace
from pallas_kernels.tuning import ATTENTION_TILE, GATE_UP_TILE, AttentionTile, FFNCost, GemvTile, GemvTTile, MgpuTile
from svdsparse_jax.config import NAMED_SHAPES, named_config
from svdsparse_jax.convert import parse_dtype
from svdsparse_jax.engine import PROJECTION_TABLES, EngineConfig
from scripts.lab import TopKPredictor, decode_steps, ffn_rows_read
from svdsparse_jax.generate import Generator, bucket
from svdsparse_jax.model import Transformer, with_engine
from svdsparse_jax.predictors import BuildConfig, build_predictors
from svdsparse_jax.weights import init_weights

NOT_KERNELS = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant")
COLUMNS = {"shape": "shape", "batch": "batch", "mode": lambda r: r["candidates"] or "dense",
           "proj": "projections", "check": "steps_per_check",
           "gate+up": lambda r: "2 GEMVs" if not r["gate_up_tile"] else "rows={rows} warps={num_warps}".format(
               **r["gate_up_tile"]),
           "attention": lambda r: "XLA" if not r["attention_tile"] else (
               "block={block} w{num_warps} s{num_stages}".format(**r["attention_tile"])),
           "e2e tok/s": "end_to_end_tokens_per_s",
           "decode tok/s": "decode_tokens_per_s", "step ms": "decode_step_ms", "GB/step": "gb_per_step",
           "TB/s": "decode_tb_per_s", "of copy": "fraction_of_copy", "launches": "launches_per_step",
           "sparse layers": "sparse_layers", "x dense": "speedup_vs_dense"}


def parse_tile(cls, text: str):
    """A tile dataclass from 'field=N field=N ...' (how the sweeps print their tiles)."""
    return cls(**{k: int(v) for k, v in (kv.split("=") for kv in text.split())})


def launches_per_step(compiled) -> int:
    """Top-level kernels in the body of the decode while-loop (the loop whose body has the most of them)."""
    text = compiled.as_text()
    best = 0
    for name in re.findall(r"body=%?([\w.\-]+)", text):
        m = re.search(r"\n%?" + re.escape(name) + r" [^\n]*\{\n(.*?)\n\}", text, re.S)
        if m:
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


def random_weights(shape: str, dtype, inactive: float | None, gate_decay: float, vocab_size: int | None = None):
    """(config, weights) of a named shape (with vocab_size, that vocabulary instead): random, std 0.02; with
    `inactive`, a FATReLU gate whose threshold leaves about that fraction of neurons at zero."""
    cfg = named_config(shape)
    if vocab_size is not None:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    std = 0.02
    if inactive is not None:
        threshold = statistics.NormalDist().inv_cdf(inactive) * std * cfg.d_model ** 0.5
        cfg = dataclasses.replace(cfg, activation="fatrelu", act_threshold=threshold)
    weights = init_weights(cfg, jax.random.key(0), dtype, std=std)
    if gate_decay:
        weights = decay_gate_columns(weights, cfg, gate_decay)
    return cfg, jax.block_until_ready(weights)


def build(model: Transformer, rank: int, s: float, calib_tokens: int, guard: float):
    """Whitened-SVD predictors built for `model` by `build_predictors` on random calibration tokens, and what to
    report about them."""
    cfg = model.cfg
    bc = BuildConfig(method="whitened", ranks=rank, rule="s", value=s, tokens=calib_tokens, guard=guard)
    t = time.perf_counter()
    pset = build_predictors(model, np.random.default_rng(1).integers(0, cfg.vocab_size, bc.tokens), bc,
                            progress=False)
    return pset, {
        "act_threshold": round(cfg.act_threshold, 4), "build_s": round(time.perf_counter() - t, 1),
        "calib_true_sparsity": round(float(np.mean([i["true_sparsity"] for i in pset.info])), 4),
        "calib_predicted_sparsity": round(float(np.mean([i["calib_predicted_sparsity"] for i in pset.info])), 4),
        "calib_recall": round(float(np.mean([i["calib_recall"] for i in pset.info])), 4),
        "predictor": f"whitened r{rank} s{s} guard{guard}"}


def topk_predictors(pset, batch: int, multiplier: float, d_ff: int) -> list:
    """Polar Sparsity's fixed top-k for `batch` sequences in place of the union: per layer
    `scripts.lab.TopKPredictor` over the set's predictors with k = multiplier x the union's mean W_gate row
    count for that batch size (`pset.union`)."""
    union = pset.union and pset.union.at(batch)
    if union is None:
        raise SystemExit(f"--topk: the predictor set has no union rows for batch {batch}")
    return [TopKPredictor(p, max(1, min(d_ff, round(multiplier * c * d_ff))), batch)
            for p, c in zip(pset.layers, union[0])]


def bench_model(model: Transformer, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                pset=None, profile_dir: str | None = None, topk: float | None = None) -> dict:
    """Decode timing of `model` under its engine, dense, or sparse with the predictor set `pset` (on the layers
    the engine's policy picks for the batch size). With
    `profile_dir`, one more call of each length runs under `jax.profiler.trace` and the row gets the GPU time per
    decode step by kernel. Per step means per step the program runs: whole groups of the engine's steps per
    check (`decode_steps`)."""
    cfg, dtype, engine = model.cfg, model.dtype, model.engine
    extra = {}
    preds = None if pset is None else pset.layers
    if topk:
        preds = topk_predictors(pset, batch, topk, cfg.d_ff)
    gen = Generator(model, preds, None if pset is None else pset.union)
    layers = gen.sparse_layers(batch)
    steps = decode_steps(new_tokens, engine.steps_per_check)
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
        traces = {}
        for n in (new_tokens, 1):
            d = f"{profile_dir}/{n}"
            shutil.rmtree(d, ignore_errors=True)  # a trace directory holds every trace written into it
            with jax.profiler.trace(d):
                gen.generate(prompts, n, eos_ids=())
            traces[n] = trace.kernel_times(d)
        prof = trace.per_step(traces[new_tokens], traces[1], steps)
        Path(f"{profile_dir}/hlo.txt").write_text(next(iter(gen.compiled.values())).as_text())
        print(trace.table(prof, 40), flush=True)
        top = sorted(prof["kernels"].items(), key=lambda kv: -kv[1][0])[:60]
        extra["profile"] = {"busy_us_per_step": round(prof["busy_us"], 1), "kernels_per_step": prof["launches"],
                            "top_kernels_us_launches": {k: [round(v[0], 2), v[1]] for k, v in top}}
    itemsize = jnp.dtype(dtype).itemsize
    slots = bucket(prompt_len) + bucket(new_tokens) + engine.steps_per_check  # the cache's slots, all read
    if preds is None:
        step_bytes = decode_bytes.step_bytes(cfg, itemsize, batch, slots)
    else:  # rows the guarded FFNs read on these very tokens (teacher-forced: the same FFN inputs as in decode),
        # the union over the batch at each position
        sequences = np.asarray([p + t for p, t in zip(prompts, first_tokens)])
        gate_rows, up_down_rows = ffn_rows_read(model, preds, sequences, together=True)
        gate_rows, up_down_rows = (np.where(layers, v, 1.0) for v in (gate_rows, up_down_rows))  # dense layers
        predictor_bytes = sum(p.nbytes() for p, s in zip(preds, layers) if s)
        step_bytes = decode_bytes.step_bytes(cfg, itemsize, batch, slots, gate_rows, up_down_rows, predictor_bytes)
        extra.update(gate_rows_read=[round(float(v), 4) for v in gate_rows],
                     up_down_rows_read=[round(float(v), 4) for v in up_down_rows],
                     predictor_gb=round(predictor_bytes / 1e9, 4), sparse_layers=int(sum(layers)))
    return {
        "dtype": jnp.dtype(dtype).name, "batch": batch, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "steps_per_check": engine.steps_per_check, "decode_steps": steps,
        "compile_s": round(compile_s, 2),
        "end_to_end_tokens_per_s": round(batch * new_tokens / full_s, 1),
        "decode_tokens_per_s": round(batch / step_s, 1), "decode_step_ms": round(step_s * 1e3, 3),
        "prefill_plus_first_token_ms": round(one_s * 1e3, 2),
        "slots": slots, "gb_per_step": round(step_bytes / 1e9, 4),
        "decode_tb_per_s": round(step_bytes / step_s / 1e12, 3),
        "launches_per_step": launches, "kernels": engine.backend,
        "projections": next(name for name, table in PROJECTION_TABLES.items() if table == engine.projections),
        "sparse": preds is not None,
        "candidates": f"top-k x{topk}" if topk else "union" if preds is not None else None, **extra,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["llama2-7b"], choices=sorted(NAMED_SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kernels", default="auto", choices=["auto", "pallas", "interpret", "xla"],
                    help="the engine's backend (EngineConfig.resolve)")
    ap.add_argument("--projections", nargs="+", default=["table"], choices=sorted(PROJECTION_TABLES),
                    help="decode products by the measured table (Pallas GEMVs where they won), the Mosaic GPU GEMV "
                         "where the table has the Pallas one (mgpu), or XLA's only; several: each, dense and sparse")
    ap.add_argument("--steps-per-check", nargs="+", type=int, default=[EngineConfig().steps_per_check],
                    help="decode steps between two checks of the stop condition (1: a device-to-host wait "
                         "after every token)")
    ap.add_argument("--sparse", action="store_true", help="also decode with predictors (see above), under each "
                    "--projections value")
    ap.add_argument("--ffn-policy", default="measured", choices=["measured", "sparse", "dense"],
                    help="which layers decode sparse (svdsparse_jax.policy)")
    ap.add_argument("--ffn-costs", metavar="JSON", help="a bench.ffn report whose fitted costs (ffn_costs) replace "
                    "the engine's table (tuning.FFN_COSTS) for the policy")
    ap.add_argument("--topk", type=float, nargs="+", default=[], metavar="MULT",
                    help="also decode batches (B > 1) sparse with a fixed top-k per layer in place of the union "
                         "(Polar Sparsity), k = MULT x the union's mean row count for B (scripts.bench.topk "
                         "gives the multiplier of equal accuracy)")
    ap.add_argument("--gemv-t-tile", metavar="TILE", help="the down product's tile instead of tuning.GEMV_T_TILE, "
                    "as scripts.bench.gemv_t prints it: 'rows=64 cols=128 splits=32 num_warps=4 num_stages=3'")
    ap.add_argument("--mgpu-tile", metavar="TILE", help="the Mosaic GPU GEMV's tile instead of tuning.MGPU_TILE "
                    "(--projections mgpu), e.g. 'tile_m=64 tile_k=128 stages=4 splits=2 pad_x=1'")
    ap.add_argument("--gate-up-tile", nargs="+", default=["table"], metavar="TILE",
                    help="dense runs with the dense FFN's gate and up as one kernel (`gemv.gate_up_pallas`) at each "
                         "tile, e.g. 'rows=2 cap=4096 num_warps=8'; 'table': tuning.GATE_UP_TILE; 'none': two GEMVs "
                         "and XLA's activation; sparse runs take the first")
    ap.add_argument("--attention-tile", nargs="+", default=["table"], metavar="TILE",
                    help="runs (dense and sparse) with decode attention as one kernel "
                         "(`attention.decode_attention_pallas`) at each tile, e.g. 'block=64 num_warps=4 "
                         "num_stages=1'; 'table': tuning.ATTENTION_TILE; 'none': XLA's scores, softmax and values")
    ap.add_argument("--inactive", type=float, default=0.9)
    ap.add_argument("--s", type=float, default=0.95)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--guard", type=float, default=0.01,
                    help="calibration guard (fraction of neurons never predicted active; the reference's 0.01)")
    ap.add_argument("--gate-decay", type=float, nargs="+", default=[0.0],
                    help="W_gate column decay exponent(s) (0: plain random weights; 0.5 gives the rank-256 "
                         "predictor the per-neuron AUROC the paper reports on ProSparse-LLaMA2-7B, ~0.93)")
    ap.add_argument("--profile", metavar="DIR", help="also trace one call of each length; GPU time per kernel "
                    "(traces and the compiled HLO under DIR/...)")
    harness.add_report_args(ap)
    args = ap.parse_args()
    rows = []
    dtype = parse_dtype(args.dtype)
    engine_fields = {}
    if args.gemv_t_tile:
        engine_fields["gemv_t_tile"] = parse_tile(GemvTTile, args.gemv_t_tile)
    if args.mgpu_tile:
        engine_fields["mgpu_tile"] = parse_tile(MgpuTile, args.mgpu_tile)
    gate_up_tiles = [None if t == "none" else GATE_UP_TILE if t == "table" else parse_tile(GemvTile, t)
                     for t in args.gate_up_tile]
    attention_tiles = [None if t == "none" else ATTENTION_TILE if t == "table" else parse_tile(AttentionTile, t)
                       for t in args.attention_tile]
    if args.ffn_costs:
        fitted = json.loads(Path(args.ffn_costs).read_text())["ffn_costs"]
        engine_fields["ffn_costs"] = tuple(FFNCost(**row) for row in fitted)
    for shape, decay in itertools.product(args.shape, args.gate_decay):
        cfg, weights = random_weights(shape, dtype, args.inactive if args.sparse else None, decay)
        model = Transformer(cfg, weights, EngineConfig.resolve(args.kernels))
        del weights
        pset, about = build(model, args.rank, args.s, args.calib_tokens, args.guard) if args.sparse else (None, {})
        dense = {}
        modes = [None, "union", *args.topk] if args.sparse else [None]
        for batch, projections, check, attention, gate_up, sparse in itertools.product(
                args.batch, args.projections, args.steps_per_check, attention_tiles, gate_up_tiles, modes):
            if sparse and gate_up != gate_up_tiles[0] \
                    or sparse not in (None, "union") and batch == 1:
                continue
            engine = EngineConfig.resolve(args.kernels, projections=projections, steps_per_check=check,
                                          ffn_policy=args.ffn_policy, gate_up_tile=gate_up,
                                          attention_tile=attention, **engine_fields)
            mode = "dense" if not sparse else "union" if sparse == "union" else f"topk{sparse}"
            tile_name = ("" if gate_up is None else f"_gateup{gate_up.rows}x{gate_up.num_warps}") + (
                "_attnxla" if attention is None
                else f"_attn{attention.block}x{attention.num_warps}x{attention.num_stages}")
            profile = args.profile and (f"{args.profile}/{shape}_decay{decay}_b{batch}_{projections}_c{check}"
                                        f"{tile_name}_{mode}")
            row = {**bench_model(with_engine(model, engine), batch, args.prompt_len, args.new_tokens, args.repeats,
                                 pset if sparse else None, profile, None if sparse == "union" else sparse),
                   **(about if sparse else {}),
                   "shape": shape, "gate_decay": decay,
                   "gate_up_tile": None if gate_up is None else {k: v for k, v in dataclasses.asdict(gate_up).items()
                                                                 if k != "source"},
                   "attention_tile": None if attention is None else {
                       k: v for k, v in dataclasses.asdict(attention).items() if k != "source"}}
            if projections == "mgpu":
                row["mgpu_tile"] = engine.mgpu_tile.kernel_args()
            key = (batch, projections, check, attention, gate_up)
            if not sparse:
                dense[key] = row
            else:  # against the dense run of the same model with the same engine
                row["speedup_vs_dense"] = round(row["decode_tokens_per_s"] / dense[key]["decode_tokens_per_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    copy_rate = harness.torch_copy_rate()  # after the timings, so torch's CUDA context cannot touch them
    for row in rows if copy_rate else []:
        row["fraction_of_copy"] = round(row["decode_tb_per_s"] * 1e12 / copy_rate, 3)
    rep = harness.report(args, copy_tb_per_s=copy_rate and round(copy_rate / 1e12, 3), runs=rows)
    harness.save(rep, args.json_out)
    print(f"\n{rep['device']}  torch copy {rep['copy_tb_per_s']} TB/s  commit {rep['commit']}")
    print(harness.table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
