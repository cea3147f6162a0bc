"""Training: resuming from a checkpoint continues exactly; the L1 factor follows the sparsity; the script runs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from svdsparse_jax.assets import BUNDLED_MODEL
from svdsparse_jax.config import named_config
from scripts.bundled_model.training import (TrainConfig, init_state, restore_checkpoint, sample_batch, save_checkpoint,
                                    train_step)

ROOT = Path(__file__).resolve().parents[1]
CFG = named_config("tiny", max_seq_len=64)
TC = TrainConfig(steps=50, batch=2, seq_len=32, warmup=2, l1_start=2, l1_target=0.95, l1_rate=0.5,
                 compute_dtype="float32")


def _run(state, data, first, last):
    for step in range(first, last):
        state, m = train_step(state, jnp.asarray(sample_batch(data, step, TC)), CFG, TC)
    return state, m


def test_resume_is_exact(tmp_path, rng):
    data = rng.integers(0, CFG.vocab_size, 4000).astype(np.uint16)
    straight, _ = _run(init_state(CFG, TC), data, 0, 6)
    half, _ = _run(init_state(CFG, TC), data, 0, 3)
    save_checkpoint(tmp_path / "ck", half)
    resumed, _ = _run(restore_checkpoint(tmp_path / "ck", CFG, TC), data, 3, 6)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), straight, resumed)
    assert jax.tree_util.tree_all(same)


def test_l1_factor_rises_while_below_target_and_is_off_without_l1(rng):
    data = rng.integers(0, CFG.vocab_size, 4000).astype(np.uint16)
    state, m = _run(init_state(CFG, TC), data, 0, 8)
    assert float(m["sparsity"].mean()) < TC.l1_target
    assert float(state["l1"]) > float(m["l1"]) > 0  # still rising
    no_l1 = TrainConfig(**{**TC.__dict__, "l1_target": None})
    s = init_state(CFG, no_l1)
    for step in range(4):
        s, _ = train_step(s, jnp.asarray(sample_batch(data, step, no_l1)), CFG, no_l1)
    assert float(s["l1"]) == 0.0


def test_train_script_smoke_resume_and_export(tmp_path, rng):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    vocab = json.loads((BUNDLED_MODEL / "config.json").read_text())["vocab_size"]
    for name, n in (("train", 20000), ("calib", 3000), ("heldout", 3000)):
        np.save(corpus / f"{name}.npy", rng.integers(0, vocab, n).astype(np.uint16))
    (corpus / "manifest.json").write_text(json.dumps({"vocab_size": vocab, "eos_id": 1}))
    (corpus / "tokenizer").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL / f, corpus / "tokenizer" / f)
    cmd = [sys.executable, "-m", "scripts.bundled_model.train", "--corpus", str(corpus),
           "--out", str(tmp_path / "run"), "--steps", "12", "--warmup", "2", "--batch", "2", "--seq-len", "32",
           "--d-model", "32", "--layers", "2", "--heads", "2", "--kv-heads", "2", "--d-ff", "64",
           "--compute-dtype", "float32", "--l1-start", "2", "--log-every", "4", "--eval-windows", "4"]
    first = subprocess.run(cmd + ["--max-steps-this-command", "5"], capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0 and "stopped at step 5" in first.stdout, first.stderr
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0 and "resumed from step 5" in second.stdout, second.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 12 and len(metrics["heldout"]["sparsity"]) == 2
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == [4, 8, 12]
    from svdsparse_jax.convert import load_model
    assert load_model(tmp_path / "run" / "model").cfg.n_layers == 2
