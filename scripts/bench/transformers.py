"""What users would otherwise run: transformers' decode speed on the same random weights as `scripts.bench.decode`
(same seed, shape and dtype; the JAX arrays are handed to torch without a copy), eager and with its static cache
+ automatic compile, greedy, batch 1. Decode tok/s is measured as ours is: the time of N new tokens minus the time
of 1, over N - 1 steps (medians of repeats). The model runs ReLU MLPs (transformers has no FATReLU; the speed of a
dense step does not depend on the activation's values).

  python -m scripts.bench.transformers --shape llama2-7b [--modes eager static] [--new-tokens 128] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax.numpy as jnp

from scripts.bench import bytes as decode_bytes
from scripts.bench import harness
from svdsparse_jax.config import NAMED_SHAPES, ModelConfig
from svdsparse_jax.weights import weight_specs


def hf_config(cfg: ModelConfig):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        cfg.model_type if cfg.model_type != "sparsellama" else "llama", vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        hidden_act="relu", rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta, max_position_embeddings=4096,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias, sliding_window=None,
        use_sliding_window=False)


def hf_model(cfg: ModelConfig, weights: dict, device: str):
    """A transformers causal LM on `device` whose parameters are the JAX arrays `weights` (shared through DLPack;
    W_down_t transposed back to down_proj's layout)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.bfloat16)
    state = {}
    for spec in weight_specs(cfg):
        t = torch.from_dlpack(weights[spec.path])
        state[spec.hf_name] = t.T.contiguous() if spec.hf_transposed else t
    model.load_state_dict(state, strict=True, assign=True)  # the random init's tensors are freed
    return model.eval()


def decode_rate(model, prompt, new_tokens: int, repeats: int, **generate_kw) -> tuple[float, float]:
    """(decode tok/s, end-to-end tok/s) of greedy generate at batch 1."""
    import torch

    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)

    def run(n: int) -> float:
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **generate_kw)
        sync()
        assert out.shape[1] == prompt.shape[1] + n
        return time.perf_counter() - t

    run(new_tokens), run(1)  # warm-up (and compilation, with the static cache)
    full = statistics.median(run(new_tokens) for _ in range(repeats))
    one = statistics.median(run(1) for _ in range(repeats))
    return (new_tokens - 1) / (full - one), new_tokens / full


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["llama2-7b"], choices=sorted(NAMED_SHAPES))
    ap.add_argument("--modes", nargs="+", default=["eager", "static"], choices=["eager", "static"])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--eager-new-tokens", type=int, default=32, help="fewer for eager, which is slow")
    ap.add_argument("--repeats", type=int, default=3)
    harness.add_report_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX holds the weights; torch the rest
    import torch
    import transformers

    from scripts.bench.decode import random_weights

    copy_rate = harness.torch_copy_rate()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for shape in args.shape:
        cfg, weights = random_weights(shape, jnp.bfloat16, None, 0.0)
        model = hf_model(cfg, weights, device)
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
        prompt = prompt.to(device)
        for mode in args.modes:
            n = args.new_tokens if mode == "static" else args.eager_new_tokens
            kw = harness.hf_cache_kwargs(mode)
            decode, e2e = decode_rate(model, prompt, n, args.repeats, **kw)
            step_bytes = decode_bytes.step_bytes(cfg, 2, 1, args.prompt_len + n)
            row = {"shape": shape, "mode": mode, "new_tokens": n, "prompt_len": args.prompt_len,
                   "decode_tokens_per_s": round(decode, 1), "end_to_end_tokens_per_s": round(e2e, 1),
                   "decode_step_ms": round(1e3 / decode, 3), "gb_per_step": round(step_bytes / 1e9, 4),
                   "decode_tb_per_s": round(step_bytes * decode / 1e12, 3)}
            if copy_rate:
                row["fraction_of_copy"] = round(step_bytes * decode / copy_rate, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, weights
    rep = harness.report(args, copy_tb_per_s=copy_rate and round(copy_rate / 1e12, 3), torch=torch.__version__,
                         transformers=transformers.__version__, runs=rows)
    harness.save(rep, args.json_out)
    print(f"\n{rep['device']}  torch copy {rep['copy_tb_per_s']} TB/s  transformers {transformers.__version__}")
    print(harness.table(rows, {"shape": "shape", "mode": "mode", "decode tok/s": "decode_tokens_per_s",
                               "step ms": "decode_step_ms", "TB/s": "decode_tb_per_s", "of copy": "fraction_of_copy"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
