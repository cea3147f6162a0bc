"""Predictors off their calibration domain (docs/RESULTS.md, "Off the calibration domain"): the bundled model's
predictors, calibrated on the standard library, evaluated on its held-out split (in domain) and on Python code
that is not the standard library (out of domain: the installed sources of OOD_PACKAGES). Compares the paper's
setting (rank d/4, s x true sparsity) with other calibration targets (recall, importance loss), ranks
allocated per layer by whitened gate energy, a mixed calibration set (the stdlib plus MIX_PACKAGES' sources)
and a trained MLP at equal predictor bytes; then takes the paper's setting apart out of domain: per layer,
per neuron and per token.

  python -m scripts.ood [--out docs/results/ood.json] [--max-windows 64]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split
from svdsparse_jax.calibration import calibration_windows, layer_inputs, layer_statistics
from svdsparse_jax.convert import load_model
from svdsparse_jax.evaluate import _stream_pass, evaluate_predictors, pick_windows
from svdsparse_jax.model import Transformer, ffn_hidden, linear
from svdsparse_jax.engine import XLA
from svdsparse_jax.predictors.build import BuildConfig, PredictorSet, calibrate_layer, layer_factors
from svdsparse_jax.predictors.thresholds import layer_target

OOD_PACKAGES = ("flax", "optax")  # held-out code outside the standard library
MIX_PACKAGES = ("numpy",)  # extra calibration code for the mixed set (not in the out-of-domain text)


def package_tokens(tokenizer, packages: tuple[str, ...], eos: int) -> tuple[np.ndarray, dict]:
    """The installed .py sources of `packages` (files in sorted order, each followed by EOS) as one token
    stream, with each package's version and file count."""
    ids, facts = [], {}
    for name in packages:
        dist = importlib.metadata.distribution(name)
        files = sorted(str(f) for f in (dist.files or []) if str(f).endswith(".py") and str(f).startswith(name))
        texts = [Path(dist.locate_file(f)).read_text(encoding="utf-8", errors="replace") for f in files]
        for chunk in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(chunk + [eos])
        facts[name] = {"version": dist.version, "files": len(files)}
    return np.asarray(ids, np.int64), facts


def energy_ranks(model: Transformer, stats, budget: int, step: int = 8) -> tuple[int, ...]:
    """Ranks per layer summing to `budget`: `step` at a time to the layer whose whitened gate spectrum (the
    eigenvalues of L^T W_g^T W_g L, S = L L^T) gains the largest share of its own energy from it."""
    shares = []
    for st in stats:
        w = np.asarray(model.layers[st.layer].ffn.w_gate[...], np.float64)
        s = np.asarray(st.gram, np.float64)
        s = s + 1e-3 * np.mean(np.diag(s)) * np.eye(len(s))
        chol = np.linalg.cholesky(s)
        ev = np.sort(np.linalg.eigvalsh(chol.T @ (w.T @ w) @ chol))[::-1]
        shares.append(np.concatenate([[0.0], np.cumsum(ev) / ev.sum()]))
    ranks = [step] * len(stats)
    while sum(ranks) < budget:
        gain = [sh[min(r + step, len(sh) - 1)] - sh[r] for sh, r in zip(shares, ranks)]
        ranks[int(np.argmax(gain))] += step
    return tuple(ranks)


def build(model, stats, method: str, ranks, rule: str, value: float, dtype) -> PredictorSet:
    cfg = model.cfg
    bc = BuildConfig(method=method, ranks=ranks, rule=rule, value=value)
    layers, info = [], []
    for st in stats:
        target = layer_target(rule, value, st.layer, st.true_sparsity)
        pred = layer_factors(st, model.layers[st.layer], cfg, bc, target, dtype)
        pred, facts = calibrate_layer(pred, st, model.layers[st.layer], target)
        layers.append(pred)
        info.append(facts)
    return PredictorSet(method, layers, {"ranks": ranks, "rule": rule, "value": value}, info)


@jax.jit
def _margin(logits):
    top2 = jax.lax.top_k(jax.nn.softmax(logits, -1), 2)[0]
    return top2[..., 0] - top2[..., 1]


def dense_margins(model: Transformer, windows: np.ndarray) -> np.ndarray:
    """The dense model's top-1 probability minus its top-2 at every predicted position [n, W - 1]."""
    from svdsparse_jax import kv_cache
    out = []
    for k in range(0, len(windows), 4):
        x = jnp.asarray(windows[k:k + 4], jnp.int32)
        cache = kv_cache.init_cache(model.cfg, jnp.zeros(len(x), jnp.int32), x.shape[1], model.dtype)
        states, _ = model(x, cache, jnp.int32(0))
        out.append(np.asarray(_margin(model.logits(states[:, :-1]))))
    return np.concatenate(out)


