#!/usr/bin/env python
"""Writes a tiny random ReLU LLaMA in Hugging Face format (model.safetensors, config.json) with a real
byte-level BPE tokenizer trained offline on a standard-library source file, so `svdsparse generate --prompt`
works before the bundled model exists. Usage: python scripts/make_tiny_checkpoint.py OUT_DIR [--seed S]
"""

import argparse
import inspect
import json
import os
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=512)
    args = ap.parse_args()
    out = Path(args.out_dir)
    if out.exists():
        print(f"{out}: already exists", file=sys.stderr)
        return 2

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from svdsparse_jax.corpus import train_bpe_tokenizer

    hf_tok = train_bpe_tokenizer([inspect.getsource(os)], args.vocab_size)

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act="relu", max_position_embeddings=512,
                      bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, initializer_range=0.05)
    LlamaForCausalLM(cfg).save_pretrained(out)
    hf_tok.save_pretrained(out)
    print(json.dumps({"out": str(out), "vocab_size": len(hf_tok)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
