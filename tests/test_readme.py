"""The README's Python snippets run as written (in order, in a fresh interpreter, in an empty directory), and
print what they say: the JAX snippet's dense text equals `svdsparse generate`'s greedy text, and the torch
snippet's patched transformers model decodes the JAX sparse model's greedy tokens."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_snippets_run_as_written(tmp_path):
    jax_snippet, torch_snippet = python_snippets()[:2]  # the third (serve) runs in tests/test_server.py
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = [sys.executable, "-c"]
    out = subprocess.run(run + [jax_snippet], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "predictors" / "manifest.json").is_file()
    greedy = subprocess.run(run + ["import sys; from svdsparse_jax.cli import main; sys.exit(main(sys.argv[1:]))",
                                   "generate", "--prompt", "def read_config(path):\n", "--max-new-tokens", "48",
                                   "--json"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert greedy.returncode == 0, greedy.stderr[-3000:]
    dense_text = json.loads(greedy.stdout)["results"][0]["samples"][0]["text"]
    assert out.stdout.startswith(dense_text + "\n") and out.stdout.rstrip().endswith(("length", "eos"))
    # the torch snippet, with its sparse tokens checked against the JAX sparse model (greedy, f32)
    check = torch_snippet + """
from svdsparse_jax import session
jax_model = session.load(BUNDLED_MODEL, dtype="float32", predictors="predictors", kernels="xla", ffn_policy="sparse")
ours = jax_model.generator().generate([input_ids[0].tolist()], 48).tokens[0]
print("SAME" if out[0, input_ids.shape[1]:].tolist()[:len(ours)] == ours else "DIFFERENT")
"""
    out = subprocess.run(run + [check], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.rstrip().endswith("SAME"), out.stdout
