"""Packages a trained sparse run as the bundled default model: copies OUT/model of the L1 run into
svdsparse_jax/assets/default_model, with a README card and card.json (the card's numbers), and copies the
corpus' held-out and calibration token arrays to svdsparse_jax/assets/corpus so tests and the demo run offline.

  python -m scripts.bundled_model.card --sparse runs/sparse --dense runs/dense [--corpus data/corpus]

The card's full-set numbers come from the runs' metrics.json (bf16, computed on the training GPU). The
"check subset" numbers are recomputed here in float32 on the first 64 held-out windows; tests/test_bundled_model.py
recomputes them and compares.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from svdsparse_jax.assets import ASSETS
from svdsparse_jax.convert import load_model
from scripts.lab import evaluate_stream
from svdsparse_jax.generate import Generator
from svdsparse_jax.model import Transformer

CHECK_WINDOWS = 64
SAMPLE_PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n", "class Stack:\n    def __init__(self):\n"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparse", required=True)
    ap.add_argument("--dense", required=True)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--gpu-seconds", type=float, help="GPU time of the two training commands, for the card")
    args = ap.parse_args()
    sparse, dense, corpus = Path(args.sparse), Path(args.dense), Path(args.corpus)
    ms = json.loads((sparse / "metrics.json").read_text())
    md = json.loads((dense / "metrics.json").read_text())
    run = json.loads((sparse / "run.json").read_text())
    manifest = json.loads((corpus / "manifest.json").read_text())

    dest = ASSETS / "default_model"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(sparse / "model", dest)
    (ASSETS / "corpus").mkdir(parents=True, exist_ok=True)
    for name in ("heldout.npy", "calib.npy", "manifest.json"):
        shutil.copy2(corpus / name, ASSETS / "corpus" / name)

    lm = load_model(dest, jnp.float32)
    model = Transformer(lm.cfg, lm.weights)
    heldout = np.load(corpus / "heldout.npy")
    window = ms["window"]
    check = evaluate_stream(model, heldout, window, max_windows=CHECK_WINDOWS)
    gen = Generator(model)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = lm.tokenizer(prompt)["input_ids"]
        out = gen.generate([ids], 64).tokens[0]
        samples.append({"prompt": prompt, "completion": lm.tokenizer.decode(out, skip_special_tokens=True)})

    size_mb = sum(p.stat().st_size for p in dest.iterdir()) / 1e6
    card = {
        "params": ms["params"], "size_mb_on_disk": round(size_mb, 2), "model": run["model"], "train": run["train"],
        "tokens_seen": ms["tokens_seen"], "train_device": ms["device"],
        "heldout_full": {"ppl": ms["heldout"]["ppl"], "mean_sparsity": ms["heldout"]["mean_sparsity"],
                         "sparsity": ms["heldout"]["sparsity"], "tokens": ms["heldout"]["tokens"],
                         "dtype": ms["eval_dtype"]},
        "baseline_no_l1_heldout_full": {"ppl": md["heldout"]["ppl"], "mean_sparsity": md["heldout"]["mean_sparsity"],
                                        "sparsity": md["heldout"]["sparsity"]},
        "ppl_ratio_vs_baseline": ms["heldout"]["ppl"] / md["heldout"]["ppl"],
        "activation": ms["activation"], "act_threshold": ms["act_threshold"], "fatrelu_search": ms["fatrelu_search"],
        "check_subset": {"windows": CHECK_WINDOWS, "window": window, "dtype": "float32", "ppl": check.ppl,
                         "mean_sparsity": check.mean_sparsity, "sparsity": check.sparsity},
        "corpus": {"python": manifest["python"], "split_rule": manifest["split_rule"],
                   "tokens": {s: v["tokens"] for s, v in manifest["splits"].items()},
                   "modules": {s: v["modules"] for s, v in manifest["splits"].items()}},
        "gpu_seconds": args.gpu_seconds, "samples": samples,
    }
    (dest / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (dest / "README.md").write_text(render(card))
    print(json.dumps({k: card[k] for k in ("params", "size_mb_on_disk", "ppl_ratio_vs_baseline")}
                     | {"check_ppl": check.ppl, "check_sparsity": check.mean_sparsity}))
    return 0


def render(c: dict) -> str:
    m, t = c["model"], c["train"]
    per_layer = " | ".join(f"{s:.3f}" for s in c["heldout_full"]["sparsity"])
    base_layer = " | ".join(f"{s:.3f}" for s in c["baseline_no_l1_heldout_full"]["sparsity"])
    header = " | ".join(str(i) for i in range(len(c["heldout_full"]["sparsity"])))
    search = "\n".join(f"| {s['threshold']} | {s['calib_ppl']:.3f} | {s['calib_sparsity']:.4f} |"
                       for s in c["fatrelu_search"])
    samples = "\n\n".join(f"Prompt:\n```python\n{s['prompt']}```\nGreedy completion (64 tokens):\n```python\n"
                          f"{s['prompt']}{s['completion']}\n```" for s in c["samples"])
    gpu = f"{c['gpu_seconds']:.0f} s" if c["gpu_seconds"] else "see docs/BENCHMARKS.md"
    return f"""# svdsparse-jax default model: a small sparse ReLU/FATReLU LLaMA trained on Python's standard library

