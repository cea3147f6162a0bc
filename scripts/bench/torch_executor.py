"""Decode tokens/s of the bundled model in transformers: unpatched vs the torch executor's exact path (two host
synchronisations per layer) vs its sync-free path (capacity d_ff, and the set's measured capacity at batch 1),
batch 1, greedy, f32, with every path's tokens checked against the unpatched model's (the predictors change the
model, so a differing token is reported, not hidden) and against the exact path's (the sync-free path must match
it while nothing overflows). Predictors: whitened SVD, rank 64, built on 4096 calibration tokens (as the tests).
Also the FFN alone: microseconds per decode token for all layers' MLPs, on the inputs the model saw while decoding
(the bundled model is small enough that attention and generate's own work dominate tokens/s).
`--threads` sets torch's CPU threads (default 1: on a shared 2-core machine two threads wait on each other's
spin barriers, and every path drops to about 2-4 tok/s).

  python -m scripts.bench.torch_executor [--device cpu|cuda] [--threads 1] [--new-tokens 64] [--repeats 5]
                                         [--cache dynamic|static]
                                         [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scripts.bench import harness


def build_predictors(out: Path) -> None:
    import jax.numpy as jnp
    from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split
    from svdsparse_jax.convert import load_model
    from svdsparse_jax.model import Transformer
    from svdsparse_jax.predictors import BuildConfig, build_predictors as build, save_predictors

    lm = load_model(BUNDLED_MODEL, jnp.float32)
    pset = build(Transformer(lm.cfg, lm.weights), corpus_split("calib")[:4096],
                 BuildConfig(ranks=64, value=0.7, tokens=4096), progress=False)
    save_predictors(out, pset, lm.cfg, lm.fingerprint)


def timed(model, prompt: torch.Tensor, new_tokens: int, repeats: int, device: str,
          cache: str = "dynamic") -> tuple[float, list[int]]:
    """(median tokens/s over `repeats` greedy generations after one warm-up, the generated tokens); cache
    "static": transformers' static KV cache, with which `generate` compiles the decode step."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kw = harness.hf_cache_kwargs(cache)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, **kw)
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
            sync()
            times.append(time.perf_counter() - t)
    return new_tokens / statistics.median(times), out[0, prompt.shape[1]:].tolist()


def ffn_us(mlps: list, inputs: list[list[torch.Tensor]], repeats: int, device: str) -> float:
    """Median over `repeats` of the microseconds per decode token that every layer's MLP takes on its inputs."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        sync()
        t = time.perf_counter()
        for mlp, xs in zip(mlps, inputs):
            for x in xs:
                mlp(x)
        sync()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times[1:]) / len(inputs[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--margin", type=float, default=1.5)
    ap.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                    help="static: transformers' static KV cache, with which generate compiles the decode step")
    harness.add_report_args(ap)
    args = ap.parse_args()
    import transformers

    from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split
    from torch_npu_bridge.hf_patch import guarded_modules, load_hf_model, overflow_count, patch_hf_model, unpatch

    torch.set_grad_enabled(False)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    report = harness.report(args, torch_device=torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                            torch=torch.__version__, transformers=transformers.__version__,
                            torch_threads=torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        pred = Path(tmp) / "pred"
        build_predictors(pred)
        model = load_hf_model(BUNDLED_MODEL, torch.float32).to(args.device)
        prompt = torch.as_tensor(corpus_split("heldout")[1000:1024].astype(np.int64)[None], device=args.device)
        rows = {}
        tps, ref = timed(model, prompt, args.new_tokens, args.repeats, args.device, args.cache)
        inputs = [[] for _ in model.model.layers]  # each MLP's decode inputs [1, 1, d]
        hooks = [layer.mlp.register_forward_pre_hook(
            lambda m, a, i=i: inputs[i].append(a[0].clone()) if a[0].shape[1] == 1 else None)
            for i, layer in enumerate(model.model.layers)]
        model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        for h in hooks:
            h.remove()
        rows["unpatched"] = {"tokens_per_s": round(tps, 2), "ffn_us_per_token": round(
            ffn_us([layer.mlp for layer in model.model.layers], inputs, args.repeats, args.device), 1)}
        print("unpatched", json.dumps(rows["unpatched"]), flush=True)  # each row as it comes: a cut run keeps them
        exact_tokens = None
        for name, kw in (("exact", {}), ("sync_free_dff", {"mode": "sync_free"}),
                         ("sync_free_measured", {"mode": "sync_free", "capacity": "measured", "margin": args.margin})):
            patch_hf_model(model, pred, device=args.device, **kw)
            tps, tokens = timed(model, prompt, args.new_tokens, args.repeats, args.device, args.cache)
            us = ffn_us(guarded_modules(model), inputs, args.repeats, args.device)
            row = {"tokens_per_s": round(tps, 2), "speedup_vs_unpatched": round(tps / rows["unpatched"]["tokens_per_s"],
                                                                               3),
                   "ffn_us_per_token": round(us, 1),
                   "ffn_speedup_vs_unpatched": round(rows["unpatched"]["ffn_us_per_token"] / us, 3),
                   "tokens_equal_unpatched": tokens == ref}
            if name == "exact":
                exact_tokens = tokens
            else:
                dropped, peak = overflow_count(model)
                row.update(tokens_equal_exact=tokens == exact_tokens, overflow=dropped,
                           capacities=[m.capacity for m in guarded_modules(model)], max_candidates=peak)
            rows[name] = row
            print(name, json.dumps(row), flush=True)
            unpatch(model)
        report["rows"] = rows
    print(json.dumps(report, indent=1))
    harness.save(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
