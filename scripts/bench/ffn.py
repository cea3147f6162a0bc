"""One FFN layer at decode (bf16, B sequences): dense XLA vs the predictor-guarded Pallas kernels, on the GPU.

For each shape, batch size B and true sparsity s, random weights for `--layers` separate layers (so the timed
loop streams from device memory, not from the 50 MB L2), x ~ N(0, 1) [B, d] and a FATReLU threshold at the
s-quantile of each layer's gate, so a fraction 1 - s of (sequence, neuron) pairs is active; each sequence's
candidates are its active neurons plus random inactive ones, `--extra` of d_ff (the predictor's false
positives), and the kernels read the union over the batch. Timed, per layer (median of repeats of one jitted
program over all layers, block_until_ready):
  dense    the model's XLA FFN (gate, up, act, down)
  kernels  the sparse kernels on a given neuron list (what the goal counts)
  +compact candidate mask -> list (the Pallas compaction programs; --compact xla: XLA's) + kernels: the
           guarded FFN as decode runs it
  +pred    + a rank-r SVD predictor's two products (as the engine routes them) and the comparison, from x
           (for B > 1 the bias makes the union every sequence's candidate set)
Useful bytes = candidate rows of W_gate + active rows of W_up and W_down_t (for B > 1: of the union); their
rate is given as a fraction of a torch copy measured in the same run. The kernels run with the tuned
configuration for the batch size (`pallas_kernels.tuning.SPARSE_FFN`), each variant of --variants with its
tuned or default configuration, or the fastest of a sweep (--sweep), which is how that table's rows were chosen.

  python -m scripts.bench.ffn --shape llama2-7b qwen2-7b --sparsity 0.5 0.8 0.9 0.95 [--batch 1 4]
                              [--variants mma stream] [--sweep] [--json-out F]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compaction, reference, tuning
from pallas_kernels import sparse_ffn as sf
from pallas_kernels.compaction import Candidates
from pallas_kernels.reference import Activation
from scripts.bench import harness
from scripts.bench.harness import looped
from svdsparse_jax.config import named_config
from svdsparse_jax.engine import EngineConfig, project

F32 = jnp.float32
COLUMNS = {"shape": "shape", "batch": "batch", "variant": lambda r: r["config"]["variant"],
           "sparsity": "true_sparsity", "cand": lambda r: f"{r['candidates']:.3f}",
           "active": lambda r: f"{r['active']:.3f}",
           "dense us": "dense_us", "kernels us": "kernels_us", "+compact us": "compact_us", "+pred us": "pred_us",
           "x kernels": "speedup_kernels", "x pred": "speedup_with_predictor", "useful/copy": "useful_fraction_of_copy"}


def timeit(fn, *args, repeats: int) -> float:
    """Median seconds of one pass of a `looped` function."""
    return harness.median_s(fn, *args, repeats=repeats) / harness.INNER


@dataclasses.dataclass
class Layers:
    """Per-layer weights, thresholds, candidate masks and lists for one (shape, sparsity)."""

    x: jax.Array
    weights: list  # [(w_gate, w_up, w_down_t)]
    acts: list  # Activation per layer
    masks: list  # bool [B, d_ff]
    predictors: list  # (a [r, d], b [d_ff, r], bias [d_ff]) giving exactly `masks`
    active: list  # int: neurons active in some sequence among its candidates (rows of W_up / W_down_t read)


def make_layers(cfg, n_layers: int, sparsity: float, extra: float, rank: int, seed: int = 0,
                batch: int = 1) -> Layers:
    d, d_ff = cfg.d_model, cfg.d_ff
    key = jax.random.key(seed)
    x = jax.random.normal(jax.random.fold_in(key, 0), (batch, d), jnp.bfloat16)
    rng = np.random.default_rng(seed)
    out = Layers(x, [], [], [], [], [])
    for layer in range(n_layers):
        ks = jax.random.split(jax.random.fold_in(key, layer + 1), 5)
        w = [(jax.random.normal(k, (d_ff, d), F32) / np.sqrt(d)).astype(jnp.bfloat16) for k in ks[:3]]
        gate = np.asarray(jnp.einsum("bd,fd->bf", x, w[0], preferred_element_type=F32))
        threshold = float(np.quantile(gate, sparsity))
        act = Activation("fatrelu", threshold)
        active = gate >= threshold
        cand = active | (rng.random(active.shape) < extra / sparsity)  # about extra * d_ff false positives
        union = cand.any(0)
        # A predictor whose scores are random but whose bias makes exactly the union positive for every
        # sequence (its cost is real; scores are O(1) against the bias's 1e3).
        a = (jax.random.normal(ks[3], (rank, d), F32) / np.sqrt(d)).astype(jnp.bfloat16)
        b = (jax.random.normal(ks[4], (d_ff, rank), F32) / np.sqrt(rank)).astype(jnp.bfloat16)
        z = jnp.einsum("bd,rd->br", x, a, preferred_element_type=F32).astype(jnp.bfloat16)
        s = np.asarray(jnp.einsum("br,fr->bf", z, b, preferred_element_type=F32))[0]
        bias = jnp.asarray(np.where(union, 1e3, -1e3) - s, F32)
        out.weights.append(w)
        out.acts.append(act)
        out.masks.append(jnp.asarray(cand))
        out.predictors.append((a, b, bias))
        out.active.append(int((active & cand).any(0).sum()))
    return out


def dense_ffn(x, w, act: Activation):
    g = jnp.einsum("bd,fd->bf", x, w[0], preferred_element_type=F32)
    u = jnp.einsum("bd,fd->bf", x, w[1], preferred_element_type=F32)
    h = act.hidden(g, u).astype(x.dtype)
    return jnp.einsum("bf,fd->bd", h, w[2], preferred_element_type=F32)


def run_config(layers: Layers, cfg: sf.SparseFFNConfig, repeats: int, only_kernels: bool = False,
               interpret: bool = False, compact_impl: str = "pallas") -> dict:
    """Per-layer us of `cfg`: the kernels on given lists, + the compaction (the Pallas programs, or XLA's with
    compact_impl='xla'), + the predictor."""
    n = len(layers.weights)
    if compact_impl == "xla":
        compact = reference.compact
    else:
        compact = functools.partial(compaction.compact_pallas, interpret=interpret)
    engine = EngineConfig.resolve("interpret" if interpret else "pallas")
    lists = [compact(Candidates(mask=m)) for m in layers.masks]

    @looped
    def kernels(x, weights, lists):
        return sum(sf.sparse_ffn_indexed(x, tiles, counts, *w, own, act=act, cfg=cfg, interpret=interpret)[0]
                   for (tiles, counts, own), w, act in zip(lists, weights, layers.acts))

    @looped
    def with_compact(x, weights, masks):
        total = 0.0
        for m, w, act in zip(masks, weights, layers.acts):
            tiles, counts, own = compact(Candidates(mask=m))
            total = total + sf.sparse_ffn_indexed(x, tiles, counts, *w, own, act=act, cfg=cfg,
                                                  interpret=interpret)[0]
        return total

    @looped
    def with_predictor(x, weights, preds):
        total = 0.0
        for (a, b, bias), w, act in zip(preds, weights, layers.acts):
            z = project(engine, x, a).astype(x.dtype)  # the products as the engine routes the predictor's
            tiles, counts, own = compact(Candidates(scores=project(engine, z, b), bias=bias))  # + bias > 0 inside
            total = total + sf.sparse_ffn_indexed(x, tiles, counts, *w, own, act=act, cfg=cfg,
                                                  interpret=interpret)[0]
        return total

    kernels_us = timeit(kernels, layers.x, layers.weights, lists, repeats=repeats) / n * 1e6
    if only_kernels:
        return {"kernels_us": kernels_us}
    return {
        "kernels_us": kernels_us,
        "compact_us": timeit(with_compact, layers.x, layers.weights, layers.masks, repeats=repeats) / n * 1e6,
        "pred_us": timeit(with_predictor, layers.x, layers.weights, layers.predictors, repeats=repeats) / n * 1e6,
    }


def time_dense(layers: Layers, repeats: int) -> float:
    @looped
    def dense(x, weights):
        return sum(dense_ffn(x, w, act) for w, act in zip(weights, layers.acts))

    return timeit(dense, layers.x, layers.weights, repeats=repeats) / len(layers.weights) * 1e6


def sweep_configs(variants: list[str]) -> list:
    out = []
    if "stream" in variants:
        for rows, programs, warps in itertools.product((2, 4, 8), (132, 264, 396, 528), (2, 4, 8)):
            out.append(sf.SparseFFNConfig(variant="stream", rows=rows, programs=programs, num_warps=warps))
    if "mma" in variants:
        for rows, chunk, warps in itertools.product((16, 32, 64), (128, 256, 512), (4,)):
            for down_rows, down_cols, splits in ((32, 256, 8), (64, 128, 8), (32, 128, 16)):
                out.append(sf.SparseFFNConfig(variant="mma", rows=rows, chunk=chunk, num_warps=warps,
                                              down_rows=down_rows, down_cols=down_cols, splits=splits))
    for row in tuning.SPARSE_FFN:  # the tuned configurations, for comparison
        if row.config.variant not in variants:
            out.append(row.config)
    return out


def variant_config(variant: str, batch: int) -> sf.SparseFFNConfig:
    """The tuned configuration of `variant` for the batch size (tuning.SPARSE_FFN), else its defaults."""
    tuned = [row.config for row in tuning.SPARSE_FFN if row.config.variant == variant]
    fits = [row.config for row in tuning.SPARSE_FFN if row.config.variant == variant and batch <= row.max_batch]
    return (fits or tuned or [sf.SparseFFNConfig(variant=variant)])[0]


def fit_costs(rows: list[dict], rank: int, source: str) -> list[dict]:
    """Per batch size, the policy's cost model (`tuning.FFNCost`) fitted to the rows: the dense rate from the
    dense times, and a least-squares line through (useful bytes + predictor bytes, the guarded FFN's time with
    predictor and compaction) over the rows' shapes and sparsities (at least two points per batch size)."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        if len({r["true_sparsity"] for r in mine}) < 2:
            continue
        dense_bytes = [3 * named_config(r["shape"]).d_ff * named_config(r["shape"]).d_model * 2 for r in mine]
        pred_bytes = [rank * (named_config(r["shape"]).d_model + named_config(r["shape"]).d_ff) * 2 for r in mine]
        x = np.asarray([r["useful_mb"] * 1e6 + p for r, p in zip(mine, pred_bytes)])
        y = np.asarray([r["pred_us"] for r in mine])
        slope, fixed = np.polyfit(x, y, 1)  # us per byte, us
        if slope <= 0:  # noise larger than the signal: no model for this batch size
            continue
        dense = np.mean([b / (r["dense_us"] * 1e-6) for b, r in zip(dense_bytes, mine)]) / 1e12
        out.append({"max_batch": batch, "dense_tb_s": float(f"{dense:.4g}"),
                    "sparse_fixed_us": float(f"{max(fixed, 0.0):.4g}"),
                    "sparse_tb_s": float(f"{1e-6 / slope:.4g}"), "source": source})  # bytes/us -> TB/s
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["llama2-7b", "qwen2-7b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95])
    ap.add_argument("--variants", nargs="+", choices=sf.VARIANTS,
                    help="time these kernel variants (default: the tuned one for each batch size)")
    ap.add_argument("--extra", type=float, default=0.03, help="false-positive candidates, fraction of d_ff")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sweep", action="store_true", help="time many kernel configurations at the first shape, "
                    "batch size and sparsity, then use the fastest for the table")
    ap.add_argument("--sweep-layers", type=int, default=8)
    ap.add_argument("--sweep-variants", nargs="+", default=list(sf.VARIANTS), choices=sf.VARIANTS)
    ap.add_argument("--compact", default="pallas", choices=["pallas", "xla"],
                    help="the compaction in +compact / +pred: the Pallas program or XLA's version")
    ap.add_argument("--interpret", action="store_true", help="kernels in interpret mode (a CPU smoke test)")
    harness.add_report_args(ap)
    args = ap.parse_args()
    best = None  # without a sweep: the tuned configuration for each batch size
    sweep = []
    if args.sweep:
        layers = make_layers(named_config(args.shape[0]), args.sweep_layers, args.sparsity[0], args.extra,
                             args.rank, batch=args.batch[0])
        for cfg in sweep_configs(args.sweep_variants):
            try:
                t = run_config(layers, cfg, max(5, args.repeats // 4), True, args.interpret)["kernels_us"]
            except Exception as e:  # a configuration the compiler rejects is reported, not fatal
                print(f"  {cfg}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            sweep.append({"config": dataclasses.asdict(cfg), "kernels_us": round(t, 2)})
            print(f"  {t:8.2f} us  {cfg}", flush=True)
        best = sf.SparseFFNConfig(**min(sweep, key=lambda r: r["kernels_us"])["config"])
        print(f"fastest: {best}", flush=True)
        del layers
    rows = []
    for shape, batch in itertools.product(args.shape, args.batch):
        mcfg = named_config(shape)
        engine = EngineConfig.resolve("interpret" if args.interpret else "pallas")
        configs = ([best] if best else [variant_config(v, batch) for v in args.variants] if args.variants
                   else [engine.sparse_ffn_config(batch) or variant_config("mma", batch)])
        for s in args.sparsity:
            layers = make_layers(mcfg, args.layers, s, args.extra, args.rank, batch=batch)
            dense_us = time_dense(layers, args.repeats)
            cand = float(np.mean([int(m.any(0).sum()) for m in layers.masks]))
            active = float(np.mean(layers.active))
            useful = (cand + 2 * active) * mcfg.d_model * 2
            for cfg in configs:
                t = run_config(layers, cfg, args.repeats, interpret=args.interpret, compact_impl=args.compact)
                row = {"shape": shape, "batch": batch, "config": dataclasses.asdict(cfg), "compact": args.compact,
                       "true_sparsity": s, "candidates": cand / mcfg.d_ff, "active": active / mcfg.d_ff,
                       "dense_us": round(dense_us, 2), **{k: round(v, 2) for k, v in t.items()},
                       "speedup_kernels": round(dense_us / t["kernels_us"], 2),
                       "speedup_with_predictor": round(dense_us / t["pred_us"], 2),
                       "useful_mb": round(useful / 1e6, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del layers
    copy_bw = harness.torch_copy_rate()  # after the timings, so torch's CUDA context cannot touch them
    for row in rows if copy_bw else []:
        mcfg = named_config(row["shape"])
        row["useful_fraction_of_copy"] = round(row["useful_mb"] * 1e6 / (row["kernels_us"] * 1e-6) / copy_bw, 3)
        row["dense_fraction_of_copy"] = round(3 * mcfg.d_ff * mcfg.d_model * 2 / (row["dense_us"] * 1e-6) / copy_bw,
                                              3)
    report = harness.report(args, copy_tb_per_s=copy_bw and round(copy_bw / 1e12, 3),
                            swept_config=best and dataclasses.asdict(best), runs=rows, sweep=sweep)
    report["ffn_costs"] = fit_costs(rows, args.rank, f"{report['device']} {report['date']} commit "
                                                       f"{report['commit']}: {report['command']}")
    for cost in report["ffn_costs"]:
        print(json.dumps(cost), flush=True)
    harness.save(report, args.json_out)
    print(f"\n{report['device']}, torch copy {report['copy_tb_per_s']} TB/s; config {best or 'tuned'}")
    print(harness.table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # leave room for torch's copy buffers
    sys.exit(main())