A {c['params'] / 1e6:.2f}M-parameter LLaMA-style model (model_type `llama`, `hidden_act` `{c['activation']}`,
threshold `hidden_act_param` = {c['act_threshold']}) whose FFN activations are
**{100 * c['heldout_full']['mean_sparsity']:.1f}% zero on held-out text**, trained by this project so that
predictor quality can be judged offline on real, learned activation sparsity. {c['size_mb_on_disk']:.1f} MB on disk
(bf16 safetensors + tokenizer).

## Shape
d_model {m['d_model']}, d_ff {m['d_ff']}, {m['n_layers']} layers, {m['n_heads']} heads (head_dim {m['head_dim']},
{m['n_kv_heads']} KV heads), vocabulary {m['vocab_size']} (byte-level BPE), tied embeddings, RoPE theta
{m['rope_theta']}, context {m['max_seq_len']} tokens. Weights bf16.

## Data
The `.py` sources of CPython {c['corpus']['python']}'s standard library, split by module with the fixed rule
`{c['corpus']['split_rule']}` (scripts/bundled_model/corpus.py): train {c['corpus']['modules']['train']} modules /
{c['corpus']['tokens']['train']:,} tokens, calibration {c['corpus']['modules']['calib']} /
{c['corpus']['tokens']['calib']:,}, held-out {c['corpus']['modules']['heldout']} / {c['corpus']['tokens']['heldout']:,}.
The tokenizer was trained on the train split only; documents are separated by `</s>`.

## Recipe
AdamW (b1 0.9, b2 0.95, weight decay {t['weight_decay']} on matrices), peak LR {t['lr']}, {t['warmup']} warm-up
steps then cosine decay to {t['min_lr_ratio']}x, gradient clipping {t['clip']}, {t['steps']} steps of
{t['batch']} x {t['seq_len']} tokens ({c['tokens_seen']:,} tokens), bf16 compute with f32 master weights, on one
{c['train_device']} ({gpu} for this and the baseline run together).
Sparsity (ProSparse recipe): ReLU gate plus an L1 penalty on the FFN activations whose factor starts at step
{t['l1_start']} and rises gradually, steered by the running sparsity towards {t['l1_target']}; then the
threshold shift: the largest FATReLU threshold whose calibration perplexity stays within 1% of ReLU's:

| threshold | calib ppl (64 windows) | calib sparsity |
|---|---|---|
{search}

## Results (held-out text, {c['heldout_full']['tokens']:,} tokens in windows of {m['max_seq_len']}, {c['heldout_full']['dtype']})

| model | held-out perplexity | mean FFN sparsity |
|---|---|---|
| this model (L1 + FATReLU {c['act_threshold']}) | {c['heldout_full']['ppl']:.4f} | {c['heldout_full']['mean_sparsity']:.4f} |
| same recipe without the L1 term (ReLU, not shipped) | {c['baseline_no_l1_heldout_full']['ppl']:.4f} | {c['baseline_no_l1_heldout_full']['mean_sparsity']:.4f} |

Perplexity ratio: {c['ppl_ratio_vs_baseline']:.4f} (the goal was at most 1.10).

Per-layer FFN sparsity (held-out):

| layer | {header} |
|---|{'---|' * len(c['heldout_full']['sparsity'])}
| this model | {per_layer} |
| without L1 | {base_layer} |

Check subset (what `tests/test_bundled_model.py` recomputes, float32 on CPU): the first
{c['check_subset']['windows']} held-out windows: perplexity {c['check_subset']['ppl']:.4f}, mean sparsity
{c['check_subset']['mean_sparsity']:.4f}.

## Samples (greedy)

{samples}

## Reproduce
```bash
python -m scripts.bundled_model.build_corpus                                   # data/corpus (CPython {c['corpus']['python']})
python -m scripts.bundled_model.train --out runs/sparse --steps {t['steps']}          # on a GPU
python -m scripts.bundled_model.train --out runs/dense --no-l1 --steps {t['steps']}   # the baseline
python -m scripts.bundled_model.card --sparse runs/sparse --dense runs/dense
```
"""


if __name__ == "__main__":
    sys.exit(main())
