"""The torch bridge on a CUDA (or NPU) device: (1) the parity check of tests/test_torch_bridge.py on the bundled
model, run on that device (patched transformers vs the JAX sparse model: candidates, active sets, logits, tokens
over 32 greedy decode steps, f32); (2) decode tokens/s of a transformers LLaMA2-7B-shaped model (random bf16
weights, FATReLU threshold at the 0.9 normal quantile of the gate's spread) patched with rank-256 predictors
vs the same model unpatched (eager transformers, greedy, batch 1).

The speed predictors are the top-256 SVD of each layer's W_gate with per-neuron biases set on random tokens so
that about `--candidates` of the neurons are candidates (random weights have no low-rank structure, so they
are not accurate; only the bytes they make the executor read matter here, and the measured candidate and
active fractions are reported).

`--cache static` gives both models transformers' static KV cache, with which `generate` compiles the decode step
(torch.compile, CUDA graphs on a GPU): the setting the sync-free path is for, as it has no host synchronisation
to break the graph. `--mode sync_free` runs the executor's sync-free path with capacity `--candidates` x
`--margin` of d_ff (rounded
up to 64 rows; the dropped candidates are reported as overflow).

  python -m scripts.bench.torch_bridge [--device cuda] [--mode exact|sync_free] [--margin 1.5] [--cache dynamic|static]
                                       [--variants topk:copy prefix:fused ...] [--json-out F]
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
from torch_npu_bridge.executor import DEFAULT_GATHER, DEFAULT_SELECTION, GATHERS, SELECTIONS


def parity(device: str) -> dict:
    import jax.numpy as jnp
    from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split
    from svdsparse_jax.convert import load_model
    from svdsparse_jax.model import Transformer
    from svdsparse_jax.predictors import BuildConfig, build_predictors, save_predictors
    from torch_npu_bridge.parity import decode_parity

    lm = load_model(BUNDLED_MODEL, jnp.float32)
    model = Transformer(lm.cfg, lm.weights)
    pset = build_predictors(model, corpus_split("calib")[:4096], BuildConfig(ranks=64, value=0.7, tokens=4096),
                            progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        save_predictors(Path(tmp) / "pred", pset, lm.cfg, lm.fingerprint)
        prompt = corpus_split("heldout")[1000:1024].astype(np.int32)
        return decode_parity(lm, model, pset.layers, Path(tmp) / "pred", prompt, 32, device)


def speed(device: str, candidates: float, new_tokens: int, repeats: int, mode: str = "exact",
          margin: float = 1.5, cache: str = "dynamic", variants: tuple[tuple[str, str], ...] = (
              (DEFAULT_SELECTION, DEFAULT_GATHER),),
          layers: int = 32) -> dict:
    """Tokens/s of the patched model for each (selection, gather) of the sync-free path (one variant, ignored, for
    the exact path) and of the model unpatched, on one random model and one predictor set."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from torch_npu_bridge.executor import GuardedFFN, round_capacity
    from torch_npu_bridge.factors import LayerFactors
    from torch_npu_bridge.hf_patch import PatchedMLP, guarded_modules, overflow_count, unpatch

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, hidden_act="relu", max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    threshold = statistics.NormalDist().inv_cdf(0.9) * cfg.initializer_range * cfg.hidden_size ** 0.5
    calib = torch.randint(0, cfg.vocab_size, (1, 256), device=device)
    inputs = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0][0].float()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    torch.set_grad_enabled(False)
    capacity = round_capacity(candidates, cfg.intermediate_size, margin) if mode == "sync_free" else None
    factors = []
    for i, layer in enumerate(model.model.layers):  # top-256 SVD of W_gate; bias for `candidates` per neuron
        w = layer.mlp.gate_proj.weight.float()
        u, s, v = torch.svd_lowrank(w, q=256, niter=2)
        a, b = v.T, u * s
        scores = inputs[i] @ a.T @ b.T  # [256 tokens, d_ff]
        bias = -torch.quantile(scores, 1 - candidates, dim=0)
        factors.append(LayerFactors(a.cpu().numpy(), b.cpu().numpy(), bias.cpu().numpy()))
    prompt = torch.randint(0, cfg.vocab_size, (1, 64), device=device)

    kw = harness.hf_cache_kwargs(cache)

    def timed() -> float:
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, **kw)
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize() if device == "cuda" else None
                t = time.perf_counter()
                model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
                torch.cuda.synchronize() if device == "cuda" else None
                times.append(time.perf_counter() - t)
        return new_tokens / statistics.median(times)

    runs = []
    for selection, gather in variants if mode == "sync_free" else (("topk", "copy"),):
        for layer, f in zip(model.model.layers, factors):
            mlp = layer.mlp
            layer.mlp = PatchedMLP(mlp, GuardedFFN(mlp.gate_proj.weight, mlp.up_proj.weight,
                                                   mlp.down_proj.weight.T.contiguous(), f, "fatrelu", threshold,
                                                   mode, capacity, selection, gather))
        torch._dynamo.reset()  # a compiled step of the last variant must not be reused
        tps = timed()  # without recording: a record copies to the host every layer
        runs.append({"selection": selection, "gather": gather, "patched_tokens_per_s": round(tps, 2),
                     "overflow": overflow_count(model)[0]})
        print(json.dumps(runs[-1]), flush=True)
        if len(runs) == 1:
            for g in guarded_modules(model):
                g.record = []
            with torch.no_grad():  # one more generation, recorded, for the candidate and active fractions
                model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            recs = [r for g in guarded_modules(model) for r in g.record]
            cand = float(np.mean([len(r[0]) for r in recs])) / cfg.intermediate_size
            active = float(np.mean([len(r[1]) for r in recs])) / cfg.intermediate_size
        unpatch(model)
    torch._dynamo.reset()
    dense_tps = timed()
    for r in runs:
        r["speedup"] = round(r["patched_tokens_per_s"] / dense_tps, 3)
    return {"shape": "llama2-7b" if layers == 32 else f"llama2-7b, {layers} layers", "dtype": "bfloat16",
            "mode": mode, "cache": cache, "capacity": capacity,
            "new_tokens": new_tokens, "prompt": 64,
            "threshold": round(threshold, 4), "candidate_fraction": round(cand, 4),
            "active_fraction": round(active, 4), "unpatched_tokens_per_s": round(dense_tps, 2), "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--candidates", type=float, default=0.13)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--mode", choices=("exact", "sync_free"), default="exact")
    ap.add_argument("--margin", type=float, default=1.5)
    ap.add_argument("--cache", choices=("dynamic", "static"), default="dynamic")
    ap.add_argument("--layers", type=int, default=32, help="LLaMA2-7B's 32 layers, or fewer for a dry run")
    ap.add_argument("--variants", nargs="+", default=[f"{DEFAULT_SELECTION}:{DEFAULT_GATHER}"],
                    metavar="SELECTION:GATHER",
                    choices=[f"{s}:{g}" for s in SELECTIONS for g in GATHERS],
                    help="the sync-free path's row selection and gather to time, each in its own run "
                         "(torch_npu_bridge.executor)")
    harness.add_report_args(ap)
    args = ap.parse_args()
    import transformers
    report = harness.report(args, torch_device=torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                            torch=torch.__version__, transformers=transformers.__version__)
    if not args.skip_parity:
        report["parity"] = parity(args.device)
        print(json.dumps(report["parity"]), flush=True)
    report["speed"] = speed(args.device, args.candidates, args.new_tokens, args.repeats, args.mode,
                            args.margin, args.cache, tuple(tuple(v.split(":")) for v in args.variants), args.layers)
    print(json.dumps(report["speed"]), flush=True)
    harness.save(report, args.json_out)
    return 0 if args.skip_parity or report["parity"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
