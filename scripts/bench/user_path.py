"""The user's path of issue 28, step by step, for `scripts/bench/user_path.sh`: what a user would do with a
checkpoint of their own, through the CLI only.

  python -m scripts.bench.user_path checkpoint --shape llama2-7b --out DIR   # a random HF checkpoint
  python -m scripts.bench.user_path calib-files --count 120 --out LIST      # standard-library files, one a line
  python -m scripts.bench.user_path prompts --out DIR                       # 16 code prompts, one a file
  python -m scripts.bench.user_path summary --runs DIR --json-out F         # the generate runs as one report

The checkpoint: the shape's random weights (std 0.02, as `scripts.bench.decode`), a FATReLU gate whose threshold
is the 0.9 quantile of the gate's pre-activation (about 90% of neurons at zero), column j of every W_gate scaled by
(j + 1)^-0.5 (`decode.decay_gate_columns`), written by transformers' `save_pretrained` (safetensors), with the
project's config.json (hidden_act fatrelu, hidden_act_param the threshold) and the bundled model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
from pathlib import Path

from scripts.bench import harness

# Code prompts: the openings of small Python functions and classes, as an editor would send them.
PROMPTS = (
    "def fibonacci(n: int) -> int:\n    \"\"\"The n-th Fibonacci number.\"\"\"\n",
    "import os\n\n\ndef list_python_files(root):\n    for dirpath, dirnames, filenames in os.walk(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n",
    "import json\n\n\ndef load_config(path):\n    with open(path) as f:\n",
    "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n",
    "class LRUCache:\n    def __init__(self, capacity: int):\n        self.capacity = capacity\n",
    "def binary_search(a, x):\n    lo, hi = 0, len(a)\n    while lo < hi:\n",
    "import re\n\nEMAIL = re.compile(r\"[^@]+@[^@]+\")\n\n\ndef valid_email(s):\n",
    "def flatten(nested):\n    out = []\n    for item in nested:\n        if isinstance(item, list):\n",
    "from dataclasses import dataclass\n\n\n@dataclass\nclass Point:\n    x: float\n    y: float\n\n"
    "    def norm(self):\n",
    "def word_counts(text):\n    counts = {}\n    for word in text.split():\n",
    "import argparse\n\n\ndef main():\n    parser = argparse.ArgumentParser(description=\"Copy files\")\n",
    "def merge(a, b):\n    i = j = 0\n    out = []\n    while i < len(a) and j < len(b):\n",
    "class Node:\n    def __init__(self, value, next=None):\n        self.value = value\n",
    "def read_csv(path):\n    import csv\n    with open(path, newline=\"\") as f:\n        reader = csv.reader(f)\n",
)


def write_checkpoint(shape: str, out: Path, inactive: float, gate_decay: float, device: str) -> dict:
    """Writes the random checkpoint described above to `out`; returns what the report records of it."""
    import jax.numpy as jnp

    from scripts.bench.decode import random_weights
    from scripts.bench.transformers import hf_model
    from svdsparse_jax.assets import BUNDLED_MODEL
    from svdsparse_jax.config import named_config, to_hf_config

    tokenizer = json.loads((BUNDLED_MODEL / "tokenizer.json").read_text())
    vocab = max(named_config(shape).vocab_size, len(tokenizer["model"]["vocab"]))  # tiny's 256 is too few
    cfg, weights = random_weights(shape, jnp.bfloat16, inactive, gate_decay, vocab)
    model = hf_model(cfg, weights, device)
    del weights
    model.save_pretrained(out, safe_serialization=True)
    del model
    hf = to_hf_config(cfg)  # the project's config.json: transformers has no FATReLU
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL / name, out / name)
    return {"shape": shape, "act_threshold": cfg.act_threshold, "inactive": inactive, "gate_decay": gate_decay}


def calib_files(count: int) -> list[Path]:
    """The first `count` Python files of the standard library (sorted by path, at least 2 kB each)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size >= 2048)
    if len(files) < count:
        raise SystemExit(f"calib-files: only {len(files)} files of >= 2 kB in {root}")
    return files[:count]


