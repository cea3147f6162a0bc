"""The CLI contracts: generate/score/convert outputs, and one-line errors without tracebacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import make_hf_checkpoint
from svdsparse_jax.cli import main



@pytest.fixture
def tiny_with_tokenizer(tmp_path, seed):
    return make_hf_checkpoint(tmp_path / "tiny", "llama_relu", seed=seed, tokenizer=True).path


def test_convert_then_generate_json_matches_transformers(tmp_path, capsys, seed):
    ckpt = make_hf_checkpoint(tmp_path / "hf", "mistral_gqa", seed=seed)
    assert main(["convert", str(ckpt.path), str(tmp_path / "conv"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    prompt = [3, 17, 40, 99, 5]
    assert main(["generate", str(tmp_path / "conv"), "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", "32", "--greedy", "--dtype", "float32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        ref = ckpt.torch_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    assert out["prompt_ids"] == prompt and out["output_ids"] == ref[0, len(prompt):].tolist()
    assert out["text"] is None and out["tokens_per_s"] > 0


def test_generate_and_score_text(tiny_with_tokenizer, tmp_path, capsys):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    assert main(["generate", str(tiny_with_tokenizer), "--prompt", "import os", "--max-new-tokens", "8",
                 "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_ids"] == tok("import os")["input_ids"] and len(out["output_ids"]) == 8
    assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return os.path.join(x, 'y')\n")
    assert main(["score", str(tiny_with_tokenizer), "--text-file", str(text), "--dtype", "float32", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    n = len(tok(text.read_text())["input_ids"])
    assert s["tokens"] == n and len(s["logprobs"]) == n - 1
    assert np.isclose(s["ppl"], np.exp(s["nll"])) and np.isclose(s["nll"], -np.mean(s["logprobs"]))


@pytest.mark.parametrize("argv, message", [
    (["generate", "/no/such/dir", "--prompt-ids", "1,2"], "/no/such/dir: not a directory"),
    (["score", "MODEL", "--text-file", "/no/such/file"], "/no/such/file: cannot read"),
    (["generate", "MODEL", "--prompt-ids", "1,2", "--max-new-tokens", "1000"], "exceeds the model's context"),
    (["generate", "MODEL", "--prompt", "hi"], "has no tokenizer files"),
    (["convert", "MODEL", "MODEL"], "already exists"),
])
def test_errors_are_one_line(tmp_path, argv, message, seed):
    ckpt = make_hf_checkpoint(tmp_path / "hf", "llama_relu", seed=seed)
    argv = [str(ckpt.path) if a == "MODEL" else a for a in argv]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "svdsparse_jax.cli", *argv], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and message in lines[-1] and "Traceback" not in r.stderr, r.stderr


def test_build_predictors_eval_and_sparse_generate_on_the_bundled_model(tmp_path, capsys, seed):
    out = tmp_path / "preds"
    assert main(["build-predictors", "--out", str(out), "--rank", "32", "--s", "0.6", "--tokens", "2048",
                 "--dtype", "float32", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["config"]["method"] == "whitened" and len(built["layers"]) == 8
    assert main(["eval", "--predictors", str(out), "--max-windows", "2", "--dtype", "float32", "--json",
                 "--plots", str(tmp_path / "plots"), "--batch-sizes", "1,2", "--ffn-policy", "sparse"]) == 0
    rep = json.loads(capsys.readouterr().out)
    one, two = rep["batches"]
    # one sequence reads its own rows; two read their union, and each still keeps only its own candidates, so
    # with every layer sparse the accuracy is the same at every batch size
    assert one["gate_rows_union"] == pytest.approx(rep["summary"]["gate_rows_read"], rel=1e-6)
    assert two["gate_rows_union"] > one["gate_rows_union"] and two["up_down_rows_union"] > one["up_down_rows_union"]
    assert main(["eval", "--predictors", str(out), "--max-windows", "2", "--batch-sizes", "1,4"]) == 2
    assert "--batch-sizes 4: expected 1 <= B <= 2" in capsys.readouterr().err
    for b in (one, two):
        assert b["sparse_layers"] == 8 and b["ppl"] == pytest.approx(rep["summary"]["ppl_sparse"], rel=1e-9)
        assert b["top1_agreement"] == pytest.approx(rep["summary"]["top1_agreement"])
    for key in ("true_sparsity", "predicted_sparsity", "recall", "precision", "auroc", "ppl_dense", "ppl_sparse",
                "top1_agreement", "rows_read_fraction"):
        assert 0 <= rep["summary"][key] < float("inf"), key
    assert len(rep["layers"]) == 8 and len(list((tmp_path / "plots").glob("*.png"))) == 3
    assert rep["summary"]["recall"] > 0.9 and rep["summary"]["auroc"] > 0.9
    generated = []
    for kernels in ("xla", "interpret"):  # the engine picked at the edge: the kernels, interpreted, decode alike
        assert main(["generate", "--predictors", str(out), "--prompt", "import os\n", "--max-new-tokens", "8",
                     "--dtype", "float32", "--json", "--kernels", kernels, "--ffn-policy", "sparse"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["sparse_layers"] == 8
        generated.append(result["output_ids"])
    assert generated[0] == generated[1] and len(generated[0]) <= 8
    # predictors of another model are refused
    other = make_hf_checkpoint(tmp_path / "hf", "llama_relu", seed=seed)
    code = main(["generate", str(other.path), "--predictors", str(out), "--prompt-ids", "1,2"])
    assert code == 2 and "predictors for" in capsys.readouterr().err


def test_demo_runs(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "top-1 agreement" in out and "sparse:" in out
