"""Builds the offline training corpus: the running interpreter's standard-library sources split by module
(rule in scripts/bundled_model/corpus.py), a byte-level BPE tokenizer trained on the train split only, and the token
arrays (uint16, documents separated by the EOS token) of each split.

  python -m scripts.bundled_model.build_corpus [--out data/corpus] [--vocab-size 8192]

Writes OUT/{train,calib,heldout}.npy, OUT/tokenizer/ (loads with AutoTokenizer.from_pretrained) and
OUT/manifest.json (Python version, split rule, module lists with content hashes, token counts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

from scripts.bundled_model.corpus import SPLITS, list_modules, read_source, stdlib_dir, train_bpe_tokenizer
from svdsparse_jax.fsutil import atomic_directory

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        print(f"{out}: already exists; remove it to rebuild", file=sys.stderr)
        return 2
    if args.vocab_size > 65535:
        print("--vocab-size must fit uint16", file=sys.stderr)
        return 2
    modules = list_modules()
    texts = {s: [read_source(p) for _, p in modules[s]] for s in SPLITS}
    tok = train_bpe_tokenizer(texts["train"], args.vocab_size)
    with atomic_directory(out) as tmp:
        tok.save_pretrained(tmp / "tokenizer")
        manifest = {"python": platform.python_version(), "stdlib": str(stdlib_dir()),
                    "split_rule": "sha256(module)[:8] % 100: 0-89 train, 90-94 calib, 95-99 heldout",
                    "vocab_size": len(tok), "eos_id": tok.eos_token_id, "splits": {}}
        for s in SPLITS:
            ids = tok(texts[s], add_special_tokens=False)["input_ids"]
            flat = np.concatenate([np.asarray(x + [tok.eos_token_id], np.uint16) for x in ids])
            np.save(tmp / f"{s}.npy", flat)
            manifest["splits"][s] = {
                "tokens": int(flat.size), "modules": len(modules[s]),
                "files": {m: hashlib.sha256(t.encode()).hexdigest()[:16] for (m, _), t in zip(modules[s], texts[s])}}
            print(f"{s:8s} {len(modules[s]):5d} modules {flat.size:10d} tokens")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
