"""Trains a small LLaMA-style ReLU LM on the stdlib corpus with the ProSparse sparsity recipe (see
scripts/bundled_model/training.py), then searches the FATReLU threshold on calibration text, evaluates held-out
perplexity and per-layer FFN sparsity, and exports an HF-format directory (bf16 safetensors + tokenizer).

  python -m scripts.bundled_model.build_corpus                      # once: data/corpus
  python -m scripts.bundled_model.train --out runs/sparse                  # L1 recipe
  python -m scripts.bundled_model.train --out runs/dense --no-l1           # baseline without the L1 term
Smoke run on CPU: add --steps 20 --warmup 2 --batch 2 --seq-len 64 --d-model 64 --layers 2 --d-ff 256
  --compute-dtype float32

Resumable: rerun the same command; it continues from OUT/ckpt. --time-limit-s saves a checkpoint and stops
cleanly, so a long run can span several commands. Logs go to stdout and OUT/log.jsonl; results to
OUT/metrics.json; the model to OUT/model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdsparse_jax.config import ModelConfig
from svdsparse_jax.convert import DTYPES, write_hf_checkpoint
from svdsparse_jax.engine import EngineConfig
from scripts.lab import evaluate_stream
from svdsparse_jax.model import Transformer
from scripts.bundled_model.training import (TrainConfig, bf16_weights, init_state, restore_checkpoint,
                                    sample_batch, save_checkpoint, train_step)
from svdsparse_jax.weights import weight_specs

FATRELU_GRID = (0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--out", required=True)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch", type=int, default=TrainConfig.batch)
    ap.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    ap.add_argument("--no-l1", action="store_true", help="train the baseline without the L1 term")
    ap.add_argument("--l1-target", type=float, default=TrainConfig.l1_target)
    ap.add_argument("--l1-start", type=int, default=TrainConfig.l1_start)
    ap.add_argument("--compute-dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fatrelu-tolerance", type=float, default=0.01,
                    help="largest relative calib-perplexity increase accepted for the FATReLU threshold (0: off)")
    ap.add_argument("--eval-windows", type=int, default=64, help="calibration windows for the threshold search")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=1000)
    ap.add_argument("--time-limit-s", type=float, default=None,
                    help="checkpoint and stop once this command has trained this long (resume by rerunning)")
    ap.add_argument("--max-steps-this-command", type=int, default=None,
                    help="checkpoint and stop after this many steps in this command (resume by rerunning)")
    return ap.parse_args()


def log(out: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def run_training(args, out: Path, cfg: ModelConfig, tc: TrainConfig, train: np.ndarray, t0: float
                 ) -> dict[str, Any] | None:
    """Trains from OUT/ckpt (or from scratch) to tc.steps on the token stream `train`, checkpointing. Returns the
    final state, or None where it stopped at --time-limit-s or --max-steps-this-command first."""
    ckpt_dir = out / "ckpt"
    latest = ckpt_dir / "LATEST"
    if latest.exists():
        state = restore_checkpoint((ckpt_dir / latest.read_text().strip()).absolute(), cfg, tc)
        print(f"resumed from step {int(state['step'])}", flush=True)
    else:
        state = init_state(cfg, tc)

    def checkpoint():
        name = f"step_{int(state['step']):07d}"
        if not (ckpt_dir / name).exists():
            save_checkpoint((ckpt_dir / name).absolute(), state)
        latest.write_text(name)
        for old in ckpt_dir.glob("step_*"):  # keep the latest only
            if old.name != name:
                shutil.rmtree(old)

    engine = EngineConfig.resolve("xla")  # training runs XLA's products on this platform
    step = int(state["step"])
    first_step = step
    while step < tc.steps:
        out_of_time = args.time_limit_s is not None and time.time() - t0 > args.time_limit_s
        out_of_steps = args.max_steps_this_command is not None and step - first_step >= args.max_steps_this_command
        if out_of_time or out_of_steps:
            checkpoint()
            print(f"stopped at step {step} ({'time' if out_of_time else 'step'} limit); rerun the same command "
                  "to resume", flush=True)
            return None
        state, m = train_step(state, jnp.asarray(sample_batch(train, step, tc)), cfg, tc, engine)
        step += 1
        if step % args.log_every == 0 or step == tc.steps:
            m = jax.device_get(m)
            log(out, {"step": step, "loss": round(float(m["loss"]), 4), "ce": round(float(m["ce"]), 4),
                      "ppl": round(float(np.exp(m["ce"])), 3), "l1": float(m["l1"]),
                      "sparsity_mean": round(float(m["sparsity"].mean()), 4),
                      "sparsity": [round(float(s), 3) for s in m["sparsity"]],
                      "grad_norm": round(float(m["grad_norm"]), 3), "elapsed_s": round(time.time() - t0, 1)})
        if step % args.ckpt_every == 0:
            checkpoint()
    checkpoint()
    return state


def threshold_search(args, cfg: ModelConfig, tc: TrainConfig, weights, calib: np.ndarray
                     ) -> tuple[ModelConfig, list[dict]]:
    """ProSparse's last stage, the threshold shift: the largest FATReLU threshold whose calibration perplexity
    stays within the tolerance of plain ReLU. Chosen on calibration text, never on held-out text. Returns the
    chosen config and the search's rows."""
    final_cfg, search = cfg, []
    if tc.l1_target is not None and args.fatrelu_tolerance > 0:
        base = None
        for t in FATRELU_GRID:
            c = dataclasses.replace(cfg, activation="fatrelu", act_threshold=t) if t > 0 else cfg
            r = evaluate_stream(Transformer(c, weights), calib, tc.seq_len, max_windows=args.eval_windows)
            base = base or r.ppl
            search.append({"threshold": t, "calib_ppl": r.ppl, "calib_sparsity": r.mean_sparsity})
            if r.ppl > base * (1 + args.fatrelu_tolerance):
                break
            final_cfg = c
        print(json.dumps({"fatrelu_search": search, "chosen": final_cfg.act_threshold}), flush=True)
    return final_cfg, search