def diagnose(model: Transformer, pset: PredictorSet, windows: np.ndarray) -> dict:
    """Where a predictor set loses top-1 agreement: per layer (the predictors on that layer alone), per neuron
    (which share of the dropped importance the worst 1% and 10% of neurons carry) and per token (the dense
    model's top-1 margin at the positions where the sparse model's top-1 differs)."""
    cfg = model.cfg
    dense_lp, dense_top, _, _ = _stream_pass(model, None, windows, 4)
    _, top, _, _ = _stream_pass(model, pset.layers, windows, 4)
    alone = []
    for i in range(cfg.n_layers):
        only = [p if j == i else None for j, p in enumerate(pset.layers)]
        alone.append(float(np.mean(_stream_pass(model, only, windows, 4)[1] == dense_top)))
    neurons = []
    for i, x in layer_inputs(model, windows):
        ffn = model.layers[i].ffn
        x = x.reshape(-1, cfg.d_model)
        gate = linear(XLA, x, ffn.w_gate[...])
        h = ffn_hidden(cfg, gate, linear(XLA, x, ffn.w_up[...]))
        m2 = (jnp.abs(h) * jnp.linalg.norm(ffn.w_down_t[...].astype(jnp.float32), axis=1)[None, :]) ** 2
        dropped = np.asarray(jnp.sum(jnp.where(pset.layers[i].predict(x, gate), 0.0, m2), 0), np.float64)
        worst = np.sort(dropped)[::-1]
        neurons.append({"layer": i, "loss": float(dropped.sum() / float(jnp.sum(m2))),
                        "top1pct_share": float(worst[:max(1, cfg.d_ff // 100)].sum() / max(worst.sum(), 1e-30)),
                        "top10pct_share": float(worst[:cfg.d_ff // 10].sum() / max(worst.sum(), 1e-30))})
    margin = dense_margins(model, windows)
    differ = top != dense_top
    return {"top1_agreement": float(np.mean(~differ)), "layer_alone_agreement": alone, "neurons": neurons,
            "disagreements": int(differ.sum()), "positions": int(differ.size),
            "disagree_margin_median": float(np.median(margin[differ])) if differ.any() else None,
            "margin_median": float(np.median(margin)),
            "disagreements_below_margin_0.1": float(np.mean(margin[differ] < 0.1)) if differ.any() else None,
            "positions_below_margin_0.1": float(np.mean(margin < 0.1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/ood.json")
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="run only these configurations and merge them into an existing --out (no diagnosis)")
    args = ap.parse_args()
    t0 = time.time()
    lm = load_model(BUNDLED_MODEL, jnp.float32)
    cfg, model = lm.cfg, Transformer(lm.cfg, lm.weights)
    eos = cfg.eos_ids[0]
    ood, ood_facts = package_tokens(lm.tokenizer, OOD_PACKAGES, eos)
    mix, mix_facts = package_tokens(lm.tokenizer, MIX_PACKAGES, eos)
    stdlib = calibration_windows(corpus_split("calib"), 512, args.calib_tokens)
    half = calibration_windows(corpus_split("calib"), 512, args.calib_tokens // 2)
    mixed = np.concatenate([half, pick_windows(mix, 512, len(half))])
    # the two calibration halves (build / calibrate) alternate windows, so both hold both sources
    mixed = mixed[np.argsort(np.r_[np.arange(len(half)) * 2, np.arange(len(half)) * 2 + 1])]
    big = calibration_windows(corpus_split("calib"), 512, 4 * args.calib_tokens)
    stats = {"stdlib": list(layer_statistics(model, stdlib)), "mixed": list(layer_statistics(model, mixed))}
    stats["stdlib x4"] = lambda: list(layer_statistics(model, big))  # built when a configuration asks
    d4 = cfg.d_model // 4
    alloc = energy_ranks(model, stats["stdlib"], d4 * cfg.n_layers)
    print(f"energy-allocated ranks: {alloc} ({time.time() - t0:.0f} s)", flush=True)
    configs = {  # name: (calibration, method, ranks, rule, value)
        "paper s=0.5": ("stdlib", "whitened", d4, "s", 0.5),
        "paper s=0.6": ("stdlib", "whitened", d4, "s", 0.6),
        "paper s=0.7": ("stdlib", "whitened", d4, "s", 0.7),
        "recall 0.99": ("stdlib", "whitened", d4, "recall", 0.99),
        "recall 0.995": ("stdlib", "whitened", d4, "recall", 0.995),
        "loss 0.03": ("stdlib", "whitened", d4, "loss", 0.03),
        "loss 0.01": ("stdlib", "whitened", d4, "loss", 0.01),
        "loss 0.003": ("stdlib", "whitened", d4, "loss", 0.003),
        "loss 0.01 energy ranks": ("stdlib", "whitened", alloc, "loss", 0.01),
        "loss 0.003 energy ranks": ("stdlib", "whitened", alloc, "loss", 0.003),
        "loss 0.01 mixed": ("mixed", "whitened", d4, "loss", 0.01),
        "loss 0.003 mixed": ("mixed", "whitened", d4, "loss", 0.003),
        "recall 0.99 energy ranks": ("stdlib", "whitened", alloc, "recall", 0.99),
        "recall 0.99 mixed": ("mixed", "whitened", d4, "recall", 0.99),
        "recall 0.995 mixed": ("mixed", "whitened", d4, "recall", 0.995),
        "paper s=0.7 mixed": ("mixed", "whitened", d4, "s", 0.7),
        "recall 0.99 x4 tokens": ("stdlib x4", "whitened", d4, "recall", 0.99),
        "recall 0.995 x4 tokens": ("stdlib x4", "whitened", d4, "recall", 0.995),
        "paper s=0.7 x4 tokens": ("stdlib x4", "whitened", d4, "s", 0.7),
        "mlp recall 0.99 x4 tokens": ("stdlib x4", "mlp", d4, "recall", 0.99),
    }
    if args.only:
        configs = {n: configs[n] for n in args.only}
    sets = {}
    for name, (calib, method, ranks, rule, value) in configs.items():
        if callable(stats[calib]):
            stats[calib] = stats[calib]()
        sets[name] = build(model, stats[calib], method, ranks, rule, value, model.dtype)
        print(f"built {name} ({time.time() - t0:.0f} s)", flush=True)
    report = {"meta": {"ood_packages": ood_facts, "mix_packages": mix_facts, "ood_tokens": len(ood),
                       "calibration_tokens": args.calib_tokens, "windows": args.max_windows, "window": 512,
                       "energy_ranks": alloc, "dtype": "float32"}, "domains": {}}
    for domain, tokens in (("in-domain", corpus_split("heldout")), ("out-of-domain", ood)):
        reports = evaluate_predictors(model, sets, tokens, 512, args.max_windows)
        report["domains"][domain] = {n: {"summary": r["summary"], "layers": r["layers"]} for n, r in reports.items()}
        print(f"evaluated {domain} ({time.time() - t0:.0f} s)", flush=True)
    report["margins"] = {}  # how often the dense model's top-1 is a near tie, in each domain
    for domain, tokens in (("in-domain", corpus_split("heldout")), ("out-of-domain", ood)):
        m = dense_margins(model, pick_windows(tokens, 512, args.max_windows))
        report["margins"][domain] = {"median": float(np.median(m)), "below_0.1": float(np.mean(m < 0.1))}
    report["meta"]["seconds"] = round(time.time() - t0, 1)
    if args.only:  # merged into the full run's report
        full = json.loads(Path(args.out).read_text())
        for domain, reports in report["domains"].items():
            full["domains"][domain].update(reports)
        full["margins"] = report["margins"]
        full["meta"].setdefault("added", []).append({"configurations": args.only, "seconds": report["meta"]["seconds"]})
        report = full
    else:
        windows = pick_windows(ood, 512, args.max_windows)
        report["diagnosis"] = {n: diagnose(model, sets[n], windows) for n in ("paper s=0.7", "loss 0.003")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))


def table(report: dict) -> str:
    head = ("| configuration | domain | predicted sparsity | effective sparsity | recall | ppl increase | "
            "top-1 agreement | predictor cost |\n|---|---|---|---|---|---|---|---|")
    rows = []
    names = list(report["domains"]["in-domain"])
    for name in names:
        for domain in ("in-domain", "out-of-domain"):
            s = report["domains"][domain][name]["summary"]
            rows.append(f"| {name} | {domain} | {s['predicted_sparsity']:.4f} | {s['effective_sparsity']:.4f} | "
                        f"{s['recall']:.4f} | {100 * s['ppl_increase']:+.2f}% | {s['top1_agreement']:.4f} | "
                        f"{s['predictor_cost']:.4f} |")
    return head + "\n" + "\n".join(rows)


if __name__ == "__main__":
    main()