def summary(runs: Path) -> list[dict]:
    """One row per `generate --json` output `runs/gen_b{B}_{mode}_{run}.json` (mode dense or sparse, run 1, 2, ...
    when a mode ran again; `gen_b{B}_{mode}.json` is run 1), with sparse's speed-up over the mean of dense's runs
    at the same batch."""
    rows = []
    for path in runs.glob("gen_b*_*.json"):
        batch, mode, *run = path.stem.removeprefix("gen_b").split("_")
        out = json.loads(path.read_text())
        rows.append({"batch": int(batch), "mode": mode, "run": int(run[0]) if run else 1,
                     "tokens_per_s": round(out["tokens_per_s"], 1),
                     "new_tokens": out["new_tokens"], "run_s": round(out["run_s"], 3),
                     "compile_s": round(out["compile_s"], 1), "sparse_layers": out["sparse_layers"],
                     "finish": sorted({s["finish_reason"] for r in out["results"] for s in r["samples"]})})
    rows.sort(key=lambda r: (r["batch"], r["mode"], r["run"]))
    dense = {}
    for r in rows:
        if r["mode"] == "dense":
            dense.setdefault(r["batch"], []).append(r["tokens_per_s"])
    for r in rows:
        if r["mode"] == "sparse" and dense.get(r["batch"]):
            r["x_dense"] = round(r["tokens_per_s"] / (sum(dense[r["batch"]]) / len(dense[r["batch"]])), 3)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--inactive", type=float, default=0.9, help="FATReLU threshold at this quantile of the gate")
    p.add_argument("--gate-decay", type=float, default=0.5)
    p.add_argument("--device", default="cuda", help="torch device the transformers model is built on")
    p = sub.add_parser("calib-files")
    p.add_argument("--count", type=int, default=120)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("summary")
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--checkpoint-info", type=Path, help="the checkpoint step's JSON")
    p.add_argument("--compile-cache", choices=["off", "on"], default="on",
                   help="whether the runs used the persistent compilation cache (recorded in the report)")
    p.add_argument("--preallocate", choices=["off", "on"], default="off",
                   help="whether the runs preallocated JAX's GPU memory (recorded in the report)")
    harness.add_report_args(p)
    args = ap.parse_args()
    if args.step == "checkpoint":
        info = write_checkpoint(args.shape, args.out, args.inactive, args.gate_decay, args.device)
        (args.out.parent / "checkpoint_info.json").write_text(json.dumps(info) + "\n")
        print(json.dumps(info))
    elif args.step == "calib-files":
        args.out.write_text("".join(f"{p}\n" for p in calib_files(args.count)))
    elif args.step == "prompts":
        args.out.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(PROMPTS):
            (args.out / f"prompt_{i:02d}.py").write_text(text)
    else:
        rows = summary(args.runs)
        info = json.loads(args.checkpoint_info.read_text()) if args.checkpoint_info else {}
        build = args.runs / "build.json"
        build_info = {}
        if build.exists():
            b = json.loads(build.read_text())
            build_info = {"build_timings_s": b["timings"], "build_config": b["config"],
                          "calib_recall": round(sum(x["calib_recall"] for x in b["layers"]) / len(b["layers"]), 4),
                          "calib_predicted_sparsity": round(sum(x["calib_predicted_sparsity"] for x in b["layers"])
                                                            / len(b["layers"]), 4),
                          "build_layers": b["layers"], "union_rows": b.get("union_rows")}
        copy_rate = harness.torch_copy_rate()
        rep = harness.report(args, copy_tb_per_s=copy_rate and round(copy_rate / 1e12, 3), checkpoint=info,
                             compile_cache=args.compile_cache, preallocate=args.preallocate,
                             **build_info, runs=rows)
        harness.save(rep, args.json_out)
        print(harness.table(rows, {"batch": "batch", "mode": "mode", "run": "run", "tok/s": "tokens_per_s",
                                   "new tokens": "new_tokens", "run s": "run_s", "sparse layers": "sparse_layers",
                                   "x dense": "x_dense"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