def main() -> int:
    args = parse_args()
    corpus, out = Path(args.corpus), Path(args.out)
    if not 0 <= args.warmup < args.steps:
        print(f"--warmup ({args.warmup}) must be smaller than --steps ({args.steps})", file=sys.stderr)
        return 2
    if not (corpus / "manifest.json").is_file():
        print(f"{corpus}/manifest.json: not found; run python -m scripts.bundled_model.build_corpus first",
              file=sys.stderr)
        return 2
    manifest = json.loads((corpus / "manifest.json").read_text())
    train = np.load(corpus / "train.npy", mmap_mode="r")
    calib, heldout = np.load(corpus / "calib.npy"), np.load(corpus / "heldout.npy")
    cfg = ModelConfig(vocab_size=manifest["vocab_size"], d_model=args.d_model, d_ff=args.d_ff, n_layers=args.layers,
                      n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.d_model // args.heads,
                      activation="relu", rms_eps=1e-5, max_seq_len=args.seq_len, tie_embeddings=True,
                      bos_id=0, eos_ids=(manifest["eos_id"],), model_type="llama")
    tc = TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                     l1_target=None if args.no_l1 else args.l1_target, l1_start=args.l1_start,
                     compute_dtype=args.compute_dtype, seed=args.seed)
    run = {"model": cfg.to_dict(), "train": dataclasses.asdict(tc)}
    out.mkdir(parents=True, exist_ok=True)
    if (out / "run.json").exists():
        if json.loads((out / "run.json").read_text()) != json.loads(json.dumps(run)):
            print(f"{out}/run.json: this output directory holds a run with other settings", file=sys.stderr)
            return 2
    else:
        (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")

    t0 = time.time()
    state = run_training(args, out, cfg, tc, train, t0)
    if state is None:
        return 0  # stopped at a limit, checkpointed: the same command resumes
    train_s = time.time() - t0
    n_params = sum(int(np.prod(s.shape)) for s in weight_specs(cfg))

    dtype = jnp.bfloat16 if args.compute_dtype == "bfloat16" else jnp.float32
    weights = bf16_weights(state, cfg, dtype)
    final_cfg, search = threshold_search(args, cfg, tc, weights, calib)
    model = Transformer(final_cfg, weights)
    held = evaluate_stream(model, heldout, tc.seq_len)
    cal = evaluate_stream(model, calib, tc.seq_len)
    metrics = {
        "params": n_params, "steps": tc.steps, "tokens_seen": tc.steps * tc.batch * tc.seq_len,
        "train_seconds_this_command": round(train_s, 1), "device": jax.devices()[0].device_kind,
        "activation": final_cfg.activation, "act_threshold": final_cfg.act_threshold,
        "heldout": {"tokens": held.tokens, "nll": held.nll, "ppl": held.ppl, "mean_sparsity": held.mean_sparsity,
                    "sparsity": held.sparsity},
        "calib": {"ppl": cal.ppl, "mean_sparsity": cal.mean_sparsity},
        "fatrelu_search": search, "window": tc.seq_len, "eval_dtype": jnp.dtype(dtype).name,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    if (out / "model").exists():
        shutil.rmtree(out / "model")
    write_hf_checkpoint(out / "model", final_cfg, weights, corpus / "tokenizer")
    print(json.dumps({k: metrics[k] for k in ("params", "activation", "act_threshold")} |
                     {"heldout_ppl": held.ppl, "heldout_sparsity": held.mean_sparsity}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
